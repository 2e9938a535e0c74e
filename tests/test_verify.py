"""Geometric verification on real photos: an edited copy verifies with its region; another photo and a next frame
of the same scene do not; the verdict rules."""

from __future__ import annotations

import io

import pytest
from copydet_helpers import NEXT_FRAME_PAIR, dev_photos, iou
from PIL import Image, ImageEnhance

from provenance.indexer import THUMBNAIL_SIZE, _thumbnail
from provenance.types import Match
from provenance.verify import Verification, VerifyOptions, decide_with_verification, extract, verify

pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def nonmember_photos(nonmember_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(nonmember_dir.glob("*.jpg"))[:12]]


def test_an_edited_copy_verifies_with_its_region_and_another_photo_does_not(nonmember_photos):
    photo = nonmember_photos[2]
    w, h = photo.size
    crop = photo.crop((w // 4, h // 5, w - w // 8, h - h // 6)).rotate(8, Image.Resampling.BICUBIC, expand=True)
    crop = ImageEnhance.Color(crop).enhance(1.4).resize((crop.width * 2, crop.height * 2))
    corpus = extract(photo.resize((160, 160)), 320)
    v = verify(extract(crop, 448), corpus)
    assert v.verified and v.inliers >= 20, v
    # the matched area in the corpus photo is the crop's (x from 1/4 to 7/8 of the width)
    assert iou(v.corpus_box, (0.25, 0.2, 0.875, 0.83)) > 0.6, v.corpus_box
    other = verify(extract(nonmember_photos[3], 448), corpus)
    assert not other.verified and other.inliers < 8, other


def test_a_next_frame_of_the_scene_does_not_verify(flickr_shards_dir):
    photos = dev_photos(flickr_shards_dir, set(NEXT_FRAME_PAIR))
    member, frame = (photos[k] for k in NEXT_FRAME_PAIR)
    v = verify(extract(frame, 448), extract(member.resize((160, 160)), 320))
    # the scene matches in places (the hallway did not move) but not as one copy
    assert v.matches >= 15 and not v.verified, v


def test_verification_decides_the_verdict():
    copy = Match("a", 0.3, "sscd")
    good = Verification(60, 58, True, (0.1, 0.1, 0.4, 0.5), (0.0, 0.0, 1.0, 1.0), 0.97, 0.2)
    verdict, match = decide_with_verification("novel", [(copy, good)], "a")
    assert verdict == "replica" and match.region == {"query": [0.1, 0.1, 0.4, 0.5], "corpus": [0.0, 0.0, 1.0, 1.0]}
    frame = Verification(56, 37, False, None, None, 0.9, 0.7)
    assert decide_with_verification("replica", [(copy, frame)], "a", VerifyOptions()) == ("similar", None)
    assert decide_with_verification("exact", [(copy, frame)], "a") == ("exact", None)


def test_the_corpus_margin_promotes_unless_verification_says_look_alike():
    from provenance.verify import corpus_margin

    assert corpus_margin([0.5, 0.2, 0.2, 0.2, 0.1]) == pytest.approx(0.3)
    assert corpus_margin([0.5, 0.2]) is None  # a corpus too small to have a margin
    m = Match("a", 0.38, "sscd")
    assert decide_with_verification("similar", [], "a", margin=0.3) == ("replica", None)
    assert decide_with_verification("similar", [], "a", margin=0.1) == ("similar", None)
    assert decide_with_verification("similar", [], "a", VerifyOptions(replica_margin=None), 0.3) == ("similar", None)
    look_alike = Verification(20, 4, False)
    assert decide_with_verification("similar", [(m, look_alike)], "a", margin=0.3) == ("similar", None)


def test_a_heavy_crop_of_a_large_photo_verifies_on_the_stored_thumbnail(coco_dir):
    """The index's thumbnail is what the corpus side is verified on: a heavy crop of a real-resolution photo
    (18% of its area) verifies against today's 256 px thumbnail, with its region; an index built with 160 px
    thumbnails is verified from what it has."""
    hires = coco_dir.parent / "openimages-hires"
    if not hires.exists():
        pytest.skip(f"test data not found at {hires}")
    photo = Image.open(sorted(hires.glob("*.jpg"))[3]).convert("RGB")  # 1920x1080
    w, h = photo.size
    truth = (0.45, 0.35, 0.875, 0.77)  # 0.425 x 0.42 of the sides: 18% of the area
    crop = photo.crop((round(truth[0] * w), round(truth[1] * h), round(truth[2] * w), round(truth[3] * h)))
    crop = crop.resize((round(crop.width * 320 / crop.height), 320), Image.Resampling.BICUBIC)
    query = extract(Image.open(io.BytesIO(_jpeg(crop, 85))), 448)
    thumb = Image.open(io.BytesIO(_thumbnail(photo)))
    assert max(thumb.size) == THUMBNAIL_SIZE
    v = verify(query, extract(thumb, VerifyOptions().corpus_side))
    # the matched area (where the inliers are) lies inside the crop's area of the photo
    assert v.verified and v.corpus_box is not None, v
    assert all(v.corpus_box[i] >= truth[i] - 0.02 for i in (0, 1)), v.corpus_box
    assert all(v.corpus_box[i] <= truth[i] + 0.02 for i in (2, 3)), v.corpus_box
    old = thumb.copy()
    old.thumbnail((160, 160))  # the thumbnail of an older index: same code path, less detail
    assert verify(query, extract(old, VerifyOptions().corpus_side)).inliers < v.inliers


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
