"""Edit families for copy-detection calibration: deterministic edited copies of a photo, one function per family.

Every family is `fn(image, rng) -> (image, params)`: an RGB PIL image in, a new RGB image and a small
JSON-able dict of what was done out. `apply_edit(image, family, seed)` is the entry point; the same
(image, family, seed) always gives the same pixels (on the same fonts and Pillow version).

Families follow the copy-detection literature's augmentations (SSCD / DISC2021: crops, rotations, colour,
overlays of text and emoji, screenshots, combinations) and the ways training images get re-posted.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

EditFn = Callable[[Image.Image, np.random.Generator], tuple[Image.Image, dict[str, Any]]]

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_EMOJI_FONT_SIZE = 109  # CBDT colour-bitmap fonts render only at their native strike size
_EMOJI = "😀😂😍😎🤔😱👍👀🔥⭐🎉❤💯🐶🐱🌸🍕⚽🚗🌈☀🎵💀👑"
# Chained in `combo`: every family except the no-op-like ones and itself.
_COMBO_EXCLUDE = ("reencode", "combo")


@dataclass(frozen=True)
class EditedImage:
    """One edited copy: the pixels, the family and the parameters drawn (for describing misses)."""

    image: Image.Image  # RGB
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    # Quality to save the file with; families that are about compression choose their own.
    jpeg_quality: int = 92

    def to_bytes(self) -> bytes:
        """The edited copy as a JPEG file, as it would be re-posted."""
        buf = io.BytesIO()
        self.image.save(buf, "JPEG", quality=self.jpeg_quality)
        return buf.getvalue()


# ------------------------------------------------------------------------------------ geometry


def crop(
    image: Image.Image, rng: np.random.Generator, area: tuple[float, float] = (0.5, 0.85)
) -> tuple[Image.Image, dict[str, Any]]:
    """A random crop keeping `area` of the pixels, aspect ratio within 3:4..4:3 of the original's."""
    w, h = image.size
    a = float(rng.uniform(*area))
    r = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, max(8, round(w * math.sqrt(a * r))))
    ch = min(h, max(8, round(h * math.sqrt(a / r))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.crop((x, y, x + cw, y + ch)), {"area": round(cw * ch / (w * h), 3), "box": [x, y, cw, ch]}


def crop_heavy(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """A crop keeping about a third to a half of the pixels."""
    return crop(image, rng, area=(0.3, 0.5))


def resize(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Scale by 0.35-2.5x, sometimes with a changed aspect ratio (re-posts get squashed too)."""
    w, h = image.size
    s = float(np.exp(rng.uniform(np.log(0.35), np.log(2.5))))
    aspect = float(rng.uniform(0.8, 1.25)) if rng.random() < 0.3 else 1.0
    size = (max(16, round(w * s * aspect)), max(16, round(h * s / aspect)))
    resample = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS][int(rng.integers(3))]
    return image.resize(size, resample), {"scale": round(s, 3), "aspect": round(aspect, 3), "size": list(size)}


def rotate_small(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Rotate by 5-20 degrees either way: expanded with a fill colour, or cropped to the largest upright box."""
    angle = float(rng.uniform(5, 20)) * (1 if rng.random() < 0.5 else -1)
    mode = "expand" if rng.random() < 0.5 else "inscribed"
    if mode == "expand":
        fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
        out = image.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
    else:
        out = image.rotate(angle, Image.Resampling.BICUBIC, expand=False)
        w, h = image.size
        iw, ih = _inscribed_size(w, h, math.radians(abs(angle)))
        x, y = (w - iw) // 2, (h - ih) // 2
        out = out.crop((x, y, x + iw, y + ih))
    return out, {"angle": round(angle, 2), "mode": mode}


def _inscribed_size(w: int, h: int, a: float) -> tuple[int, int]:
    """Largest axis-aligned rectangle inside a w x h rectangle rotated by `a` radians."""
    long_side, short_side = max(w, h), min(w, h)
    sin, cos = abs(math.sin(a)), abs(math.cos(a))
    if short_side <= 2 * sin * cos * long_side or abs(sin - cos) < 1e-10:
        x = 0.5 * short_side
        wr, hr = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        wr, hr = (w * cos - h * sin) / cos2, (h * cos - w * sin) / cos2
    return max(8, int(wr)), max(8, int(hr))


def rotate90(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Rotate by 90, 180 or 270 degrees (a sideways phone photo, an upside-down scan)."""
    k = int(rng.integers(1, 4))
    ops = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}
    return image.transpose(ops[k]), {"angle": 90 * k}


def flip(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Mirror horizontally (mostly) or vertically."""
    if rng.random() < 0.8:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), {"axis": "horizontal"}
    return image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), {"axis": "vertical"}


def perspective(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """A keystone / photographed-screen warp: the photo mapped onto a quadrilateral whose corners are moved
    inwards by up to 8-20% of the side, the rest filled black or white."""
    w, h = image.size
    m = float(rng.uniform(0.08, 0.2))
    shift = rng.uniform(0, m, size=(4, 2)) * [w, h]
    quad = [
        (shift[0, 0], shift[0, 1]),
        (shift[1, 0], h - shift[1, 1]),
        (w - shift[2, 0], h - shift[2, 1]),
        (w - shift[3, 0], shift[3, 1]),
    ]
    coeffs = _perspective_coeffs(quad, [(0, 0), (0, h), (w, h), (w, 0)])
    fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
    out = image.transform((w, h), Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC, fillcolor=fill)
    return out, {"max_shift": round(m, 3)}


def _perspective_coeffs(out_pts: list[tuple[float, float]], in_pts: list[tuple[float, float]]) -> list[float]:
    """PIL's PERSPECTIVE coefficients (a..h) that map each output point to its input point (8 equations)."""
    rows = []
    for (x, y), (u, v) in zip(out_pts, in_pts, strict=False):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    a = np.array(rows, dtype=np.float64)
    b = np.array([c for p in in_pts for c in p], dtype=np.float64)
    return np.linalg.solve(a, b).tolist()


# ------------------------------------------------------------------------------------ photometric


def jpeg_low(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """JPEG at quality 8-30 (the returned image already carries the artefacts)."""
    q = int(rng.integers(8, 31))
    return _jpeg_roundtrip(image, q), {"quality": q}


def reencode(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """The same picture re-saved as JPEG at quality 75-95: an exact copy with other bytes."""
    q = int(rng.integers(75, 96))
    return _jpeg_roundtrip(image, q), {"quality": q}


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def colour(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Brightness, contrast and saturation changes and a hue shift, as filters and phone edits do."""
    b, c, s = (float(rng.uniform(0.6, 1.4)), float(rng.uniform(0.6, 1.5)), float(rng.uniform(0.3, 1.7)))
    hue = float(rng.uniform(-0.12, 0.12))
    out = ImageEnhance.Brightness(image).enhance(b)
    out = ImageEnhance.Contrast(out).enhance(c)
    out = ImageEnhance.Color(out).enhance(s)
    hsv = np.asarray(out.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(hue * 255)) % 256
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    return out, {"brightness": round(b, 2), "contrast": round(c, 2), "saturation": round(s, 2), "hue": round(hue, 3)}


def greyscale(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Greyscale, sometimes sepia-toned."""
    grey = ImageOps.grayscale(image)
    if rng.random() < 0.25:
        return ImageOps.colorize(grey, (40, 26, 13), (255, 240, 192)), {"tone": "sepia"}
    return grey.convert("RGB"), {"tone": "grey"}


def blur(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Gaussian blur of radius 1-3 px (at the photo's size)."""
    r = float(rng.uniform(1.0, 3.0))
    return image.filter(ImageFilter.GaussianBlur(r)), {"radius": round(r, 2)}


# ------------------------------------------------------------------------------------ overlays


@functools.lru_cache(maxsize=1)
def _fonts() -> tuple[str, ...]:
    """Latin text fonts on this machine (sorted, so a seed gives the same font everywhere)."""
    try:
        from training.overlays import find_fonts

        return tuple(find_fonts())
    except ImportError:  # the overlays module is another engineer's; fall back to the system fonts
        return tuple(str(p) for p in sorted(Path("/usr/share/fonts").rglob("*.ttf")) if "Emoji" not in str(p))


def _font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
    fonts = _fonts()
    if not fonts:
        return ImageFont.load_default()
    return ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], max(8, int(size)))


def text_overlay(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """A stock-photo watermark or ordinary opaque text (meme caption, subtitle, date stamp...)."""
    try:
        from training import overlays
    except ImportError:
        overlays = None
    fonts = list(_fonts())
    if overlays is not None and fonts:
        if rng.random() < 0.5:
            return overlays.add_stock_watermark(image, rng, fonts), {"kind": "stock_watermark"}
        return overlays.add_opaque_text(image, rng, fonts), {"kind": "opaque_text"}
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    draw.text(
        (w * 0.05, h * 0.8),
        "when you finally get the weekend off",
        fill=(255, 255, 255),
        font=_font(rng, h // 10),
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return out, {"kind": "caption"}


@functools.lru_cache(maxsize=64)
def _emoji_tile(char: str) -> Image.Image | None:
    """One colour emoji as a tight RGBA tile at the font's native size, or None without the font."""
    if not Path(EMOJI_FONT).exists():
        return None
    try:
        font = ImageFont.truetype(EMOJI_FONT, _EMOJI_FONT_SIZE)
    except OSError:
        return None
    tile = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((10, 10), char, font=font, embedded_color=True)
    box = tile.getbbox()
    return tile.crop(box) if box else None


def emoji_overlay(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """1-5 emoji or filled shapes (stickers), each 12-35% of the short side."""
    out = image.convert("RGBA")
    w, h = out.size
    n = int(rng.integers(1, 6))
    kinds = []
    for _ in range(n):
        size = max(8, int(min(w, h) * rng.uniform(0.12, 0.35)))
        char = _EMOJI[int(rng.integers(len(_EMOJI)))]
        tile = _emoji_tile(char) if rng.random() < 0.7 else None
        if tile is None:
            tile = _shape_tile(rng, size)
            kinds.append("shape")
        else:
            kinds.append("emoji")
        tile = tile.resize((size, max(4, round(size * tile.height / tile.width))), Image.Resampling.BILINEAR)
        tile = tile.rotate(float(rng.uniform(-30, 30)), Image.Resampling.BILINEAR, expand=True)
        x = int(rng.integers(-size // 4, max(1, w - 3 * size // 4)))
        y = int(rng.integers(-size // 4, max(1, h - 3 * size // 4)))
        out.alpha_composite(tile, (max(0, x), max(0, y)))
    return out.convert("RGB"), {"count": n, "kinds": kinds}


def _shape_tile(rng: np.random.Generator, size: int) -> Image.Image:
    tile = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    colour = (*tuple(int(c) for c in rng.integers(0, 256, size=3)), 255)
    kind = int(rng.integers(3))
    if kind == 0:
        d.ellipse((0, 0, size - 1, size - 1), fill=colour)
    elif kind == 1:
        d.rectangle((0, size // 4, size - 1, 3 * size // 4), fill=colour)
    else:
        pts = [
            (
                size / 2 + size / 2 * math.cos(math.pi / 2 + i * math.pi / 5) * (1 if i % 2 == 0 else 0.45),
                size / 2 - size / 2 * math.sin(math.pi / 2 + i * math.pi / 5) * (1 if i % 2 == 0 else 0.45),
            )
            for i in range(10)
        ]
        d.polygon(pts, fill=colour)
    return tile


# ------------------------------------------------------------------------------------ screenshots


def screenshot(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """The photo shown smaller inside a fake phone app, desktop window, or padded letterbox, with UI text."""
    kind = str(rng.choice(["phone", "window", "padded"], p=[0.45, 0.35, 0.2]))
    dark = bool(rng.random() < 0.4)
    bg = (18, 18, 18) if dark else (250, 250, 250)
    fg = (230, 230, 230) if dark else (30, 30, 30)
    if kind == "phone":
        cw = int(rng.integers(320, 541))
        ch = int(cw * rng.uniform(1.8, 2.2))
        frac = float(rng.uniform(0.75, 1.0))  # photo width / screen width
    elif kind == "window":
        cw = int(rng.integers(560, 1025))
        ch = int(cw * rng.uniform(0.55, 0.8))
        frac = float(rng.uniform(0.35, 0.7))
    else:
        cw = int(rng.integers(300, 700))
        ch = int(cw * rng.uniform(0.6, 1.8))
        frac = float(rng.uniform(0.55, 0.9))
    canvas = Image.new("RGB", (cw, ch), bg if kind != "padded" else tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(canvas)
    pw = max(16, int(cw * frac))
    ph = max(16, round(pw * image.height / image.width))
    top = 0
    if kind == "phone":
        bar = int(ch * 0.035)
        d.rectangle((0, 0, cw, bar), fill=(0, 0, 0) if not dark else (40, 40, 40))
        d.text(
            (8, 2),
            f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}",
            fill=(255, 255, 255),
            font=_font(rng, bar * 0.7),
        )
        d.rectangle((cw - 40, bar // 4, cw - 12, 3 * bar // 4), outline=(255, 255, 255))
        nav = int(ch * 0.06)
        d.rectangle((0, bar, cw, bar + nav), fill=bg)
        d.ellipse((10, bar + nav // 4, 10 + nav // 2, bar + 3 * nav // 4), fill=(120, 160, 220))
        d.text((20 + nav // 2, bar + nav // 4), "some_user · Follow", fill=fg, font=_font(rng, nav * 0.4))
        top = bar + nav + int(rng.integers(0, 20))
    elif kind == "window":
        title = int(rng.integers(24, 40))
        d.rectangle((0, 0, cw, title), fill=(220, 220, 225) if not dark else (50, 50, 55))
        for i, c in enumerate([(255, 95, 86), (255, 189, 46), (39, 201, 63)]):
            d.ellipse((10 + 20 * i, title // 2 - 6, 22 + 20 * i, title // 2 + 6), fill=c)
        d.text((90, title // 4), "photo.jpg — Image Viewer", fill=fg, font=_font(rng, title * 0.5))
        side = int(cw * rng.uniform(0.1, 0.25))
        d.rectangle((0, title, side, ch), fill=(235, 235, 240) if not dark else (32, 32, 36))
        for i in range(6):
            d.text((10, title + 15 + 28 * i), f"Folder {i + 1}", fill=fg, font=_font(rng, 14))
        top = title + int(rng.integers(10, 40))
    left_min = 0 if kind == "phone" else (int(cw * 0.25) if kind == "window" else 0)
    left = (cw - pw) // 2 if kind != "window" else int(rng.integers(left_min, max(left_min + 1, cw - pw)))
    if kind == "padded":
        top = (ch - ph) // 2
    ph = min(ph, ch - top - 4)
    photo = image.resize((pw, max(8, ph)), Image.Resampling.BILINEAR)
    canvas.paste(photo, (left, top))
    if kind != "padded":
        y = top + photo.height + 10
        d.text((max(8, left), y), "♥ 1,204 likes   Nice shot! #travel #photo", fill=fg, font=_font(rng, 16))
        d.text((max(8, left), y + 26), "View all 87 comments", fill=(140, 140, 140), font=_font(rng, 14))
    area = photo.width * photo.height / (cw * ch)
    return canvas, {"kind": kind, "canvas": [cw, ch], "photo_area": round(area, 3), "dark": dark}


# ------------------------------------------------------------------------------------ registry


FAMILIES: dict[str, EditFn] = {
    "reencode": reencode,
    "crop": crop,
    "crop_heavy": crop_heavy,
    "resize": resize,
    "jpeg_low": jpeg_low,
    "rotate_small": rotate_small,
    "rotate90": rotate90,
    "flip": flip,
    "colour": colour,
    "greyscale": greyscale,
    "blur": blur,
    "text": text_overlay,
    "emoji": emoji_overlay,
    "screenshot": screenshot,
    "perspective": perspective,
}


def combo(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """2-3 different families chained in a random order."""
    names = [n for n in FAMILIES if n not in _COMBO_EXCLUDE]
    chosen = [str(n) for n in rng.choice(names, size=int(rng.integers(2, 4)), replace=False)]
    steps = []
    out = image
    for n in chosen:
        out, p = FAMILIES[n](out, rng)
        steps.append({"family": n, **p})
    return out, {"steps": steps}


FAMILIES["combo"] = combo
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


def apply_edit(image: Image.Image, family: str, seed: int | np.random.Generator) -> EditedImage:
    """Edit `image` with `family`; the same seed gives the same result."""
    if family not in FAMILIES:
        raise ValueError(f"unknown edit family {family!r}; expected one of {', '.join(FAMILY_NAMES)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out, params = FAMILIES[family](image.convert("RGB"), rng)
    out = out.convert("RGB")
    # Compression families are saved at their own quality; every other copy as a typical re-post JPEG.
    quality = params.get("quality", 92) if family in ("jpeg_low", "reencode") else 92
    return EditedImage(out, family, params, jpeg_quality=int(quality))
