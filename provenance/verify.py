"""Geometric verification: does a query share one consistent transform with a corpus image over the matched area?

A copy (pasted, tiled, cropped, rotated, recoloured) maps onto its source by one affine transform: its local
features (SIFT) match the source's and agree on that transform, with small residuals. A next frame of the same
scene resembles the photo as a whole (SSCD scores it high) but its subjects moved and the camera shifted, so
few matches agree on one transform. Verification also says where the copy is: the inliers' bounding boxes in
the query and in the corpus image, relative (x0, y0, x1, y1) in 0..1.

OpenCV (SIFT, RANSAC); pure functions over PIL images and numpy arrays. Figures in BENCHMARKS.md
("Copy detection: partial copies").
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from provenance.errors import ModelLoadError
from provenance.types import Match, Verdict

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class VerifyOptions:
    """Local features and what counts as one consistent transform."""

    query_side: int = 448  # the query's long side for feature extraction (larger images are shrunk)
    # the corpus image's long side: the index's thumbnail is used as it is (256 px; 160 px in older indexes)
    corpus_side: int = 256
    max_features: int = 1500  # SIFT keypoints per image, strongest first
    ratio: float = 0.8  # Lowe's ratio test on the two nearest corpus descriptors
    ransac_px: float = 0.02  # RANSAC reprojection threshold, as a share of the corpus image's long side
    min_inliers: int = 10  # a verified copy: at least this many matches agree on one affine transform,
    min_local_ratio: float = 0.5  # at least this share of the matches inside the matched area do (see verify)
    # and their median reprojection error is at most this many pixels (Verification.residual_px): a copy maps
    # to within SIFT's own precision, a next frame of the scene (the camera moved, the subjects moved) mostly
    # does not. In pixels, not as a share of the image: SIFT's precision is a fraction of a pixel at any
    # thumbnail size, while a next frame's misfit grows with the thumbnail (tuned on 160 px thumbnails)
    max_residual_px: float = 0.48
    # which candidates are verified: the best `candidates` corpus items over all views that score at least
    # `min_score` (SSCD cosine); below it a candidate is not worth the features. A pasted cut-out that the
    # region proposals miss is often the whole image's top match at 0.18-0.25: verification finds it there
    candidates: int = 2
    min_score: float = 0.18
    # a replica by SSCD score whose top candidate has no consistent transform with the query is called similar:
    # fewer than `demote_below` inliers (a look-alike), or min_inliers or more with a median residual above
    # `frame_residual_px` (the scene agrees roughly, as a next frame's does, but not as a copy's)
    demote_below: int = 8
    frame_residual_px: float = 0.56
    # SSCD score normalisation by the corpus's own neighbours (corpus_margin): a whole image whose top match
    # stands this far above its next three is a replica too, unless verification says look-alike; None = off
    replica_margin: float | None = 0.25
    # chosen on training/copydet_eval.py's families and hard negatives: BENCHMARKS.md, "Copy detection: partial
    # copies"

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio}")
        if self.min_inliers < 3:
            raise ValueError(f"min_inliers must be >= 3 (an affine transform needs 3 points), got {self.min_inliers}")


@dataclass(frozen=True)
class Features:
    """SIFT keypoints of one image: (n, 2) float32 pixel positions and (n, 128) float32 descriptors."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple[int, int]  # (width, height) of the image the points are in


@dataclass(frozen=True)
class Verification:
    """The outcome of matching a query against one corpus image."""

    matches: int  # ratio-test matches
    inliers: int  # of those, how many agree on the RANSAC affine transform
    verified: bool  # inliers >= min_inliers, local_ratio >= min_local_ratio, residual_px <= max_residual_px
    query_box: Box | None = None  # the inliers' bounding box in the query, relative
    corpus_box: Box | None = None  # and in the corpus image
    local_ratio: float = 0.0  # inliers / matches inside the inliers' bounding box in the query
    # median inlier reprojection error, in pixels of the corpus image, or of the query where the transform
    # enlarges it (the coarser side of the match)
    residual_px: float = float("inf")

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "matches": self.matches,
            "inliers": self.inliers,
            "local_ratio": self.local_ratio,
            "residual_px": self.residual_px if np.isfinite(self.residual_px) else None,
            "verified": self.verified,
        }


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # a base dependency, imported only by the region search (scan --thorough)
        raise ModelLoadError(
            f"the region search (scan --thorough) needs OpenCV, which does not import ({e}); "
            "pip install opencv-python-headless"
        ) from None
    return cv2


