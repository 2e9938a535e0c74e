"""The `provenance serve` command: runs the JSON API and web page (api/) under uvicorn."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)
EXIT_USAGE = 2  # the main CLI's code for bad input


def serve_command(
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory to serve (e.g. indexes/coco).")],
    host: Annotated[str, typer.Option(help="Interface to listen on (0.0.0.0 exposes the server to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Server processes; each loads its own models (RAM x N).")] = 1,
    max_upload_mb: Annotated[Optional[float], typer.Option(help="Largest upload accepted, in MB (default 20).")] = None,
    max_pixels: Annotated[Optional[int], typer.Option(min=1, help="Larger images are refused as decompression bombs (default 64 M).")] = None,
    keep_uploads: Annotated[Optional[Path], typer.Option(help="Keep scanned uploads and their records in this folder (default: keep nothing).")] = None,
    cors_origins: Annotated[Optional[str], typer.Option(help="Comma-separated origins allowed to call the API from a browser.")] = None,
    scan_batch: Annotated[Optional[int], typer.Option(min=0, help="Most queued scans run as one batch (default 1 = no micro-batching; 0 = no scan queue).")] = None,
    scan_workers: Annotated[Optional[int], typer.Option(min=1, help="Scan threads (default 2).")] = None,
    torch_threads: Annotated[Optional[int], typer.Option(min=0, help="torch threads per model call (default 1; 0 = torch's default, all cores).")] = None,
    visible: Annotated[Optional[bool], typer.Option("--visible/--no-visible", help="Visible-watermark check (default: on when its weights are present).")] = None,
    visible_thorough: Annotated[Optional[bool], typer.Option("--visible-thorough", help="Look for visible watermarks in each upload as scan --visible-thorough does: the head tuned at 512 px on the image and its mirror, mixed with the 288 px head (~120 ms more CPU per scan).")] = None,
    centre_view: Annotated[Optional[bool], typer.Option("--centre-view", help="Also match the centre 60% of each upload with SSCD, as scan --centre-view does (a second SSCD pass per scan).")] = None,
    invisible_crops: Annotated[Optional[bool], typer.Option("--invisible-crops", help="Also read invisible marks as in a crop of a marked image, as scan --invisible-crops does (~0.2 s more CPU per scan).")] = None,
    invisible: Annotated[Optional[bool], typer.Option("--invisible/--no-invisible", help="Invisible-watermark check (default: on when available).")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the API (/v1, docs at /docs) and the "Have I Been Trained"-style page at /.

    API keys come from the environment only (PROVENANCE_API_KEYS=key1,key2), so they never show in `ps`.
    """
    import uvicorn

    from provenance.api.config import ServerConfig
    from provenance.errors import ProvenanceError
    from provenance.store import ProvenanceIndex

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = ServerConfig.from_env(
            index_dir=index, max_upload_bytes=int(max_upload_mb * 1024 * 1024) if max_upload_mb else None,
            max_pixels=max_pixels, keep_uploads=keep_uploads, scan_batch=scan_batch, scan_workers=scan_workers, torch_threads=torch_threads, visible=visible,
            visible_thorough=visible_thorough, centre_view=centre_view, invisible_crops=invisible_crops, invisible=invisible, cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip())
            if cors_origins is not None else None)
        # Fail now, not in a background thread, when there is no index at all (reads only the manifest).
        ProvenanceIndex.open(config.index_dir)
    except (ValueError, ProvenanceError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(EXIT_USAGE) from None
    console.print(f"serving {config.index_dir} on http://{host}:{port}/ (API docs at /docs)"
                  + (f", {workers} workers" if workers > 1 else ""))
    if workers > 1:
        # Worker processes import the app themselves: hand them the config through the environment.
        os.environ.update(config.to_env())
        uvicorn.run("provenance.api.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, timeout_graceful_shutdown=10)
    else:
        from provenance.api.app import create_app

        uvicorn.run(create_app(config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
