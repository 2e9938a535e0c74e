"""Command-line flags made from the fields of `ScanOptions`: a new option appears as `--new-option`, with its
description as its help text, in `provenance scan` and `provenance serve` without declaring it again."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Optional

import annotated_types
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from provenance.options import ScanOptions


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def scan_option_parameters(unset_default: bool = False) -> list[inspect.Parameter]:
    """One keyword-only typer parameter per ScanOptions field that the command line shows.

    unset_default: every flag defaults to None ("not given"), so a caller can tell the flags given from the
    others (`serve` lets them override the server settings, which read the environment).
    """
    params = []
    for name, f in ScanOptions.model_fields.items():
        decl = ScanOptions.meta(name).get("cli")
        if decl is False:
            continue
        base = _without_none(f.annotation)
        if base is bool and decl is None:
            # an option on by default needs its --no- form; one off by default is a plain flag
            decl = f"{_flag(name)}/--no-{name.replace('_', '-')}" if f.default is not False else _flag(name)
        kwargs: dict[str, Any] = {"help": f.description}
        for m in f.metadata:  # ranges from Field(ge=..., le=...)
            if isinstance(m, annotated_types.Ge):
                kwargs["min"] = m.ge
            elif isinstance(m, annotated_types.Le):
                kwargs["max"] = m.le
        default = None if unset_default else f.default
        kind = Optional[base] if default is None else base
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, typer.Option(decl or _flag(name), **kwargs)],
            )
        )
    return params


def with_scan_options(unset_default: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command that takes `scan_options: dict`: the command gets one flag per ScanOptions field,
    and receives their values (None = not given, with unset_default) in that dict. A parameter of the command's own
    keeps its name, and hides the scan option of that name."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "scan_options"
        ]
        # a parameter of the command's own wins over a scan option of the same name (serve's --workers are processes)
        taken = {p.name for p in own}
        extra = [p for p in scan_option_parameters(unset_default) if p.name not in taken]
        names = [p.name for p in extra]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names if n in kwargs}
            return func(scan_options=values, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + extra
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must read the signature above, not the function's own
        return command

    return wrap


def _without_none(annotation: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def progress_bar(label: str, console: Console, *, transient: bool = True) -> Progress:
    """The commands' one progress bar: spinner, label, bar, done/total and elapsed time, on `console`."""
    return Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )
