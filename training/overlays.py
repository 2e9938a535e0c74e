"""Synthetic overlays on photos: stock-photo visible watermarks (positives) and ordinary opaque text (negatives)."""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

FONT_ROOT = "/usr/share/fonts"

# Font families kept out of training so that evaluation measures generalisation to unseen typefaces.
# Matched as substrings of the font file path.
HELDOUT_FONT_KEYS: tuple[str, ...] = ("/lato/", "/open-sans/", "Carlito", "URWGothic", "P052", "NotoSerif")

# Symbol, dingbat and non-Latin fonts render our strings as boxes or pictograms.
_SKIP_FONT_KEYS = ("Symbol", "D050000L", "Math", "Emoji", "Music", "Z003")
_NOTO_LATIN = re.compile(r"/Noto(Sans|Serif)(Display|Mono)?-[A-Za-z]+\.ttf$")
_BOLD_KEYS = ("Bold", "Black", "Heavy", "Demi", "CondBold")

STOCK_STYLES: tuple[str, ...] = ("tiled", "centred", "logo", "footer", "corner")
STOCK_STYLE_WEIGHTS: tuple[float, ...] = (0.32, 0.24, 0.14, 0.16, 0.14)
TEXT_STYLES: tuple[str, ...] = ("meme", "subtitle", "sign", "date_stamp", "title", "label")
TEXT_STYLE_WEIGHTS: tuple[float, ...] = (0.22, 0.2, 0.16, 0.14, 0.14, 0.14)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class WatermarkStrings:
    """The vocabulary of watermark texts: agency brands, photographer names and their web sites."""

    brands: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    domains: tuple[str, ...]  # top-level domains of photographer sites

    def brand(self, rng: np.random.Generator) -> str:
        b = str(rng.choice(self.brands))
        r = rng.random()
        if r < 0.15:
            return b.lower()
        if r < 0.25:
            return "© " + b
        return b

    def name(self, rng: np.random.Generator) -> str:
        return f"{rng.choice(self.first_names)} {rng.choice(self.last_names)}"

    def url(self, rng: np.random.Generator, brand: str | None = None) -> str:
        stem = brand or (str(rng.choice(self.first_names)) + str(rng.choice(self.last_names)))
        stem = re.sub(r"[^a-z0-9]", "", stem.lower())
        suffix = str(rng.choice(["", "photo", "photography", "images", "studio"])) if brand is None else ""
        return f"{rng.choice(['www.', '', 'https://'])!s}{stem}{suffix}{rng.choice(self.domains)}"

    def sample(self, rng: np.random.Generator) -> str:
        """One watermark text: mostly a brand, else a photographer credit, a URL or an image id."""
        r = rng.random()
        if r < 0.55:
            return self.brand(rng)
        if r < 0.75:
            name = self.name(rng)
            credits = [f"© {name}", f"{name} Photography", f"Photo: {name}", name, f"© {name} {_year(rng)}"]
            return str(rng.choice(credits))
        if r < 0.9:
            return self.url(rng)
        return f"{self.brand(rng)}  {image_id(rng)}"


@dataclass(frozen=True)
class TextStrings:
    """The vocabulary of ordinary (non-watermark) text: captions, sign words, labels."""

    phrases: tuple[str, ...]  # sentences for memes, subtitles, titles
    words: tuple[str, ...]  # short sign and label texts


TRAIN_WATERMARK_STRINGS = WatermarkStrings(
    brands=(
        "Shutterstock",
        "shutterstock",
        "Getty Images",
        "gettyimages",
        "iStock",
        "iStock by Getty Images",
        "© alamy",
        "alamy",
        "Depositphotos",
        "Fotolia",
        "Bigstock",
        "Pond5",
        "Can Stock Photo",
        "Stocksy",
        "PhotoDune",
        "Vecteezy",
        "Westend61",
        "Photocase",
        "Superstock",
        "Fotosearch",
        "YAYIMAGES",
        "Pixabay Pro",
        "Visual China",
        "AP Images",
        "Reuters",
        "Imagn",
        "PicFair",
        "EyeEm",
    ),
    first_names=(
        "John",
        "Maria",
        "David",
        "Anna",
        "Peter",
        "Laura",
        "Michael",
        "Sofia",
        "James",
        "Elena",
        "Tom",
        "Julia",
        "Mark",
        "Nina",
        "Paul",
        "Sarah",
        "Alex",
        "Emma",
        "Chris",
        "Olga",
        "Daniel",
        "Kate",
    ),
    last_names=(
        "Smith",
        "Garcia",
        "Miller",
        "Novak",
        "Brown",
        "Rossi",
        "Schmidt",
        "Kowalski",
        "Johnson",
        "Silva",
        "Dubois",
        "Lee",
        "Walker",
        "Petrov",
        "Jensen",
        "Moreau",
        "Tanaka",
        "Clark",
        "Fischer",
        "Young",
    ),
    domains=(".com", ".net", ".org", ".de"),
)

# Disjoint from the training vocabulary: evaluation uses brands and names the model never saw.
HELDOUT_WATERMARK_STRINGS = WatermarkStrings(
    brands=(
        "Dreamstime",
        "dreamstime",
        "123RF",
        "Adobe Stock",
        "Freepik",
        "Envato Elements",
        "Masterfile",
        "Corbis",
        "AGE fotostock",
        "Science Photo Library",
        "Stockfresh",
        "Crestock",
        "Panthermedia",
        "Mostphotos",
        "Kalium Stock",
        "Lumina Images",
    ),
    first_names=("Igor", "Chloe", "Rafael", "Ingrid", "Mateo", "Yuki", "Bruno", "Freya", "Omar", "Lucia"),
    last_names=("Lindqvist", "Okafor", "Bianchi", "Horvath", "Nakamura", "Oliveira", "Kaur", "Marsh", "Varga"),
    domains=(".photo", ".co.uk", ".io", ".fr"),
)

