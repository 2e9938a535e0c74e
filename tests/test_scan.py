"""The detector on real photos: replicas with the right id, clean non-members, marks, metadata, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, PngImagePlugin
from pydantic import ValidationError

from provenance.errors import InvalidOptionsError
from provenance.indexer import BuildOptions, build
from provenance.scan import Scanner, ScanOptions, Thresholds, decide_verdict, fail_on_met, match_verdicts
from provenance.types import Match, ScanRecord, WatermarkEvidence
from provenance.watermarks.visible import VisibleWatermarkDetector


@pytest.fixture(scope="module")
def index_dir(coco_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("scan-idx") / "coco"
    build(str(coco_dir), d, BuildOptions(descriptors=["sscd", "pdq"]))
    return d


@pytest.fixture(scope="module")
def scanner(index_dir) -> Scanner:
    return Scanner.open(index_dir, ScanOptions(k=5))


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[Path]:
    return sorted(coco_dir.glob("*.jpg"))


def _save(im: Image.Image, path: Path, **kw) -> Path:
    im.save(path, **kw)
    return path


def test_verdict_rules_are_ordered():
    t = Thresholds(exact_pdq_bits=8, exact_sscd=0.95, replica_sscd=0.5, similar_sscd=0.35, similar_clip=0.9)
    assert decide_verdict({"sscd": 0.99, "pdq_distance": 2}, t) == "exact"
    assert decide_verdict({"sscd": 0.40, "pdq_distance": 2}, t) == "similar"  # PDQ alone can't call exact
    assert decide_verdict({"sscd": 0.70, "pdq_distance": 90}, t) == "replica"
    assert decide_verdict({"sscd": 0.36}, t) == "similar"
    assert decide_verdict({"sscd": 0.1, "clip": 0.95}, t) == "similar"
    assert decide_verdict({"sscd": 0.1, "clip": 0.2, "pdq_distance": 120}, t) == "novel"
    assert decide_verdict({"sscd": 0.1}, t, same_bytes=True) == "exact"
    # each match's own verdict, from its descriptor's score alone (the library's, the API only presents it)
    rec = ScanRecord(
        path="q",
        matches=[
            Match("a", 0.7, "sscd"),
            Match("b", 0.99, "pdq", distance=3),
            Match("c", 0.2, "clip"),
            Match("d", 0.1, "sscd"),
        ],
        extra={"identical_file": "d"},
    )
    assert match_verdicts(rec, t) == ["replica", "exact", "novel", "exact"]


def test_corpus_file_is_exact_and_reencoded_copy_too(scanner, photos, tmp_path):
    rec = scanner.scan_paths([photos[4]])[0]
    assert rec.verdict == "exact" and rec.matches[0].id == photos[4].name
    png = _save(Image.open(photos[6]).convert("RGB"), tmp_path / "reencoded.png")
    rec = scanner.scan_paths([png])[0]
    assert rec.verdict == "exact" and rec.matches[0].id == photos[6].name
    assert rec.scores["pdq_distance"] <= 10 and rec.scores["sscd"] > 0.95


def test_edited_copy_is_a_replica_with_the_right_id(scanner, photos, tmp_path):
    im = Image.open(photos[9]).convert("RGB")
    w, h = im.size
    edited = ImageEnhance.Contrast(im.crop((w // 6, h // 10, w - w // 8, h - h // 5))).enhance(1.5)
    edited = edited.resize((edited.width * 2 // 3, edited.height * 2 // 3))
    path = _save(edited, tmp_path / "edited.jpg", quality=45)
    rec = scanner.scan_paths([path])[0]
    assert rec.verdict == "replica", rec.scores
    assert rec.matches[0].id == photos[9].name and rec.matches[0].descriptor == "sscd"
    assert rec.width == edited.width and len(rec.sha256) == 64


def test_non_members_are_not_replicas(scanner, nonmember_dir):
    records = scanner.scan_paths(sorted(nonmember_dir.glob("*.jpg"))[:40])
    verdicts = [r.verdict for r in records]
    assert "exact" not in verdicts and "replica" not in verdicts, [
        (r.path, r.scores) for r in records if r.verdict in ("exact", "replica")
    ]


def test_centre_view_finds_a_photo_shown_small_in_a_screenshot(
    scanner, index_dir, photos, nonmember_dir, tmp_path, window_screenshot
):
    centre = Scanner.open(index_dir, ScanOptions(k=5, centre_view=True, visible=False, invisible=False))
    shots = [
        _save(window_screenshot(Image.open(photos[i]).convert("RGB"), 0.4), tmp_path / f"shot{i}.jpg", quality=85)
        for i in (5, 25)
    ]
    plain, thorough = scanner.scan_paths(shots), centre.scan_paths(shots)
    for i, one_view, two_views in zip((5, 25), plain, thorough, strict=False):
        assert one_view.verdict not in ("exact", "replica"), one_view.scores  # the whole window: photo too small
        assert two_views.verdict == "replica" and two_views.matches[0].id == photos[i].name, two_views.scores
        assert two_views.extra["sscd_view"] == "centre" and two_views.scores["sscd"] > one_view.scores["sscd"]
    # a corpus photo itself is still its own top match, from the whole-image view
    rec = centre.scan_paths([photos[3]])[0]
    assert rec.verdict == "exact" and rec.matches[0].id == photos[3].name and "sscd_view" not in rec.extra
    # and the second view does not turn non-members into replicas
    records = centre.scan_paths(sorted(nonmember_dir.glob("*.jpg"))[:40])
    assert not [r.scores for r in records if r.verdict in ("exact", "replica")]


def test_best_per_item_keeps_each_item_once_at_its_best_view():
    from provenance.search import best_per_item
    from provenance.types import Match

    full = [Match("a", 0.5, "sscd"), Match("b", 0.4, "sscd")]
    part = [Match("b", 0.7, "sscd"), Match("c", 0.45, "sscd"), Match("a", 0.2, "sscd")]
    merged = best_per_item([full, part], k=2)
    assert [(m.id, m.score) for m in merged] == [("b", 0.7), ("a", 0.5)]
    assert merged[0] is part[0] and best_per_item([[], []], k=3) == []


def test_corrupt_files_give_error_records_and_the_batch_continues(scanner, photos, tmp_path):
    bad = tmp_path / "truncated.jpg"
    bad.write_bytes(photos[0].read_bytes()[:1000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    records = scanner.scan_paths([bad, photos[2], empty, tmp_path / "missing.jpg", text])
    assert [r.verdict for r in records] == ["error", "exact", "error", "error", "error"]
    assert "truncated" in records[0].error and "empty" in records[2].error and "not found" in records[3].error
    assert records[1].matches[0].id == photos[2].name
    d = records[0].to_dict()
    assert d["verdict"] == "error" and d["matches"] == [] and d["error"]
    # each failure kind has its code beside its message (the class of the library's exception)
    assert [r.error_code for r in records] == ["not_an_image", None, "not_an_image", "unreadable", "not_an_image"]
    assert d["error_code"] == "not_an_image" and d["checks"] == {}  # nothing ran on a file that did not decode
    bomb = Scanner(scanner.searcher, ScanOptions(k=5, max_pixels=100 * 100)).scan_paths([photos[2]])[0]
    assert bomb.error_code == "too_many_pixels" and "decompression bomb" in bomb.error


def test_options_check_their_rules_once_with_a_clear_message():
    with pytest.raises(InvalidOptionsError, match="invisible_crops is a way of running the invisible check"):
        ScanOptions.build(invisible=False, invisible_crops=True)
    with pytest.raises(InvalidOptionsError, match="visible_thorough picks the shipped thorough"):
        ScanOptions.build(visible_thorough=True, visible_model="other.pt")
    with pytest.raises(InvalidOptionsError, match="k: Input should be less than or equal to 100"):
        ScanOptions.build(k=1000)
    with pytest.raises(ValueError):  # the constructor itself refuses them too (pydantic's ValidationError)
        ScanOptions(workers=0)
    o = ScanOptions()
    with pytest.raises(ValidationError):  # frozen: a Scanner and every request see the same options
        o.k = 3  # type: ignore[misc]
    # thorough turns on the slower checks that do better on real inputs, where the check they belong to is on
    assert o.requested_checks()["centre_view"] is False
    thorough = o.with_overrides(thorough=True).requested_checks()
    assert thorough["centre_view"] and thorough["invisible_crops"] and not thorough["visible_thorough"]
    assert thorough["region_search"] and not o.requested_checks()["region_search"]
    no_invisible = ScanOptions(thorough=True, invisible=False).requested_checks()
    assert no_invisible["centre_view"] and not no_invisible["invisible_crops"]
    assert o.with_overrides(centre_view=None) is o  # None keeps the value


def test_record_keys_are_the_contract(scanner, photos):
    d = scanner.scan_paths([photos[1]])[0].to_dict()
    assert set(d) >= {
        "path",
        "sha256",
        "width",
        "height",
        "verdict",
        "matches",
        "scores",
        "watermarks",
        "error",
        "error_code",
        "checks",
    }
    assert d["checks"] == {
        "descriptors": ["sscd", "pdq"],
        "visible": True,
        "visible_thorough": False,
        "invisible": True,
        "invisible_crops": False,
        "c2pa": True,
        "metadata": True,
        "centre_view": False,
        "region_search": False,
    }
    assert set(d["scores"]) == {"sscd", "clip", "pdq_distance"}
    assert set(d["watermarks"]) == {"visible", "invisible", "c2pa", "metadata"}
    assert set(d["matches"][0]) >= {"id", "score", "descriptor", "caption", "source"}
    visible = d["watermarks"]["visible"]
    assert 0.0 <= visible["probability"] <= 1.0
    assert visible["threshold"] == VisibleWatermarkDetector.load().config.flag_threshold == 0.9
    assert visible["flagged"] is (visible["probability"] >= visible["threshold"])
    json.dumps(d)


def test_fail_on_watermark_follows_the_visible_flag_not_the_probability():
    def rec(p: float, flagged: bool) -> ScanRecord:
        return ScanRecord(
            path="x.png",
            sha256="0" * 64,
            width=1,
            height=1,
            verdict="novel",
            watermarks=WatermarkEvidence(visible={"probability": p, "flagged": flagged, "threshold": 0.9}),
        )

    assert not fail_on_met([rec(0.8, False)], ["watermark"])  # likelier than not, but below the detector's gate
    assert fail_on_met([rec(0.8, False), rec(0.95, True)], ["watermark"])
    assert not fail_on_met([rec(0.95, True)], ["replica"])


def test_png_text_chunks_and_memorization_are_reported(scanner, photos, tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a castle on a hill\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, "
        "Seed: 1234, Size: 512x512, Model: sd15",
    )
    info.add_text(
        "provenance",
        json.dumps(
            {
                "prompt": "x",
                "memorization": {"noise_norm": 9.0, "pairwise_sscd": 0.8, "flag": True, "flag_reason": "test"},
            }
        ),
    )
    path = tmp_path / "gen.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(path, pnginfo=info)
    rec = scanner.scan_paths([path])[0]
    meta = rec.watermarks.metadata
    assert meta and "a castle on a hill" in json.dumps(meta)
    assert rec.extra["memorization"]["flag"] is True


def test_stable_diffusion_marks_are_found_and_clean_images_are_not(scanner, photos, tmp_path):
    import cv2
    from imwatermark import WatermarkEncoder

    im = Image.open(photos[12]).convert("RGB").resize((512, 512))
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", b"StableDiffusionV1")
    bgr = enc.encode(cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR), "dwtDct")
    marked = _save(Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), tmp_path / "sd1.png")
    clean = _save(im, tmp_path / "clean.png")
    rec_marked, rec_clean = scanner.scan_paths([marked, clean])
    schemes = {m.scheme: m for m in rec_marked.watermarks.invisible}
    assert "sd-v1" in schemes and schemes["sd-v1"].p_value <= 1e-6
    assert rec_clean.watermarks.invisible == []
    assert fail_on_met([rec_marked], ["watermark"]) and not fail_on_met([rec_clean], ["watermark"])


def test_scan_bytes_matches_scan_paths(scanner, photos):
    data = photos[3].read_bytes()
    a = scanner.scan_bytes(data, "upload.jpg")
    b = scanner.scan_paths([photos[3]])[0]
    assert a.verdict == b.verdict == "exact" and a.matches[0].id == b.matches[0].id


def test_one_image_scans_search_on_one_openmp_thread_with_the_batch_results(scanner, photos):
    import faiss

    before = faiss.omp_get_max_threads()
    batch = scanner.scan_paths(photos[:4])  # one batch of 4: FAISS on the caller's OpenMP threads
    for path, rec in zip(photos[:4], batch, strict=True):
        (one,) = scanner.scan_many_bytes([(str(path), path.read_bytes())])  # the server's one-upload batch
        assert one.verdict == rec.verdict and one.scores == rec.scores
        assert [(m.id, m.descriptor, m.score) for m in one.matches] == [
            (m.id, m.descriptor, m.score) for m in rec.matches
        ]
    assert faiss.omp_get_max_threads() == before  # the thread's setting is handed back


def test_visible_watermark_reads_the_descriptor_pass_and_agrees_with_its_own(scanner, photos, coco_dir, tmp_path):
    # The shipped visible-watermark head reads SSCD's intermediate maps. With an SSCD index the scanner takes
    # them from the descriptor's forward pass; without one the detector runs SSCD itself; both give one number.

    assert scanner._visible.needs_scan_taps
    images = [Image.open(p).convert("RGB") for p in photos[:3]]
    expected = VisibleWatermarkDetector.load().probability(images)
    got = [r.watermarks.visible["probability"] for r in scanner.scan_paths(photos[:3])]
    assert np.allclose(got, expected, atol=1e-4)
    pdq_only = tmp_path / "pdq-only"
    build(str(coco_dir), pdq_only, BuildOptions(descriptors=["pdq"]))
    alone = Scanner.open(pdq_only, ScanOptions(k=5))
    assert not alone._visible.needs_scan_taps
    got_alone = [r.watermarks.visible["probability"] for r in alone.scan_paths(photos[:3])]
    assert np.allclose(got_alone, expected, atol=1e-4)
    # --visible-thorough's mix: its 288 px head reads the scan's pass, its 512 px head runs SSCD again; without an
    # SSCD index the mix runs both sizes itself; all three give one number
    from provenance.watermarks.visible import THOROUGH_WEIGHTS, load_detector

    expected = load_detector(THOROUGH_WEIGHTS).probability(images)
    thorough = Scanner(scanner.searcher, ScanOptions(k=5, visible_thorough=True))
    assert thorough._visible.needs_scan_taps
    got = [r.watermarks.visible["probability"] for r in thorough.scan_paths(photos[:3])]
    assert np.allclose(got, expected, atol=1e-4)
    alone = Scanner.open(pdq_only, ScanOptions(k=5, visible_thorough=True))
    assert not alone._visible.needs_scan_taps
    got_alone = [r.watermarks.visible["probability"] for r in alone.scan_paths(photos[:3])]
    assert np.allclose(got_alone, expected, atol=1e-4)
