"""Approximate nearest-neighbour search: plan, build, save, load and query FAISS indexes of descriptor vectors."""

# This module is the one place that turns FAISS distances into "higher = more similar" scores:
# cosine similarity for L2-normalised float vectors (inner product), 1 - d / bits for binary
# hashes compared by Hamming distance.
# Names as in faiss contrib: xb the corpus, xq the queries, k the neighbours wanted. Float vectors
# are (n, d) float32 (float16 accepted, e.g. a memory-mapped .npy), L2-normalised; binary hashes
# are (n, bits / 8) uint8. Ids are row numbers of xb in the order the rows were added.

from __future__ import annotations

import logging
import math
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from provenance.errors import IndexMismatchError

logger = logging.getLogger(__name__)

FLOAT_KINDS = ("flat", "hnsw", "ivf_flat", "ivf_sq", "ivf_pq")
BINARY_KINDS = ("binary_flat", "binary_ivf", "binary_hnsw")
KINDS = FLOAT_KINDS + BINARY_KINDS
METRICS = ("ip", "hamming")

# --- Planning thresholds. autofaiss (criteo/autofaiss, autofaiss/external/optimize.py,
# get_optimal_index_keys_v2) uses Flat below 1,000 vectors, HNSW below 10,000, HNSW whenever
# it fits the memory budget, IVF-Flat below 1M vectors when it fits, and IVF-PQ otherwise. We keep
# its order but move the Flat threshold up: provenance verdicts threshold the *exact* cosine, and a
# brute-force query over this many values still costs a few milliseconds on one core (BENCHMARKS.md, index).
FLAT_MAX_VALUES = 16_384 * 512  # n * dim up to which exact search is used
# HNSW is CPU-only, cannot be memory-mapped usefully (its graph is read at random) and builds slowly
# on a few cores, so larger corpora go to IVF even when HNSW would fit the budget (autofaiss ignores
# build time; build rates in BENCHMARKS.md, index).
HNSW_MAX_N = 100_000
IVF_FLAT_MAX_N = 1_000_000  # autofaiss ivf_flat_threshold
HNSW_M = 32  # autofaiss: HNSW{min(m_hnsw, 32)}
HNSW_EF_CONSTRUCTION = 40  # faiss's default; a larger one builds much slower for little recall
# autofaiss get_optimal_train_size: "between 30 and 256" training points per centroid (it uses
# 100); faiss warns below 39. k-means cost is linear in it, so we stay near the floor to keep a 1M
# build to minutes. faiss's 10 k-means iterations (cp.niter) are kept: more gave the same lists.
TRAIN_POINTS_PER_CENTROID = 40
MIN_POINTS_PER_CENTROID = 39
SEED = 1234  # training-sample draw and k-means seed: the same vectors give the same index
ADD_CHUNK = 65_536  # rows converted to float32 at a time when adding (bounds the float32 copy)
BINARY_FLAT_MAX_N = 2_000_000  # 2M x 32 B = 61 MiB: an exact popcount scan stays cheap per query
PAD_DISTANCE = np.iinfo(np.int32).max  # hamming distance reported for padded (-1) results
# --- IVF-PQ at 1M x 512. A single query's time goes to the coarse scan of the centroids, the fast-scan of the
# probed lists and the exact re-rank of the PQ top candidates. Indexes built before 2026-12-06 store their
# centroids as SQ8 ("IVF4096(SQ8),..."); they still load.
# --- The in-memory fast-scan plan (2026-12-06, the 1M benchmark): IVF-PQ 4-bit fast-scan codes held in memory
# (dim/4 B a vector at PQ{dim/2}: 128 MiB at 1M x 512) found from centroids stored as float16 and scanned in full
# (exact, ~0.17 ms for 4,096 x 512 on one core: cheaper than an HNSW walk over them that finds the same lists, which
# needed efSearch >= 128), a few probed lists, and the PQ top FS_RERANK_K given exact cosines from the float16
# embeddings. Fast-scan PQ256 ranks well enough that the exact top-10 sits in its top 100 nearly whenever it sits in
# the probed lists (BENCHMARKS.md, index).
FS_COARSE = "SQfp16"
FS_RERANK_K = 100
FS_NPROBE_SHARE = 512  # probe nlist / 512 lists (at least 8): 8 of 4,096 at 1M
# Indexes of the earlier IVF-PQ + SQ8 refine plan ("...,Refine(SQ8)", no longer chosen): an in-memory SQ8 copy
# of the vectors (d bytes per vector) re-scores the PQ candidates inside faiss (IndexRefine, one C++ call); only
# its best EXACT_K are then read from the float16 file for their exact cosines (the verdict thresholds are
# calibrated on exact scores). SQ8 alone reorders near-ties; re-scoring its top few exactly recovers the exact
# ranking, and EXACT_K leaves a margin over the fewest that did.
# (SQ8 with per-dimension min/max ranked best: "optim", "quantiles" and uniform ranges did worse.)
REFINE_SQ = "SQ8"
EXACT_K = 16
# --- IVF-SQ8 with an HNSW coarse quantizer and an exact re-rank ("ivf_sq"). The coarse step walks an HNSW
# graph over the centroids (tens of microseconds) instead of scanning all of them; the SQ8 codes stay in the
# memory-mapped index file (file-backed pages, not anonymous memory); the best SQ_RERANK_K of the SQ8 scores
# get exact cosines from the float16 embeddings (pread). SQ8 mis-orders only near-ties, so a short re-rank
# restores the exact order, and its recall is that of the probed lists. OnDiskInvertedLists can hold these
# codes (not fast-scan PQ: faiss #2407), so the merged index over parts (provenance.merged_ann) is the same plan.
COARSE_HNSW_M = 32
SQ_RERANK_K = 32
_SQ_TYPES = {"SQ8": "QT_8bit", "SQfp16": "QT_fp16"}
_COARSE_RE = re.compile(r"^IVF(\d+)\((SQ8|SQfp16)\),")  # "IVF4096(SQ8),..." = SQ-stored centroids
_REFINE_RE = re.compile(r",Refine\((SQ8|SQfp16)\)$")


