"""Reading uploaded files within their size limit, naming them safely, and keeping them when configured."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path

from fastapi import UploadFile

from provenance.errors import UploadTooLargeError
from provenance.types import ScanRecord

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_EXTENSIONS = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "TIFF": ".tif",
    "BMP": ".bmp",
    "AVIF": ".avif",
    "HEIF": ".heic",
}


async def read_upload(file: UploadFile, limit: int) -> bytes | None:
    """The file's bytes, or None as soon as it proves larger than `limit` (never reads past limit + 1 MB)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await file.read(_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def upload_too_large(name: str, limit: int) -> UploadTooLargeError:
    """The error of an upload over the byte limit (a 413, code too_large), as raised or as a batch record's."""
    return UploadTooLargeError(f"{name}: larger than the upload limit of {limit:,} bytes")


def display_name(filename: str | None, fallback: str = "upload") -> str:
    """A label for the record's `path`: the client's base name, printable, at most 200 characters.
    It is only ever shown, never used to open or write a file."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()
    return name[:200] or fallback


def keep_upload(folder: Path, data: bytes, record: ScanRecord) -> Path | None:
    """Store an upload as `<sha256><ext>` plus its record as `<sha256>.json`; names come from the content only."""
    if not record.sha256:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.sha256}{_extension(data)}"
    try:
        if not path.exists():
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        (folder / f"{record.sha256}.json").write_text(json.dumps(record.to_dict(), indent=1), encoding="utf-8")
    except OSError as e:
        # Keeping uploads is an audit aid; a full disk must not fail the scan the client asked for.
        logger.error("cannot keep upload %s in %s: %s", record.sha256, folder, e)
        return None
    return path


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return _EXTENSIONS.get(im.format or "", ".bin")
    except Exception:
        return ".bin"
