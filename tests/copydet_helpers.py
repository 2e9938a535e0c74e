"""Helpers for the copy-detection tests: real photos composed into insets and contact sheets, a next-frame pair."""

from __future__ import annotations

import io

from PIL import Image

from provenance.corpus import read_webdataset

# Two frames of the same scene in flickr8k-dev (a woman in a hallway, seconds apart; SSCD cosine 0.78), found by
# training/copydet_eval.py's mining and checked by eye. The first is used as a corpus photo, the second as a query.
NEXT_FRAME_PAIR = ("000020036", "000030338")


def dev_photos(shards, keys: set[str]) -> dict[str, Image.Image]:
    out = {}
    for item in read_webdataset(str(shards)):
        if item.id in keys:
            out[item.id] = Image.open(io.BytesIO(item.data)).convert("RGB")
            if len(out) == len(keys):
                break
    return out


def inset(
    photo: Image.Image, background: Image.Image, width: float, at: tuple[float, float]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The photo at `width` of a 640x480 copy of the background, its top-left corner at relative `at`."""
    canvas = background.resize((640, 480))
    w = round(640 * width)
    h = round(w * photo.height / photo.width)
    x, y = round(at[0] * 640), round(at[1] * 480)
    canvas.paste(photo.resize((w, h)), (x, y))
    return canvas, (x / 640, y / 480, (x + w) / 640, (y + h) / 480)


def contact_sheet(photos: list[Image.Image], n: int, tile: int = 200, gap: int = 6) -> Image.Image:
    side = n * tile + (n + 1) * gap
    sheet = Image.new("RGB", (side, side), (255, 255, 255))
    for i, p in enumerate(photos[: n * n]):
        sheet.paste(p.resize((tile, tile)), (gap + (i % n) * (tile + gap), gap + (i // n) * (tile + gap)))
    return sheet


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union
