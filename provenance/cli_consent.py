"""The `provenance consent` commands: read AI-training reservations for URLs and image files, and print them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True)
out = Console(soft_wrap=True)
EXIT_USAGE, EXIT_UNREADABLE = 2, 3  # the main CLI's codes

consent_app = typer.Typer(help="Read machine-readable do-not-train reservations (TDMRep, robots.txt, ai.txt, C2PA, IPTC).",
                          no_args_is_help=True)  # fmt: skip
_COLOURS = {"not_allowed": "red", "constrained": "yellow", "allowed": "green", "unknown": "dim"}


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)  # fmt: skip


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(EXIT_USAGE)


@consent_app.command("check")
def check(
    urls: Annotated[Optional[list[str]], typer.Argument(help="http(s) URLs of images or pages.")] = None,
    file: Annotated[
        Optional[Path],
        typer.Option("--file", "-f", help="A file of URLs, one per line (# comments and blank lines skipped)."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON: a list of {url, consent}.")] = False,
    cache: Annotated[
        Optional[Path],
        typer.Option(help="SQLite cache of fetched files (default: ~/.cache/provenance/consent.sqlite)."),
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")] = False,
    ttl_hours: Annotated[
        float, typer.Option(min=0.001, help="How long a fetched file stays fresh in the cache.")
    ] = 24.0,
    offline: Annotated[bool, typer.Option(help="Answer from the cache only; fetch nothing.")] = False,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            "--allow-private-addresses",
            help="Also fetch from private, loopback and link-local addresses (off: an SSRF guard).",
        ),
    ] = False,
    per_host: Annotated[int, typer.Option(min=1, help="Concurrent requests to one host.")] = 2,
    rate: Annotated[float, typer.Option(min=0.0, help="Requests per second to one host (0 = no limit).")] = 2.0,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds allowed to connect and read each response.")] = 10.0,
    workers: Annotated[int, typer.Option(min=1, help="Concurrent requests in all.")] = 8,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Check URLs for TDMRep, X-Robots-Tag noai, ai.txt and AI-crawler robots.txt reservations."""
    from provenance.consent import Fetcher, FetchOptions, url_consent
    from provenance.errors import ProvenanceError

    _setup_logging(verbose)
    todo = list(urls or [])
    if file is not None:
        try:
            lines = file.read_text("utf-8", errors="replace").splitlines()
        except OSError as e:
            _fail(f"{file}: cannot read the URL list ({e.strerror or e})")
        todo += [s for line in lines if (s := line.strip()) and not s.startswith("#")]
    if not todo:
        _fail("give URLs as arguments or --file urls.txt")
    try:
        options = FetchOptions(
            timeout_s=timeout, max_per_host=per_host, per_host_rate=rate, workers=workers,
            allow_private_addresses=allow_private_addresses, cache_path=cache, use_cache=not no_cache,
            ttl_s=ttl_hours * 3600.0, offline=offline,
        )  # fmt: skip
        fetcher = Fetcher(options)
    except (ValueError, ProvenanceError) as e:
        _fail(f"{e}")
    with fetcher:
        try:
            answers = url_consent(todo, fetcher)
        except ProvenanceError as e:  # e.g. httpx not installed: pip install 'provenance[consent]'
            _fail(f"{e}")
    if json_out:
        sys.stdout.write(json.dumps([{"url": u, "consent": c.to_dict()} for u, c in answers.items()]) + "\n")
        return
    table = Table("URL", "training", "signals", show_lines=False)
    for url, c in answers.items():
        shown = "; ".join(f"{s.source}: {s.value}" + (" (overridden)" if s.overridden_by else "") for s in c.signals)
        table.add_row(url, f"[{_COLOURS[c.training]}]{c.training}[/]", shown or "-")
    out.print(table)


@consent_app.command("file")
def file_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files.")],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON: a list of {path, consent} or {path, error}.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Read the C2PA/CAWG training-mining assertions and IPTC/PLUS data-mining XMP of image files."""
    from provenance.consent import read_file_consent
    from provenance.errors import UnreadableImageError
    from provenance.images import read_bytes

    _setup_logging(verbose)
    results: list[dict[str, Any]] = []
    failed = False
    for p in paths:
        try:
            results.append({"path": str(p), "consent": read_file_consent(read_bytes(p)).to_dict()})
        except UnreadableImageError as e:
            failed = True
            results.append({"path": str(p), "error": str(e)})
    if json_out:
        sys.stdout.write(json.dumps(results) + "\n")
    else:
        table = Table("file", "training", "signals")
        for r in results:
            if "error" in r:
                table.add_row(r["path"], "[red]error[/]", r["error"])
                continue
            c = r["consent"]
            table.add_row(r["path"], f"[{_COLOURS[c['training']]}]{c['training']}[/]",
                          "; ".join(f"{s['source']}: {s['value']}" for s in c["signals"]) or "-")  # fmt: skip
        out.print(table)
    if failed:
        raise typer.Exit(EXIT_UNREADABLE)


def register(app: typer.Typer) -> None:
    app.add_typer(consent_app, name="consent")
