"""What the server never tells a client or writes in a log: its own paths, and API keys."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WINDOWS_ABS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
# an absolute path inside a message: a "/" not preceded by a word character, ":" or "/" (so URLs stay whole),
# and not one of the API's own routes, which messages name on purpose
_ABS_IN_TEXT = re.compile(r"(?<![\w.:/~-])(?!/(?:v1|healthz|docs|static|openapi)\b)/[^\s'\"()\[\],;]+")
_SECRET_PARAMS = re.compile(r"(?i)\b(api[_-]?key|key|token|access_token)=([^&\s\"']+)")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")


def _basename(path: str) -> str:
    return re.split(r"[\\/]", path.rstrip("\\/"))[-1] or "."


def _is_absolute(path: str) -> bool:
    return path.startswith("/") or bool(_WINDOWS_ABS.match(path))


class PathRedactor:
    """Turns server paths into what a client may see, for one loaded index.

    A corpus item's `source` is a URL (kept), a path relative to its corpus folder (kept; indexes built since
    this release record those), or, in an older index, an absolute path: shown relative to the corpus folder
    recorded in the manifest, or as its file name."""

    def __init__(self, index_dir: Path | None = None, manifest: dict[str, Any] | None = None):
        manifest = manifest or {}
        roots = [(manifest.get("source") or {}).get("location")]
        roots += [(b.get("source") or {}).get("location") for b in manifest.get("builds") or []]
        self.roots = sorted(
            {r.rstrip("/\\") for r in roots if isinstance(r, str) and _is_absolute(r)}, key=len, reverse=True
        )
        # known paths -> what a message says instead: the index by its name, a corpus by its folder's name
        self.known: list[tuple[str, str]] = []
        if index_dir is not None:
            for p in {str(index_dir), str(Path(index_dir).resolve())}:
                self.known.append((p, Path(index_dir).name))
        self.known += [(r, _basename(r)) for r in self.roots]
        self.known.sort(key=lambda kv: len(kv[0]), reverse=True)

    def source(self, source: str | None) -> str | None:
        if not source or _URL.match(source) or not _is_absolute(source):
            return source
        for root in self.roots:
            if source.startswith((root + "/", root + "\\")):
                return source[len(root) + 1 :].replace("\\", "/")
        return _basename(source)

    def text(self, message: str) -> str:
        """A message without server paths: known ones by name, any other absolute path by its last part."""
        for path, name in self.known:
            message = message.replace(path, name)
        return _ABS_IN_TEXT.sub(lambda m: _basename(m.group(0)), message)

    def hit(self, d: dict[str, Any]) -> dict[str, Any]:
        """A match, caption hit or item dict with its `source` made public (in place)."""
        if "source" in d:
            d["source"] = self.source(d["source"])
        return d

    def manifest(self, manifest: dict[str, Any], expose_paths: bool) -> dict[str, Any]:
        """The manifest as /v1/index shows it: without the build history and with the source's location reduced
        to its name, unless the operator allows paths (`expose_index_paths`)."""
        if expose_paths:
            return manifest
        out = {k: v for k, v in manifest.items() if k != "builds"}
        source = out.get("source")
        if isinstance(source, dict) and isinstance(source.get("location"), str):
            location = source["location"]
            out["source"] = {**source, "location": _basename(location) if _is_absolute(location) else location}
        return out


class SecretRedactingFilter(logging.Filter):
    """Removes API keys from log records: the configured keys anywhere, bearer tokens, and key-like query
    parameters (uvicorn's access log writes the query string)."""

    def __init__(self, keys: Iterable[str] = ()):
        super().__init__()
        self.keys = sorted((k for k in keys if k), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for k in self.keys:
            text = text.replace(k, "[redacted]")
        text = _BEARER.sub(r"\1 [redacted]", text)
        return _SECRET_PARAMS.sub(r"\1=[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        # arguments one by one, keeping their shape (uvicorn's access formatter unpacks them); the whole message
        # when a secret hides elsewhere (inside a dict, say)
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        try:
            message = record.getMessage()
        except Exception:
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# loggers whose records reach the server's handlers; a filter on a handler sees every record it writes
_SERVER_LOGGERS = ("", "uvicorn", "uvicorn.access", "uvicorn.error", "provenance")


def install_log_redaction(keys: Iterable[str]) -> SecretRedactingFilter:
    """Attach one redacting filter to the server's loggers and their handlers (idempotent per key set)."""
    flt = SecretRedactingFilter(keys)
    for name in _SERVER_LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            for old in [f for f in target.filters if isinstance(f, SecretRedactingFilter)]:
                target.removeFilter(old)
            target.addFilter(flt)
    return flt
