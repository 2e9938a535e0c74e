"""Decoding images safely: bytes or files in, upright 8-bit RGB PIL images out, or a specific error."""

from __future__ import annotations

import hashlib
import io
import errno
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from provenance.errors import DecompressionBombError, FileUnreadableError, UnreadableImageError

logger = logging.getLogger(__name__)

# 64 megapixels: far above any photo a corpus or a generator produces, far below what
# would exhaust memory (an RGB decode of this size is ~200 MB).
DEFAULT_MAX_PIXELS = 64_000_000
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
    info: dict  # PIL's info of the original (PNG text chunks, EXIF, ...)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The largest image file read: a 64 MP PNG at 4 bytes a pixel with no compression is ~256 MB. Checked before
# reading, so a huge (or sparse) file costs a stat, not its size in memory.
DEFAULT_MAX_FILE_BYTES = 256 << 20


def file_problem(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[str, str] | None:
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
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        return "special_file", f"{p}: {kind}, not an image file"
    if st.st_size > max_bytes:
        return "too_large", f"{p}: {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for an image file"
    return None


def _unreadable(kind: str, message: str) -> FileUnreadableError:
    e = FileUnreadableError(message)
    e.reason_kind = kind  # type: ignore[attr-defined] - the skip reason a corpus reader reports
    return e


def read_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
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
            raise FileUnreadableError(f"{p}: changed while being opened (not a regular file of at most "
                                      f"{max_bytes:,} bytes)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise FileUnreadableError(f"{p}: cannot read file ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileUnreadableError(f"{p}: grew over the {max_bytes:,}-byte limit while being read")
    return data


def decode_image(data: bytes, name: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode `data` into an upright RGB image.

    Handles CMYK, 16-bit, palette, alpha (composited on white, as a viewer shows it), greyscale and
    EXIF-rotated images. Raises UnreadableImageError naming `name` for empty, truncated, corrupt or
    non-image data, and DecompressionBombError above `max_pixels`.
    """
    if not data:
        raise UnreadableImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise DecompressionBombError(
                    f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                    "(possible decompression bomb)"
                )
            fmt = im.format
            info = dict(im.info)
            im.load()
    except DecompressionBombError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecompressionBombError(f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImageError(f"{name}: corrupt or truncated image ({e})") from None
    try:
        # in place: the decoded image is ours, and without an Orientation tag this saves a full copy
        ImageOps.exif_transpose(im, in_place=True)
        im = _to_rgb(im)
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, not ours
        raise UnreadableImageError(f"{name}: cannot convert image to RGB ({e})") from None
    return DecodedImage(im, sha256_bytes(data), im.width, im.height, fmt, data, info)


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
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