class IndexDimensionError(IndexMismatchError, ValueError):
    """An index, its plan and the vectors given to it disagree on the dimension."""


@dataclass(frozen=True)
class AnnPlan:
    """Which FAISS index to build for a corpus, how to search it, and why."""

    kind: str  # one of KINDS
    factory: str  # the faiss.index_factory / index_binary_factory string
    metric: str  # "ip" (cosine on L2-normalised vectors) or "hamming"
    params: dict[str, Any] = field(default_factory=dict)  # nprobe / efSearch / rerank_k ...
    reason: str = ""
    est_memory_bytes: int = 0  # resident size of the index (with its SQ8 copy; not the float16 file)
    dim: int = 0  # vector length (bits for hamming); 0 = take it from the data / the index

    @property
    def rerank_k(self) -> int:
        """Candidates to fetch before the re-rank; 0 when the plan does not re-rank."""
        return int(self.params.get("rerank_k", 0))

    @property
    def refine(self) -> str:
        """ "SQ8" when the index re-scores its PQ candidates with an in-memory SQ8 copy, else ""."""
        m = _REFINE_RE.search(self.factory)
        return m.group(1) if m else ""

    @property
    def exact_k(self) -> int:
        """Candidates given exact float16 cosines: the SQ8 re-rank's best (refine plans), else rerank_k."""
        return int(self.params.get("exact_k", EXACT_K)) if self.refine else self.rerank_k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnPlan:
        missing = {"kind", "factory", "metric"} - set(d)
        if missing:
            raise ValueError(f"AnnPlan dict lacks {sorted(missing)}: {d!r}")
        plan = cls(
            kind=str(d["kind"]),
            factory=str(d["factory"]),
            metric=str(d["metric"]),
            params=dict(d.get("params") or {}),
            reason=str(d.get("reason", "")),
            est_memory_bytes=int(d.get("est_memory_bytes", 0)),
            dim=int(d.get("dim", 0)),
        )
        _check_plan(plan)
        return plan

    def with_params(self, **params: Any) -> AnnPlan:
        """A copy with some search parameters changed (e.g. after tuning)."""
        return replace(self, params={**self.params, **params})


@dataclass
class Neighbors:
    """k nearest corpus rows of each query, best first."""

    scores: np.ndarray  # (nq, k) float32, higher = more similar; -inf where ids == -1
    ids: np.ndarray  # (nq, k) int64 corpus row numbers, -1 padding when fewer than k exist
    distances: np.ndarray | None = None  # (nq, k) int32 Hamming bits (hamming plans only)


