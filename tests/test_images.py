"""Decoding: every awkward real-world image either decodes correctly or raises a specific error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from provenance.errors import DecompressionBombError, UnreadableImageError
from provenance.images import decode_image, iter_image_paths, load_image


@pytest.fixture(scope="module")
def photo(coco_dir):
    return Image.open(sorted(coco_dir.glob("*.jpg"))[0]).convert("RGB")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_real_photo_decodes_with_hash_and_size(coco_dir):
    path = sorted(coco_dir.glob("*.jpg"))[0]
    d = load_image(path)
    assert d.image.mode == "RGB" and (d.width, d.height) == d.image.size
    assert len(d.sha256) == 64 and d.format == "JPEG"


def test_cmyk_16bit_palette_alpha_grey_decode_to_rgb(photo):
    small = photo.resize((64, 48))
    cases = {
        "cmyk": _encode(small.convert("CMYK"), "JPEG"),
        "palette": _encode(small.convert("P"), "PNG"),
        "grey": _encode(small.convert("L"), "PNG"),
        "16bit": _encode(Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257), "PNG"),
    }
    rgba = small.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    cases["alpha"] = _encode(rgba, "PNG")
    for name, data in cases.items():
        d = decode_image(data, name)
        assert d.image.mode == "RGB" and d.image.size == (64, 48), name
    assert np.asarray(decode_image(cases["alpha"]).image).min() == 255
    # 16-bit is scaled, not clipped to white
    grey16 = np.asarray(decode_image(cases["16bit"]).image)[..., 0]
    assert abs(int(grey16.mean()) - int(np.asarray(small.convert("L")).mean())) <= 2


def test_exif_rotation_is_applied(photo):
    small = photo.resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    d = decode_image(_encode(small, "JPEG", exif=exif.tobytes()))
    assert d.image.size == (40, 80)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n", "not an image"),
    ],
)
def test_bad_bytes_raise_named_errors(data, message):
    with pytest.raises(UnreadableImageError, match=message):
        decode_image(data, "bad.jpg")


def test_truncated_jpeg_raises(coco_dir):
    data = sorted(coco_dir.glob("*.jpg"))[0].read_bytes()[:3000]
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        decode_image(data, "bad.jpg")


def test_decompression_bomb_rejected():
    data = _encode(Image.new("L", (5000, 5000)), "PNG")  # tiny file, 25 MP
    with pytest.raises(DecompressionBombError, match="exceeds"):
        decode_image(data, "bomb.png", max_pixels=10_000_000)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UnreadableImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(UnreadableImageError, match="directory"):
        load_image(tmp_path)


def test_iter_image_paths_expands_folders_and_globs(coco_dir, tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(3):
        (tmp_path / "sub" / f"{i}.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    found = iter_image_paths([str(tmp_path), str(coco_dir / "0000000007*.jpg"), str(tmp_path / "notes.txt")])
    names = [p.name for p in found]
    assert names[:3] == ["0.png", "1.png", "2.png"]
    assert "notes.txt" in names  # named explicitly: kept, so it yields its error
    assert any(n.startswith("0000000007") for n in names)


def test_jpeg_drafted_to_a_minimum_side_keeps_its_file_size_and_orientation(coco_dir):
    photo = Image.open(sorted(coco_dir.glob("*.jpg"))[0]).convert("RGB").resize((2048, 1536))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees: upright it is 1536 x 2048
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90, exif=exif)
    full = decode_image(buf.getvalue(), "big.jpg")
    small = decode_image(buf.getvalue(), "big.jpg", min_side=512)
    assert (full.width, full.height) == (small.width, small.height) == (1536, 2048)
    assert small.image.size == (768, 1024)  # decoded at 1/2: the short side stays >= 512, and it is upright
    assert decode_image(buf.getvalue(), "big.jpg", min_side=1000).image.size == full.image.size
    png = _encode(photo, "PNG")  # only JPEG decoders can scale while decoding
    assert decode_image(png, "big.png", min_side=512).image.size == (2048, 1536)
