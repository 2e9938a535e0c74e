"""One ANN over many parts: an IVF trained once, each part's codes added on their own, the lists merged on disk.

A vector search of an index of many parts would otherwise ask every part's own FAISS index (1,000 parts at 10M
rows). This module builds one IVF index per descriptor over the parts it covers:

  1. `train_template`: k-means on a sample drawn across the parts (each part gives rows in proportion to its size),
     written as an empty, trained index (`template.<name>.faiss`).
  2. `add_part_codes`: one part's vectors encoded into a copy of the template, with ids `seq << 32 | row`
     (part sequence number, row in the part), written as `codes.<part>.<name>.faiss`. Parts are independent: a
     function of (template file, vectors file, seq, output file), so a Ray task can run it per part (issue 25).
  3. `merge_lists`: the per-part inverted lists (read memory-mapped) and, on an append, the previous merged
     lists, concatenated list by list into one `OnDiskInvertedLists` file (`<name>.<gen>.ivfdata`) beside a
     small index file holding the coarse quantizer and the list offsets. Search memory-maps that file: queries
     page in only the lists they probe.

Why merged OnDiskInvertedLists rather than the other ways FAISS offers:
  * per-part indexes searched together cost one coarse scan and nprobe list reads per part per query (the
    problem this module solves); `HStackInvertedLists` over per-part lists shares the coarse scan but still
    reads nprobe x parts small, scattered lists per query;
  * `merge_ondisk` makes each list one contiguous run of the file: nprobe reads per query whatever the part
    count. It does not take fast-scan PQ codes (faiss issue #2407), so the codes are SQ8 (d bytes a vector),
    which rank well enough that a short exact re-rank from the float16 vectors recovers the exact order.
  * an append merges the old lists file with the new parts' lists into a new file (sequential I/O, no
    retraining, no re-encoding of old parts): cheaper than a build by the k-means and the encoding.
PDQ (256-bit hashes) takes the same path with `IndexBinaryIVF` (Hamming k-means over bytes; exact distances,
since the codes are the hashes themselves), so it scales the same way.

Ids: int64 `seq << 32 | row`, stable while the part is listed (a compaction writes new parts, and the merged
index is rebuilt from its template then). Removed rows are excluded inside FAISS with an IDSelector.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from provenance import ann

logger = logging.getLogger(__name__)

# The same plan as ann's "ivf_sq" (the per-part plan for large parts): an HNSW graph over the centroids as coarse
# quantizer (no full scan of them per query), SQ8 codes (d bytes a vector; OnDiskInvertedLists cannot hold
# fast-scan PQ, faiss #2407), the SQ8 top RERANK_K given exact float16 cosines (SQ8 mis-orders near-ties only).
HNSW_COARSE_M = ann.COARSE_HNSW_M
CODES = "SQ8"
RERANK_K = ann.SQ_RERANK_K
NPROBE_SHARE = 64  # probe nlist / NPROBE_SHARE lists (at least MIN_NPROBE) ...
MIN_NPROBE = 16
# ... or fewer when lists are long: about SCAN_ROWS rows scanned per query. 64 lists of ~244 rows at 1M (4,096
# lists) and 16 of ~1,220 at 10M (8,192 lists) both gave recall@10 0.95 (headline) at 3-4 ms CPU; 128 lists at 10M
# scanned 156k rows for 0.97 at 21 ms (BENCHMARKS.md, index).
SCAN_ROWS = 16_384
RETRAIN_GROWTH = 4.0  # an append retrains when the covered rows grew past this many times the trained ones
SAMPLE_SEED = 1234
ID_SHIFT = 32


@dataclass(frozen=True)
class MergedPlan:
    """How one descriptor's merged index is built and searched."""

    factory: str
    metric: str  # "ip" or "hamming"
    dim: int  # floats, or bits for hamming
    nlist: int
    nprobe: int
    rerank_k: int  # 0: no re-rank (hamming: the codes are the hashes)
    efsearch: int = 128  # HNSW coarse quantizer's efSearch (float plans; at least nprobe)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergedPlan:
        return cls(**{k: d[k] for k in ("factory", "metric", "dim", "nlist", "nprobe", "rerank_k", "efsearch")})


