"""training/edits.py: every edit family gives a sane RGB image and is deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from provenance.images import decode_image, load_image
from training.edits import FAMILY_NAMES, apply_edit


@pytest.fixture(scope="module")
def photos(nonmember_dir: Path) -> list[Image.Image]:
    square = load_image(sorted(nonmember_dir.glob("*.jpg"))[0]).image  # 224x224 Flickr8k
    wide = square.resize((320, 180))  # a landscape photo exercises the aspect-dependent paths
    return [square, wide]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_gives_sane_rgb_image(family: str, photos: list[Image.Image]) -> None:
    for photo in photos:
        for seed in (0, 1):
            e = apply_edit(photo, family, seed)
            assert e.image.mode == "RGB" and e.family == family
            w, h = e.image.size
            assert 16 <= w <= 1100 and 16 <= h <= 1200, (family, e.image.size)
            # It is still a picture, not a blank canvas.
            assert np.asarray(e.image).std() > 5
            # And it survives the path the scanner takes: JPEG bytes -> decode_image.
            assert decode_image(e.to_bytes(), family).image.size == e.image.size


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_is_deterministic(family: str, photos: list[Image.Image]) -> None:
    a = apply_edit(photos[0], family, 1234)
    b = apply_edit(photos[0], family, np.random.default_rng(1234))
    assert a.params == b.params
    assert a.image.tobytes() == b.image.tobytes()


def test_seeds_differ_and_families_change_pixels(photos: list[Image.Image]) -> None:
    photo = photos[0]
    assert apply_edit(photo, "crop", 1).params != apply_edit(photo, "crop", 2).params
    for family in FAMILY_NAMES:
        e = apply_edit(photo, family, 5)
        if e.image.size == photo.size:
            diff = np.abs(np.asarray(e.image, np.int16) - np.asarray(photo, np.int16)).mean()
            assert diff > 0.2, family  # even a re-encode changes some pixels


def test_geometry_is_what_the_family_says(photos: list[Image.Image]) -> None:
    photo = photos[1]  # 320x180
    assert apply_edit(photo, "rotate90", 0).image.size in {(180, 320), (320, 180)}
    for seed in range(5):
        area = apply_edit(photo, "crop_heavy", seed).params["area"]
        assert 0.25 <= area <= 0.55
        assert apply_edit(photo, "screenshot", seed).params["photo_area"] < 0.9


def test_unknown_family_is_refused(photos: list[Image.Image]) -> None:
    with pytest.raises(ValueError, match="unknown edit family"):
        apply_edit(photos[0], "sepia-ish", 0)
