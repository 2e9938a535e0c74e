"""`provenance optout`: register, list, remove and export do-not-train opt-outs (provenance.registry)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, cast

import typer

from provenance.errors import ProvenanceError

optout_app = typer.Typer(
    help="The do-not-train registry: opt-outs by content, id, URL and domain.", no_args_is_help=True
)

RegistryOpt = Annotated[Path, typer.Option("--registry", "-r", help="Registry file (SQLite; made on first add).")]


def _cli() -> ModuleType:
    from provenance import cli

    return cli


@optout_app.command("add")
def optout_add(
    registry: RegistryOpt,
    index: Annotated[
        Path | None,
        typer.Option(
            "--index",
            "-i",
            help="Index to count the covered items of (needed with --image: its models fingerprint the image).",
        ),
    ] = None,
    image: Annotated[
        Path | None, typer.Option("--image", help="Opt out this artwork and every exact or replica copy of it.")
    ] = None,
    item_id: Annotated[str | None, typer.Option("--id", help="Opt out a corpus item id.")] = None,
    url: Annotated[str | None, typer.Option("--url", help="Opt out an image URL.")] = None,
    domain: Annotated[
        str | None, typer.Option("--domain", help="Opt out every URL of a domain and its subdomains.")
    ] = None,
    claimant: Annotated[str | None, typer.Option(help="Who claims it (name, e-mail...).")] = None,
    prove: Annotated[
        bool,
        typer.Option(
            "--prove",
            help="--domain: fetch https://DOMAIN/.well-known/provenance-optout.txt now and record ownership as shown (fails if the token is not there).",
        ),
    ] = False,
    allow_private_addresses: Annotated[
        bool, typer.Option(help="--prove: allow a private or loopback address (tests, intranets).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Register one opt-out; with --index, print how many indexed items it covers."""
    from provenance.registry import (
        NewOptout,
        OptoutKind,
        ProofOptions,
        Registry,
        content_print,
        coverage,
    )

    cli = _cli()
    cli._setup_logging(verbose)
    given = {k: v for k, v in (("image", image), ("id", item_id), ("url", url), ("domain", domain)) if v is not None}
    if len(given) != 1:
        cli._fail(typer.BadParameter("give exactly one of --image, --id, --url, --domain"))
    if image is not None and index is None:
        cli._fail(typer.BadParameter("--image needs --index: the index's own SSCD/PDQ models fingerprint the image"))
    if prove and domain is None:
        cli._fail(typer.BadParameter("--prove goes with --domain"))
    try:
        idx = searcher = content = None
        if index is not None:
            from provenance.search import Searcher

            searcher = Searcher.open(index)
            idx = searcher.index
        if image is not None:
            from provenance.images import read_bytes

            assert searcher is not None  # --image needs --index, checked above
            content = content_print(read_bytes(str(image)), searcher, str(image))
            entry = NewOptout("content", content=content, claimant=claimant)
        else:
            kind, value = next(iter(given.items()))
            entry = NewOptout(cast("OptoutKind", kind), str(value), claimant=claimant, prove=prove)
        with Registry(registry) as reg:
            o = reg.add(entry, proof=ProofOptions(allow_private_addresses=allow_private_addresses))
            covered = coverage(reg, idx, o, content) if idx is not None else None
            token = reg.domain_token(o.value) if o.kind == "domain" else None
    except ProvenanceError as e:
        cli._fail(e, cli._index_error_code(e))
    if as_json:
        cli.out.print_json(json.dumps({"optout": o.to_dict(), "covered": covered, "token": token}))
        return
    cli.out.print(f"opt-out {o.id}: {o.kind} {o.value} ({o.ownership})")
    if covered is not None:
        shown = ", ".join(covered[:10]) + (" ..." if len(covered) > 10 else "")
        cli.out.print(f"covers {len(covered)} indexed item(s) in {index}" + (f": {shown}" if covered else ""))
    if token and o.ownership != "shown":
        cli.out.print(
            f"to show you own {o.value}, serve this line at https://{o.value}/.well-known/"
            f"provenance-optout.txt and run again with --prove:\n{token}"
        )


@optout_app.command("list")
def optout_list(
    registry: RegistryOpt,
    kind: Annotated[str | None, typer.Option(help="content | id | url | domain")] = None,
    audit: Annotated[bool, typer.Option("--audit", help="Show the audit log instead (newest first).")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List the opt-outs (or the audit log)."""
    from rich.table import Table

    from provenance.registry import Registry

    cli = _cli()
    try:
        with Registry(registry, create=False) as reg:
            rows = reg.audit_log() if audit else [o.to_dict() for o in reg.iter_all(kind)]
    except ProvenanceError as e:
        cli._fail(e)
    if as_json:
        cli.out.print_json(json.dumps(rows))
        return
    cols = (
        ("seq", "at", "action", "optout_id", "kind", "value", "key_id")
        if audit
        else ("id", "kind", "value", "ownership", "claimant", "key_id", "created_at")
    )
    t = Table(*cols)
    for r in rows:
        t.add_row(*[str(r.get(c) if r.get(c) is not None else "-") for c in cols])
    cli.out.print(t)


@optout_app.command("remove")
def optout_remove(
    registry: RegistryOpt,
    optout_id: Annotated[str, typer.Argument(help="The opt-out id (from `optout list`).")],
) -> None:
    """Remove an opt-out (the command line acts as the registry's owner; the audit log keeps the record)."""
    from provenance.registry import Registry

    cli = _cli()
    try:
        with Registry(registry, create=False) as reg:
            o = reg.remove(optout_id, admin=True)
    except ProvenanceError as e:
        cli._fail(e)
    cli.console.print(f"[green]removed[/] opt-out {o.id} ({o.kind} {o.value})")


@optout_app.command("export")
def optout_export(
    registry: RegistryOpt,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="urls (an img2dataset blocklist) | ids | sha256 | parquet")
    ] = "urls",
    index: Annotated[
        Path | None,
        typer.Option("--index", "-i", help="Also list the covered items of this index (by content, domain...)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here (default: stdout; parquet needs a file).")
    ] = None,
) -> None:
    """Export the opt-outs, one value a line (or a Parquet table)."""
    from provenance.registry import Registry

    cli = _cli()
    if fmt not in ("urls", "ids", "sha256", "parquet"):
        cli._fail(typer.BadParameter(f"--format must be urls, ids, sha256 or parquet, not {fmt!r}"))
    if fmt == "parquet" and output is None:
        cli._fail(typer.BadParameter("--format parquet needs --output FILE"))
    try:
        idx = None
        if index is not None:
            from provenance.store import ProvenanceIndex

            idx = ProvenanceIndex.open(index)
        with Registry(registry, create=False) as reg:
            if fmt == "parquet":
                assert output is not None  # checked above
                n = reg.export_parquet(output, idx)
            else:
                n = 0
                with open(output, "w", encoding="utf-8") if output else contextlib.nullcontext(sys.stdout) as f:
                    for line in reg.export_lines(fmt, idx):
                        f.write(line + "\n")
                        n += 1
    except ProvenanceError as e:
        cli._fail(e, cli._index_error_code(e))
    if output is not None:
        cli.console.print(f"wrote {n} {fmt} row(s) to {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(optout_app, name="optout")
