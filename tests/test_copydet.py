"""The scanner's region search (scan --thorough) on real photos: partial copies found with the right id and their
region, next frames of a scene and clean non-members not called replica."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from copydet_helpers import NEXT_FRAME_PAIR, contact_sheet, dev_photos, inset, iou
from PIL import Image

from provenance.corpus import read_webdataset
from provenance.indexer import BuildOptions, build
from provenance.report import render_html
from provenance.scan import Scanner, ScanOptions

pytest.importorskip("cv2")

QUIET = dict(visible=False, invisible=False, c2pa=False, metadata=False, k=5)


@pytest.fixture(scope="module")
def corpus(flickr_shards_dir, tmp_path_factory) -> tuple[Path, dict[str, Image.Image], Path]:
    """An index of 40 flickr8k-dev photos (the first of the next-frame pair among them), the photos by corpus id
    (file name) and their folder."""
    folder = tmp_path_factory.mktemp("copydet-corpus")
    photos: dict[str, Image.Image] = {}
    for item in read_webdataset(str(flickr_shards_dir)):
        if len(photos) < 39 or item.id == NEXT_FRAME_PAIR[0]:
            photos[f"{item.id}.jpg"] = Image.open(io.BytesIO(item.data)).convert("RGB")  # a folder's ids: file names
            (folder / f"{item.id}.jpg").write_bytes(item.data)
        if len(photos) == 40:
            break
    index = folder.parent / "copydet-index"
    build(str(folder), index, BuildOptions(descriptors=["sscd", "pdq"]))
    return index, photos, folder


@pytest.fixture(scope="module")
def thorough(corpus) -> Scanner:
    return Scanner.open(corpus[0], ScanOptions(**QUIET, thorough=True))


@pytest.fixture(scope="module")
def default(corpus) -> Scanner:
    return Scanner.open(corpus[0], ScanOptions(**QUIET))


def _jpeg(im: Image.Image, quality: int = 88) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def backgrounds(nonmember_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(nonmember_dir.glob("*.jpg"))[20:29]]


def test_an_inset_is_found_with_its_id_and_region(corpus, thorough, default, backgrounds, tmp_path):
    _, photos, _ = corpus
    ids = list(photos)
    target = ids[7]
    query, truth = inset(photos[target], backgrounds[0], 0.33, (0.55, 0.35))
    path = tmp_path / "inset.jpg"
    path.write_bytes(_jpeg(query))
    before = default.scan_paths([path])[0]
    assert before.verdict not in ("exact", "replica") or before.matches[0].id != target  # today's miss
    rec = thorough.scan_paths([path])[0]
    assert rec.verdict == "replica" and rec.matches[0].id == target, (rec.scores, rec.extra)
    region = rec.matches[0].region
    assert iou(region["query"], truth) > 0.6, (region, truth)
    assert iou(region["corpus"], (0, 0, 1, 1)) > 0.6
    assert rec.to_dict()["matches"][0]["region"] == region  # the JSON contract carries it
    # the HTML report draws the region on the query and on the corpus item, whose 256 px thumbnail it shrinks
    page = render_html([rec], thumbnails=thorough.index.thumbnail)
    assert page.count('<svg class="region"') == 2
    b64 = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert len(b64) >= 2 and all(max(Image.open(io.BytesIO(base64.b64decode(b))).size) <= 192 for b in b64)


def test_a_contact_sheet_tile_is_found(corpus, thorough, backgrounds):
    _, photos, _ = corpus
    target = list(photos)[12]
    tiles = backgrounds[:3]
    tiles.insert(2, photos[target])  # bottom-left of a 2x2 sheet
    rec = thorough.scan_bytes(_jpeg(contact_sheet(tiles, 2)), "sheet.jpg")
    assert rec.verdict in ("exact", "replica") and rec.matches[0].id == target, (rec.scores, rec.extra)
    assert iou(rec.matches[0].region["query"], (0, 0.5, 0.5, 1)) > 0.5


def test_a_next_frame_of_a_corpus_photo_is_not_a_replica(flickr_shards_dir, corpus, thorough, default):
    frame = dev_photos(flickr_shards_dir, {NEXT_FRAME_PAIR[1]})[NEXT_FRAME_PAIR[1]]
    data = _jpeg(frame, 92)
    assert default.scan_bytes(data, "frame.jpg").verdict == "replica"  # SSCD alone: a look-alike scores high
    rec = thorough.scan_bytes(data, "frame.jpg")
    assert rec.verdict == "similar" and rec.matches[0].id == f"{NEXT_FRAME_PAIR[0]}.jpg", (rec.scores, rec.extra)
    assert rec.extra["verdict_before_verification"] == "replica"
    assert rec.matches[0].region is None


def test_clean_non_members_are_not_flagged(thorough, nonmember_dir):
    records = thorough.scan_paths(sorted(nonmember_dir.glob("*.jpg"))[40:60])
    flagged = [(r.path, r.scores, r.extra) for r in records if r.verdict in ("exact", "replica")]
    assert not flagged


def test_a_corpus_photo_itself_stays_exact(corpus, thorough):
    _, photos, folder = corpus
    target = list(photos)[3]
    rec = thorough.scan_paths([folder / target])[0]
    assert rec.verdict == "exact" and rec.matches[0].id == target
    assert rec.checks["region_search"] and rec.checks["centre_view"]  # what --thorough turned on
