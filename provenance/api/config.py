"""The server's settings: one pydantic-settings class read from PROVENANCE_* environment variables (and the
`serve` flags), with the scan options nested: PROVENANCE_SCAN__CENTRE_VIEW=true sets `scan.centre_view`."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from provenance.options import ScanOptions, options_error

logger = logging.getLogger(__name__)

ENV_PREFIX = "PROVENANCE_"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Multipart framing (boundaries, part headers, small form fields) on top of the file itself.
MULTIPART_SLACK_BYTES = 64 * 1024
# The flat names of this release's scan settings, read for one more release (with a warning) as the nested ones.
DEPRECATED_SCAN_ENV = (
    "VISIBLE",
    "VISIBLE_THOROUGH",
    "CENTRE_VIEW",
    "INVISIBLE",
    "INVISIBLE_CROPS",
    "C2PA",
    "METADATA",
    "K",
    "MAX_PIXELS",
)

SCOPES = ("read", "optout:write", "admin")


def parse_api_key(entry: str) -> tuple[str, frozenset[str]]:
    """'KEY' or 'KEY:SCOPE+SCOPE' -> (KEY, scopes granted): admin implies optout:write and read, optout:write implies
    read, a plain KEY is read only. A key may not hold ':'. ValueError naming an unknown scope."""
    key, sep, tail = entry.partition(":")
    scopes = set(tail.split("+")) if sep else {"read"}
    bad = sorted(sc for sc in scopes if sc not in SCOPES)
    if not key or bad:
        raise ValueError(
            f"api_keys: {'unknown scope(s) ' + ', '.join(map(repr, bad)) if bad else 'an entry has no key'}; "
            f"write KEY or KEY:SCOPE+SCOPE with scopes {', '.join(SCOPES)}"
        )
    scopes.add("read")
    if "admin" in scopes:
        scopes.update(SCOPES)
    return key, frozenset(scopes)


CommaList = Annotated[tuple[str, ...], NoDecode]  # "a,b" in the environment, not JSON


class ServerConfig(BaseSettings):
    """Everything `create_app` needs; frozen so every request sees the same settings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_parse_none_str="null",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
    )

    index_dir: Path = Field(validation_alias=AliasChoices("index_dir", ENV_PREFIX + "INDEX"))
    # what each scan runs, and what a request may change (ScanOptions.request_names); max_pixels is the
    # decompression-bomb limit of every upload, scans and image searches alike
    scan: ScanOptions = Field(default_factory=ScanOptions)
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, gt=0)  # per uploaded file
    max_batch_files: int = Field(32, ge=1)  # files per /v1/scan/batch request
    # empty = /v1 is open to read. Each entry is KEY or KEY:SCOPE+SCOPE with scopes read, optout:write, admin
    # (admin implies the others); a plain KEY (this setting's format before scopes) is `read` only. Example:
    # PROVENANCE_API_KEYS="k1:read,k2:read+optout:write,k3:admin"
    api_keys: CommaList = ()
    cors_origins: CommaList = ()  # empty = no CORS headers (same-origin page only)
    keep_uploads: Path | None = None  # folder to keep scanned uploads in; None = keep nothing
    # Scans run on `scan_workers` threads fed by a queue (a bounded pool, however many requests arrive).
    # Each worker may take up to `scan_batch` queued scans as one Scanner batch, waiting at most
    # scan_window_ms for company; 0 = no queue, every request scans in its own thread, unbounded.
    # Micro-batching is off by default: it saved no CPU per scan on mixed-size photos (SSCD batches only
    # images of one shape); BENCHMARKS.md has the figures.
    scan_batch: int = Field(1, ge=0, le=256)
    scan_window_ms: float = Field(0.0, ge=0)
    scan_workers: int = Field(2, ge=1, le=64)
    search_threads: int = Field(2, ge=1)  # executor for image/text search (model work), sized to the cores
    # torch threads per model call (visible-watermark model, CLIP) for the threads that start once the models are
    # loaded (the scan and search threads); 0 = torch's default (all cores). Scans and searches already run side by
    # side on their own threads, and a batch-1 call of the small watermark CNN is no faster on 2 threads, only
    # twice the CPU.
    torch_threads: int = Field(1, ge=0)
    load_in_background: bool = True
    registry: Path | None = None  # the do-not-train registry (provenance optout); None = the opt-out routes are off
    # without API keys, writes (POST /v1/optout...) are refused unless this is set: anyone could opt anything out
    allow_anonymous_writes: bool = False
    # POST /v1/consent/check answers from the registry, the index and the consent cache; a request may ask for live
    # fetches of the URLs the cache lacks only when this is above 0, and for at most this many URLs
    consent_live_max_urls: int = Field(0, ge=0, le=1000)
    # how users reach the operator (an email address or a URL), e.g. to ask for a key: /healthz and the page show it
    contact: str | None = Field(None, max_length=200)
    consent_cache: Path | None = None  # the consent signals cache (SQLite); None = provenance.consent's default
    allow_private_addresses: bool = False  # domain proofs and live consent fetches may reach private addresses

    @field_validator("api_keys", mode="after")
    @classmethod
    def _check_scopes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parse_api_key(entry)
        return value

    @property
    def key_scopes(self) -> dict[str, frozenset[str]]:
        """{key: the scopes it grants} (parse_api_key)."""
        return dict(parse_api_key(e) for e in self.api_keys)

    # --- Limits that bound the cost of every request (README, "Deploying it publicly"). 0 turns a rate limit off.
    # A batch request: its whole body, and the pixels of its images summed from their headers as the parts arrive.
    max_batch_bytes: int = Field(128 * 1024 * 1024, gt=0)
    max_batch_pixels: int = Field(256_000_000, gt=0)
    # scan and image-search requests handled at once, their uploads included; one more is a 503 with Retry-After
    max_active_scans: int = Field(8, ge=1)
    retry_after_s: int = Field(5, ge=1)  # what a 503 (busy) or 429 tells the client to wait
    # token buckets over /v1: per client address (behind a proxy, see --forwarded-allow-ips) and per API key
    client_rate_per_minute: float = Field(120.0, ge=0)
    client_burst: int = Field(60, ge=1)
    key_rate_per_minute: float = Field(600.0, ge=0)
    key_burst: int = Field(120, ge=1)
    # a request body that stops arriving for body_idle_timeout_s, or is still arriving after body_timeout_s, is a 408;
    # a connection whose request headers are not complete after header_timeout_s is closed (`provenance serve` only)
    body_idle_timeout_s: float = Field(15.0, gt=0)
    body_timeout_s: float = Field(120.0, gt=0)
    header_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(256, ge=1)  # open connections (`provenance serve`); more are answered 503
    # caption search: words kept (after removing repeats), query length, and the time SQLite may spend on it
    caption_max_terms: int = Field(16, ge=1)
    caption_max_chars: int = Field(256, ge=1)
    caption_time_budget_s: float = Field(0.5, gt=0)
    # /v1/index shows the build source location and history (server paths) only when the operator allows it
    expose_index_paths: bool = False

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: keyword arguments (the serve flags), PROVENANCE_*, then the deprecated flat names
        return init_settings, env_settings, _DeprecatedScanEnv(settings_cls)

    @property
    def max_request_bytes(self) -> int:
        return self.max_upload_bytes + MULTIPART_SLACK_BYTES

    @property
    def max_batch_request_bytes(self) -> int:
        return self.max_batch_bytes + MULTIPART_SLACK_BYTES

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Settings from PROVENANCE_* variables; keyword overrides (e.g. from the CLI) win when not None, and
        `scan` may be a dict of the scan options given (merged into the environment's). A bad value raises
        ValueError naming it."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "index_dir" not in values and not os.environ.get(ENV_PREFIX + "INDEX"):
            raise ValueError(f"no index given: pass --index DIR or set {ENV_PREFIX}INDEX")
        try:
            return cls(**values)
        except ValidationError as e:
            raise options_error(e, "server settings") from None

    def to_env(self) -> dict[str, str]:
        """The variables that make `from_env` rebuild this config (for uvicorn worker processes): every setting,
        so none comes from what the parent's environment happened to hold."""
        env = {ENV_PREFIX + "INDEX": str(self.index_dir)}
        for name in type(self).model_fields:
            if name not in ("index_dir", "scan"):
                env[ENV_PREFIX + name.upper()] = _env_value(getattr(self, name))
        for name in ScanOptions.model_fields:
            env[f"{ENV_PREFIX}SCAN__{name.upper()}"] = _env_value(getattr(self.scan, name))
        return env


def _env_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)
    if is_dataclass(value) and not isinstance(value, type):
        return json.dumps(asdict(value))
    return str(value)


class _DeprecatedScanEnv(PydanticBaseSettingsSource):
    """PROVENANCE_CENTRE_VIEW and the other flat names of the scan settings, as `scan.centre_view`, with a
    warning; the nested name (PROVENANCE_SCAN__CENTRE_VIEW) wins where both are set."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the whole table at once

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name in DEPRECATED_SCAN_ENV:
            value = os.environ.get(ENV_PREFIX + name)
            if value not in (None, ""):
                logger.warning(
                    "%s%s is deprecated and will be removed in the next release: use %sSCAN__%s",
                    ENV_PREFIX,
                    name,
                    ENV_PREFIX,
                    name,
                )
                found[name.lower()] = value
        return {"scan": found} if found else {}