TRAIN_TEXT_STRINGS = TextStrings(
    phrases=(
        "when you finally get the weekend off",
        "one does not simply walk into the office",
        "nobody: absolutely nobody:",
        "me explaining my plan to the group",
        "this is fine",
        "my face when the wifi goes down",
        "happy birthday mom",
        "best summer ever",
        "we did it!",
        "I told you so",
        "and then he said no",
        "keep calm and carry on",
        "Where are you going?",
        "I will be back before dark.",
        "Look at the size of that thing!",
        "Welcome to the family",
        "Grand opening this Saturday",
        "Day three at the lake",
        "You have to see this.",
        "They never came back.",
        "Merry Christmas and a happy new year",
        "not sure if tired or just lazy",
        "that feeling when the pizza arrives",
        "first day of school",
    ),
    words=(
        "STOP",
        "EXIT",
        "OPEN",
        "CLOSED",
        "NO PARKING",
        "Main St",
        "SALE",
        "ONE WAY",
        "CAFE",
        "Bus Stop",
        "Platform 3",
        "PUSH",
        "FRESH FISH",
        "Hotel",
        "Pharmacy",
        "$4.99",
        "50% OFF",
        "Route 66",
        "Parking",
        "Elm Street",
        "BAKERY",
        "Gate B",
        "Danger",
        "Welcome",
        "Pizza",
    ),
)

HELDOUT_TEXT_STRINGS = TextStrings(
    phrases=(
        "when the teacher says open your books",
        "is this a pigeon?",
        "expectation versus reality",
        "nailed it",
        "how it started, how it's going",
        "the dog ate my homework again",
        "Congratulations on your graduation",
        "Our trip to the mountains",
        "Please, don't go.",
        "I have never seen anything like it.",
        "Meet me at the station at noon.",
        "family reunion 2016",
        "that awkward moment when",
        "Sunday morning vibes",
        "Thanks for everything, coach",
    ),
    words=(
        "YIELD",
        "ENTRANCE",
        "NO ENTRY",
        "Oak Avenue",
        "DELI",
        "SLOW",
        "Library",
        "Ticket Office",
        "Post Office",
        "Gas",
        "Bar & Grill",
        "Taxi",
        "$12",
        "2 FOR 1",
        "WET PAINT",
        "Museum",
    ),
)


def find_fonts(root: str | Path = FONT_ROOT) -> list[str]:
    """TrueType/OpenType fonts under `root` that render Latin text (symbol and non-Latin fonts left out)."""
    fonts = []
    for p in sorted(Path(root).rglob("*")):
        s = str(p)
        if p.suffix.lower() not in (".ttf", ".otf") or any(k in s for k in _SKIP_FONT_KEYS):
            continue
        if "/noto/" in s.lower() and not _NOTO_LATIN.search(s):
            continue
        fonts.append(s)
    return fonts


def split_fonts(fonts: list[str]) -> tuple[list[str], list[str]]:
    """(training fonts, held-out fonts), split by family with HELDOUT_FONT_KEYS."""
    heldout = [f for f in fonts if any(k in f for k in HELDOUT_FONT_KEYS)]
    return [f for f in fonts if f not in set(heldout)], heldout


def bold_fonts(fonts: list[str]) -> list[str]:
    """The bold/black faces of `fonts` (meme captions and signs), or all of them if none is bold."""
    return list(_bold_fonts(tuple(fonts)))


@functools.lru_cache(maxsize=16)
def _bold_fonts(fonts: tuple[str, ...]) -> tuple[str, ...]:
    bold = tuple(f for f in fonts if any(k in f.rsplit("/", 1)[-1] for k in _BOLD_KEYS))
    return bold or fonts


def image_id(rng: np.random.Generator) -> str:
    """A stock-agency style image id, e.g. 'Image ID: 2B4XK7R' or '#1187263541'."""
    if rng.random() < 0.5:
        code = "".join(rng.choice(list("ABCDEFGHJKMNPRTWXY0123456789"), size=7))
        return str(rng.choice(["Image ID: ", "ID ", "Stock Photo ID: "])) + code
    return "#" + "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(7, 11))))


# ---------------------------------------------------------------------------------------------
# Public generators


def add_stock_watermark(
    image: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    *,
    style: str | None = None,
    opacity: float | None = None,
) -> Image.Image:
    """Overlay a stock-photo style visible watermark on `image`; returns a new RGB image of the same size.

    `style` is one of STOCK_STYLES (random by STOCK_STYLE_WEIGHTS when None): semi-transparent tiled text,
    centred text/logo, a logo, a branded footer bar with an image id, or a corner credit. `opacity` (alpha of
    the mark, 0-1) is drawn from 0.15-0.6 when None; footer bars are drawn more opaque, as agencies do.
    """
    base = image.convert("RGB")
    return composite_layer(base, stock_watermark_layer(base.size, rng, fonts, strings, style=style, opacity=opacity))


def stock_watermark_layer(
    size: tuple[int, int],
    rng: np.random.Generator,
    fonts: list[str],
    strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    *,
    style: str | None = None,
    opacity: float | None = None,
) -> Image.Image:
    """The watermark of `add_stock_watermark` alone: an RGBA layer of `size` (width, height), opacity included."""
    if not fonts:
        raise ValueError("fonts is empty: pass font file paths, e.g. from find_fonts()")
    if style is None:
        style = str(rng.choice(STOCK_STYLES, p=STOCK_STYLE_WEIGHTS))
    if style not in STOCK_STYLES:
        raise ValueError(f"unknown watermark style {style!r}; expected one of {STOCK_STYLES}")
    alpha = float(rng.uniform(0.15, 0.6)) if opacity is None else float(opacity)
    layer = _STOCK_DRAWERS[style](tuple(size), rng, fonts, strings)
    return _scale_alpha(layer, alpha if style != "footer" else max(alpha, float(rng.uniform(0.6, 1.0))))