# ----------------------------------------------------------------------------- planning
def _human(nbytes: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= div:
            return f"{nbytes / div:.1f} {unit}"
    return f"{int(nbytes)} B"


def _nlist(n: int) -> int:
    """IVF list count: a power of 2 near 4*sqrt(n), capped so that every centroid gets >= 39
    training points. autofaiss (get_optimal_nb_clusters) and the faiss wiki ("Guidelines to choose
    an index") use 4..16*sqrt(n); we take the low end because k-means and the assignment of every
    added vector cost O(n * nlist * d) and a 1M build must stay within minutes on 2 cores.
    2*sqrt(n) was too coarse: it cuts groups of similar photos across many lists, so the exact
    top-10 falls outside the probed lists far more often (BENCHMARKS.md, index)."""
    nl = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = 2 ** math.floor(math.log2(max(1, n // MIN_POINTS_PER_CENTROID)))
    return int(max(1, min(nl, cap)))


def _pq_m(dim: int, n: int = 0, nlist: int = 0, budget: float = math.inf) -> int:
    """PQ sub-quantizers: one per 2 dims (4-bit fast-scan codes: dim/4 bytes per vector) when the
    index fits half the memory budget, else one per 4, then per 8 dims.

    Finer codes rank the candidates well enough that few need the exact re-rank, whose rows are
    read from disk one by one: with coarser codes the exact top-10 needs a far deeper re-rank, or
    is not reached at all (BENCHMARKS.md, index). The scan itself costs about the same (the probed
    lists are short).
    """
    cands = [m for m in (dim // 2, dim // 4, dim // 8, dim // 16) if m >= 2 and dim % m == 0 and m % 2 == 0]
    for m in cands:
        if _est_memory("ivf_pq", n, dim, nlist, pq_m=m) <= budget / 2:
            return m
    return cands[-1] if cands else dim


def _est_memory(kind: str, n: int, dim: int, nlist: int = 0, m: int = HNSW_M, pq_m: int = 0) -> int:
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":  # autofaiss: 4 * n * (d + 2 * M): vectors + level-0 links (2M int32)
        return 4 * n * (dim + 2 * m)
    if kind == "ivf_flat":  # codes + 8-byte ids + centroids
        return n * (dim * 4 + 8) + nlist * dim * 4
    if kind == "ivf_sq":  # SQ8 codes + ids (memory-mapped) + float32 centroids in an HNSW graph
        return n * (dim + 8) + nlist * (dim * 4 + 8 * COARSE_HNSW_M)
    if kind == "ivf_pq":  # 4-bit codes + ids + float16 centroids (+ fast-scan block padding, ~32 rows/list)
        code = (pq_m or _pq_m(dim)) // 2
        return (n + 32 * nlist) * (code + 8) + nlist * dim * 2
    nbytes = dim // 8
    if kind == "binary_flat":
        return n * nbytes
    if kind == "binary_hnsw":
        return n * (nbytes + 8 * m)
    if kind == "binary_ivf":
        return n * (nbytes + 8) + nlist * nbytes
    raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")


def _default_params(kind: str, n: int, nlist: int) -> dict[str, Any]:
    """Search parameters chosen on SSCD-like vectors (the index benchmark; figures in BENCHMARKS.md):
    the edited copy of a query must come first nearly always at a few milliseconds of CPU per query,
    and recall@10 against exact search is as high as that allows."""
    if kind in ("hnsw", "binary_hnsw"):
        # efSearch 64 missed a copy's first place noticeably more often than 128, for a little less CPU
        return {"efSearch": 128, "efConstruction": HNSW_EF_CONSTRUCTION}
    if kind == "ivf_flat":
        # probing 1/16 of the lists put nearly every copy first; half of that missed more of them
        return {"nprobe": min(nlist, max(8, nlist // 16))}
    if kind == "ivf_sq":
        # as ivf_pq's probing; the HNSW walk over the centroids must visit at least nprobe of them
        return {"nprobe": min(nlist, max(16, nlist // 64)), "rerank_k": SQ_RERANK_K, "efSearch": 128}
    if kind == "ivf_pq":
        # fast-scan with exact centroids: 8 of 4,096 lists at 1M, the PQ256 top 100 re-ranked, found 0.988 of the
        # exact top-10 of the standard queries; the top 50 lost 0.002, 16 lists cost 20% more CPU (BENCHMARKS.md, index)
        return {"nprobe": min(nlist, max(8, nlist // FS_NPROBE_SHARE)), "rerank_k": FS_RERANK_K}
    if kind == "binary_ivf":  # not benchmarked: the same scanned fraction as ivf_flat
        return {"nprobe": min(nlist, max(8, nlist // 16))}
    return {}


def plan_index(  # noqa: C901 - one decision table, read top to bottom with its reasons
    n: int,
    dim: int,
    metric: str = "ip",
    memory_budget_bytes: int = 1 << 30,
    *,
    kind: str | None = None,
) -> AnnPlan:
    """Choose the index for `n` vectors of `dim` (bits, for hamming) under a memory budget.

    `kind` forces one of KINDS (tests, or an operator who knows better); the parameters then
    follow the same rules as an automatic choice of that kind.
    """
    # 1. Check inputs
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric == "hamming" and dim % 8:
        raise ValueError(f"hamming dim is in bits and must be a multiple of 8, got {dim}")
    if kind is not None and (kind in BINARY_KINDS) != (metric == "hamming"):
        raise ValueError(f"kind {kind!r} does not fit metric {metric!r}")
    n, dim = int(n), int(dim)
    budget = _human(memory_budget_bytes)

    # 2. Choose the kind, with the reason
    if metric == "hamming":
        raw = n * dim // 8
        if kind is None:
            if n <= BINARY_FLAT_MAX_N:
                kind = "binary_flat"
                why = f"n={n:,} x {dim} bits = {_human(raw)}: exact Hamming scan (<= {BINARY_FLAT_MAX_N:,})"
            else:
                kind = "binary_ivf"
                why = f"n={n:,} > {BINARY_FLAT_MAX_N:,}: a full scan is too slow per query, binary IVF"
        else:
            why = f"kind {kind} forced"
    else:
        raw = n * dim * 4
        m_hnsw = int((memory_budget_bytes / (4 * max(n, 1)) - dim) // 2)  # autofaiss m_hnsw rule
        shape = f"n={n:,} x {dim} float32 = {_human(raw)}"
        if kind is not None:
            why = f"kind {kind} forced ({shape})"
        elif n * dim <= FLAT_MAX_VALUES and raw <= memory_budget_bytes:
            kind = "flat"
            why = f"{shape} <= {FLAT_MAX_VALUES // dim:,} vectors: exact inner-product search"
        elif n <= HNSW_MAX_N and m_hnsw >= 8:
            kind = "hnsw"
            why = (
                f"{shape}: HNSW{HNSW_M} graph fits budget {budget} (autofaiss m_hnsw={m_hnsw} >= 8) "
                f"and builds in minutes for n <= {HNSW_MAX_N:,}"
            )
        elif n < IVF_FLAT_MAX_N and _est_memory("ivf_flat", n, dim, _nlist(n)) <= memory_budget_bytes:
            kind = "ivf_flat"
            why = f"{shape} fits budget {budget}; n too large for an HNSW build: uncompressed IVF"
        elif n >= IVF_FLAT_MAX_N and _est_memory("ivf_pq", n, dim, _nlist(n), pq_m=dim // 4) <= memory_budget_bytes / 2:
            # in-memory fast-scan codes, exact re-rank: measured at 1M against plain IVF-SQ8 and IVF-PQ fast-scan of
            # the same budget (bench/bench_index.py shows them side by side; BENCHMARKS.md, index)
            kind = "ivf_pq"
            over = f"> budget {budget}" if raw > memory_budget_bytes else f"and n >= {IVF_FLAT_MAX_N:,}"
            why = f"{shape} {over}: in-memory IVF-PQ fast-scan,"
        elif n >= IVF_FLAT_MAX_N and _est_memory("ivf_sq", n, dim, _nlist(n)) <= memory_budget_bytes / 2:
            # the fast-scan codes do not fit: SQ8 codes memory-mapped from the index file (page cache, not the
            # process's memory); the same plan as the merged on-disk index over parts (provenance.merged_ann)
            kind = "ivf_sq"
            over = f"> budget {budget}" if raw > memory_budget_bytes else f"and n >= {IVF_FLAT_MAX_N:,}"
            why = f"{shape} {over}; SQ8 codes fit half the budget:"
        else:
            kind = "ivf_pq"
            over = f"> budget {budget}" if raw > memory_budget_bytes else f"and n >= {IVF_FLAT_MAX_N:,}"
            why = f"{shape} {over}: compressed IVF-PQ,"

    # 3. Parameters of that kind
    nlist = _nlist(n) if kind in ("ivf_flat", "ivf_sq", "ivf_pq", "binary_ivf") else 0
    m_pq = _pq_m(dim, n, nlist, memory_budget_bytes) if kind == "ivf_pq" else 0
    # (IVF-PQ + an in-memory SQ8 copy, "...,Refine(SQ8)", is no longer chosen: the fast-scan plan with exact
    # centroids and an exact re-rank of the PQ top 100 had its recall at a fifth of the CPU and memory; such
    # indexes still load and search)
    if kind == "flat":
        factory = "Flat"
    elif kind == "hnsw":
        factory = f"HNSW{HNSW_M},Flat"
    elif kind == "ivf_flat":
        factory = f"IVF{nlist},Flat"
    elif kind == "ivf_sq":
        factory = f"IVF{nlist}_HNSW{COARSE_HNSW_M},SQ8"
        why += (
            f" {factory}: {nlist} lists ~ 4*sqrt(n) found by an HNSW walk over the centroids; SQ8 codes ({dim} B/vector) "
            "memory-mapped from the index file; the best "
            f"{SQ_RERANK_K} given exact cosines from the float16 embeddings, read row by row from the file"
        )
    elif kind == "ivf_pq":
        factory = f"IVF{nlist}({FS_COARSE}),PQ{m_pq}x4fs"
        why += (
            f" {factory}: {nlist} lists ~ 4*sqrt(n), centroids stored as {FS_COARSE} and scanned in full (exact "
            f"lists, cheaper than a graph walk at this size); {m_pq // 2} B/vector in memory, 4-bit fast-scan, the "
            "finest PQ that fits half the budget"
        )
        depth = FS_RERANK_K if m_pq >= dim // 2 else 2 * FS_RERANK_K
        why += (
            f"; the PQ top {depth} given exact cosines from the float16 embeddings (memory-mapped or read row by "
            "row from the file)"
        )
    elif kind == "binary_flat":
        factory = "BFlat"
    elif kind == "binary_hnsw":
        factory = f"BHNSW{HNSW_M}"
    else:
        factory = f"BIVF{nlist}"
    if kind in ("ivf_flat", "binary_ivf"):
        why += f" ({factory}: {nlist} lists ~ 4*sqrt(n))"
    est = _est_memory(kind, n, dim, nlist, pq_m=m_pq)
    params = _default_params(kind, n, nlist)
    if kind == "ivf_pq" and m_pq < dim // 2:
        # coarser codes rank worse: PQ128 at 1M needed its top 150-200 for what PQ256 keeps in its top 50-100
        params["rerank_k"] = 2 * FS_RERANK_K
    plan = AnnPlan(
        kind=kind,
        factory=factory,
        metric=metric,
        dim=dim,
        params=params,
        reason=f"{why}; index ~{_human(est)}",
        est_memory_bytes=int(est),
    )
    logger.debug("plan for n=%d dim=%d: %s", n, dim, plan.reason)
    return plan


def _check_plan(plan: AnnPlan) -> None:
    if not isinstance(plan, AnnPlan):
        raise TypeError(f"plan must be an AnnPlan, got {type(plan).__name__}")
    if plan.kind not in KINDS:
        raise ValueError(f"plan kind must be one of {KINDS}, got {plan.kind!r}")
    if plan.metric not in METRICS or (plan.kind in BINARY_KINDS) != (plan.metric == "hamming"):
        raise ValueError(f"plan metric {plan.metric!r} does not fit kind {plan.kind!r}")


# ----------------------------------------------------------------------------- input checks
def _check_vectors(x: Any, metric: str, dim: int, name: str) -> np.ndarray:
    """Validate a float (n, dim) or binary (n, dim/8) uint8 matrix; no copy made."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if metric == "hamming":
        width = dim // 8
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != width:
            raise TypeError(
                f"{name} must be a uint8 matrix of {width} bytes per row ({dim}-bit hashes), got {x.dtype} {x.shape}"
            )
    elif x.dtype not in (np.float32, np.float16) or x.ndim != 2 or x.shape[1] != dim:
        raise TypeError(f"{name} must be a float32 (or float16) matrix of dim {dim}, got {x.dtype} {x.shape}")
    return x


def _plan_dim(plan: AnnPlan, actual: int, what: str) -> int:
    """The dim to check against: the plan's, which must agree with the index/data when both are known."""
    if plan.dim and plan.dim != actual:
        raise IndexDimensionError(f"{what} has dim {actual} but the plan was made for dim {plan.dim}")
    return actual


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_normalised(x: np.ndarray, name: str) -> None:
    """Scores are cosines only for unit vectors: refuse un-normalised rows (zero rows allowed)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))  # (cheaper than linalg.norm for one row)
    bad = ~((np.abs(norms - 1.0) < 1e-2) | (norms < 1e-6)) | ~np.isfinite(norms)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} rows must be L2-normalised for inner-product search: row {i} has norm {norms[i]:.4g}")


# ----------------------------------------------------------------------------- GPU helpers
def _faiss_gpus() -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # pragma: no cover - very old faiss
        return 0


def _torch_device(import_torch: bool) -> str | None:
    """ "cuda" when torch sees a GPU. Only imports torch when asked: it takes seconds."""
    if not import_torch and "torch" not in sys.modules:
        return None
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def gpu_available(*, import_torch: bool = False) -> bool:
    """True when faiss sees a GPU, or torch (if imported, or import_torch) does.

    faiss wheels with GPU kernels need CUDA 12's cuBLAS; where only torch has a GPU, the IVF
    k-means of `build_index` runs in torch on it (search stays on the CPU).
    """
    return _faiss_gpus() > 0 or _torch_device(import_torch) is not None


def _resolve_gpu(use_gpu: bool | None) -> bool:
    if use_gpu is None:
        return gpu_available()
    if use_gpu and not gpu_available(import_torch=True):
        raise RuntimeError("use_gpu=True but neither faiss (faiss-cpu installed?) nor torch sees a GPU")
    return bool(use_gpu)


def _kmeans_torch(x: np.ndarray, k: int, device: str, niter: int = 10, seed: int = SEED) -> np.ndarray:
    """Spherical k-means of (n, d) unit vectors in torch, as faiss trains an inner-product IVF:
    assign to the max inner product, mean, renormalise; an emptied centroid is re-seeded.
    Returns (k, d) float32 centroids."""
    import torch

    g = torch.Generator().manual_seed(seed)
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    n = X.shape[0]
    C = X[torch.randperm(n, generator=g)[:k].to(device)].clone()
    for _ in range(niter):
        assign = torch.cat([(X[a : a + 65_536] @ C.T).argmax(dim=1) for a in range(0, n, 65_536)])
        sums = torch.zeros_like(C).index_add_(0, assign, X)
        counts = torch.bincount(assign, minlength=k)
        C = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = counts == 0
        if bool(empty.any()):
            C[empty] = X[torch.randint(0, n, (int(empty.sum()),), generator=g).to(device)]
        C = torch.nn.functional.normalize(C, dim=1)
    return C.cpu().numpy().astype(np.float32)


_GPU_RES: list[Any] = []


def _gpu_resources() -> Any:
    if not _GPU_RES:  # one StandardGpuResources per process: each reserves scratch GPU memory
        _GPU_RES.append(faiss.StandardGpuResources())
    return _GPU_RES[0]


def _is_binary(index: Any) -> bool:
    return isinstance(index, faiss.IndexBinary)


def _binary_ivf(index: Any) -> Any:
    """The IndexBinaryIVF inside a binary index (faiss has no extract_index_binary_ivf)."""
    index = faiss.downcast_IndexBinary(index) if type(index) is faiss.IndexBinary else index
    if not isinstance(index, faiss.IndexBinaryIVF):
        raise TypeError(f"expected a binary IVF index, got {type(index).__name__}")
    return index


def _to_cpu(index: Any) -> Any:
    if _is_binary(index):
        if "Gpu" in type(index).__name__:
            return faiss.index_binary_gpu_to_cpu(index)
        return index
    if "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


# ----------------------------------------------------------------------------- build
def _train_sample(x: np.ndarray, nlist: int) -> np.ndarray:
    """autofaiss get_optimal_train_size: TRAIN_POINTS_PER_CENTROID * nlist rows, drawn with a fixed seed."""
    n = x.shape[0]
    size = min(n, max(TRAIN_POINTS_PER_CENTROID * nlist, 10_000))
    if size >= n:
        return np.ascontiguousarray(x) if x.dtype == np.uint8 else _as_f32(x)
    rows = np.sort(np.random.default_rng(SEED).choice(n, size=size, replace=False))  # sorted: sequential memmap reads
    sample = x[rows]
    return np.ascontiguousarray(sample) if x.dtype == np.uint8 else _as_f32(sample)


def _new_index(plan: AnnPlan) -> Any:
    """The empty index of the plan. "IVF4096(SQ8),..." is made with a flat quantizer: k-means and the
    assignment of the added vectors need exact centroids (and BLAS); `_compress_coarse` stores them as
    SQ8 once the index is filled."""
    if plan.metric == "hamming":
        index = faiss.index_binary_factory(plan.dim, plan.factory)
    else:
        factory = _COARSE_RE.sub(r"IVF\1,", plan.factory)
        index = faiss.index_factory(plan.dim, factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind in ("hnsw", "binary_hnsw"):
        index.hnsw.efConstruction = int(plan.params.get("efConstruction", HNSW_EF_CONSTRUCTION))
    return index


def build_index(x: np.ndarray, plan: AnnPlan, *, use_gpu: bool | None = None) -> Any:
    """Train (if the kind needs it) and fill an index with `x`; ids are the row numbers of `x`.

    `x` may be a float16 memory map: it is converted to float32 one chunk at a time. With a GPU
    (use_gpu=None: whenever `gpu_available()`) the IVF k-means runs there, in faiss or else in
    torch; the returned index is always on the CPU, ready for `save_index`.
    """
    # 1. Check inputs
    _check_plan(plan)
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise TypeError(f"x must be a 2-D numpy array, got {getattr(x, 'shape', type(x).__name__)}")
    dim = plan.dim or (x.shape[1] * 8 if plan.metric == "hamming" else x.shape[1])
    _check_vectors(x, plan.metric, dim, "x")
    plan = replace(plan, dim=dim)
    if x.shape[0] == 0:
        raise ValueError("x has no rows: nothing to index")
    gpu = _resolve_gpu(use_gpu)

    # 2. Make the empty index
    index = _new_index(plan)

    # 3. Train on a fixed-seed sample (IVF kinds)
    if not index.is_trained:
        ivf = _binary_ivf(index) if plan.metric == "hamming" else faiss.extract_index_ivf(index)
        nlist = ivf.nlist
        if x.shape[0] < nlist:
            raise ValueError(f"{plan.factory} needs >= {nlist} training vectors, got {x.shape[0]}; plan for this n")
        sample = _train_sample(x, nlist)
        ivf.cp.seed = SEED
        faiss_gpu = gpu and _faiss_gpus() > 0
        if gpu and plan.metric == "ip":
            # k-means is the cost of an IVF build: run it on the GPU
            if faiss_gpu:
                ivf.clustering_index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, faiss.IndexFlatIP(plan.dim))
            else:  # torch's GPU: a quantizer holding nlist centroids makes faiss skip its own k-means
                ivf.quantizer.add(_kmeans_torch(sample, nlist, _torch_device(True) or "cpu", ivf.cp.niter))
        logger.info("training %s on %d vectors", plan.factory, sample.shape[0])
        index.train(sample)
        if faiss_gpu and plan.metric == "ip":
            ivf.clustering_index = None
        del sample

    # 4. Add all rows, chunk by chunk
    if gpu and _faiss_gpus() > 0 and plan.kind == "ivf_flat":
        # it has a GPU twin: add there (the coarse assignment is the cost), then bring it back
        gindex = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
        add_vectors(gindex, x, plan=plan)
        index = faiss.index_gpu_to_cpu(gindex)
    else:
        add_vectors(index, x, plan=plan)
    m = _COARSE_RE.match(plan.factory)
    if m:
        _compress_coarse(index, m.group(2))
    _apply_search_params(index, plan)
    return index


def _compress_coarse(index: Any, sq: str) -> None:
    """Replace the flat quantizer of an IVF index by an SQ copy of its centroids (search reads them all)."""
    ivf = faiss.extract_index_ivf(index)
    flat = ivf.quantizer
    centroids = flat.reconstruct_n(0, ivf.nlist)  # (nlist, d) float32
    q = faiss.IndexScalarQuantizer(ivf.d, getattr(faiss.ScalarQuantizer, _SQ_TYPES[sq]), ivf.metric_type)
    q.train(centroids)  # per-dimension range of the centroids themselves
    q.add(centroids)
    assert ivf.own_fields, "factory-made IVF indexes own their quantizer"
    ivf.quantizer = q
    q.this.disown()  # the IVF index deletes it (own_fields)
    flat.this.acquire()  # ... and no longer the flat one: Python frees it


@contextmanager
def exact_coarse(index: Any):
    """While adding: a flat quantizer of the (decoded) centroids in place of an SQ-stored or HNSW one, so that
    the assignment of many vectors runs as one BLAS product (an SQ quantizer scores them one by one)."""
    ivf = None if _is_binary(index) else _ivf_or_none(index)
    if ivf is None or not isinstance(
        faiss.downcast_index(ivf.quantizer), (faiss.IndexScalarQuantizer, faiss.IndexHNSW)
    ):
        yield
        return
    # (an HNSW quantizer's walk, at its default efSearch, put rows in the wrong lists often enough to cost
    # 0.02-0.03 of recall@10 at 1M; the exact assignment is also faster as one BLAS product per chunk)
    sq = ivf.quantizer
    flat = faiss.IndexFlat(ivf.d, ivf.metric_type)
    flat.add(sq.reconstruct_n(0, ivf.nlist))
    own = ivf.own_fields
    ivf.own_fields = False  # `flat` stays Python's, `sq` is put back before anything is freed
    ivf.quantizer = flat
    try:
        yield
    finally:
        ivf.quantizer = sq
        ivf.own_fields = own
        # SWIG disowned `flat` when it was set as the quantizer: give it back to Python, or its (nlist, d) float32
        # centroids leak on every call (16 MiB a part at 8,192 x 512 in the 10M merged build)
        flat.this.acquire()


def _ivf_or_none(index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def add_vectors(index: Any, x: np.ndarray, *, plan: AnnPlan | None = None) -> None:
    """Append rows of `x` to a built index (ids continue from index.ntotal), chunk by chunk."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy array, got {type(x).__name__}")
    binary = _is_binary(index)
    if plan is not None:
        _check_vectors(x, plan.metric, _plan_dim(plan, index.d, "index"), "x")
    elif binary:
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] * 8 != index.d:
            raise TypeError(f"x must be a uint8 matrix of {index.d // 8} bytes per row, got {x.dtype} {x.shape}")
    elif x.dtype not in (np.float32, np.float16) or x.ndim != 2 or x.shape[1] != index.d:
        raise TypeError(f"x must be a float32 (or float16) matrix of dim {index.d}, got {x.dtype} {x.shape}")
    if not index.is_trained:
        raise ValueError("index is not trained: build it with build_index() before adding vectors")
    # (an IndexRefine adds each chunk to its PQ index and to its SQ8 copy alike)
    with exact_coarse(index):
        for start in range(0, x.shape[0], ADD_CHUNK):
            chunk = x[start : start + ADD_CHUNK]
            chunk = np.ascontiguousarray(chunk) if binary else _as_f32(chunk)
            if not binary and start == 0:
                _check_normalised(chunk[:1024], "x")  # a sample: the full check would double the pass
            try:
                index.add(chunk)
            except RuntimeError as e:
                raise ValueError(
                    f"cannot add to this index ({e}); an index loaded with mmap=True is read-only: "
                    "load it with mmap=False to append"
                ) from None


# ----------------------------------------------------------------------------- save / load
def save_index(index: Any, path: str | os.PathLike) -> None:
    """Write the index (moved to the CPU first) atomically: a crash leaves the old file intact."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    cpu = _to_cpu(index)
    if _is_binary(cpu):
        faiss.write_index_binary(cpu, str(tmp))
    else:
        faiss.write_index(cpu, str(tmp))
    os.replace(tmp, p)


def _mmap_flags(plan: AnnPlan) -> int:
    # IVF inverted lists are memory-mapped by IO_FLAG_MMAP (read as read-only OnDiskInvertedLists);
    # flat codes (Flat, HNSW storage, binary) by IO_FLAG_MMAP_IFC ("in-place from file", faiss >= 1.11).
    if plan.kind in ("ivf_flat", "ivf_sq", "ivf_pq", "binary_ivf"):
        return faiss.IO_FLAG_MMAP
    return getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)


def load_index(
    path: str | os.PathLike,
    plan: AnnPlan,
    *,
    mmap: bool = True,
    use_gpu: bool | None = None,
) -> Any:
    """Read an index written by `save_index` and set the plan's search parameters.

    mmap=True maps the vector codes from the file instead of reading them into memory (the OS
    pages in what queries touch); such an index is read-only (load with mmap=False to append).
    With a GPU that faiss sees, Flat and IVF-Flat indexes are moved there for search.
    """
    _check_plan(plan)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no index file at {p}")
    read = faiss.read_index_binary if plan.metric == "hamming" else faiss.read_index
    index = None
    if mmap:
        try:
            index = read(str(p), _mmap_flags(plan))
        except RuntimeError as e:  # this kind/faiss version cannot map it: read it whole
            logger.warning("%s: memory-mapped read failed (%s); reading into memory", p, str(e).splitlines()[0])
    if index is None:
        try:
            index = read(str(p))
        except RuntimeError as e:
            raise ValueError(
                f"{p}: not a readable faiss index for plan {plan.kind} ({str(e).splitlines()[0]})"
            ) from None
    if plan.dim and index.d != plan.dim:
        raise IndexDimensionError(f"{p}: index dim {index.d} does not match the plan's dim {plan.dim}")
    if bool(plan.refine) != isinstance(index, faiss.IndexRefine):
        raise IndexMismatchError(f"{p}: a {type(index).__name__} but the plan says {plan.factory}; rebuild the index")
    if _resolve_gpu(use_gpu) and _faiss_gpus() > 0 and plan.kind in ("flat", "ivf_flat"):
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    _apply_search_params(index, plan)
    return index


def _apply_search_params(index: Any, plan: AnnPlan) -> None:
    params = plan.params
    if plan.kind in ("ivf_flat", "ivf_sq", "ivf_pq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(params.get("nprobe", 1))
        q = faiss.downcast_index(ivf.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            q.hnsw.efSearch = max(int(params.get("efSearch", 64)), ivf.nprobe)
        if isinstance(index, faiss.IndexRefine) and plan.rerank_k:
            # PQ candidates per result of index.search; `search` passes it per call as well
            index.k_factor = max(1.0, plan.rerank_k / max(1, plan.exact_k))
    elif plan.kind == "binary_ivf":
        _binary_ivf(index).nprobe = int(params.get("nprobe", 1))
    elif plan.kind in ("hnsw", "binary_hnsw"):
        index.hnsw.efSearch = int(params.get("efSearch", 64))


# ----------------------------------------------------------------------------- search
def search(
    index: Any,
    xq: np.ndarray,
    k: int,
    plan: AnnPlan,
    *,
    rerank_vectors: Any = None,  # an (n, d) array or a row reader (see below)
) -> Neighbors:
    """The k most similar corpus rows of each query, as "higher = more similar" scores.

    For plans that re-rank (ivf_pq), `rerank_vectors` must be the (n, d) corpus embeddings: an
    array (a float16 memmap is fine) or a row reader with `.shape` and `.read_rows(ids)` such as
    `provenance.store.RowReader`, which reads them from the file without mapping it. The index
    proposes plan.rerank_k candidates; with an SQ8 refine (plan.refine) faiss re-scores them and keeps
    the best max(k, plan.exact_k); the exact cosines of those against the queries decide the final
    top k, and are the returned scores.
    """
    # 1. Check inputs
    _check_plan(plan)
    dim = _plan_dim(plan, index.d, "index")
    _check_vectors(xq, plan.metric, dim, "xq")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = int(k)
    nq = xq.shape[0]

    # 2. Hamming: distances in bits -> 1 - d / bits
    if plan.metric == "hamming":
        D, I = index.search(np.ascontiguousarray(xq), k)
        I = I.astype(np.int64, copy=False)
        pad = I < 0
        dist = np.where(pad, PAD_DISTANCE, D).astype(np.int32)
        scores = np.where(pad, -np.inf, 1.0 - D / float(dim)).astype(np.float32)
        return Neighbors(scores=scores, ids=I, distances=dist)

    xq = _as_f32(xq)
    _check_normalised(xq, "xq")
    if nq == 0:
        return Neighbors(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))

    # 3. Inner product: the scores are cosines, optionally exact re-rank of candidates
    if plan.rerank_k:
        if rerank_vectors is None:
            raise ValueError(
                f"plan {plan.kind} re-ranks its candidates: pass rerank_vectors, the ({index.ntotal}, "
                f"{dim}) float16/float32 corpus embeddings"
            )
        if (
            not (isinstance(rerank_vectors, np.ndarray) or callable(getattr(rerank_vectors, "read_rows", None)))
            or len(rerank_vectors.shape) != 2
            or rerank_vectors.shape[1] != dim
            or rerank_vectors.shape[0] < index.ntotal
        ):
            shape = getattr(rerank_vectors, "shape", type(rerank_vectors).__name__)
            raise ValueError(
                f"rerank_vectors must be a ({index.ntotal}, {dim}) matrix of the indexed vectors, got {shape}"
            )
        if isinstance(index, faiss.IndexRefine):
            kk = max(k, plan.exact_k)
            # k_factor per call (not index.k_factor): searches with another k may run in other threads
            _, cand = index.search(xq, kk, params=_refine_params(max(1.0, plan.rerank_k / kk)))
        elif plan.refine:
            raise IndexMismatchError(f"plan {plan.factory} needs an IndexRefine, got {type(index).__name__}")
        else:
            _, cand = index.search(xq, max(k, plan.rerank_k))
        scores, ids = _rerank(xq, cand.astype(np.int64, copy=False), rerank_vectors, k)
    else:
        D, ids = index.search(xq, k)
        ids = ids.astype(np.int64, copy=False)
        scores = D.astype(np.float32, copy=False)
    pad = ids < 0
    # float16 storage can give cosines a hair above 1; padding gets -inf (never a match)
    scores = np.where(pad, -np.inf, np.clip(scores, -1.0, 1.0)).astype(np.float32)
    return Neighbors(scores=scores, ids=ids)


_REFINE_PARAMS: dict[float, Any] = {}


def _refine_params(k_factor: float) -> Any:
    """IndexRefine search parameters, made once per k_factor (read-only once made: shared by threads)."""
    sp = _REFINE_PARAMS.get(k_factor)
    if sp is None:
        sp = _REFINE_PARAMS[k_factor] = faiss.IndexRefineSearchParameters(k_factor=k_factor)
    return sp


_FP16_DECODERS: dict[int, Any] = {}


def _to_f32(x: np.ndarray) -> np.ndarray:
    """(n, d) float32 of an (n, d) array; float16 rows are decoded by faiss's SQfp16 decoder (exact), a little
    cheaper than numpy's astype per query-sized block (docs/experiments/2026-12-06-ann-1m-10m.md)."""
    if x.dtype != np.float16 or x.ndim != 2 or not len(x):
        return np.asarray(x, dtype=np.float32)
    d = x.shape[1]
    dec = _FP16_DECODERS.get(d)
    if dec is None:  # stateless once made (fp16 needs no training): shared by threads
        dec = _FP16_DECODERS[d] = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)
    return dec.sa_decode(np.ascontiguousarray(x).view(np.uint8))


def _gather(xb: Any, rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) float32 copies of the unique `rows` of an array or a row reader (both index by
    an id array; sorted rows read a file in order)."""
    # index the plain ndarray view of a memory map: np.memmap's own fancy indexing took 52 us for 100 rows, 32 us
    if isinstance(xb, np.memmap):
        xb = xb.view(np.ndarray)
    return _to_f32(np.asarray(xb[rows]))


def _rerank(xq: np.ndarray, cand: np.ndarray, xb: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each query with its (nq, kk) candidates, cut to the best k (kk >= k)."""
    nq, kk = cand.shape
    if nq == 1:  # the usual single query: no de-duplication across queries (less numpy per query)
        got = cand[0][cand[0] >= 0]  # faiss ids are unique; -1 pads
        s1 = _gather(xb, got) @ xq[0]  # (len(got),)
        order = np.argsort(-s1, kind="stable")[:k]
        scores = np.full((1, k), -np.inf, np.float32)
        ids = np.full((1, k), -1, np.int64)
        scores[0, : len(order)], ids[0, : len(order)] = s1[order], got[order]
        return scores, ids
    scores = np.empty((nq, k), np.float32)
    ids = np.empty((nq, k), np.int64)
    block = max(1, 16_384 // kk)  # queries per step: bounds the gathered rows to 16k x d float32 (32 MiB at 512)
    for a in range(0, nq, block):
        c = cand[a : a + block]
        valid = c >= 0
        # one sorted gather per block: reads in file order, each row read once
        uniq, inv = np.unique(np.where(valid, c, 0).ravel(), return_inverse=True)
        rows = _gather(xb, uniq)  # (u, d) float32
        # one BLAS product per unique row, then each query picks its candidates' scores (a (b, kk, d)
        # gather + einsum costs more per query)
        s_u = rows @ xq[a : a + block].T  # (u, b)
        s = s_u[inv.reshape(c.shape), np.arange(c.shape[0])[:, None]]  # (b, kk)
        s[~valid] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        ids[a : a + block] = np.take_along_axis(np.where(valid, c, -1), order, axis=1)
        scores[a : a + block] = np.take_along_axis(s, order, axis=1)
    return scores, ids
