"""Decoding images safely: bytes or files in, upright 8-bit RGB PIL images out, or a specific error."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from provenance.errors import DecompressionBombError, FileUnreadableError, UnreadableImageError

logger = logging.getLogger(__name__)

# 64 megapixels: far above any photo a corpus or a generator produces, far below what
# would exhaust memory (an RGB decode of this size is ~200 MB).
DEFAULT_MAX_PIXELS = 64_000_000
# The short side a JPEG may be drafted down to when no reader needs every pixel: SSCD and the default visible
# head read 288 px, the thorough head 512, the centre view 288 / 0.6 = 480 (bench/results/draft.md: the copy
# descriptors barely move, decoding costs about half on 2 MP photos).
DRAFT_MIN_SIDE = 512
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif", ".heic"}
)


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for the descriptors, with the facts about the original file."""

    image: Image.Image  # RGB, 8-bit, EXIF orientation applied
    sha256: str
    width: int  # of the upright image
    height: int
    format: str | None
    raw: bytes  # the original file bytes (watermark and metadata readers need them)
    info: dict[str | tuple[int, int], Any]  # PIL's info of the original (PNG text chunks, EXIF, ...)
    # what could not be read although the image could, e.g. a PNG text chunk over Pillow's size limit (the
    # metadata reader reports these in the record)
    warnings: tuple[str, ...] = ()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The largest image file read: a 64 MP PNG at 4 bytes a pixel with no compression is ~256 MB. Checked before
# reading, so a huge (or sparse) file costs a stat, not its size in memory.
DEFAULT_MAX_FILE_BYTES = 256 << 20


