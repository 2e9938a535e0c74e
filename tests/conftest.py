"""Shared test fixtures: paths to the real photos in ../shared/data and small helpers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO = SHARED_DATA / "coco-cc"
FLICKR_SHARDS = SHARED_DATA / "flickr8k-dev"
NONMEMBERS = SHARED_DATA / "flickr8k-nonmember"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"test data not found at {path} (set PROVENANCE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    return _need(COCO)


@pytest.fixture(scope="session")
def flickr_shards_dir() -> Path:
    return _need(FLICKR_SHARDS)


@pytest.fixture(scope="session")
def nonmember_dir() -> Path:
    return _need(NONMEMBERS)


@pytest.fixture(scope="session")
def coco_subset(coco_dir):
    """A function: (root, n, subdir="", nested=()) -> root holding the first n COCO photos and their metadata.jsonl
    rows (captions, license, origin); photo i goes under `subdir` when i is in `nested`, its file_name with it."""

    def make(root: Path, n: int, subdir: str = "", nested: Iterable[int] = ()) -> Path:
        rows = {
            json.loads(line)["file_name"]: json.loads(line)
            for line in (coco_dir / "metadata.jsonl").read_text().splitlines()
            if line.strip()
        }
        nested = set(nested)
        if subdir:
            (root / subdir).mkdir(parents=True, exist_ok=True)
        with open(root / "metadata.jsonl", "w") as meta:
            for i, p in enumerate(sorted(coco_dir.glob("*.jpg"))[:n]):
                rel = f"{subdir}/{p.name}" if i in nested else p.name
                shutil.copy(p, root / rel)
                meta.write(json.dumps({**rows[p.name], "file_name": rel}) + "\n")
        return root

    return make


@pytest.fixture(scope="session")
def window_screenshot():
    """A function: (photo, photo_width) -> the photo shown small in a desktop window (scan's centre view finds it)."""
    return _window_screenshot


def _window_screenshot(photo, photo_width: float):
    """The photo shown small in the middle of a desktop window with a title bar and a column of text."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (1100, 760), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, 1100, 40), fill=(60, 60, 70))
    draw.text((12, 12), "Photos - Gallery viewer", fill=(255, 255, 255))
    for y in range(60, 760, 28):
        draw.text((20, y), f"folder item {y}", fill=(30, 30, 30))
    w = int(1100 * photo_width)
    h = round(w * photo.height / photo.width)
    canvas.paste(photo.resize((w, h)), ((1100 - w) // 2, (760 - h) // 2 + 10))
    return canvas
