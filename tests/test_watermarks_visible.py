"""Tests for the visible-watermark detector and the synthetic overlay generator."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from provenance.errors import ModelLoadError
from provenance.watermarks.visible import (
    DEFAULT_WEIGHTS,
    TapHead,
    TapHeadConfig,
    VisibleHead,
    VisibleWatermarkDetector,
    WatermarkNet,
    WatermarkNetConfig,
    laion_classifier_head,
)
from training import overlays
from training.visible_checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def fonts() -> tuple[list[str], list[str]]:
    train, heldout = overlays.split_fonts(overlays.find_fonts())
    if not train or not heldout:
        pytest.skip("system fonts not found under /usr/share/fonts")
    return train, heldout


@pytest.fixture(scope="module")
def photos(nonmember_dir: Path) -> list[Image.Image]:
    # held-out photos: flickr8k-nonmember is never used for training
    paths = sorted(nonmember_dir.glob("*.jpg"))[:12]
    return [Image.open(p).convert("RGB") for p in paths]


@pytest.fixture(scope="module")
def detector() -> VisibleWatermarkDetector:
    return VisibleWatermarkDetector.load()


# --- overlays -----------------------------------------------------------------------------------


def test_font_and_string_splits_are_disjoint(fonts):
    train, heldout = fonts
    assert not set(train) & set(heldout)
    assert not set(overlays.TRAIN_WATERMARK_STRINGS.brands) & set(overlays.HELDOUT_WATERMARK_STRINGS.brands)
    assert not set(overlays.TRAIN_TEXT_STRINGS.phrases) & set(overlays.HELDOUT_TEXT_STRINGS.phrases)


@pytest.mark.parametrize("style", overlays.STOCK_STYLES)
def test_add_stock_watermark_changes_pixels_and_keeps_size(photos, fonts, style):
    im = photos[0].resize((320, 240))
    out = overlays.add_stock_watermark(im, np.random.default_rng(0), fonts[1], style=style, opacity=0.4)
    assert out.size == im.size and out.mode == "RGB"
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(im, dtype=np.int16))
    assert diff.max() > 20  # a visible mark was drawn
    again = overlays.add_stock_watermark(im, np.random.default_rng(0), fonts[1], style=style, opacity=0.4)
    assert np.array_equal(np.asarray(out), np.asarray(again))  # same seed, same overlay


@pytest.mark.parametrize("style", overlays.TEXT_STYLES)
def test_add_opaque_text_draws_text(photos, fonts, style):
    im = photos[1].resize((320, 240))
    out = overlays.add_opaque_text(im, np.random.default_rng(1), fonts[0], style=style)
    assert out.size == im.size and out.mode == "RGB"
    assert np.abs(np.asarray(out, dtype=np.int16) - np.asarray(im, dtype=np.int16)).max() > 60


def test_overlay_rejects_bad_arguments(photos, fonts):
    with pytest.raises(ValueError, match="style"):
        overlays.add_stock_watermark(photos[0], np.random.default_rng(0), fonts[0], style="sparkles")
    with pytest.raises(ValueError, match="fonts"):
        overlays.add_opaque_text(photos[0], np.random.default_rng(0), [])


def test_layer_drawn_large_equals_overlay_then_downscale(photos, fonts):
    # composite_layer resizes a canvas-size layer onto a small photo: the same as drawing on the big canvas and
    # downscaling, up to rounding (both operations are linear in premultiplied alpha)
    photo = photos[3]
    layer = overlays.stock_watermark_layer((448, 448), np.random.default_rng(0), fonts[0], style="centred", opacity=0.5)
    small = np.asarray(overlays.composite_layer(photo, layer), dtype=np.float32)
    big = overlays.composite_layer(photo.resize((448, 448), Image.Resampling.BILINEAR), layer)
    reference = np.asarray(big.resize(photo.size, Image.Resampling.BILINEAR), dtype=np.float32)
    up_down = photo.resize((448, 448), Image.Resampling.BILINEAR).resize(photo.size, Image.Resampling.BILINEAR)
    blurred = np.asarray(up_down, dtype=np.float32)
    # the two differ only by the softening of the photo by the up-and-down resize: compare what the mark changed
    change_small = small - np.asarray(photo, dtype=np.float32)
    change_reference = reference - blurred
    assert np.abs(change_reference).mean() > 2.0  # a sizeable mark (mean change in levels of 255)
    assert np.abs(change_small - change_reference).mean() < 0.05 * np.abs(change_reference).mean()


def test_synthetic_example_is_reproducible(photos, fonts):
    a = overlays.synthetic_example(photos[2], np.random.default_rng([7, 3]), fonts[0], kind="watermark")
    b = overlays.synthetic_example(photos[2], np.random.default_rng([7, 3]), fonts[0], kind="watermark")
    assert a[1] == b[1] == "watermark" and a[2] == b[2]
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


# --- shipped detector ---------------------------------------------------------------------------


def test_shipped_weights_load_once_and_are_small(detector):
    assert DEFAULT_WEIGHTS.is_file()
    assert DEFAULT_WEIGHTS.stat().st_size < 3_000_000
    assert VisibleWatermarkDetector.load() is detector  # loaded once per process
    assert len(detector.config.checksum) == 16


def test_watermarked_photo_scores_higher_than_clean(detector, photos, fonts):
    # held-out photos, held-out fonts, held-out strings: nothing here was seen in training. Marks are drawn on a
    # 448 px canvas and composited, downscaled, onto the 224 px photo (what a 448 px watermarked photo becomes).
    _, heldout_fonts = fonts
    clean, marked = [], []
    for i, photo in enumerate(photos[:10]):
        rng = np.random.default_rng([99, i])
        style = ("tiled", "centred", "logo", "footer", "tiled")[i % 5]
        opacity = 0.5 if style != "footer" else 0.9
        layer = overlays.stock_watermark_layer(
            (448, 448), rng, heldout_fonts, overlays.HELDOUT_WATERMARK_STRINGS, style=style, opacity=opacity
        )
        clean.append(photo)
        marked.append(overlays.composite_layer(photo, layer))
    p_clean, p_marked = detector.probability(clean), detector.probability(marked)
    assert p_clean.shape == p_marked.shape == (10,) and p_clean.dtype == np.float32
    assert p_marked.mean() > p_clean.mean() + 0.2
    assert (p_marked > p_clean).sum() >= 8  # the same photo scores higher once marked, for a clear majority


@pytest.fixture(scope="module")
def thorough():
    from provenance.watermarks.visible import THOROUGH_WEIGHTS, load_detector

    return load_detector(THOROUGH_WEIGHTS)


def test_thorough_mix_is_the_shipped_head_and_one_tuned_from_it_at_512_px(thorough, detector):
    assert isinstance(thorough, VisibleWatermarkDetector) and len(thorough.heads) == 3
    files = [h["weights"] for h in thorough.config.extra["heads"]]
    assert set(files) == {"visible_watermark_512.pt", "visible_watermark.pt"}
    at_512, at_288 = (thorough.heads[files.index(f)] for f in ("visible_watermark_512.pt", "visible_watermark.pt"))
    assert at_288 is detector.heads[0]  # the shipped 288 px head itself, loaded once per process
    assert all(
        h is at_512 for h, f in zip(thorough.heads, files, strict=False) if f == "visible_watermark_512.pt"
    )  # one model
    assert thorough.input_sizes == [288, 512] and detector.input_sizes == [288]
    assert not at_512.reads_sscd_pass and at_288.reads_sscd_pass
    assert all(w > 0 for w in thorough.logit_weights) and 0 < thorough.config.flag_threshold < 1
    training = at_512.config.extra
    first = training["init"]  # the head it was fine-tuned from, in stages: the first stage starts from the 288 px head
    while first.get("init"):
        first = first["init"]
    assert training["input_short_side"] == 512 and first["checksum"] == detector.config.checksum
    assert at_512.model.config == at_288.model.config and at_512.backbone is detector.backbone


def test_thorough_mix_is_the_weighted_logits_of_its_heads(thorough, photos):
    images = photos[:6]
    p = thorough.probability(images)

    def logits(head, mirrored):
        x = [head.preprocess(im) for im in images]
        x = [np.ascontiguousarray(xi[:, ::-1]) for xi in x] if mirrored else x
        return head.logits_from_taps(head.backbone.tap_maps(x, head.model.config.taps)).astype(np.float64)

    z = sum(
        w * logits(h, m) for h, w, m in zip(thorough.heads, thorough.logit_weights, thorough.mirrored, strict=False)
    )
    assert np.allclose(p, 1 / (1 + np.exp(-z)), atol=1e-4)
    # as a scan gives it: the 288 px maps from the scan's own SSCD pass, only the 512 px input preprocessed
    x = [thorough.preprocess(im) for im in images]
    assert all(sorted(xi) == [288, 512] and xi[512].shape[2] == 3 and min(xi[512].shape[:2]) == 512 for xi in x)
    shared = thorough.sharing_scan_pass(thorough.backbone)
    assert shared.needs_scan_taps and not thorough.needs_scan_taps
    beside = [shared.preprocess(im) for im in images]
    assert all(list(b) == [512] and np.array_equal(b[512], xi[512]) for b, xi in zip(beside, x, strict=False))
    scan_taps = thorough.backbone.embed_batch_with_taps([xi[288] for xi in x])[1]
    assert np.array_equal(shared.probabilities(beside, scan_taps), p)
    with pytest.raises(ValueError, match="scan_taps"):
        shared.probabilities(beside)
    with pytest.raises(ValueError, match="288 px input"):
        thorough.probabilities(beside)
    assert thorough.probabilities([]).shape == (0,)


def test_a_mirrored_view_reads_the_image_flipped_left_to_right(tmp_path, detector, photos):
    from provenance.watermarks.visible import DEFAULT_WEIGHTS, load_detector

    path = tmp_path / "mirror.json"
    path.write_text(
        json.dumps(
            {
                "format": "provenance-visible-watermark-mix",
                "flag_threshold": 0.5,
                "heads": [{"weights": str(DEFAULT_WEIGHTS), "logit_weight": 1.0, "mirrored": True}],
            }
        )
    )
    mirror = load_detector(path)
    images = photos[:4]
    x = [detector.preprocess(im) for im in images]
    p_flipped = detector.probabilities([{288: np.ascontiguousarray(xi[288][:, ::-1])} for xi in x])
    assert np.allclose(mirror.probability(images), p_flipped, atol=1e-6)
    assert not np.allclose(p_flipped, detector.probabilities(x), atol=1e-3)  # a different look, not the same
    assert not mirror.sharing_scan_pass(detector.backbone).needs_scan_taps  # the scan's own pass is not mirrored
    path.write_text(path.read_text().replace("true", '"yes"'))
    with pytest.raises(ModelLoadError, match="mirrored"):
        load_detector(path)
    # a mix of the 288 px head alone is the head: beside a scan it takes the scan's maps and needs no input of its own
    path.write_text(path.read_text().replace('"yes"', "false"))
    plain = load_detector(path).sharing_scan_pass(detector.backbone)
    shared = detector.sharing_scan_pass(detector.backbone)
    assert plain.needs_scan_taps and shared.needs_scan_taps
    beside = [plain.preprocess(im) for im in images]
    scan_taps = detector.backbone.embed_batch_with_taps([xi[288] for xi in x])[1]
    assert beside == [{}] * len(images) and [shared.preprocess(im) for im in images] == beside
    assert np.allclose(plain.probabilities(beside, scan_taps), shared.probabilities(beside, scan_taps), atol=1e-6)
    assert np.allclose(shared.probabilities(beside, scan_taps), detector.probabilities(x), atol=1e-6)


def test_a_bad_mix_file_names_its_problem(tmp_path):
    from provenance.watermarks.visible import DEFAULT_WEIGHTS, load_detector

    cases = {
        "not json {": "cannot read",
        json.dumps({"heads": []}): "not a visible-watermark mix",
        json.dumps(
            {"format": "provenance-visible-watermark-mix", "heads": [{"weights": "x.pt"}], "flag_threshold": 0.5}
        ): "logit_weight",
        json.dumps(
            {
                "format": "provenance-visible-watermark-mix",
                "flag_threshold": 0.5,
                "heads": [{"weights": str(DEFAULT_WEIGHTS), "logit_weight": -1}],
            }
        ): "positive logit weights",
        json.dumps(
            {
                "format": "provenance-visible-watermark-mix",
                "flag_threshold": 0.5,
                "heads": [{"weights": "missing.pt", "logit_weight": 1}],
            }
        ): "missing.pt",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"mix{i}.json"
        path.write_text(text)
        with pytest.raises(ModelLoadError, match=message):
            load_detector(path)


def test_thorough_mix_scores_small_marks_above_the_same_photos_clean(thorough, photos, fonts):
    # held-out fonts and strings; corner credits and logos, the small marks the 512 px head is for, drawn on 640 px
    # canvases (a 640 px photo is read at 512 px; at SSCD's 288 px such a mark is a few pixels high)
    _, heldout_fonts = fonts
    clean, marked = [], []
    for i, photo in enumerate(photos[:10]):
        rng = np.random.default_rng([98, i])
        canvas = photo.resize((640, 640), Image.Resampling.BICUBIC)
        style = ("corner", "logo")[i % 2]
        clean.append(canvas)
        marked.append(
            overlays.add_stock_watermark(
                canvas, rng, heldout_fonts, overlays.HELDOUT_WATERMARK_STRINGS, style=style, opacity=0.6
            )
        )
    p_clean, p_marked = thorough.probability(clean), thorough.probability(marked)
    assert p_marked.mean() > p_clean.mean() + 0.2
    assert (p_marked > p_clean).sum() >= 8


def test_preprocess_is_thread_safe_and_matches_batch(detector, photos):
    with ThreadPoolExecutor(4) as pool:
        xs = list(pool.map(detector.preprocess, photos[:8]))
    # the shipped head on SSCD features takes SSCD's own input
    assert all(list(x) == [288] and x[288].dtype == np.uint8 and min(x[288].shape[:2]) == 288 for x in xs)
    assert np.array_equal(xs[3][288], detector.preprocess(photos[3])[288])
    p = detector.probabilities(xs)
    assert np.allclose(p, detector.probability(photos[:8]), atol=1e-6)
    assert ((p >= 0) & (p <= 1)).all()


def test_probabilities_checks_inputs(detector):
    assert detector.probabilities([]).shape == (0,)
    with pytest.raises(ValueError, match="expected"):
        detector.probabilities([{288: np.zeros((3, 10, 10), np.float32)}])
    with pytest.raises(ValueError, match="288 px input"):
        detector.probabilities([np.zeros((288, 288, 3), np.uint8)])
    with pytest.raises(TypeError):
        detector.preprocess(np.zeros((10, 10, 3), np.uint8))


def test_fused_inference_model_matches_training_model(tmp_path):
    # load() folds BatchNorm into the convs; its outputs must equal the unfused network's
    torch.manual_seed(0)
    net = WatermarkNet(WatermarkNetConfig(stem=8, widths=(16, 32)))
    for m in net.modules():  # non-trivial BN statistics, so that folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, net, input_size=64, card={"note": "test"})
    det = VisibleWatermarkDetector.load(str(path))
    assert det.config.input_size == 64 and det.config.extra == {"note": "test"}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    x = det.preprocess(img)
    with torch.no_grad():
        expected = torch.sigmoid(net.eval()(torch.from_numpy(x[64])[None])).numpy()
    assert np.allclose(det.probabilities([x]), expected, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------------


def test_corrupt_or_missing_weights_raise_model_load_error(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 50)
    with pytest.raises(ModelLoadError, match="corrupt.pt"):
        VisibleWatermarkDetector.load(str(bad))
    with pytest.raises(ModelLoadError, match="no visible-watermark weights"):
        VisibleWatermarkDetector.load(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelLoadError, match="corrupt.pt"):
        VisibleWatermarkDetector.from_laion_checkpoint(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(ModelLoadError, match="not a provenance visible-watermark checkpoint"):
        VisibleWatermarkDetector.load(str(other))


def test_laion_architecture_checkpoint_loads_by_path(tmp_path, photos):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = laion_classifier_head()
    path = tmp_path / "watermark_model_v1.pt"
    torch.save(model.state_dict(), path)  # LAION ships a bare state dict

    det = VisibleWatermarkDetector.from_laion_checkpoint(str(path))
    assert det.config.input_size == 256 and det.config.positive_index == 0
    p = det.probability(photos[:2])
    assert p.shape == (2,) and p.dtype == np.float32 and ((p >= 0) & (p <= 1)).all()
    # p(watermark) is the softmax at index 0 ('watermark' = 0, 'clear' = 1 in LAION's training labels)
    x = torch.from_numpy(np.stack([det.preprocess(im)[256] for im in photos[:2]]))
    with torch.no_grad():
        expected = torch.softmax(model.eval()(x), dim=1)[:, 0].numpy()
    assert np.allclose(p, expected, atol=1e-5)

    # our own checkpoint is not a LAION one
    ours = tmp_path / "ours.pt"
    save_checkpoint(ours, WatermarkNet(WatermarkNetConfig(stem=8, widths=(16,))), 64, {})
    with pytest.raises(ModelLoadError, match="not a LAION"):
        VisibleWatermarkDetector.from_laion_checkpoint(str(ours))


# --- heads on SSCD features ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_head_path(tmp_path_factory) -> Path:
    """A TapHead with random weights and non-trivial BatchNorm statistics, saved as a checkpoint."""
    from provenance.models import load_descriptor

    torch.manual_seed(0)
    head = TapHead(TapHeadConfig(width=8))
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    head.set_input_scale({"stride16": np.full(1024, 20.0)})
    path = tmp_path_factory.mktemp("head") / "head.pt"
    save_checkpoint(path, head.eval(), card={"note": "tiny"}, backbone=load_descriptor("sscd", {"path": None}).spec)
    return path


def test_head_on_sscd_features_loads_and_matches_the_training_module(tiny_head_path, photos):
    det = VisibleWatermarkDetector.load(str(tiny_head_path))
    assert det.backbone is not None and det.backbone.has_feature_taps and det.config.extra == {"note": "tiny"}
    inputs = [det.preprocess(im) for im in photos[:3]]
    xs = [x[288] for x in inputs]
    assert all(x.dtype == np.uint8 and min(x.shape[:2]) == 288 for x in xs)  # SSCD's own input
    p = det.probabilities(inputs)
    assert p.shape == (3,) and ((p >= 0) & (p <= 1)).all()
    # the loaded head has BatchNorm folded into its convs; the training module must give the same numbers
    ckpt = torch.load(tiny_head_path, weights_only=True)
    head = TapHead(TapHeadConfig.from_dict(ckpt["arch"]))
    head.load_state_dict(ckpt["state_dict"])
    _, taps = det.backbone.embed_batch_with_taps(xs)
    with torch.no_grad():
        expected = [
            torch.sigmoid(head.eval()({"stride16": torch.from_numpy(t["stride16"][None])})).item() for t in taps
        ]
    assert np.allclose(p, expected, atol=1e-5)
    shared = det.sharing_scan_pass(det.backbone)  # as a scan with this SSCD model runs it: the scan's maps
    assert shared.needs_scan_taps and shared.preprocess(photos[0]) == {}
    assert np.allclose(shared.probabilities([{}] * 3, taps), p, atol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        det.probabilities([{288: np.zeros((3, 10, 10), np.float32)}])


def test_head_refuses_another_sscd_model(tiny_head_path, tmp_path):
    ckpt = torch.load(tiny_head_path, weights_only=True)
    ckpt["backbone"] = {"model_id": "sscd/other.onnx", "checksum": "0123456789abcdef"}
    other = tmp_path / "other-backbone.pt"
    torch.save(ckpt, other)
    with pytest.raises(ModelLoadError, match="installed one"):
        VisibleWatermarkDetector.load(str(other))


def test_a_card_flag_threshold_that_is_not_a_probability_is_refused(tmp_path):
    ckpt = torch.load(DEFAULT_WEIGHTS, weights_only=False)
    ckpt["card"] = {**ckpt.get("card", {}), "flag_threshold": 1.5}
    bad = tmp_path / "bad-gate.pt"
    torch.save(ckpt, bad)
    with pytest.raises(ModelLoadError, match="flag_threshold 1.5"):
        VisibleWatermarkDetector.load(str(bad))


@pytest.fixture(scope="module")
def train_head():
    from training import train_visible_watermark_head

    return train_visible_watermark_head


def test_head_training_command_runs_end_to_end_and_reuses_its_cache(
    tmp_path, flickr_shards_dir, fonts, photos, train_head
):
    # training/train_visible_watermark_head.py at toy size: examples -> cached SSCD maps -> head -> a checkpoint that
    # the detector loads through the shipped path; the photo under pair 0 is listed as carrying a real mark
    names = train_head.photo_names(flickr_shards_dir, train_head.TRAIN_SHARDS)
    marked = names[int(train_head.pair_photos(1, len(names), seed=0)[0])]
    audit = tmp_path / "marks.json"
    audit.write_text(json.dumps({"photos": [{"name": marked, "mark": "a photographer's signature"}]}))
    out, cache = tmp_path / "head.pt", tmp_path / "cache"
    args = [
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--data",
        str(flickr_shards_dir.parent),
        "--pairs",
        "6",
        "--chunk",
        "3",
        "--epochs",
        "1",
        "--batch-pairs",
        "2",
        "--width",
        "8",
        "--threads",
        "1",
        "--depth",
        "2",
        "--flag-threshold",
        "0.8",
        "--exclude-photos",
        str(audit),
    ]
    assert train_head.main(args) == 0
    maps = np.load(cache / "stride16_1.npy")
    assert maps.shape == (6, 1024, 18, 18) and maps.dtype == np.uint8 and maps.max() > 0
    card = json.loads(out.with_suffix(".json").read_text())["training"]
    assert card["pairs"] == 6 and card["backbone"]["taps"] == ["stride16"] and len(card["loss_per_epoch"]) == 1
    on_marked = int((train_head.pair_photos(6, len(names), seed=0) == names.index(marked)).sum())
    assert card["pairs_trained"] == 6 - on_marked < 6 and card["excluded_photos"]["training_photos_listed"] == 1
    det = VisibleWatermarkDetector.load(str(out))
    assert det.probability(photos[:2]).shape == (2,)
    # the card's gate is the one scans flag at; the extra 3x3 conv survives the round trip
    model = det.heads[0].model
    assert det.config.flag_threshold == 0.8 and model.config.depth == 2 and len(model.branches[0]) == 3
    before = (cache / "stride16_0.npy").stat().st_mtime_ns
    assert train_head.main(args) == 0  # the second run trains from the cache without remaking it
    assert (cache / "stride16_0.npy").stat().st_mtime_ns == before


def test_head_fine_tuned_at_another_input_size_is_read_at_that_size(tmp_path, flickr_shards_dir, photos, train_head):
    # --init fine-tunes a trained head; --input-size makes its examples, and the detector's inputs, at that short
    # side (the shipped 512 px head is made this way, from the 288 px one)
    base, tuned, cache = tmp_path / "base.pt", tmp_path / "tuned.pt", tmp_path / "cache"
    common = [
        "--data",
        str(flickr_shards_dir.parent),
        "--pairs",
        "4",
        "--chunk",
        "4",
        "--epochs",
        "1",
        "--batch-pairs",
        "2",
        "--threads",
        "1",
        "--exclude-photos",
        "",
    ]
    assert train_head.main(["--out", str(base), "--cache", str(tmp_path / "c288"), "--width", "8", *common]) == 0
    assert (
        train_head.main(
            [
                "--out",
                str(tuned),
                "--cache",
                str(cache),
                "--input-size",
                "96",
                "--init",
                str(base),
                "--lr",
                "1e-3",
                *common,
            ]
        )
        == 0
    )
    assert np.load(cache / "stride16_0.npy").shape == (8, 1024, 6, 6)  # 96 px / stride 16
    card = json.loads(tuned.with_suffix(".json").read_text())["training"]
    det_base, det = VisibleWatermarkDetector.load(str(base)), VisibleWatermarkDetector.load(str(tuned))
    assert card["input_short_side"] == 96 and card["init"]["file"] == "base.pt"
    assert card["init"]["checksum"] == det_base.config.checksum and card["init"]["init"] is None
    assert card["init"]["training_command"].endswith("--exclude-photos ")  # base's own recipe travels along
    assert det.heads[0].model.config == det_base.heads[0].model.config  # the architecture comes from --init
    assert det_base.heads[0].reads_sscd_pass and det_base.input_sizes == [288]
    assert not det.heads[0].reads_sscd_pass and det.input_sizes == [96]
    assert not det.sharing_scan_pass(det.backbone).needs_scan_taps  # a scan's 288 px maps are not its input
    x = det.preprocess(photos[0])[96]
    assert x.dtype == np.uint8 and min(x.shape[:2]) == 96
    # its p is the head on the maps of SSCD run at 96 px
    logit = det.heads[0].model(
        {"stride16": torch.from_numpy(det.backbone.tap_maps([x], ("stride16",))[0]["stride16"][None])}
    )
    np.testing.assert_allclose(det.probability([photos[0]]), torch.sigmoid(logit).detach().numpy(), atol=1e-5)
    assert not np.allclose(det.probability(photos[:2]), det_base.probability(photos[:2]))
    # the gate the evaluation chooses is written into the checkpoint afterwards, without training again
    assert train_head.main(["--out", str(tuned), "--set-flag-threshold", "0.7"]) == 0
    assert json.loads(tuned.with_suffix(".json").read_text())["training"]["flag_threshold"] == 0.7
    regated = VisibleWatermarkDetector.load(str(tuned))
    assert regated.config.flag_threshold == 0.7
    np.testing.assert_array_equal(regated.probability(photos[:2]), det.probability(photos[:2]))
    # a further stage on photos at their own size: its card carries the whole chain back to the first head
    staged = tmp_path / "staged.pt"
    assert (
        train_head.main(
            [
                "--out",
                str(staged),
                "--cache",
                str(tmp_path / "c-native"),
                "--input-size",
                "96",
                "--init",
                str(tuned),
                "--native-share",
                "1",
                "--seed",
                "1",
                *common,
            ]
        )
        == 0
    )
    card = json.loads(staged.with_suffix(".json").read_text())["training"]
    assert card["data"]["native_share"] == 1 and card["init"]["file"] == "tuned.pt"
    assert card["init"]["init"]["file"] == "base.pt" and "--native-share" not in card["init"]["training_command"]


def test_native_pairs_are_drawn_on_the_photo_at_its_own_size(photos, fonts, train_head):
    # --native-share: the photo cropped square at its own resolution (no resize, no sharpening), then read at the
    # head's input size like every pair; without it a seed keeps the pairs it always drew
    photo = photos[0]
    square = train_head.native_square(photo, np.random.default_rng(0))
    assert square.size == (min(photo.size),) * 2
    box = np.asarray(square)
    crops = [
        np.asarray(photo.crop((x, y, x + box.shape[1], y + box.shape[0])))
        for x in range(photo.size[0] - box.shape[1] + 1)
        for y in range(photo.size[1] - box.shape[0] + 1)
    ]
    assert any(np.array_equal(box, c) or np.array_equal(box[:, ::-1], c) for c in crops)  # pixels untouched
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    jpegs = [buf.getvalue()]
    plain = train_head.SquarePairs(jpegs, fonts[0], 3, 0, 2, side=96)
    assert np.array_equal(plain[1], train_head.SquarePairs(jpegs, fonts[0], 3, 0, 2, side=96, native_share=0.0)[1])
    native = train_head.SquarePairs(jpegs, fonts[0], 3, 0, 2, side=96, native_share=1.0)
    assert native[0].shape == (2, 96, 96, 3) and not np.array_equal(native[0], plain[0])


def test_head_trainer_knows_which_photo_each_pair_is_drawn_on(fonts, train_head):
    # pairs_to_keep trusts pair_photos to name the photo SquarePairs draws on; photos of three solid colours show
    # which one each pair's negative half was made from
    colours = [(210, 40, 40), (40, 210, 40), (40, 40, 210)]
    jpegs = []
    for c in colours:
        buf = io.BytesIO()
        Image.new("RGB", (320, 260), c).save(buf, "JPEG", quality=95)
        jpegs.append(buf.getvalue())
    pairs = train_head.SquarePairs(jpegs, fonts[0], seed=7, start=0, stop=8)
    drawn = [int(np.argmax(np.median(pairs[j][1].reshape(-1, 3), axis=0))) for j in range(8)]
    assert drawn == train_head.pair_photos(8, 3, seed=7).tolist() and len(set(drawn)) > 1
    keep = train_head.pairs_to_keep(["red", "green", "blue"], 8, 7, exclude={"green"})
    assert keep.tolist() == [j for j in range(8) if drawn[j] != 1]


@pytest.fixture(scope="module")
def eval_visible():
    from training import eval_visible_watermark

    return eval_visible_watermark


def test_the_real_mark_audit_names_photos_that_exist(
    eval_visible, train_head, flickr_shards_dir, nonmember_dir, coco_dir
):
    # a misspelt name would silently leave a marked photo among the negatives
    marked = eval_visible.load_real_marks()
    known = set(train_head.photo_names(flickr_shards_dir, (*train_head.TRAIN_SHARDS, "00004")))
    known |= {f"nonmember/{p.name}" for p in nonmember_dir.glob("*.jpg")}
    known |= {f"coco/{p.name}" for p in coco_dir.glob("*.jpg")}
    assert len(marked) > 50 and set(marked) <= known
    assert {e["set"] for e in marked.values()} == {"train", "heldout", "coco"}


def test_eval_scores_photos_with_real_marks_as_positives_not_negatives(eval_visible):
    def ex(kind, photo):
        return (None, kind, {"photo": photo})

    examples = [
        ex("watermark", "a"),
        ex("text", "a"),
        ex("clean", "a"),  # a photo that already has a mark
        ex("watermark", "b"),
        ex("text", "b"),
        ex("clean", "b"),
        ex("clean", "c"),
        ex("clean", "c"),
        ex("text", "c"),
    ]  # c: two variants of one clean photo
    p = np.array([0.9, 0.8, 0.7, 0.95, 0.2, 0.1, 0.6, 0.6, 0.3])
    kept_p, kept = eval_visible.without_photos(p, examples, {"a": {}})
    assert [f["photo"] for _, _, f in kept] == ["b"] * 3 + ["c"] * 3 and kept_p.tolist() == p[3:].tolist()
    real = eval_visible.real_mark_summary(p, examples, {"a": {}}, threshold=0.65)
    # a's untouched photo (0.7) against the clean photos b (0.1) and c (0.6, counted once) and the text of b, c
    assert real["n"] == 1 and real["auc_vs_clean"] == 1.0 and real["recall_at_threshold"] == 1.0
    assert real["scores"] == {"a": 0.7}


def test_real_photographer_marks_in_the_data_score_above_unmarked_photos(detector, eval_visible, nonmember_dir):
    # the audit's untouched held-out nonmember photos that carry a real mark (signatures, "(c) name" lines, URLs)
    # against 150 nonmember photos without one: the only real-world positives offline. The shipped head's AUC here
    # is 0.65 (BENCHMARKS: it is weak on small corner credits); this guards against a head that ignores real marks
    marked = eval_visible.load_real_marks()
    paths = sorted(nonmember_dir.glob("*.jpg"))
    with_mark = [p for p in paths if f"nonmember/{p.name}" in marked]
    without = [p for p in paths if f"nonmember/{p.name}" not in marked][:150]
    assert len(with_mark) >= 10

    def scores(ps):
        return detector.probability([Image.open(p).convert("RGB") for p in ps])

    assert eval_visible.auc(scores(with_mark), scores(without)) > 0.6


def test_pixel_cnn_trainer_packs_for_a_gpu_and_trains_two_architectures(tmp_path, flickr_shards_dir, fonts):
    # training/train_visible_watermark.py: --pack (what a GPU machine is sent: re-encoded photos, subset fonts) gives
    # the same examples as the full fonts, and training on the pack writes checkpoints the detector loads
    import shutil

    from training import train_visible_watermark as trainer

    font_root = tmp_path / "fonts"
    for f in fonts[0][:3]:  # three training faces, at their paths relative to the system's font folder
        target = font_root / Path(f).relative_to(overlays.FONT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
    _, _, names = trainer.read_shards(flickr_shards_dir, ("00000",))
    audit = tmp_path / "marks.json"
    audit.write_text(json.dumps({"photos": [{"name": names[5], "mark": "a signature"}]}))
    pack = tmp_path / "pack"
    common = ["--shards", "00000", "--exclude-photos", str(audit)]
    assert (
        trainer.main(["--pack", str(pack), "--data", str(flickr_shards_dir), "--fonts", str(font_root), *common]) == 0
    )
    packed_photos, _, packed_names = trainer.read_shards(pack / "flickr8k-dev", ("00000",))
    assert len(packed_names) == len(names) - 1 and names[5] not in packed_names
    assert sum(len(b) for b in packed_photos) < (flickr_shards_dir / "00000.tar").stat().st_size  # re-encoded

    photos, captions, _ = trainer.read_shards(flickr_shards_dir, ("00000",))
    strings = overlays.TextStrings(
        phrases=overlays.TRAIN_TEXT_STRINGS.phrases + tuple(captions), words=overlays.TRAIN_TEXT_STRINGS.words
    )

    def examples(font_dir):
        train_fonts, _ = overlays.split_fonts(overlays.find_fonts(font_dir))
        ds = trainer.SyntheticPairs(
            photos, train_fonts, overlays.TRAIN_WATERMARK_STRINGS, strings, 128, 0, 100, 0.001, "mixed"
        )
        return [ds[i][0].numpy() for i in range(12)]

    for full, subset in zip(examples(font_root), examples(pack / "fonts"), strict=False):
        np.testing.assert_array_equal(full, subset)

    out, alt = tmp_path / "cnn.pt", tmp_path / "cnn_wide.pt"
    assert (
        trainer.main(
            [
                "--data",
                str(pack / "flickr8k-dev"),
                "--fonts",
                str(pack / "fonts"),
                *common,
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--input-size",
                "64",
                "--stem",
                "8",
                "--widths",
                "16",
                "--also-arch",
                f"8:16,32={alt}",
                "--out",
                str(out),
                "--generator",
                "mixed",
            ]
        )
        == 0
    )
    for path, widths in ((out, [16]), (alt, [16, 32])):
        card = json.loads(path.with_suffix(".json").read_text())["training"]
        assert (
            card["architecture"]["widths"] == widths and card["steps"] == 2 and len(card["loss_every_100_steps"]) == 1
        )
        head = VisibleHead.load(str(path))
        assert head.config.input_size == 64 and head.backbone is None
        z = head.logits([head.preprocess(Image.fromarray(x)) for x in examples(pack / "fonts")[0]])
        assert z.shape == (2,) and np.isfinite(z).all()