def file_problem(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[str, str] | None:
    """(reason_kind, reason) why `path` cannot be read as an image file, or None when it is a readable regular
    file of at most max_bytes. Kinds: missing, dangling_link, symlink_loop, permission, special_file,
    directory, too_large."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            return "dangling_link", f"{p}: dangling symbolic link (its target {os.readlink(p)!r} does not exist)"
        return "missing", f"{p}: file not found"
    except PermissionError:
        return "permission", f"{p}: permission denied"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink_loop", f"{p}: symbolic link loop"
        return "unreadable", f"{p}: cannot read file ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "directory", f"{p}: is a directory, not an image file"
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        return "special_file", f"{p}: {kind}, not an image file"
    if st.st_size > max_bytes:
        return "too_large", f"{p}: {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for an image file"
    return None


def _unreadable(kind: str, message: str) -> FileUnreadableError:
    e = FileUnreadableError(message)
    e.reason_kind = kind  # the skip reason a corpus reader reports
    return e


def read_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular image file. Special files (a FIFO would block forever), files over max_bytes,
    dangling links, loops and unreadable files raise FileUnreadableError with the true reason."""
    p = Path(path)
    problem = file_problem(p, max_bytes)
    if problem is not None:
        raise _unreadable(*problem)
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, open returns instead of waiting
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except PermissionError:
        raise _unreadable("permission", f"{p}: permission denied") from None
    except OSError as e:
        raise _unreadable("unreadable", f"{p}: cannot read file ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise FileUnreadableError(
                f"{p}: changed while being opened (not a regular file of at most {max_bytes:,} bytes)"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise FileUnreadableError(f"{p}: cannot read file ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileUnreadableError(f"{p}: grew over the {max_bytes:,}-byte limit while being read")
    return data


def decode_image(
    data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None
) -> DecodedImage:
    """Decode `data` into an upright RGB image.

    Handles CMYK, 16-bit, palette, alpha (composited on white, as a viewer shows it), greyscale and
    EXIF-rotated images. Raises UnreadableImageError naming `name` for empty, truncated, corrupt or
    non-image data, and DecompressionBombError above `max_pixels` (Pillow's own limit is raised to it, so
    ours is the one that applies and is quoted). A PNG whose text chunks Pillow refuses (a ComfyUI workflow
    inflating past PngImagePlugin.MAX_TEXT_CHUNK) is decoded without them, and says so in `warnings`.

    `min_side`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, `Image.draft`) as long
    as its short side stays at least this many pixels; `width` and `height` are still the file's. For callers
    whose models all read smaller images (not the invisible-mark decoders, which need every pixel).
    """
    if not data:
        raise UnreadableImageError(f"{name}: empty file (0 bytes)")
    _raise_pillow_limit(max_pixels)
    notes: list[str] = []
    try:
        try:
            im, fmt, info = _open(data, name, max_pixels, min_side)
        except ValueError as e:
            if not (data[:8] == _PNG_SIGNATURE and _PNG_TEXT_ERROR.search(str(e))):
                raise
            # the pixels are fine; only the metadata is too big for Pillow: decode without the text chunks
            notes.append(
                f"a PNG text chunk inflates past Pillow's limit of {_max_text_chunk():,} bytes "
                f"(PngImagePlugin.MAX_TEXT_CHUNK) and was not read ({e})"
            )
            im, fmt, info = _open(_without_png_text(data), name, max_pixels, min_side)
    except DecompressionBombError:
        raise
    except Image.DecompressionBombError as e:  # above twice Pillow's limit, before we saw the size
        m = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(m.group(1)):,} pixels" if m else "the image"
        raise DecompressionBombError(
            f"{name}: {pixels} exceeds the limit of {max_pixels:,} (possible decompression bomb)"
        ) from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise UnreadableImageError(f"{name}: corrupt or truncated image ({e})") from None
    full = info.pop("_full_size", None)  # (w, h) in the file, when drafted smaller
    try:
        # in place: the decoded image is ours, and without an Orientation tag this saves a full copy
        ImageOps.exif_transpose(im, in_place=True)
        im = _to_rgb(im)
    except Exception as e:  # any decoder failure is this file's problem, not ours
        raise UnreadableImageError(f"{name}: cannot convert image to RGB ({e})") from None
    width, height = im.size
    if full is not None:  # the upright size of the file: swapped where the drafted image was turned
        scaled_turned = (im.width > im.height) != (full[0] > full[1])
        width, height = (full[1], full[0]) if scaled_turned else full
    return DecodedImage(im, sha256_bytes(data), width, height, fmt, data, info, tuple(notes))


def _open(
    data: bytes, name: str, max_pixels: int, min_side: int | None = None
) -> tuple[Image.Image, str | None, dict[str | tuple[int, int], Any]]:
    """The loaded image, its format and info; DecompressionBombError above max_pixels, before decoding."""
    with warnings.catch_warnings():
        # Pillow warns between its limit and twice it: our own check below decides, with our numbers
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w * h > max_pixels:
        raise DecompressionBombError(
            f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} (possible decompression bomb)"
        )
    fmt, info = im.format, dict(im.info)
    if min_side and fmt == "JPEG" and min(w, h) >= 2 * min_side:
        scale = min(w, h) / min_side  # draft picks the smallest DCT scale whose size is still >= the one asked
        im.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        if im.size != (w, h):
            info["_full_size"] = (w, h)
    im.load()
    return im, fmt, info


def _max_text_chunk() -> int:
    from PIL import PngImagePlugin

    return PngImagePlugin.MAX_TEXT_CHUNK


_pillow_limit_lock = threading.Lock()


def _raise_pillow_limit(max_pixels: int) -> None:
    """Raise Pillow's process-wide MAX_IMAGE_PIXELS to at least `max_pixels` (never lower it: another caller may
    need more), so that its check never fires before ours with its own number (89,478,485 by default)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < max_pixels:
        with _pillow_limit_lock:
            if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
                Image.MAX_IMAGE_PIXELS = max_pixels


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_PNG_TEXT_ERROR = re.compile(r"MAX_TEXT_CHUNK|MAX_TEXT_MEMORY|text chunk", re.IGNORECASE)


def _without_png_text(data: bytes) -> bytes:
    """The PNG without the text chunks (tEXt, zTXt, iTXt) that inflate past Pillow's MAX_TEXT_CHUNK; every other
    chunk, smaller text included, as it was."""
    from PIL import PngImagePlugin

    limit = PngImagePlugin.MAX_TEXT_CHUNK
    out = [data[:8]]
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + length
        if (
            data[pos + 4 : pos + 8] not in _PNG_TEXT_CHUNKS
            or _text_size(data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length], limit) <= limit
        ):
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def _text_size(kind: bytes, body: bytes, limit: int) -> int:
    """The text's size once inflated, counted up to limit + 1 (never inflating more than that)."""
    if kind == b"tEXt":
        return len(body)
    _, _, rest = body.partition(b"\0")  # after the keyword
    if kind == b"zTXt":
        compressed = rest[1:]  # after the compression method byte
    else:  # iTXt: flag, method, language\0, translated keyword\0, text
        if not rest or rest[0] == 0:
            return len(rest)
        compressed = rest[2:].split(b"\0", 2)[-1]
    try:
        return len(zlib.decompressobj().decompress(compressed, limit + 1))
    except zlib.error:
        return 0  # Pillow reports a broken chunk itself


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    return decode_image(read_bytes(path), str(path), max_pixels)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert("L") clips instead of scaling, so scale explicitly.
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        return Image.fromarray((a / top * 255).round().clip(0, 255).astype("uint8")).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def iter_image_paths(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated list of paths.

    Explicitly named files are kept whatever their extension (so a bad file yields its error);
    folders and globs contribute files with image extensions only.
    """
    import glob

    seen: dict[Path, None] = {}
    for item in inputs:
        p = Path(item)
        # image-named entries that are not regular files (dangling links, loops, FIFOs) are kept: reading them
        # gives their true reason instead of a silent skip
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.is_dir():
                    seen.setdefault(f, None)
        elif any(ch in item for ch in "*?["):
            for g in sorted(glob.glob(item, recursive=True)):
                gp = Path(g)
                if gp.suffix.lower() in IMAGE_EXTENSIONS and not gp.is_dir():
                    seen.setdefault(gp, None)
        else:
            seen.setdefault(p, None)
    return list(seen)


def mime_type(fmt: str | None) -> str | None:
    """The MIME type of a Pillow format name (DecodedImage.format), for readers that want one (C2PA)."""
    return {
        "JPEG": "image/jpeg",
        "PNG": "image/png",
        "WEBP": "image/webp",
        "TIFF": "image/tiff",
        "GIF": "image/gif",
        "AVIF": "image/avif",
        "HEIF": "image/heif",
        "BMP": "image/bmp",
    }.get(fmt or "")
