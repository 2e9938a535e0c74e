"""The `provenance serve` command: runs the JSON API and web page (provenance.api) under uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from provenance.cli_options import with_scan_options

console = Console(stderr=True)
EXIT_USAGE = 2  # the main CLI's code for bad input


@with_scan_options(unset_default=True)
def serve_command(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory to serve (e.g. indexes/coco).")],
    host: Annotated[
        str, typer.Option(help="Interface to listen on (0.0.0.0 exposes the server to the network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads its own models (RAM x N).")] = 1,
    max_upload_mb: Annotated[Optional[float], typer.Option(help="Largest upload accepted, in MB (default 20).")] = None,
    keep_uploads: Annotated[
        Optional[Path],
        typer.Option(help="Keep scanned uploads and their records in this folder (default: keep nothing)."),
    ] = None,
    cors_origins: Annotated[
        Optional[str], typer.Option(help="Comma-separated origins allowed to call the API from a browser.")
    ] = None,
    scan_batch: Annotated[
        Optional[int],
        typer.Option(
            min=0, help="Most queued scans run as one batch (default 1 = no micro-batching; 0 = no scan queue)."
        ),
    ] = None,
    scan_workers: Annotated[Optional[int], typer.Option(min=1, help="Scan threads (default 2).")] = None,
    torch_threads: Annotated[
        Optional[int],
        typer.Option(min=0, help="torch threads per model call (default 1; 0 = torch's default, all cores)."),
    ] = None,
    registry: Annotated[
        Optional[Path],
        typer.Option(help="Do-not-train registry for /v1/optout and /v1/consent/check (PROVENANCE_REGISTRY)."),
    ] = None,
    allow_anonymous_writes: Annotated[
        Optional[bool],
        typer.Option(
            "--allow-anonymous-writes", help="Without API keys, accept opt-out writes from anyone (default: refused)."
        ),
    ] = None,
    contact: Annotated[
        Optional[str],
        typer.Option(help="How users reach you, e.g. to ask for an API key (an email or URL; the page shows it)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    # the ScanOptions flags given (provenance.cli_options); the rest from PROVENANCE_SCAN__*
    scan_options: dict[str, Any] | None = None,
) -> None:
    """Serve the API (/v1, docs at /docs) and the upload page at /.

    Every setting can also come from the environment: PROVENANCE_<NAME> for the server's (PROVENANCE_API_KEYS=key1,key2,
    only there, so keys never show in `ps`), PROVENANCE_SCAN__<OPTION> for the scan's (PROVENANCE_SCAN__THOROUGH=true).
    The flags given here win.
    """
    import uvicorn

    from provenance.api.config import ServerConfig
    from provenance.errors import ProvenanceError
    from provenance.store import ProvenanceIndex

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        scan = {k: v for k, v in (scan_options or {}).items() if v is not None}
        config = ServerConfig.from_env(
            index_dir=index,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024) if max_upload_mb else None,
            keep_uploads=keep_uploads,
            scan_batch=scan_batch,
            scan_workers=scan_workers,
            torch_threads=torch_threads,
            registry=registry,
            allow_anonymous_writes=allow_anonymous_writes,
            contact=contact,
            cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip())
            if cors_origins is not None
            else None,
            scan=scan or None,
        )
        # Fail now, not in a background thread, when there is no index at all (reads only the manifest).
        ProvenanceIndex.open(config.index_dir)
    except (ValueError, ProvenanceError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(
        f"serving {config.index_dir} on http://{host}:{port}/ (API docs at /docs)"
        + (f", {workers} workers" if workers > 1 else "")
    )
    # Headers must arrive within header_timeout_s (uvicorn has no such deadline); connections beyond
    # max_connections get a 503. Behind a reverse proxy on this host, uvicorn takes the client address from
    # X-Forwarded-For (FORWARDED_ALLOW_IPS lists the trusted proxies), so rate limits apply per real client.
    from provenance.api.protocol import HeaderTimeoutH11Protocol

    HeaderTimeoutH11Protocol.timeout_s = config.header_timeout_s
    server_options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "timeout_graceful_shutdown": 10,
        "http": HeaderTimeoutH11Protocol,
        "limit_concurrency": config.max_connections,
    }
    if workers > 1:
        # Worker processes import the app themselves: hand them the config through the environment.
        os.environ.update(config.to_env())
        uvicorn.run("provenance.api.app:app_from_env", factory=True, workers=workers, **server_options)
    else:
        from provenance.api.app import create_app

        uvicorn.run(create_app(config), **server_options)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
