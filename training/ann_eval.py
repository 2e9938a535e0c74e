"""Evaluation of the ANN layer: exact (brute-force) ground truth, recall@k, and tuning a plan's search parameters
against a recall target. Used by tests and bench/bench_index.py; `provenance index build` does not tune."""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from provenance.ann import AnnPlan, _apply_search_params, _as_f32, _binary_ivf, _is_binary, search

logger = logging.getLogger(__name__)


def exact_search(xq: np.ndarray, xb: np.ndarray, k: int, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k (ground truth), reading `xb` (float16 memmap ok) in chunks.

    Returns (D, I): (nq, k) float32 scores (descending) and int64 ids.
    """
    xq = _as_f32(xq)
    nq = xq.shape[0]
    best_d = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    for start in range(0, xb.shape[0], chunk):
        block = _as_f32(xb[start : start + chunk])
        s = xq @ block.T  # (nq, chunk)
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        d = np.concatenate([best_d, np.take_along_axis(s, part, axis=1)], axis=1)
        i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, top, axis=1), np.take_along_axis(i, top, axis=1)
    return best_d, best_i


def recall_at_k(ids: np.ndarray, gt_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k found in the returned top-k (ties count by id)."""
    hits = [len(set(a[:k].tolist()) & set(b[:k].tolist()) - {-1}) for a, b in zip(ids, gt_ids, strict=False)]
    return float(np.mean(hits) / k) if hits else 0.0


def tune_search_params(
    index: Any,
    plan: AnnPlan,
    xq_sample: np.ndarray,
    ground_truth: np.ndarray,
    target_recall: float = 0.95,
    *,
    k: int = 10,
    rerank_vectors: np.ndarray | None = None,
) -> AnnPlan:
    """Smallest nprobe / efSearch (and rerank_k) on a doubling ladder whose recall@k reaches the target.

    `ground_truth` is (nq, >=k) exact ids of `xq_sample`. Like autofaiss's binary search on speed,
    but against recall; returns the plan with the chosen parameters (the largest tried when none
    reaches the target, with a warning).
    """
    if plan.kind in ("flat", "binary_flat"):
        return plan
    if plan.kind in ("hnsw", "binary_hnsw"):
        key, ladder = "efSearch", [16, 32, 64, 128, 256, 512, 1024]
    else:
        nlist = (_binary_ivf(index) if _is_binary(index) else faiss.extract_index_ivf(index)).nlist
        key, ladder = "nprobe", sorted({min(nlist, 2**i) for i in range(0, 12)})
    # re-ranking plans: when more probes stop helping, the PQ ranking is the limit: widen rerank_k
    rerank_ladder = [0] if not plan.rerank_k else sorted({plan.rerank_k, 2 * plan.rerank_k, 4 * plan.rerank_k})
    best, best_r = plan, -1.0
    for rk in rerank_ladder:
        prev = -1.0
        for v in ladder:
            trial = plan.with_params(**{key: v}, **({"rerank_k": rk} if rk else {}))
            _apply_search_params(index, trial)
            got = search(index, xq_sample, k, trial, rerank_vectors=rerank_vectors)
            r = recall_at_k(got.ids, ground_truth, k)
            logger.info("tune %s %s=%s rerank_k=%s: recall@%d %.3f", plan.kind, key, v, rk, k, r)
            if r > best_r:
                best, best_r = trial, r
            if r >= target_recall:
                _apply_search_params(index, trial)
                return trial
            if rk and r - prev < 0.002:
                break
            prev = r
    _apply_search_params(index, best)
    logger.warning("tune %s: recall@%d target %.2f not reached; using %s", plan.kind, k, target_recall, best.params)
    return best