def add_opaque_text(
    image: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    style: str | None = None,
) -> Image.Image:
    """Overlay ordinary opaque text (not a watermark) on `image`; returns a new RGB image of the same size.

    `style` is one of TEXT_STYLES (random by TEXT_STYLE_WEIGHTS when None): an Impact-like meme caption,
    a subtitle, a sign plate, a camera date stamp, a large title, or small labels.
    """
    base = image.convert("RGB")
    return composite_layer(base, opaque_text_layer(base.size, rng, fonts, strings, style=style))


def opaque_text_layer(
    size: tuple[int, int],
    rng: np.random.Generator,
    fonts: list[str],
    strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    style: str | None = None,
) -> Image.Image:
    """The text of `add_opaque_text` alone: an RGBA layer of `size` (width, height)."""
    if not fonts:
        raise ValueError("fonts is empty: pass font file paths, e.g. from find_fonts()")
    if style is None:
        style = str(rng.choice(TEXT_STYLES, p=TEXT_STYLE_WEIGHTS))
    if style not in TEXT_STYLES:
        raise ValueError(f"unknown text style {style!r}; expected one of {TEXT_STYLES}")
    return _TEXT_DRAWERS[style](tuple(size), rng, fonts, strings)


def composite_layer(base: Image.Image, layer: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA `layer` over `base` (RGB out). A layer of another size is resized to `base` first
    (with premultiplied alpha), which equals drawing it on a canvas of its own size and resizing the result:
    both operations are linear, so a mark drawn at 1024 px can be put on a 224 px photo without upscaling it."""
    if layer.size != base.size:
        layer = layer.resize(base.size, Image.Resampling.BILINEAR)  # Pillow premultiplies RGBA for resizing
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Drawing helpers: every drawer returns a full-size RGBA layer, composited once at the end.


@functools.lru_cache(maxsize=1024)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, max(6, int(size)))


def _year(rng: np.random.Generator) -> int:
    return int(rng.integers(1998, 2025))


def _scale_alpha(layer: Image.Image, opacity: float) -> Image.Image:
    if opacity < 1.0:
        layer.putalpha(layer.getchannel("A").point([round(a * opacity) for a in range(256)]))
    return layer


def _mark_colour(rng: np.random.Generator) -> RGB:
    r = rng.random()
    if r < 0.6:
        v = int(rng.integers(225, 256))
        return (v, v, v)
    if r < 0.8:
        v = int(rng.integers(0, 70))
        return (v, v, v)
    if r < 0.9:
        v = int(rng.integers(120, 200))
        return (v, v, v)
    return tuple(int(c) for c in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _contrast(c: RGB) -> RGB:
    return (0, 0, 0) if sum(c) > 384 else (255, 255, 255)


def _text_tile(
    text: str,
    font: ImageFont.FreeTypeFont,
    fill: RGB,
    stroke: int = 0,
    stroke_fill: RGB | None = None,
    shadow: int = 0,
) -> Image.Image:
    """Tight RGBA image of `text` (transparent background), with optional outline and drop shadow."""
    x0, y0, x1, y1 = font.getbbox(text, stroke_width=stroke)
    pad = stroke + shadow + 2
    tile = Image.new("RGBA", (x1 - x0 + 2 * pad, y1 - y0 + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    if shadow:
        sc = _contrast(fill)
        d.text((pad - x0 + shadow, pad - y0 + shadow), text, font=font, fill=(*sc, 160))
    d.text(
        (pad - x0, pad - y0),
        text,
        font=font,
        fill=(*fill, 255),
        stroke_width=stroke,
        stroke_fill=(stroke_fill or _contrast(fill)) + (255,),
    )
    return tile


def _fit_font(path: str, text: str, width: float, max_height: float) -> ImageFont.FreeTypeFont:
    """The font size at which `text` is about `width` px wide and at most `max_height` px tall."""
    ref = _font(path, 100)
    x0, y0, x1, y1 = ref.getbbox(text)
    size = 100 * min(width / max(1, x1 - x0), max_height / max(1, y1 - y0))
    return _font(path, max(6, int(size)))


def _logo_tile(rng: np.random.Generator, size: int, colour: RGB, fonts: list[str]) -> Image.Image:
    """A simple agency-like logo: a ring, disc, rounded square, camera, shield or triangle, maybe with a letter."""
    s = max(8, int(size))
    tile = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(tile)
    fill = (*colour, 255)
    w = max(1, s // int(rng.integers(8, 16)))
    kind = int(rng.integers(0, 6))
    m = w
    if kind == 0:
        d.ellipse((m, m, s - m, s - m), outline=fill, width=w)
    elif kind == 1:
        d.ellipse((m, m, s - m, s - m), fill=fill)
    elif kind == 2:
        d.rounded_rectangle((m, m, s - m, s - m), radius=s // 5, outline=fill, width=w)
    elif kind == 3:  # camera: body, lens, viewfinder bump
        d.rounded_rectangle((m, s * 0.3, s - m, s * 0.85), radius=s // 10, outline=fill, width=w)
        d.ellipse((s * 0.33, s * 0.4, s * 0.67, s * 0.74), outline=fill, width=w)
        d.rectangle((s * 0.35, s * 0.18, s * 0.6, s * 0.3), fill=fill)
    elif kind == 4:  # shield
        d.polygon([(m, m), (s - m, m), (s - m, s * 0.55), (s / 2, s - m), (m, s * 0.55)], outline=fill, width=w)
    else:
        d.polygon([(s / 2, m), (s - m, s - m), (m, s - m)], outline=fill, width=w)
    if kind in (0, 2, 4, 5) and rng.random() < 0.6:
        letter = str(rng.choice(list("ASGDPRIXM")))
        f = _font(str(rng.choice(fonts)), int(s * 0.45))
        x0, y0, x1, y1 = f.getbbox(letter)
        d.text(((s - (x1 - x0)) / 2 - x0, (s - (y1 - y0)) / 2 - y0), letter, font=f, fill=fill)
    elif kind == 1:
        # a disc carries a knocked-out letter so that it reads as a logo, not a blob
        letter = str(rng.choice(list("ASGDPRIXM")))
        f = _font(str(rng.choice(fonts)), int(s * 0.5))
        x0, y0, x1, y1 = f.getbbox(letter)
        d.text(((s - (x1 - x0)) / 2 - x0, (s - (y1 - y0)) / 2 - y0), letter, font=f, fill=(0, 0, 0, 0))
    return tile


def _stack(tiles: list[Image.Image], gap: int, horizontal: bool = False) -> Image.Image:
    """Tiles side by side (or one above the other), centred on the cross axis."""
    if horizontal:
        w, h = sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)
    else:
        w, h = max(t.width for t in tiles), sum(t.height for t in tiles) + gap * (len(tiles) - 1)
    out = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    pos = 0
    for t in tiles:
        if horizontal:
            out.alpha_composite(t, (pos, (h - t.height) // 2))
            pos += t.width + gap
        else:
            out.alpha_composite(t, ((w - t.width) // 2, pos))
            pos += t.height + gap
    return out


def _paste_centred(layer: Image.Image, tile: Image.Image, cx: float, cy: float) -> None:
    x, y = round(cx - tile.width / 2), round(cy - tile.height / 2)
    # alpha_composite needs the tile inside the layer: crop the part that falls outside.
    sx, sy = max(0, -x), max(0, -y)
    ex, ey = min(tile.width, layer.width - x), min(tile.height, layer.height - y)
    if ex <= sx or ey <= sy:
        return
    layer.alpha_composite(tile.crop((sx, sy, ex, ey)), (x + sx, y + sy))


def _rotate(tile: Image.Image, angle: float) -> Image.Image:
    return tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True) if abs(angle) > 0.5 else tile


def _mark_text_tile(rng: np.random.Generator, text: str, font: ImageFont.FreeTypeFont, colour: RGB) -> Image.Image:
    """Watermark text: plain, or with a thin contrasting outline or soft shadow (visible on any background)."""
    r = rng.random()
    size = font.size
    if r < 0.25:
        return _text_tile(text, font, colour, stroke=max(1, int(size * rng.uniform(0.02, 0.05))))
    if r < 0.4:
        return _text_tile(text, font, colour, shadow=max(1, int(size * 0.05)))
    return _text_tile(text, font, colour)


# ---------------------------------------------------------------------------------------------
# Watermark styles


def _draw_tiled(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    m = min(W, H)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    colour = _mark_colour(rng)
    text = strings.sample(rng)
    font = _font(str(rng.choice(fonts)), int(m * rng.uniform(0.035, 0.1)))
    tile = _mark_text_tile(rng, text, font, colour)
    if rng.random() < 0.3:
        logo = _logo_tile(rng, tile.height * rng.uniform(1.0, 2.0), colour, fonts)
        tile = _stack([logo, tile], gap=max(1, tile.height // 4), horizontal=rng.random() < 0.5)
    angle = 0.0 if rng.random() < 0.3 else float(rng.uniform(-45, 45))
    tile = _rotate(tile, angle)
    sx = tile.width * rng.uniform(1.05, 2.0) if angle == 0 else max(tile.width, tile.height) * rng.uniform(0.9, 1.6)
    sy = tile.height * rng.uniform(1.5, 4.0) if angle == 0 else max(tile.height * 1.5, sx * rng.uniform(0.4, 0.9))
    stagger = rng.random() < 0.5
    ox, oy = rng.uniform(0, sx), rng.uniform(0, sy)
    for j, y in enumerate(np.arange(-sy + oy, H + sy, sy)):
        shift = (sx / 2) if (stagger and j % 2) else 0.0
        for x in np.arange(-sx + ox + shift, W + sx, sx):
            _paste_centred(layer, tile, x, y)
    if rng.random() < 0.3:
        _draw_lines(layer, rng, colour)
    return layer


def _draw_lines(layer: Image.Image, rng: np.random.Generator, colour: RGB) -> None:
    """Thin diagonal lines across the image, as some agencies add to their tiled text."""
    W, H = layer.size
    d = ImageDraw.Draw(layer)
    step = int(min(W, H) * rng.uniform(0.12, 0.35))
    width = max(1, int(min(W, H) / 300))
    slope = float(rng.choice([-1.0, 1.0])) * rng.uniform(0.4, 1.5)
    for c in range(-int(abs(slope) * W) - H, W + H + int(abs(slope) * W), step):
        d.line([(c, 0), (c + H / slope, H)], fill=(*colour, 200), width=width)
        if rng.random() < 0.5:
            d.line([(c, H), (c + H / slope, 0)], fill=(*colour, 200), width=width)


def _draw_centred(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    colour = _mark_colour(rng)
    text = strings.sample(rng)
    font = _fit_font(str(rng.choice(fonts)), text, W * rng.uniform(0.35, 0.9), H * 0.3)
    tile = _mark_text_tile(rng, text, font, colour)
    r = rng.random()
    if r < 0.3:
        logo = _logo_tile(rng, min(H * 0.35, tile.height * rng.uniform(1.5, 3.5)), colour, fonts)
        tile = _stack([logo, tile], gap=max(1, tile.height // 3), horizontal=rng.random() < 0.3)
    elif r < 0.45:
        sub = _font(font.path, int(font.size * rng.uniform(0.25, 0.45)))
        tile = _stack([tile, _text_tile(image_id(rng) if rng.random() < 0.5 else strings.url(rng), sub, colour)], 2)
    angle = 0.0 if rng.random() < 0.5 else float(rng.uniform(-35, 35))
    tile = _rotate(tile, angle)
    cx, cy = W * rng.uniform(0.4, 0.6), H * rng.uniform(0.4, 0.6)
    if rng.random() < 0.2:  # the same mark repeated at thirds of the height (iStock-like)
        for fy in (1 / 6, 1 / 2, 5 / 6):
            _paste_centred(layer, tile, cx, H * fy)
    else:
        _paste_centred(layer, tile, cx, cy)
    return layer


def _draw_logo(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    m = min(W, H)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    colour = _mark_colour(rng)
    if rng.random() < 0.4:  # tiled small logos
        tile = _logo_tile(rng, m * rng.uniform(0.08, 0.18), colour, fonts)
        step = tile.width * rng.uniform(1.6, 3.0)
        ox, oy = rng.uniform(0, step, size=2)
        for y in np.arange(-step + oy, H + step, step):
            for x in np.arange(-step + ox, W + step, step):
                _paste_centred(layer, tile, x, y)
        return layer
    tile = _logo_tile(rng, m * rng.uniform(0.2, 0.55), colour, fonts)
    if rng.random() < 0.5:
        text = strings.sample(rng)
        font = _fit_font(str(rng.choice(fonts)), text, W * rng.uniform(0.3, 0.7), tile.height * 0.4)
        tile = _stack([tile, _mark_text_tile(rng, text, font, colour)], gap=max(1, tile.height // 8))
    _paste_centred(layer, tile, W * rng.uniform(0.35, 0.65), H * rng.uniform(0.35, 0.65))
    return layer


def _draw_footer(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    bar_h = max(10, int(H * rng.uniform(0.05, 0.13)))
    r = rng.random()
    bar = (
        tuple(int(v) for v in rng.integers(0, 50, size=3))
        if r < 0.5
        else (255, 255, 255)
        if r < 0.75
        else tuple(int(v) for v in rng.integers(0, 256, size=3))
    )
    ink = _contrast(bar)  # type: ignore[arg-type]
    partial = rng.random() < 0.2  # a credit strip over part of the width (Getty-like)
    top = rng.random() < 0.12
    x_end = int(W * rng.uniform(0.45, 0.8)) if partial else W
    y0 = 0 if top else H - bar_h
    d.rectangle((0, y0, x_end, y0 + bar_h), fill=(*bar, 255))  # type: ignore[operator]
    brand = strings.brand(rng)
    font_path = str(rng.choice(fonts))
    big = _font(font_path, int(bar_h * rng.uniform(0.45, 0.7)))
    small = _font(font_path, int(bar_h * rng.uniform(0.25, 0.4)))
    if partial:
        left = _text_tile(f"Credit: {strings.name(rng)} / {brand}", small, ink)
    else:
        left = _text_tile(brand, big, ink)
    if rng.random() < 0.5 and not partial:
        left = _stack([_logo_tile(rng, bar_h * 0.7, ink, fonts), left], gap=max(1, bar_h // 6), horizontal=True)
    lx = int(bar_h * 0.3)
    left = left.crop((0, 0, min(left.width, x_end - lx), left.height))
    layer.alpha_composite(left, (lx, y0 + max(0, (bar_h - left.height) // 2)))
    if not partial:
        parts = [image_id(rng)] if rng.random() < 0.8 else []
        if rng.random() < 0.6:
            parts.append(strings.url(rng, brand=brand))
        if parts:
            right = _stack([_text_tile(p, small, ink) for p in parts], gap=1)
            rx = W - right.width - int(bar_h * 0.3)
            if rx > lx + left.width:
                layer.alpha_composite(right, (rx, y0 + max(0, (bar_h - right.height) // 2)))
    return layer


def _draw_corner(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    m = min(W, H)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    colour = _mark_colour(rng)
    text = strings.sample(rng)
    font = _fit_font(str(rng.choice(fonts)), text, W * rng.uniform(0.25, 0.55), m * rng.uniform(0.04, 0.1))
    tile = _mark_text_tile(rng, text, font, colour)
    if rng.random() < 0.35:
        logo = _logo_tile(rng, tile.height * 1.6, colour, fonts)
        tile = _stack([logo, tile], gap=max(1, tile.height // 4), horizontal=True)
    if rng.random() < 0.15:
        tile = _rotate(tile, 90.0)
    mx, my = W * rng.uniform(0.02, 0.06), H * rng.uniform(0.02, 0.06)
    xs = (mx + tile.width / 2, W / 2, W - mx - tile.width / 2)
    ys = (my + tile.height / 2, H - my - tile.height / 2)
    _paste_centred(layer, tile, xs[int(rng.integers(0, 3))], ys[int(rng.integers(0, 2))])
    return layer


# ---------------------------------------------------------------------------------------------
# Ordinary-text styles


def _wrap(text: str, max_chars: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > max_chars:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])


def _draw_meme(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    path = str(rng.choice(bold_fonts(fonts)))
    fill = (255, 255, 255) if rng.random() < 0.85 else (0, 0, 0) if rng.random() < 0.5 else (255, 230, 0)
    where = ["top", "bottom"] if rng.random() < 0.5 else [str(rng.choice(["top", "bottom"]))]
    for pos in where:
        text = str(rng.choice(strings.phrases)).upper()
        lines = _wrap(text, int(rng.integers(12, 26)))[:3]
        longest = max(lines, key=len)
        font = _fit_font(path, longest, W * rng.uniform(0.7, 0.95), H * rng.uniform(0.07, 0.14))
        stroke = max(1, int(font.size * rng.uniform(0.05, 0.1)))
        tiles = [_text_tile(line, font, fill, stroke=stroke, stroke_fill=_contrast(fill)) for line in lines]
        block = _stack(tiles, gap=max(1, font.size // 8))
        cy = H * 0.03 + block.height / 2 if pos == "top" else H * 0.97 - block.height / 2
        _paste_centred(layer, block, W / 2, cy)
    return layer


def _draw_subtitle(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    text = str(rng.choice(strings.phrases))
    text = text[0].upper() + text[1:]
    lines = _wrap(text, int(rng.integers(24, 44)))[:2]
    font = _font(str(rng.choice(fonts)), int(H * rng.uniform(0.035, 0.07)))
    fill = (255, 255, 255) if rng.random() < 0.7 else (255, 235, 60)
    boxed = rng.random() < 0.35
    if boxed:
        tiles = [_text_tile(line, font, fill) for line in lines]
    elif rng.random() < 0.6:
        tiles = [_text_tile(line, font, fill, stroke=max(1, font.size // 14), stroke_fill=(0, 0, 0)) for line in lines]
    else:
        tiles = [_text_tile(line, font, fill, shadow=max(1, font.size // 12)) for line in lines]
    block = _stack(tiles, gap=max(1, font.size // 6))
    cx, cy = W / 2, H * rng.uniform(0.86, 0.94) - block.height / 2
    if boxed:
        # the subtitle box is translucent, the text on it is opaque
        pad = font.size // 3
        box = Image.new("RGBA", (block.width + 2 * pad, block.height + 2 * pad), (0, 0, 0, int(rng.integers(110, 210))))
        _paste_centred(layer, box, cx, cy)
    _paste_centred(layer, block, cx, cy)
    return layer


def _draw_sign(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    plate_colours = [(200, 20, 30), (20, 110, 50), (20, 60, 160), (245, 245, 245), (250, 200, 0), (30, 30, 30)]
    for _ in range(int(rng.integers(1, 3))):
        plate = plate_colours[int(rng.integers(0, len(plate_colours)))]
        ink = _contrast(plate)
        text = str(rng.choice(strings.words))
        font = _fit_font(str(rng.choice(bold_fonts(fonts))), text, W * rng.uniform(0.12, 0.4), H * 0.15)
        t = _text_tile(text, font, ink)
        pad = max(2, font.size // 3)
        sign = Image.new("RGBA", (t.width + 2 * pad, t.height + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(sign).rounded_rectangle(
            (0, 0, sign.width - 1, sign.height - 1),
            radius=pad,
            fill=(*plate, 255),
            outline=(*ink, 255),
            width=max(1, pad // 3),
        )
        sign.alpha_composite(t, (pad, pad))
        sign = _rotate(sign, float(rng.uniform(-10, 10)))
        _paste_centred(layer, sign, W * rng.uniform(0.15, 0.85), H * rng.uniform(0.15, 0.85))
    return layer


def _draw_date_stamp(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    y, mo, d = _year(rng), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    formats = [
        f"'{y % 100:02d} {mo} {d}",
        f"{y}/{mo:02d}/{d:02d}",
        f"{d:02d}.{mo:02d}.{y}",
        f"{mo:02d}/{d:02d}/{y % 100:02d}",
    ]
    text = formats[int(rng.integers(0, len(formats)))]
    if rng.random() < 0.3:
        text += f" {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    colour = [(255, 140, 0), (255, 170, 40), (255, 220, 60), (240, 60, 30)][int(rng.integers(0, 4))]
    font = _font(str(rng.choice(fonts)), int(min(W, H) * rng.uniform(0.035, 0.07)))
    tile = _text_tile(text, font, colour)
    # the glow of a burned-in LED date
    glow = tile.filter(ImageFilter.GaussianBlur(max(1, font.size // 10)))
    tile = Image.alpha_composite(glow, tile)
    mx, my = W * rng.uniform(0.03, 0.08), H * rng.uniform(0.03, 0.08)
    right = rng.random() < 0.8
    cx = W - mx - tile.width / 2 if right else mx + tile.width / 2
    _paste_centred(layer, tile, cx, H - my - tile.height / 2)
    return layer


def _draw_title(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    text = str(rng.choice(strings.phrases + strings.words))
    if rng.random() < 0.5:
        text = text.upper()
    lines = _wrap(text, int(rng.integers(10, 24)))[:3]
    # saturated, white or black: opaque mid-grey text over a photo is indistinguishable from a watermark
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3)) if rng.random() < 0.6 else _contrast(_mark_colour(rng))
    font = _fit_font(str(rng.choice(fonts)), max(lines, key=len), W * rng.uniform(0.4, 0.9), H * 0.2)
    stroke = max(1, font.size // 16) if rng.random() < 0.4 else 0
    tiles = [_text_tile(line, font, fill, stroke=stroke) for line in lines]  # type: ignore[arg-type]
    block = _stack(tiles, gap=max(1, font.size // 6))
    block = _rotate(block, 0.0 if rng.random() < 0.6 else float(rng.uniform(-20, 20)))
    _paste_centred(layer, block, W * rng.uniform(0.35, 0.65), H * rng.uniform(0.3, 0.7))
    return layer


def _draw_label(size, rng, fonts, strings) -> Image.Image:
    W, H = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    for _ in range(int(rng.integers(1, 4))):
        text = str(rng.choice(strings.words)) if rng.random() < 0.6 else str(rng.choice(strings.phrases))
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
        font = _font(str(rng.choice(fonts)), int(min(W, H) * rng.uniform(0.03, 0.08)))
        stroke = max(1, font.size // 15) if rng.random() < 0.3 else 0
        tile = _text_tile(text, font, fill, stroke=stroke)  # type: ignore[arg-type]
        _paste_centred(layer, tile, W * rng.uniform(0.1, 0.9), H * rng.uniform(0.08, 0.92))
    return layer


_STOCK_DRAWERS = {
    "tiled": _draw_tiled,
    "centred": _draw_centred,
    "logo": _draw_logo,
    "footer": _draw_footer,
    "corner": _draw_corner,
}
_TEXT_DRAWERS = {
    "meme": _draw_meme,
    "subtitle": _draw_subtitle,
    "sign": _draw_sign,
    "date_stamp": _draw_date_stamp,
    "title": _draw_title,
    "label": _draw_label,
}


# ---------------------------------------------------------------------------------------------
# Whole training/evaluation examples


EXAMPLE_KINDS: tuple[str, ...] = ("watermark", "text", "clean")


def synthetic_example(
    photo: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    watermark_strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    text_strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    kind: str | None = None,
    canvas_short_side: int | None = None,
    kind_weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
    jpeg_probability: float = 0.7,
    resize: bool = True,
    min_visibility: float = 0.0,
) -> tuple[Image.Image, str, dict]:
    """One labelled example from one photo: (image, kind, facts), kind in EXAMPLE_KINDS ("watermark" = positive).

    The photo goes through `random_canvas` (skipped with `resize=False`: marks at the photo's own resolution),
    then `overlay_example`.
    """
    if kind is None:
        kind = str(rng.choice(EXAMPLE_KINDS, p=kind_weights))
    canvas = random_canvas(photo, rng, canvas_short_side) if resize else photo.convert("RGB")
    return overlay_example(
        canvas,
        rng,
        fonts,
        watermark_strings,
        text_strings,
        kind=kind,
        jpeg_probability=jpeg_probability,
        min_visibility=min_visibility,
    )


def random_canvas(
    photo: Image.Image, rng: np.random.Generator, short_side: int | None = None, sharpen: bool = True
) -> Image.Image:
    """Crop (70-100% of each side), maybe flip, and resize `photo` to a canvas of short side `short_side`.

    None draws the short side log-uniformly from 224-768 px and the aspect from 0.6-1.7, so that marks are drawn
    at the resolution of real photos, before the model's own downscale. An upscaled canvas is soft while the
    marks drawn on it are crisp; a detector trained on that learns "crisp = watermark" and flags every sharp
    real photo. So upscaled canvases are (with `sharpen`, 85% of the time) unsharp-masked back to crisp edges.
    """
    photo = photo.convert("RGB")
    cw, ch = photo.size
    f = rng.uniform(0.7, 1.0)
    w, h = max(8, int(cw * f)), max(8, int(ch * f))
    x, y = int(rng.integers(0, cw - w + 1)), int(rng.integers(0, ch - h + 1))
    flip = rng.random() < 0.5
    size = _canvas_size(rng, short_side)
    short = min(size)
    im = photo.resize(size, Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))  # crop and resize in one pass
    upscale = short / min(w, h)
    r, percent = rng.uniform(0.5, 1.0) * upscale, int(rng.integers(60, 200))
    if sharpen and upscale > 1.2 and rng.random() < 0.85:
        im = im.filter(ImageFilter.UnsharpMask(radius=r, percent=percent, threshold=int(rng.integers(0, 3))))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else im


def overlay_example(
    canvas: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    watermark_strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    text_strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    kind: str,
    jpeg_probability: float = 0.7,
    min_visibility: float = 0.0,
) -> tuple[Image.Image, str, dict]:
    """Overlay `canvas` as `kind` ("watermark", "text" or "clean"); returns (image, kind, facts).

    The result is JPEG-compressed with probability `jpeg_probability` (quality 35-95) whatever the kind, so
    that compression artefacts carry no label information. A watermark whose `mark_visibility` is below
    `min_visibility` is redrawn (up to 3 times): for training, where a mark that changes no pixel visibly
    (white on a white sky) is label noise.
    """
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; expected one of {EXAMPLE_KINDS}")
    im = canvas.convert("RGB")
    facts: dict = {"canvas": list(im.size)}
    if kind == "watermark":
        if rng.random() < 0.15:  # marks on images that also carry ordinary text are still marks
            im = add_opaque_text(im, rng, fonts, text_strings)
        for _ in range(4):
            style = str(rng.choice(STOCK_STYLES, p=STOCK_STYLE_WEIGHTS))
            opacity = float(rng.uniform(0.15, 0.6))
            marked = add_stock_watermark(im, rng, fonts, watermark_strings, style=style, opacity=opacity)
            visibility = mark_visibility(im, marked)
            if visibility >= min_visibility:
                break
        im = marked
        facts.update(style=style, opacity=round(opacity, 3), visibility=round(visibility, 5))
    elif kind == "text":
        style = str(rng.choice(TEXT_STYLES, p=TEXT_STYLE_WEIGHTS))
        im = add_opaque_text(im, rng, fonts, text_strings, style=style)
        facts.update(style=style)
    return _maybe_jpeg(im, rng, jpeg_probability, 35, facts), kind, facts


def layered_example(
    background: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    watermark_strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    text_strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    kind: str,
    canvas_size: tuple[int, int] | None = None,
    jpeg_probability: float = 0.7,
    min_visibility: float = 0.0,
) -> tuple[Image.Image, str, dict]:
    """Like `overlay_example`, but the overlay is drawn on a canvas of `canvas_size` (random as in `random_canvas`
    when None) and composited, resized, onto `background` at the background's own size; returns (image, kind, facts).

    This is what a photo of canvas size with a mark looks like once downscaled to `background`'s size, without
    ever upscaling the background (an upscaled photo is soft, and a detector learns "crisp = watermark") and
    several times cheaper than drawing on a full-size canvas. JPEG (quality 50-95, probability
    `jpeg_probability`) is applied at the background's size, where real compression artefacts survive weakened.
    """
    if kind not in EXAMPLE_KINDS:
        raise ValueError(f"unknown example kind {kind!r}; expected one of {EXAMPLE_KINDS}")
    im = background.convert("RGB")
    if canvas_size is None:
        canvas_size = _canvas_size(rng)
    facts: dict = {"canvas": list(canvas_size)}
    if kind == "watermark":
        if rng.random() < 0.15:  # marks on images that also carry ordinary text are still marks
            im = composite_layer(im, opaque_text_layer(canvas_size, rng, fonts, text_strings))
        # the style is drawn once, so that redrawing invisible marks does not skew the mix of styles
        style = str(rng.choice(STOCK_STYLES, p=STOCK_STYLE_WEIGHTS))
        for _ in range(4):
            opacity = float(rng.uniform(0.15, 0.6))
            layer = stock_watermark_layer(canvas_size, rng, fonts, watermark_strings, style=style, opacity=opacity)
            marked = composite_layer(im, layer)
            visibility = mark_visibility(im, marked)
            if visibility >= min_visibility:
                break
        im = marked
        facts.update(style=style, opacity=round(opacity, 3), visibility=round(visibility, 5))
    elif kind == "text":
        style = str(rng.choice(TEXT_STYLES, p=TEXT_STYLE_WEIGHTS))
        im = composite_layer(im, opaque_text_layer(canvas_size, rng, fonts, text_strings, style=style))
        facts.update(style=style)
    return _maybe_jpeg(im, rng, jpeg_probability, 50, facts), kind, facts


def overlay_pair(
    background: Image.Image,
    rng: np.random.Generator,
    fonts: list[str],
    watermark_strings: WatermarkStrings = TRAIN_WATERMARK_STRINGS,
    text_strings: TextStrings = TRAIN_TEXT_STRINGS,
    *,
    make=overlay_example,
    min_visibility: float = 0.0,
) -> tuple[Image.Image, Image.Image]:
    """A training pair on one background: (a stock watermark, opaque text (60%) or the clean background), each
    made by `make` (overlay_example or layered_example). The pair shares everything but the overlay, so the only
    evidence that separates its two labels is the mark itself."""
    negative = "text" if rng.random() < 0.6 else "clean"
    marked = make(
        background, rng, fonts, watermark_strings, text_strings, kind="watermark", min_visibility=min_visibility
    )[0]
    other = make(background, rng, fonts, watermark_strings, text_strings, kind=negative, min_visibility=min_visibility)[
        0
    ]
    return marked, other


def _canvas_size(rng: np.random.Generator, short_side: int | None = None) -> tuple[int, int]:
    """(width, height) of a training canvas: short side `short_side`, or log-uniform in 224-768 px; aspect 0.6-1.7."""
    short = int(short_side or round(float(np.exp(rng.uniform(np.log(224), np.log(768))))))
    aspect = float(rng.uniform(0.6, 1.7))
    return (short, int(short * aspect)) if aspect >= 1 else (int(short / aspect), short)


def _maybe_jpeg(
    im: Image.Image, rng: np.random.Generator, probability: float, min_quality: int, facts: dict
) -> Image.Image:
    """With `probability`, `im` re-encoded as JPEG at a quality drawn from min_quality-95 (recorded in `facts`)."""
    if rng.random() >= probability:
        return im
    q = int(rng.integers(min_quality, 96))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    facts["jpeg_quality"] = q
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def mark_visibility(before: Image.Image, after: Image.Image, levels: int = 24) -> float:
    """Fraction of pixels that an overlay changed by >= `levels` (of 255) in some channel: 0 = invisible."""
    # PIL's C loops: ~10x faster than the numpy int16 equivalent on a 768 px canvas
    r, g, b = ImageChops.difference(after.convert("RGB"), before.convert("RGB")).split()
    hist = ImageChops.lighter(ImageChops.lighter(r, g), b).histogram()
    return sum(hist[levels:]) / max(1, before.width * before.height)


__all__ = [
    "EXAMPLE_KINDS",
    "HELDOUT_FONT_KEYS",
    "HELDOUT_TEXT_STRINGS",
    "HELDOUT_WATERMARK_STRINGS",
    "STOCK_STYLES",
    "TEXT_STYLES",
    "TRAIN_TEXT_STRINGS",
    "TRAIN_WATERMARK_STRINGS",
    "TextStrings",
    "WatermarkStrings",
    "add_opaque_text",
    "add_stock_watermark",
    "bold_fonts",
    "composite_layer",
    "find_fonts",
    "image_id",
    "layered_example",
    "mark_visibility",
    "opaque_text_layer",
    "overlay_example",
    "overlay_pair",
    "random_canvas",
    "split_fonts",
    "stock_watermark_layer",
    "synthetic_example",
]
