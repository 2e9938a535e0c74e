"""Tests of provenance.ann: planning, building, saving/loading and searching FAISS indexes."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from provenance import ann
from provenance.ann import AnnPlan, Neighbors, build_index, load_index, plan_index, save_index, search
from provenance.errors import IndexMismatchError
from training import ann_eval

D = 64  # small dim keeps every kind's build under a second on 2 cores


def clustered(n: int, d: int = D, n_clusters: int = 50, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """(n, d) float32 L2-normalised vectors around random centres, like embeddings of similar photos."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def perturbed(x: np.ndarray, scale: float, seed: int = 1) -> np.ndarray:
    """Edited copies: each row plus noise, renormalised (cosine ~ 1/sqrt(1 + scale^2 d))."""
    rng = np.random.default_rng(seed)
    q = x + scale * rng.standard_normal(x.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # tiny k-means runs are all OpenMP barriers: on a busy 2-core machine one thread is ~5x faster
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def xb() -> np.ndarray:
    return clustered(4000)


@pytest.fixture(scope="module")
def xq(xb) -> np.ndarray:
    return perturbed(xb[::40], 0.05)  # 100 queries near corpus rows 0, 40, 80...


@pytest.fixture(scope="module")
def gt(xq, xb) -> np.ndarray:
    return ann_eval.exact_search(xq, xb, 10)[1]


def test_flat_self_search_is_exact(xb):
    plan = plan_index(len(xb), D)
    assert plan.kind == "flat" and plan.factory == "Flat"
    index = build_index(xb, plan, use_gpu=False)
    got = search(index, xb[:200], 5, plan)
    assert isinstance(got, Neighbors) and got.distances is None
    assert got.ids.dtype == np.int64 and got.scores.dtype == np.float32
    assert (got.ids[:, 0] == np.arange(200)).all()
    np.testing.assert_allclose(got.scores[:, 0], 1.0, atol=1e-5)  # cosine of a vector with itself
    assert (np.diff(got.scores, axis=1) <= 1e-6).all()  # best first
    # the scores are the cosines of the returned rows (tolerance: float32 dot products)
    expect = np.einsum("qd,qkd->qk", xb[:200], xb[got.ids])
    np.testing.assert_allclose(got.scores, expect, atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_pq"])
def test_each_kind_recall_and_copy_found(kind, xb, xq, gt):
    plan = plan_index(len(xb), D, kind=kind)
    assert plan.kind == kind
    index = build_index(xb, plan, use_gpu=False)
    assert index.ntotal == len(xb)
    # ivf_pq must re-rank from the float16 embeddings the indexer stores
    xb16 = xb.astype(np.float16)
    got = search(index, xq, 10, plan, rerank_vectors=xb16 if plan.rerank_k else None)
    assert ann_eval.recall_at_k(got.ids, gt, 10) >= 0.9
    # every query is an edited copy of row 40*i: it must come first
    assert (got.ids[:, 0] == np.arange(0, len(xb), 40)).mean() >= 0.98
    if kind == "ivf_pq":
        # re-ranked scores are exact cosines (float16 rows: tolerance 1e-3), not PQ estimates
        expect = np.einsum("qd,qkd->qk", xq, xb16.astype(np.float32)[got.ids])
        np.testing.assert_allclose(got.scores, expect, atol=1e-3)


def test_fast_scan_plan_exact_centroids_and_exact_scores(xb, xq, gt):
    # the in-memory fast-scan plan: centroids stored as float16 (scanned in full), exact re-rank from float16 rows
    plan = plan_index(len(xb), D, kind="ivf_pq")
    assert plan.factory.startswith("IVF") and f"({ann.FS_COARSE})" in plan.factory and "x4fs" in plan.factory
    index = build_index(xb, plan, use_gpu=False)
    ivf = faiss.extract_index_ivf(index)
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexScalarQuantizer)
    xb16 = xb.astype(np.float16)
    got = search(index, xq, 10, plan, rerank_vectors=xb16)
    # the scores are the float32 dot products of the float16 rows, as an exact search over them gives
    expect = np.einsum("qd,qkd->qk", xq, xb16.astype(np.float32)[got.ids])
    np.testing.assert_allclose(got.scores, expect, atol=1e-5)
    assert ann_eval.recall_at_k(got.ids, gt, 10) >= 0.9
    # the float16 rows are decoded by faiss, bit for bit as numpy converts them
    rows = xb16[:37]
    np.testing.assert_array_equal(ann._to_f32(rows), rows.astype(np.float32))


def test_ivf_pq_requires_rerank_vectors(xb, xq):
    plan = plan_index(len(xb), D, kind="ivf_pq")
    index = build_index(xb, plan, use_gpu=False)
    with pytest.raises(ValueError, match="rerank_vectors"):
        search(index, xq, 10, plan)
    with pytest.raises(ValueError, match="rerank_vectors"):
        search(index, xq, 10, plan, rerank_vectors=xb[:100])


def test_fewer_rows_than_k_pads_with_minus_one():
    xb = clustered(5)
    plan = plan_index(5, D)
    got = search(build_index(xb, plan, use_gpu=False), xb[:2], 8, plan)
    assert (got.ids[:, 5:] == -1).all() and np.isneginf(got.scores[:, 5:]).all()
    assert sorted(got.ids[0, :5].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kind", ["binary_flat", "binary_ivf", "binary_hnsw"])
def test_hamming_distances_and_scores(kind):
    rng = np.random.default_rng(3)
    bits = 256
    hashes = rng.integers(0, 256, (3000, bits // 8), dtype=np.uint8)
    plan = plan_index(len(hashes), bits, metric="hamming", kind=kind)
    index = build_index(hashes, plan, use_gpu=False)
    # queries: rows 0..49 with exactly j % 20 bits flipped (a PDQ hash of an edited copy)
    q = hashes[:50].copy()
    for j in range(50):
        for b in rng.choice(bits, j % 20, replace=False):
            q[j, b // 8] ^= np.uint8(1 << (b % 8))
    got = search(index, q, 5, plan)
    assert got.distances is not None and got.distances.dtype == np.int32
    # random 256-bit hashes are ~128 bits apart: the source row is nearest at <= 19 flips
    assert (got.ids[:, 0] == np.arange(50)).all()
    assert (got.distances[:, 0] == np.arange(50) % 20).all()
    np.testing.assert_allclose(got.scores, 1.0 - got.distances / bits, rtol=0, atol=1e-6)
    # distances agree with a numpy popcount of the returned rows
    popcount = np.unpackbits(q[:, None, :] ^ hashes[got.ids], axis=2).sum(axis=2)
    assert (popcount == got.distances).all()


def test_save_load_round_trip_mmap(tmp_path, xb, xq):
    for kind in ("flat", "hnsw", "ivf_flat", "ivf_pq"):
        plan = plan_index(len(xb), D, kind=kind)
        index = build_index(xb, plan, use_gpu=False)
        xb16 = xb.astype(np.float16)
        before = search(index, xq, 10, plan, rerank_vectors=xb16)
        path = tmp_path / f"{kind}.faiss"
        save_index(index, path)
        # the plan travels as JSON in the index manifest
        plan2 = AnnPlan.from_dict(plan.to_dict())
        assert plan2 == plan
        loaded = load_index(path, plan2, mmap=True, use_gpu=False)
        assert loaded.ntotal == len(xb)
        after = search(loaded, xq, 10, plan2, rerank_vectors=xb16)
        assert (after.ids == before.ids).all(), kind
        np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)


def test_binary_save_load_round_trip(tmp_path):
    hashes = np.random.default_rng(5).integers(0, 256, (500, 32), dtype=np.uint8)
    plan = plan_index(500, 256, metric="hamming")
    assert plan.kind == "binary_flat"
    save_index(build_index(hashes, plan, use_gpu=False), tmp_path / "pdq.faiss")
    got = search(load_index(tmp_path / "pdq.faiss", plan), hashes[:10], 1, plan)
    assert (got.ids[:, 0] == np.arange(10)).all() and (got.distances[:, 0] == 0).all()


def test_append_after_load_without_mmap(tmp_path, xb):
    plan = plan_index(3000, D, kind="ivf_flat")
    save_index(build_index(xb[:3000], plan, use_gpu=False), tmp_path / "a.faiss")
    index = load_index(tmp_path / "a.faiss", plan, mmap=False)
    ann.add_vectors(index, xb[3000:].astype(np.float16))
    assert index.ntotal == len(xb)
    got = search(index, xb[3990:4000], 1, plan)
    assert (got.ids[:, 0] == np.arange(3990, 4000)).all()  # appended rows keep their row ids


def test_plan_index_choices():
    small = plan_index(10_000, 512)
    assert small.kind == "flat" and small.est_memory_bytes == 10_000 * 512 * 4
    # 1M x 512: in-memory IVF-PQ256 fast-scan (~150 MiB), exact float16 centroids, exact re-rank of the PQ top 100
    big = plan_index(1_000_000, 512, memory_budget_bytes=1 << 30)
    assert big.kind == "ivf_pq" and big.factory == "IVF4096(SQfp16),PQ256x4fs" and big.refine == ""
    assert big.params == {"nprobe": 8, "rerank_k": ann.FS_RERANK_K} and big.exact_k == ann.FS_RERANK_K
    assert 100 << 20 < big.est_memory_bytes < 200 << 20
    assert "1.9 GiB" in big.reason and "budget" in big.reason and "exact cosines" in big.reason
    # a tight budget gets coarser codes (the index must fit half of it), re-ranked deeper
    tight = plan_index(1_000_000, 512, memory_budget_bytes=200 << 20)
    assert tight.factory == "IVF4096(SQfp16),PQ128x4fs" and tight.est_memory_bytes <= 100 << 20
    assert tight.params == {"nprobe": 8, "rerank_k": 2 * ann.FS_RERANK_K}
    # codes that do not fit but SQ8 codes that fit half the budget memory-mapped: IVF-SQ8 with an HNSW coarse
    # quantizer and an exact re-rank (as the merged on-disk index over parts)
    sq = plan_index(1_000_000, 512, memory_budget_bytes=1 << 30, kind="ivf_sq")
    assert sq.kind == "ivf_sq" and sq.factory == "IVF4096_HNSW32,SQ8" and sq.rerank_k == ann.SQ_RERANK_K
    assert sq.params["nprobe"] == 64 and sq.est_memory_bytes < 1 << 29 and "exact cosines" in sq.reason
    # 2M vectors: never the in-memory SQ8 copy (no longer chosen)
    assert plan_index(2_000_000, 512).refine == ""
    mid = plan_index(100_000, 512)
    assert mid.kind == "hnsw" and "HNSW32" in mid.factory
    # a roomy budget below 1M keeps vectors uncompressed
    assert plan_index(500_000, 512, memory_budget_bytes=8 << 30).kind == "ivf_flat"
    assert plan_index(10_000, 256, metric="hamming").kind == "binary_flat"
    assert plan_index(5_000_000, 256, metric="hamming").kind == "binary_ivf"
    # every automatic plan builds an index that the factory accepts
    for p in (small, sq, big, mid):
        assert ann._new_index(p).d == 512


def test_bad_inputs_raise(xb):
    plan = plan_index(len(xb), D)
    index = build_index(xb, plan, use_gpu=False)
    with pytest.raises(TypeError, match=r"xq must be a float32 .*dim 64.*\(3, 32\)"):
        search(index, np.zeros((3, 32), np.float32), 5, plan)
    with pytest.raises(TypeError, match="xq must be a numpy array"):
        search(index, [[0.0] * D], 5, plan)
    with pytest.raises(TypeError, match="float64"):
        search(index, xb[:2].astype(np.float64), 5, plan)
    with pytest.raises(ValueError, match="k must be a positive int"):
        search(index, xb[:2], 0, plan)
    with pytest.raises(ValueError, match="L2-normalised.*row 1"):
        search(index, np.stack([xb[0], 3 * xb[1]]), 5, plan)
    with pytest.raises(ValueError, match="metric"):
        plan_index(10, D, metric="l2")
    with pytest.raises(ValueError, match="kind"):
        plan_index(10, D, kind="lsh")
    with pytest.raises(ValueError, match="n must be"):
        plan_index(-1, D)
    with pytest.raises(TypeError, match="uint8"):
        hplan = plan_index(10, 256, metric="hamming")
        build_index(np.zeros((10, 16), np.uint8), hplan, use_gpu=False)
    with pytest.raises(ValueError, match="no rows"):
        build_index(np.zeros((0, D), np.float32), plan, use_gpu=False)
    # a 512-d plan against this 64-d index: the dimension mismatch names both
    wrong = plan_index(len(xb), 512)
    with pytest.raises(IndexMismatchError, match="dim 64.*dim 512"):
        search(index, xb[:1], 1, wrong)
    with pytest.raises(FileNotFoundError):
        load_index("/nonexistent/x.faiss", plan)


def test_tune_search_params_reaches_target(xb, xq, gt):
    plan = plan_index(len(xb), D, kind="ivf_flat").with_params(nprobe=1)
    index = build_index(xb, plan, use_gpu=False)
    tuned = ann_eval.tune_search_params(index, plan, xq, gt, target_recall=0.97)
    got = search(index, xq, 10, tuned)
    assert ann_eval.recall_at_k(got.ids, gt, 10) >= 0.97
    assert tuned.params["nprobe"] >= 1


def test_use_gpu_true_without_gpu_raises(monkeypatch):
    assert isinstance(ann.gpu_available(), bool)
    monkeypatch.setattr(ann, "_faiss_gpus", lambda: 0)
    monkeypatch.setattr(ann, "_torch_device", lambda import_torch: None)
    assert not ann.gpu_available(import_torch=True)
    with pytest.raises(RuntimeError, match="GPU"):
        build_index(clustered(10), plan_index(10, D), use_gpu=True)


def test_torch_kmeans_path_builds_a_good_ivf(monkeypatch, xb, xq, gt):
    # where only torch has a GPU, the IVF centroids come from _kmeans_torch; run it on the CPU here
    monkeypatch.setattr(ann, "_torch_device", lambda import_torch: "cpu")
    monkeypatch.setattr(ann, "_faiss_gpus", lambda: 0)
    plan = plan_index(len(xb), D, kind="ivf_pq")
    index = build_index(xb, plan, use_gpu=True)
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    # spherical, as faiss for IP (tolerance: the centroids are stored as SQ8, 1/255 of each range)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-2)
    got = search(index, xq, 10, plan, rerank_vectors=xb)
    assert ann_eval.recall_at_k(got.ids, gt, 10) >= 0.9


@pytest.mark.gpu
def test_gpu_build_matches_cpu(xb, xq, gt):
    if not ann.gpu_available():
        pytest.skip("faiss sees no GPU")
    plan = plan_index(len(xb), D, kind="ivf_flat")
    index = build_index(xb, plan, use_gpu=True)
    got = search(index, xq, 10, plan)
    assert ann_eval.recall_at_k(got.ids, gt, 10) >= 0.9


def test_rerank_from_row_reader_matches_the_memory_map(tmp_path, xb, xq):
    # the store re-ranks with rows read by pread instead of a memory map: same ids, same scores
    from provenance.store import RowReader

    plan = plan_index(len(xb), D, kind="ivf_pq")
    index = build_index(xb, plan, use_gpu=False)
    np.save(tmp_path / "sscd.f16.npy", xb.astype(np.float16))
    mapped = np.load(tmp_path / "sscd.f16.npy", mmap_mode="r")
    reader = RowReader.from_npy(tmp_path / "sscd.f16.npy")
    assert reader.shape == mapped.shape and reader.dtype == np.float16
    rows = np.array([0, 1, 2, 777, len(xb) - 1])
    np.testing.assert_array_equal(reader.read_rows(rows), mapped[rows])
    a = search(index, xq, 10, plan, rerank_vectors=mapped)
    b = search(index, xq, 10, plan, rerank_vectors=reader)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(IndexError):
        reader.read_rows(np.array([len(xb)]))
    reader.close()


def _forced_refine_plan(n: int, budget: int = 1 << 30) -> AnnPlan:
    # the IVF-PQ + in-memory SQ8 copy plan of earlier releases: plan_index no longer makes it, indexes built with
    # it must still load and search
    plan = plan_index(n, D, kind="ivf_pq", memory_budget_bytes=budget)
    factory = plan.factory.replace(f"({ann.FS_COARSE})", "(SQ8)") + ",Refine(SQ8)"
    plan = AnnPlan.from_dict(
        {**plan.to_dict(), "factory": factory, "params": {"nprobe": 64, "rerank_k": 100, "exact_k": ann.EXACT_K}}
    )
    assert plan.refine == "SQ8", plan.factory
    return plan


def test_ivf_pq_sq8_refine_same_top_k_as_exact_and_exact_scores(tmp_path, xb, xq, gt):
    # IVF-PQ + SQ8 refine: faiss re-scores the PQ top 100 with its SQ8 copy, the best exact_k get
    # exact cosines of the float16 rows (read by pread), which are what `search` returns
    from provenance.store import RowReader

    plan = _forced_refine_plan(len(xb)).with_params(nprobe=64)  # all 64 lists: only PQ/SQ8 can err
    index = build_index(xb, plan, use_gpu=False)
    assert isinstance(index, faiss.IndexRefine) and index.ntotal == len(xb)
    assert isinstance(faiss.downcast_index(index.refine_index), faiss.IndexScalarQuantizer)
    # the coarse centroids are stored as SQ8
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexScalarQuantizer)
    xb16 = xb.astype(np.float16)
    np.save(tmp_path / "sscd.f16.npy", xb16)
    reader = RowReader.from_npy(tmp_path / "sscd.f16.npy")
    got = search(index, xq, 10, plan, rerank_vectors=reader)
    # exact top-10 over the float16 rows, as the benchmark's ground truth
    ex_d, ex_i = ann_eval.exact_search(xq, xb16, 10)
    same = [set(a) == set(b) for a, b in zip(got.ids.tolist(), ex_i.tolist(), strict=False)]
    assert np.mean(same) >= 0.95  # the rest differ by near-ties only:
    np.testing.assert_allclose(np.sort(got.scores, axis=1), np.sort(ex_d, axis=1), atol=2e-3)
    # returned scores are the float16 cosines, best first (tolerance: float32 dot products)
    expect = np.einsum("qd,qkd->qk", xq, xb16.astype(np.float32)[got.ids])
    np.testing.assert_allclose(got.scores, expect, atol=1e-5)
    assert (np.diff(got.scores, axis=1) <= 1e-6).all()
    # single queries (the fast path) give the same answers as the batch
    for i in range(0, len(xq), 17):
        one = search(index, xq[i : i + 1], 10, plan, rerank_vectors=reader)
        np.testing.assert_array_equal(one.ids[0], got.ids[i])
        np.testing.assert_allclose(one.scores[0], got.scores[i], atol=1e-6)
    # k above exact_k: faiss keeps k candidates (with k_factor scaled down), still exact scores
    wide = search(index, xq[:5], 40, plan, rerank_vectors=xb16)
    assert wide.ids.shape == (5, 40) and (wide.ids >= 0).all()
    np.testing.assert_allclose(
        wide.scores, np.einsum("qd,qkd->qk", xq[:5], xb16.astype(np.float32)[wide.ids]), atol=1e-5
    )
    reader.close()


def test_ivf_pq_sq8_refine_save_load_append(tmp_path, xb, xq):
    # the SQ8 copy lives in the same .faiss file; appending adds to the PQ lists and to the copy
    plan = _forced_refine_plan(3000)
    index = build_index(xb[:3000], plan, use_gpu=False)
    xb16 = xb.astype(np.float16)
    before = search(index, xq, 10, plan, rerank_vectors=xb16[:3000])
    save_index(index, tmp_path / "r.faiss")
    loaded = load_index(tmp_path / "r.faiss", AnnPlan.from_dict(plan.to_dict()), mmap=True, use_gpu=False)
    assert isinstance(loaded, faiss.IndexRefine)
    after = search(loaded, xq, 10, plan, rerank_vectors=xb16[:3000])
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    # append (loaded without mmap): ids continue, both parts grow, appended rows are found
    index = load_index(tmp_path / "r.faiss", plan, mmap=False, use_gpu=False)
    ann.add_vectors(index, xb16[3000:])
    assert index.ntotal == len(xb) and index.refine_index.ntotal == len(xb)
    assert index.base_index.ntotal == len(xb)
    # the assignment used the centroids, but the SQ8 quantizer is back in place
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexScalarQuantizer)
    got = search(index, xb[3990:4000], 1, plan, rerank_vectors=xb16)
    assert (got.ids[:, 0] == np.arange(3990, 4000)).all()
    save_index(index, tmp_path / "r.faiss")
    again = load_index(tmp_path / "r.faiss", plan, mmap=True, use_gpu=False)
    assert again.ntotal == len(xb)


def test_refine_plan_and_index_must_agree(tmp_path, xb):
    refine = _forced_refine_plan(len(xb))
    plain = plan_index(len(xb), D, kind="ivf_pq", memory_budget_bytes=1 << 18)
    assert plain.refine == "" and plain.rerank_k and plain.exact_k == plain.rerank_k
    save_index(build_index(xb, plain, use_gpu=False), tmp_path / "plain.faiss")
    with pytest.raises(IndexMismatchError, match="Refine"):
        load_index(tmp_path / "plain.faiss", AnnPlan.from_dict({**plain.to_dict(), "factory": refine.factory}))


def test_exact_coarse_frees_its_flat_quantizer():
    # the flat copy of the centroids set as quantizer while adding was disowned by SWIG and leaked on every call
    # (16 MiB a part in the 10M merged build, 7.8 GB after 480 parts)
    def anon_mib() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon"))
        return int(line.split()[1]) / 1024

    rng = np.random.default_rng(0)
    nlist, d = 2048, 512  # 4 MiB of float32 centroids per flat copy
    c = rng.standard_normal((nlist, d)).astype(np.float32)
    quantizer = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(c)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.train(c)  # the quantizer already holds nlist centroids: no k-means, only the SQ8 ranges
    with ann.exact_coarse(index):
        pass
    before = anon_mib()
    for _ in range(20):
        with ann.exact_coarse(index):
            assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexFlat)
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexHNSWFlat)
    assert anon_mib() - before < 30  # leaking, 20 calls kept 80 MiB