def extract(image: Image.Image, max_side: int, options: VerifyOptions | None = None) -> Features:
    """SIFT features of the image, its long side shrunk to at most `max_side`."""
    o = options or VerifyOptions()
    cv2 = _cv2()
    grey = image if image.mode == "L" else image.convert("L")
    scale = max_side / max(grey.size)
    if scale < 1:
        grey = grey.resize(
            (max(16, round(grey.width * scale)), max(16, round(grey.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=2.0,
        )
    sift = cv2.SIFT_create(nfeatures=o.max_features)
    kps, desc = sift.detectAndCompute(np.asarray(grey, dtype=np.uint8), None)
    pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    desc = desc if desc is not None else np.zeros((0, 128), dtype=np.float32)
    return Features(pts, desc.astype(np.float32, copy=False), grey.size)


def verify(query: Features, corpus: Features, options: VerifyOptions | None = None) -> Verification:
    """Match the query's features to the corpus image's and fit one affine transform (corpus <- query) by RANSAC."""
    o = options or VerifyOptions()
    cv2 = _cv2()
    if len(query.points) < 3 or len(corpus.points) < 2:
        return Verification(0, 0, False)
    # for each query keypoint its two nearest corpus descriptors; keep the distinctive ones (Lowe's ratio test)
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(query.descriptors, corpus.descriptors, k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, n in (p for p in knn if len(p) == 2) if m.distance < o.ratio * n.distance]
    if len(pairs) < 3:
        return Verification(len(pairs), 0, False)
    qi, ci = np.array(pairs).T
    src, dst = query.points[qi], corpus.points[ci]
    threshold = o.ransac_px * max(corpus.size)
    m, mask = cv2.estimateAffine2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=2000, confidence=0.99
    )
    if mask is None or m is None:
        return Verification(len(pairs), 0, False)
    inl = mask.ravel().astype(bool)
    n_in = int(inl.sum())
    qbox = _box(src[inl], query.size)
    # inside the matched area of the query, the share of matches that agree: a copy's area matches as a whole,
    # a next frame's moved subjects leave disagreeing matches among the agreeing background (a grid's other
    # tiles, outside the area, do not count against a tile)
    x0, y0 = src[inl].min(axis=0) if n_in else (0, 0)
    x1, y1 = src[inl].max(axis=0) if n_in else (0, 0)
    inside = (src[:, 0] >= x0) & (src[:, 0] <= x1) & (src[:, 1] >= y0) & (src[:, 1] <= y1)
    local = n_in / max(1, int(inside.sum()))
    resid = np.linalg.norm(src[inl] @ m[:, :2].T + m[:, 2] - dst[inl], axis=1)  # (n_in,) corpus pixels
    # in pixels of the coarser side of the match: where the corpus image holds the copy at more pixels than the
    # query does (a small inset, a larger thumbnail), the query's own localisation error is magnified by the
    # transform's scale; divide it out, or a copy's residual would grow with the thumbnail
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    # a degenerate fit (collinear or repeated points) has no usable residual: inf
    err = float(np.median(resid)) / max(1.0, scale) if n_in else float("inf")
    err = round(err, 3) if np.isfinite(err) else float("inf")
    ok = n_in >= o.min_inliers and local >= o.min_local_ratio and err <= o.max_residual_px
    return Verification(len(pairs), n_in, ok, qbox, _box(dst[inl], corpus.size), round(local, 3), err)


def _box(points: np.ndarray, size: tuple[int, int]) -> Box | None:
    """The points' bounding box, relative to an image of `size` (width, height)."""
    if len(points) < 2:
        return None
    w, h = size
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return (round(float(x0 / w), 4), round(float(y0 / h), 4), round(float(x1 / w), 4), round(float(y1 / h), 4))


class Verifier:
    """Verifies a query's best corpus candidates against the index's stored thumbnails (features cached per item).

    `corpus_image(id)` gives a corpus item's pixels (the index's thumbnail) or None when it has none."""

    def __init__(
        self,
        corpus_image: Callable[[str], Image.Image | None],
        options: VerifyOptions | None = None,
        cache_items: int = 512,
    ):
        _cv2()  # fail when the scanner is built, not on the first image
        self.options = options or VerifyOptions()
        self._corpus_image = corpus_image
        self._cache: OrderedDict[str, Features | None] = OrderedDict()
        self._cache_items = cache_items
        self._lock = threading.Lock()

    def _corpus_features(self, item_id: str) -> Features | None:
        with self._lock:
            if item_id in self._cache:
                self._cache.move_to_end(item_id)
                return self._cache[item_id]
        image = self._corpus_image(item_id)
        feats = extract(image, self.options.corpus_side, self.options) if image is not None else None
        with self._lock:
            self._cache[item_id] = feats
            while len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return feats

    def check(self, image: Image.Image, candidates: list[Match]) -> list[tuple[Match, Verification]]:
        """Each candidate worth verifying (see VerifyOptions) with its verification, in the given order, up to the
        first verified one."""
        o = self.options
        todo = [m for m in candidates if m.score >= o.min_score][: o.candidates]
        if not todo:
            return []
        query = extract(image, o.query_side, o)
        out = []
        for m in todo:
            corpus = self._corpus_features(m.id)
            if corpus is not None:
                out.append((m, verify(query, corpus, o)))
                if out[-1][1].verified:
                    break  # the first verified candidate is the one reported
        return out


def corpus_margin(scores: list[float]) -> float | None:
    """The top SSCD score minus the mean of the next three (best first), or None with fewer than four: the
    normalisation of Pizzi et al. 2022 with the corpus as its own background (training/calibration.py)."""
    if len(scores) < 4:
        return None
    return float(scores[0] - np.mean(scores[1:4]))


def decide_with_verification(
    verdict: Verdict,
    checks: list[tuple[Match, Verification]],
    top_id: str | None,
    options: VerifyOptions | None = None,
    margin: float | None = None,
) -> tuple[Verdict, Match | None]:
    """The verdict after verification, and the verified match (with its region) to report first, if any.

    - a verified candidate makes the verdict at least `replica`: one consistent transform over the matched area
      is the copy-detection evidence SSCD's whole-image score stands in for;
    - a `replica` whose top SSCD candidate (`top_id`) shares no consistent transform with the query (see
      VerifyOptions.demote_below and frame_residual_px) is a look-alike: `similar`;
    - with VerifyOptions.replica_margin set, a whole image whose corpus `margin` reaches it is a `replica`
      unless its top candidate is such a look-alike.
    `exact` is never changed (identical bytes or PDQ + SSCD agree)."""
    o = options or VerifyOptions()
    if verdict == "exact":
        return verdict, None
    for m, v in checks:
        if v.verified and v.query_box and v.corpus_box:
            region = {"query": list(v.query_box), "corpus": list(v.corpus_box)}
            return ("replica" if verdict in ("replica", "similar", "novel") else verdict), replace(m, region=region)
    top = next((v for m, v in checks if m.id == top_id), None)
    look_alike = top is not None and (
        top.inliers < o.demote_below or (top.inliers >= o.min_inliers and top.residual_px > o.frame_residual_px)
    )
    if verdict == "replica" and look_alike:
        return "similar", None
    if (
        verdict in ("similar", "novel")
        and not look_alike
        and o.replica_margin is not None
        and margin is not None
        and margin >= o.replica_margin
    ):
        return "replica", None
    return verdict, None
