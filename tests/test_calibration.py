"""training.calibration: score normalisation, centring and thresholds at a target FPR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.calibration import (
    ScoreNormalization,
    background_similarity,
    centre,
    corpus_margin,
    normalize_scores,
    rates,
    threshold_at_fpr,
    top1,
    topk,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_background_similarity_is_mean_of_chosen_neighbours() -> None:
    rng = np.random.default_rng(0)
    xq, xbg = _unit(rng.normal(size=(5, 16))), _unit(rng.normal(size=(40, 16)))
    sims = np.sort(xq @ xbg.T, axis=1)[:, ::-1]
    np.testing.assert_allclose(background_similarity(xq, xbg), sims[:, :3].mean(1), rtol=1e-5)
    np.testing.assert_allclose(
        background_similarity(xq, xbg, ScoreNormalization(1.0, 2, 5)), sims[:, 2:6].mean(1), rtol=1e-5
    )


def test_normalisation_lowers_queries_that_look_like_everything() -> None:
    rng = np.random.default_rng(1)
    common = _unit(rng.normal(size=(1, 32)))
    # Background photos all share one direction (think: plain skies); a query along it looks like all of them.
    xbg = _unit(common + 0.3 * rng.normal(size=(50, 32)))
    generic, distinct = _unit(common + 0.3 * rng.normal(size=(1, 32))), _unit(rng.normal(size=(1, 32)))
    xq = np.vstack([generic, distinct])
    adjusted = normalize_scores(xq, np.array([0.6, 0.6]), xbg)
    assert adjusted[0] < adjusted[1]  # same raw score, but the generic query needs more margin
    np.testing.assert_allclose(normalize_scores(xq, np.array([0.6, 0.6]), xbg, ScoreNormalization(0.0)), [0.6, 0.6])
    assert normalize_scores(xq, np.ones((2, 4)), xbg).shape == (2, 4)


def test_threshold_at_fpr_keeps_the_promise() -> None:
    rng = np.random.default_rng(2)
    neg = rng.uniform(0, 0.6, size=1000)
    t = threshold_at_fpr(neg, 0.01)
    assert (neg >= t).mean() <= 0.01
    assert (neg >= t - 0.02).mean() > 0.005  # and is not needlessly high
    assert t == round(t, 2)
    assert threshold_at_fpr(neg, 0.0) > neg.max()


def test_rates_count_only_right_id_hits() -> None:
    tpr, fpr = rates(np.array([0.9, 0.9, 0.2]), np.array([True, False, True]), np.array([0.1, 0.8]), 0.5)
    assert tpr == pytest.approx(1 / 3) and fpr == 0.5


def test_top1_and_centre() -> None:
    rng = np.random.default_rng(3)
    xb = _unit(rng.normal(size=(100, 8)))
    s, r = top1(xb[[7, 42]] + 0.01, xb)
    assert r.tolist() == [7, 42] and (s > 0.9).all()
    c = centre(xb, xb.mean(0))
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-5)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="xq must be a 2-d float matrix"):
        background_similarity(np.zeros(4, np.float32), np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="needs at least 3"):
        background_similarity(np.zeros((1, 4), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="first <= last"):
        ScoreNormalization(1.0, 3, 1)
    with pytest.raises(ValueError, match="empty"):
        threshold_at_fpr(np.array([]), 0.01)


def test_topk_sorted_and_corpus_margin() -> None:
    rng = np.random.default_rng(4)
    xb = _unit(rng.normal(size=(50, 8)))
    s, r = topk(xb[:3], xb, 5)
    assert s.shape == (3, 5) and r[:, 0].tolist() == [0, 1, 2]
    assert (np.diff(s, axis=1) <= 1e-6).all()
    m = corpus_margin(s, ScoreNormalization(1.0, 1, 3))
    np.testing.assert_allclose(m, s[:, 0] - s[:, 1:4].mean(1), rtol=1e-5)
    with pytest.raises(ValueError, match="first >= 1"):
        corpus_margin(s, ScoreNormalization(1.0, 0, 2))


def test_calibration_harness_chooses_similar_clip_for_the_given_clip_model(tmp_path, nonmember_dir) -> None:
    """training/calibrate.py --clip-model indexes the corpus with that CLIP checkpoint (here a tiny random one, through
    the same loading path as real weights) and writes a similar_clip chosen at <= 5% FPR, which scan can load."""
    import json
    import shutil

    from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint
    from provenance.scan import Thresholds, load_thresholds
    from training import calibrate

    nonmembers = tmp_path / "nonmembers"
    nonmembers.mkdir()
    for photo in sorted(nonmember_dir.glob("*.jpg"))[:24]:
        shutil.copy(photo, nonmembers / photo.name)
    ckpt = make_tiny_checkpoint(tmp_path / "tiny-clip.pt")
    out = tmp_path / "out"
    out.mkdir()
    rc = calibrate.main(
        [
            "--corpus",
            str(Path(__file__).resolve().parents[1] / "provenance" / "sample" / "coco-cc"),
            "--nonmembers",
            str(nonmembers),
            "--positives",
            "32",
            "--negatives",
            "24",
            "--untouched-positives",
            "4",
            "--views",
            "",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--clip-model",
            TINY_CLIP_MODEL,
            "--clip-pretrained",
            str(ckpt),
        ]
    )
    assert rc == 0
    chosen = load_thresholds(out / "thresholds.json")
    assert chosen.similar_clip != Thresholds().similar_clip and -1.0 <= chosen.similar_clip <= 1.0
    assert json.loads((out / "thresholds.json").read_text())["similar_clip"] == chosen.similar_clip
    report = (out / "calibration.md").read_text()
    assert f"### CLIP similar band ({TINY_CLIP_MODEL}/tiny-clip.pt)" in report
    assert "For this CLIP model only" in report and "| reencode | 2 |" in report
    # the queries' CLIP vectors were cached per model: the untouched non-members' top-1 scores, recomputed from
    # them, put at most 5% (1 of 24) at or above the chosen threshold
    cached = list((tmp_path / "cache").glob("queries-*/clip_base-*.npy"))
    assert len(cached) == 1
    index_dir = next((tmp_path / "cache").glob("index-coco-cc-clip-*"))
    from provenance.store import ProvenanceIndex

    xb = np.asarray(ProvenanceIndex.open(index_dir).vectors("clip"), dtype=np.float32)
    untouched_neg = np.load(cached[0])[-24:]  # the plan ends with every non-member, untouched
    assert int(((untouched_neg @ xb.T).max(axis=1) >= chosen.similar_clip).sum()) <= 1
