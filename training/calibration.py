"""Score calibration for copy detection: SSCD score normalisation, descriptor centring, thresholds at a target FPR.

Pure numpy over L2-normalised float vectors (`xq` queries, `xb` corpus, `xbg` a background set of images
known NOT to be in the corpus). Scores are cosine similarities, higher = more similar.

Score normalisation follows Pizzi et al. 2022 (SSCD, eq. 8, and `sscd/disc_eval.py`): a query's similarity
to a corpus item is lowered by `beta` times its mean similarity to its `first..last` nearest background
images, so that queries which resemble many unrelated images (plain skies, text, UI) need a larger margin.
The SSCD paper's default is beta = 1 over the 1st..3rd neighbours (`1.0[0,2]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreNormalization:
    """SSCD-style normalisation: s' = s - beta * mean(similarity to background neighbours first..last).

    `first` and `last` are zero-based and inclusive, as in SSCD's `1.0[0,2]` notation."""

    beta: float = 1.0
    first: int = 0
    last: int = 2

    def __post_init__(self) -> None:
        if self.first < 0 or self.last < self.first:
            raise ValueError(f"need 0 <= first <= last, got first={self.first}, last={self.last}")

    def __str__(self) -> str:
        return f"{self.beta:.2f}[{self.first},{self.last}]"


def _check_matrix(name: str, x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"{name} must be a 2-d float matrix (n, d), got "
            f"{type(x).__name__}{getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def background_similarity(
    xq: np.ndarray, xbg: np.ndarray, norm: ScoreNormalization = ScoreNormalization(), batch: int = 1024
) -> np.ndarray:
    """(n,) float32: each query's mean similarity to its `norm.first..norm.last` nearest background vectors."""
    xq = _check_matrix("xq", xq)
    xbg = _check_matrix("xbg", xbg)
    if xq.shape[1] != xbg.shape[1]:
        raise ValueError(f"xq has dimension {xq.shape[1]} but xbg has {xbg.shape[1]}")
    if len(xbg) <= norm.last:
        raise ValueError(f"the background has {len(xbg)} vectors; normalisation {norm} needs at least {norm.last + 1}")
    out = np.empty(len(xq), dtype=np.float32)
    for i in range(0, len(xq), batch):
        sims = xq[i : i + batch] @ xbg.T  # (b, n_background)
        # Top last+1 similarities, sorted descending; argpartition keeps this O(n_background).
        top = -np.partition(-sims, norm.last, axis=1)[:, : norm.last + 1]
        top = -np.sort(-top, axis=1)
        out[i : i + batch] = top[:, norm.first : norm.last + 1].mean(axis=1)
    return out


def normalize_scores(
    xq: np.ndarray, scores: np.ndarray, xbg: np.ndarray, norm: ScoreNormalization = ScoreNormalization()
) -> np.ndarray:
    """Adjusted scores, same shape as `scores` ((n,) top-1 or (n, k) top-k of each query):
    `scores - norm.beta * background_similarity(xq, xbg)`. The ranking of one query's matches is unchanged;
    what changes is which queries clear a global threshold."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim not in (1, 2) or len(scores) != len(xq):
        raise ValueError(f"scores must be (n,) or (n, k) with n = {len(xq)} queries, got shape {scores.shape}")
    adj = norm.beta * background_similarity(xq, xbg, norm)
    return scores - (adj[:, None] if scores.ndim == 2 else adj)


def centre(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Subtract a mean descriptor (e.g. of a background set) and re-L2-normalise: SSCD's `PCA,L2norm` centring,
    which removes the direction all photos share and so lowers unrelated pairs' similarity."""
    x = _check_matrix("x", x)
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1)
    if mean.shape[1] != x.shape[1]:
        raise ValueError(f"mean has dimension {mean.shape[1]} but x has {x.shape[1]}")
    y = x - mean
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def corpus_margin(scores: np.ndarray, norm: ScoreNormalization = ScoreNormalization(1.0, 1, 3)) -> np.ndarray:
    """(n,) top-1 score minus `beta` times the mean of the query's own corpus neighbours `first..last`.

    The same idea as `normalize_scores`, with the corpus as the background: it needs no extra data and
    the scanner already retrieves the top k. `scores` is (n, k) sorted best first, k > norm.last; `first`
    must be >= 1 so the candidate match is not compared with itself."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 2 or scores.shape[1] <= norm.last:
        raise ValueError(f"scores must be (n, k) with k > {norm.last}, got shape {scores.shape}")
    if norm.first < 1:
        raise ValueError("corpus_margin needs first >= 1: neighbour 0 is the candidate match itself")
    return scores[:, 0] - norm.beta * scores[:, norm.first : norm.last + 1].mean(axis=1)


def topk(xq: np.ndarray, xb: np.ndarray, k: int = 1, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive inner-product search: (n, k) float32 scores and (n, k) int64 corpus rows, best first."""
    xq = _check_matrix("xq", xq)
    xb = _check_matrix("xb", xb)
    k = min(k, len(xb))
    scores = np.empty((len(xq), k), dtype=np.float32)
    rows = np.empty((len(xq), k), dtype=np.int64)
    for i in range(0, len(xq), batch):
        sims = xq[i : i + batch] @ xb.T  # (b, n_corpus)
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_scores, axis=1)
        rows[i : i + batch] = np.take_along_axis(part, order, axis=1)
        scores[i : i + batch] = np.take_along_axis(part_scores, order, axis=1)
    return scores, rows


def top1(xq: np.ndarray, xb: np.ndarray, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive inner-product search: (n,) float32 best scores and (n,) int64 corpus rows."""
    scores, rows = topk(xq, xb, 1, batch)
    return scores[:, 0], rows[:, 0]


def threshold_at_fpr(negative_scores: np.ndarray, max_fpr: float, decimals: int | None = 2) -> float:
    """The lowest threshold t (rounded UP to `decimals`) at which the share of negatives scoring >= t is at
    most `max_fpr`. Rounding up keeps the guarantee on the calibration set."""
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())[::-1]
    if neg.size == 0:
        raise ValueError("negative_scores is empty: a threshold needs negatives")
    if not 0 <= max_fpr < 1:
        raise ValueError(f"max_fpr must be in [0, 1), got {max_fpr}")
    allowed = int(np.floor(max_fpr * neg.size))  # negatives allowed at or above the threshold
    t = float(np.nextafter(neg[allowed], np.inf))  # just above the first negative that must be rejected
    if decimals is not None:
        t = float(np.ceil(t * 10**decimals) / 10**decimals)
        if (neg >= t).sum() > allowed:  # float noise at the rounding boundary
            t += 10**-decimals
    return t


def rates(
    pos_scores: np.ndarray, pos_correct: np.ndarray, neg_scores: np.ndarray, threshold: float
) -> tuple[float, float]:
    """(TPR, FPR) at `threshold`; a positive counts only when its top match is the right item (`pos_correct`)."""
    pos_scores = np.asarray(pos_scores)
    hit = (pos_scores >= threshold) & np.asarray(pos_correct, dtype=bool)
    tpr = float(hit.mean()) if pos_scores.size else float("nan")
    neg_scores = np.asarray(neg_scores)
    fpr = float((neg_scores >= threshold).mean()) if neg_scores.size else float("nan")
    return tpr, fpr
