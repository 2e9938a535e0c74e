"""The server's typed configuration, built from CLI options or PROVENANCE_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provenance.images import DEFAULT_MAX_PIXELS

ENV_PREFIX = "PROVENANCE_"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Multipart framing (boundaries, part headers, small form fields) on top of the file itself.
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything `create_app` needs; immutable so every request sees the same settings."""

    index_dir: Path
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES  # per uploaded file
    max_batch_files: int = 32  # files per /v1/scan/batch request
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejected as decompression bombs
    api_keys: tuple[str, ...] = ()  # empty = /v1 is open
    cors_origins: tuple[str, ...] = ()  # empty = no CORS headers (same-origin page only)
    keep_uploads: Path | None = None  # folder to keep scanned uploads in; None = keep nothing
    k: int = 10  # matches per scan record
    max_k: int = 100
    # Scan checks: None = on when available (e.g. visible-watermark weights present), True = required.
    visible: bool | None = None
    # the thorough visible-watermark mix reads each upload (scan --visible-thorough: the head tuned at 512 px on the
    # image and its mirror, with the 288 px head): more small and faint marks found, ~120 ms more CPU per scan
    visible_thorough: bool = False
    # SSCD also matches the centre 60% of each upload (scan --centre-view): photos shown small inside screenshots
    centre_view: bool = False
    invisible: bool | None = None
    # invisible marks are also read as in a crop of a marked image (scan --invisible-crops): ~0.2 s more CPU per scan
    invisible_crops: bool = False
    c2pa: bool = True
    metadata: bool = True
    # Scans run on `scan_workers` threads fed by a queue (a bounded pool, however many requests arrive).
    # Each worker may take up to `scan_batch` queued scans as one Scanner batch, waiting at most
    # scan_window_ms for company; 0 = no queue, every request scans in its own thread, unbounded.
    # Micro-batching is off by default: it saved no CPU per scan on mixed-size photos (SSCD batches only
    # images of one shape), measured in bench/results/api.md.
    scan_batch: int = 1
    scan_window_ms: float = 0.0
    scan_workers: int = 2
    search_threads: int = 2  # executor for image/text search (model work), sized to the cores
    # torch threads per model call (visible-watermark model, CLIP) for the threads that start once the models are
    # loaded (the scan and search threads); 0 = torch's default (all cores). Scans and searches already run side by
    # side on their own threads, and a batch-1 call of the small watermark CNN is no faster on 2 threads, only
    # twice the CPU (5.5 vs 10.6 ms per 224 px image, measured for issue 5).
    torch_threads: int = 1
    load_in_background: bool = True

    def __post_init__(self) -> None:
        if self.max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if not 0 <= self.scan_batch <= 256:
            raise ValueError(f"scan_batch must be in 0..256, got {self.scan_batch}")
        if not 1 <= self.scan_workers <= 64:
            raise ValueError(f"scan_workers must be in 1..64, got {self.scan_workers}")
        if self.scan_window_ms < 0:
            raise ValueError(f"scan_window_ms must be >= 0, got {self.scan_window_ms}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")
        if self.visible_thorough and self.visible is False:
            raise ValueError("visible_thorough needs the visible-watermark check, which is off")
        if self.invisible_crops and self.invisible is False:
            raise ValueError("invisible_crops needs the invisible-watermark check, which is off")
        if not 1 <= self.k <= self.max_k:
            raise ValueError(f"k must be in 1..{self.max_k}, got {self.k}")

    @property
    def max_request_bytes(self) -> int:
        return self.max_upload_bytes + MULTIPART_SLACK_BYTES

    @property
    def max_batch_request_bytes(self) -> int:
        return self.max_upload_bytes * self.max_batch_files + MULTIPART_SLACK_BYTES

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> "ServerConfig":
        """Settings from PROVENANCE_* variables; keyword overrides (e.g. from the CLI) win when not None."""
        env = dict(os.environ if environ is None else environ)

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        values: dict[str, Any] = {}
        if (v := get("INDEX")) is not None:
            values["index_dir"] = Path(v)
        for name, key, conv in (
            ("MAX_UPLOAD_BYTES", "max_upload_bytes", int),
            ("MAX_BATCH_FILES", "max_batch_files", int),
            ("MAX_PIXELS", "max_pixels", int),
            ("SCAN_BATCH", "scan_batch", int),
            ("SCAN_WINDOW_MS", "scan_window_ms", float),
            ("SCAN_WORKERS", "scan_workers", int),
            ("SEARCH_THREADS", "search_threads", int),
            ("TORCH_THREADS", "torch_threads", int),
            ("K", "k", int),
        ):
            if (v := get(name)) is not None:
                try:
                    values[key] = conv(v)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{name}={v!r} is not a number") from None
        if (v := get("API_KEYS")) is not None:
            values["api_keys"] = _split(v)
        if (v := get("CORS_ORIGINS")) is not None:
            values["cors_origins"] = _split(v)
        if (v := get("KEEP_UPLOADS")) is not None:
            values["keep_uploads"] = Path(v)
        for name, key in (("VISIBLE", "visible"), ("VISIBLE_THOROUGH", "visible_thorough"), ("CENTRE_VIEW", "centre_view"),
                          ("INVISIBLE", "invisible"), ("INVISIBLE_CROPS", "invisible_crops"),
                          ("C2PA", "c2pa"), ("METADATA", "metadata")):
            if (v := get(name)) is not None:
                values[key] = _flag(ENV_PREFIX + name, v)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "index_dir" not in values:
            raise ValueError(f"no index given: pass --index DIR or set {ENV_PREFIX}INDEX")
        values["index_dir"] = Path(values["index_dir"])
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The variables that make `from_env` rebuild this config (for uvicorn worker processes)."""
        env = {
            "INDEX": str(self.index_dir),
            "MAX_UPLOAD_BYTES": str(self.max_upload_bytes),
            "MAX_BATCH_FILES": str(self.max_batch_files),
            "MAX_PIXELS": str(self.max_pixels),
            "SCAN_BATCH": str(self.scan_batch),
            "SCAN_WINDOW_MS": str(self.scan_window_ms),
            "SCAN_WORKERS": str(self.scan_workers),
            "SEARCH_THREADS": str(self.search_threads),
            "TORCH_THREADS": str(self.torch_threads),
            "K": str(self.k),
            "API_KEYS": ",".join(self.api_keys),
            "CORS_ORIGINS": ",".join(self.cors_origins),
            "KEEP_UPLOADS": str(self.keep_uploads) if self.keep_uploads else "",
            "C2PA": str(self.c2pa).lower(),
            "METADATA": str(self.metadata).lower(),
            "VISIBLE_THOROUGH": str(self.visible_thorough).lower(),
            "CENTRE_VIEW": str(self.centre_view).lower(),
            "INVISIBLE_CROPS": str(self.invisible_crops).lower(),
        }
        if self.visible is not None:
            env["VISIBLE"] = str(self.visible).lower()
        if self.invisible is not None:
            env["INVISIBLE"] = str(self.invisible).lower()
        return {ENV_PREFIX + k: v for k, v in env.items()}


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")