def plan_merged(n: int, dim: int, metric: str, nprobe: int | None = None, nlist: int | None = None) -> MergedPlan:
    """The merged index for n rows: nlist ~ 4 sqrt(n) lists (ann._nlist) unless given, nlist/64 of them probed (fewer
    when lists are long: ~SCAN_ROWS rows scanned), SQ8 codes, HNSW coarse
    quantizer."""
    nlist = int(nlist) if nlist else ann._nlist(n)
    by_rows = 2 ** round(math.log2(max(1.0, SCAN_ROWS * nlist / max(n, 1))))
    probe = int(nprobe) if nprobe else min(nlist, max(MIN_NPROBE, min(nlist // NPROBE_SHARE, by_rows)))
    if metric == "hamming":
        return MergedPlan(f"BIVF{nlist}", metric, dim, nlist, min(probe, nlist), 0)
    return MergedPlan(f"IVF{nlist}_HNSW{HNSW_COARSE_M},{CODES}", metric, dim, nlist, min(probe, nlist), RERANK_K)


def make_id(seq: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(seq) << np.int64(ID_SHIFT)) | rows.astype(np.int64)


def split_id(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(seq, row) of merged ids (>= 0)."""
    return ids >> ID_SHIFT, ids & ((1 << ID_SHIFT) - 1)


def _ivf(index: Any) -> Any:
    if isinstance(index, faiss.IndexBinary):
        return faiss.downcast_IndexBinary(index) if not isinstance(index, faiss.IndexBinaryIVF) else index
    return faiss.extract_index_ivf(index)


def _read(path: Path, metric: str, flags: int = 0) -> Any:
    return faiss.read_index_binary(str(path), flags) if metric == "hamming" else faiss.read_index(str(path), flags)


def _write(index: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    (faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else faiss.write_index)(index, str(tmp))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- 1. train
def sample_across_parts(parts: list[np.ndarray], n_sample: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """About n_sample rows drawn from the parts in proportion to their sizes, in file order within each part
    (float32, or uint8 hashes). parts: (n_i, d) arrays, e.g. memory-mapped .npy files."""
    sizes = np.array([len(p) for p in parts], np.int64)
    total = int(sizes.sum())
    rng = np.random.default_rng(seed)
    out = []
    for p, n in zip(parts, sizes, strict=True):
        take = min(int(n), math.ceil(n_sample * int(n) / max(total, 1)))
        if take:
            rows = np.sort(rng.choice(int(n), take, replace=False))
            out.append(np.asarray(p[rows]))
    x = np.concatenate(out) if out else np.zeros((0, parts[0].shape[1] if parts else 0))
    return x if x.dtype == np.uint8 else np.ascontiguousarray(x, dtype=np.float32)


def train_template(parts: list[np.ndarray], plan: MergedPlan, path: Path) -> None:
    """k-means of the coarse quantizer (and the SQ8 ranges) on a sample across parts; writes the empty index."""
    n = sum(len(p) for p in parts)
    sample = sample_across_parts(parts, min(n, plan.nlist * ann.TRAIN_POINTS_PER_CENTROID))
    if len(sample) < plan.nlist:
        raise ValueError(f"{plan.factory} needs >= {plan.nlist} training vectors, got {len(sample)}")
    if plan.metric == "hamming":
        index = faiss.index_binary_factory(plan.dim, plan.factory)
    else:
        index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf(index)
    ivf.cp.seed = SAMPLE_SEED
    logger.info("training %s on %d vectors sampled across %d parts", plan.factory, len(sample), len(parts))
    index.train(sample)
    _write(index, path)


# ------------------------------------------------------------------------------- 2. add (per part)
def add_part_codes(
    template_path: str | os.PathLike,
    vectors: np.ndarray | str | os.PathLike,
    seq: int,
    out_path: str | os.PathLike,
    metric: str = "ip",
) -> int:
    """Encode one part's vectors (an array, or the path of its .npy) into a copy of the trained template, ids
    `seq << 32 | row`; write it to out_path. Independent of every other part: a Ray task can run it."""
    x = np.load(vectors, mmap_mode="r") if isinstance(vectors, (str, os.PathLike)) else vectors
    index = _read(Path(template_path), metric)
    with ann.exact_coarse(index):  # rows go to their nearest centroid's list (not an HNSW walk's guess)
        for start in range(0, len(x), ann.ADD_CHUNK):
            chunk = x[start : start + ann.ADD_CHUNK]
            chunk = (
                np.ascontiguousarray(chunk) if metric == "hamming" else np.ascontiguousarray(chunk, dtype=np.float32)
            )
            index.add_with_ids(chunk, make_id(seq, np.arange(start, start + len(chunk))))
    _write(index, Path(out_path))
    return int(index.ntotal)


# ------------------------------------------------------------------------------- 3. merge (on disk)
def merge_lists(
    template_path: Path, sources: list[Path], index_path: Path, ivfdata_path: Path, metric: str = "ip"
) -> int:
    """Concatenate the inverted lists of `sources` (per-part code files, or an earlier merged index) list by list
    into one OnDiskInvertedLists file; write the index that points at it (read back with IO_FLAG_ONDISK_SAME_DIR,
    so the folder can move). Sources are memory-mapped: memory stays flat while the file grows."""
    index = _read(template_path, metric)
    ivf = _ivf(index)
    srcs = []
    for s in sources:
        # an earlier merged index's lists are an OnDiskInvertedLists (mapped by nature); per-part code files
        # are mapped by IO_FLAG_MMAP (that flag on an OnDisk index crashes merge_from_multiple in faiss 1.15)
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if s.with_suffix(".ivfdata").exists() else faiss.IO_FLAG_MMAP
        si = _read(s, metric, flags)
        if metric != "hamming":
            _drop_quantizer(_ivf(si))
        srcs.append(si)  # kept alive while their lists are read
    tmp_data = ivfdata_path.with_name(ivfdata_path.name + ".tmp")
    tmp_data.unlink(missing_ok=True)  # left by a stopped merge
    invlists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(tmp_data))
    vec = faiss.InvertedListsPtrVector()
    for si in srcs:
        vec.push_back(_ivf(si).invlists)
    ntotal = int(invlists.merge_from_multiple(vec.data(), vec.size(), False, False))
    del vec, srcs
    os.replace(tmp_data, ivfdata_path)
    invlists.filename = ivfdata_path.name  # read back from the index's own folder (IO_FLAG_ONDISK_SAME_DIR)
    ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    ivf.ntotal = index.ntotal = ntotal
    _write(index, index_path)
    return ntotal


def _drop_quantizer(ivf: Any) -> None:
    """Free a source's coarse quantizer (only its lists are merged): every per-part codes file carries the template's
    HNSW over the centroids (~18 MB at 8,192 x 512), and 909 of them held at once took 15.7 GB in the 10M build."""
    old = ivf.quantizer
    ivf.quantizer = faiss.IndexFlat(ivf.d, ivf.metric_type)  # empty; SWIG hands it to the index (own_fields)
    if ivf.own_fields:
        old.this.acquire()  # Python now owns the old quantizer and frees it here
    del old


def load_merged(index_path: Path, plan: MergedPlan) -> Any:
    """The merged index with its lists memory-mapped from the .ivfdata beside it, search parameters set."""
    index = _read(index_path, plan.metric, faiss.IO_FLAG_ONDISK_SAME_DIR)  # OnDisk lists are mapped, read-only
    ivf = _ivf(index)
    ivf.nprobe = plan.nprobe
    if plan.metric == "ip":
        q = faiss.downcast_index(ivf.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            q.hnsw.efSearch = max(plan.efsearch, plan.nprobe)
    return index


# ------------------------------------------------------------------------------- 4. search
def search_merged(
    index: Any,
    plan: MergedPlan,
    xq: np.ndarray,
    k: int,
    removed_ids: np.ndarray | None,
    read_rows: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (nq, k) float32, hamming distances (nq, k) int32 or zeros, merged ids (nq, k) int64, -1 padded).

    removed_ids: merged ids never to return (tombstones), excluded inside FAISS. read_rows(ids) -> (len, d) float
    rows of those merged ids (float plans): the SQ8 top plan.rerank_k get exact cosines from them."""
    ivf = _ivf(index)
    sel = None
    if removed_ids is not None and len(removed_ids):
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(removed_ids, dtype=np.int64))
        sel = faiss.IDSelectorNot(batch)
    if plan.metric == "hamming":
        # IndexBinaryIVF takes no IDSelector (faiss 1.15): ask for as many more as there are removed rows, drop them
        extra = 0 if removed_ids is None else len(removed_ids)
        dist, lab = index.search(np.ascontiguousarray(xq), min(k + extra, max(1, index.ntotal)))
        lab = lab.astype(np.int64)
        if extra:
            lab = np.where(np.isin(lab, removed_ids), -1, lab)
            order = np.argsort(lab < 0, axis=1, kind="stable")  # live results first, in their order
            lab, dist = np.take_along_axis(lab, order, 1), np.take_along_axis(dist, order, 1)
        lab, dist = lab[:, :k], dist[:, :k]
        if lab.shape[1] < k:
            lab = np.pad(lab, ((0, 0), (0, k - lab.shape[1])), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, k - dist.shape[1])))
        pad = lab < 0
        return (
            np.where(pad, -np.inf, 1.0 - dist / float(plan.dim)).astype(np.float32),
            np.where(pad, ann.PAD_DISTANCE, dist).astype(np.int32),
            lab,
        )
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    kk = max(k, plan.rerank_k)
    params = faiss.SearchParametersIVF(nprobe=ivf.nprobe, sel=sel) if sel is not None else None
    dist, lab = index.search(xq, kk, params=params) if params else index.search(xq, kk)
    lab = lab.astype(np.int64)
    if read_rows is None or not plan.rerank_k:
        order = slice(0, k)
        sc = np.where(lab[:, order] < 0, -np.inf, dist[:, order]).astype(np.float32)
        return sc, np.zeros_like(lab[:, order], np.int32), lab[:, order]
    sc = np.full((len(xq), k), -np.inf, np.float32)
    ids = np.full((len(xq), k), -1, np.int64)
    for qi in range(len(xq)):
        got = lab[qi][lab[qi] >= 0]
        if not len(got):
            continue
        s = np.asarray(read_rows(got), np.float32) @ xq[qi]
        o = np.lexsort((got, -s))[:k]  # exact cosine, then id: ties ordered as a flat search orders them
        sc[qi, : len(o)], ids[qi, : len(o)] = np.clip(s[o], -1.0, 1.0), got[o]
    return sc, np.zeros((len(xq), k), np.int32), ids


# ------------------------------------------------------------------------------- files of a merged index
def remove_files(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
