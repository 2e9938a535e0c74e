"""The merged on-disk ANN over parts (provenance.merged_ann): equal to a flat search, appends without retraining,
removed items never returned, per-part codes encoded independently."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from provenance import merged_ann as ma
from provenance import store
from provenance.descriptors.base import DescriptorSpec
from provenance.images import load_image
from provenance.indexer import BuildOptions, build
from provenance.search import Searcher
from provenance.store import IndexContents, ProvenanceIndex, compact, remove_items, write_index

DIM = 64


def _contents(n: int, seed: int = 0) -> IndexContents:
    rng = np.random.default_rng(seed)
    # clustered rows (as real descriptors are), so that IVF lists are uneven and near-ties exist
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    pdq = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    specs = {
        "sscd": DescriptorSpec("sscd", "test", "", DIM, "cosine"),
        "pdq": DescriptorSpec("pdq", "pdq", None, 256, "hamming"),
    }
    rows = [
        {"id": f"item-{i:05d}", "caption": f"caption {i}", "sha256": hashlib.sha256(b"%d" % i).hexdigest()}
        for i in range(n)
    ]
    return IndexContents(rows, {"sscd": x, "pdq": pdq}, specs, {}, [None] * n, [])


@pytest.fixture
def exhaustive(monkeypatch):
    """Merged ANN from 1,000 rows, probing every list: its top k must then be the flat top k."""
    monkeypatch.setattr(store, "MERGED_ANN_MIN_ROWS", 1000)
    monkeypatch.setattr(store, "MERGED_ANN_NPROBE", 1 << 20)


def _flat(x: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = xq @ x.astype(np.float32).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _same_up_to_ties(got: list, ids: np.ndarray, scores: np.ndarray, rows: list[dict]) -> None:
    assert len(got) == len(ids)
    for m, i, s in zip(got, ids, scores, strict=True):
        assert m.score == pytest.approx(float(s), abs=1e-5)
        if m.id != rows[i]["id"]:  # only a tie may swap two items
            assert abs(m.score - float(s)) < 1e-5


def test_merged_ann_equals_flat_search_and_is_used(tmp_path, exhaustive):
    c = _contents(2400)
    write_index(tmp_path / "many", c, {}, use_gpu=False, part_size=300)
    idx = ProvenanceIndex.open(tmp_path / "many")
    meta = idx.manifest["ann"]
    assert len(idx.parts) == 8 and idx._lay.ann_covered == list(range(8))
    assert set(meta["descriptors"]) == {"sscd", "pdq"} and meta["descriptors"]["sscd"]["factory"].endswith(",SQ8")
    d = tmp_path / "many" / meta["dir"]
    assert {p.name for p in d.iterdir()} == {
        "template.sscd.faiss",
        "sscd.faiss",
        "sscd.ivfdata",
        "template.pdq.faiss",
        "pdq.faiss",
        "pdq.ivfdata",
    }

    def no_part_search(*a, **k):  # every part is covered: the merged lists answer alone
        raise AssertionError("a covered part was searched on its own")

    for p in idx.parts:
        p.search = no_part_search
    rng = np.random.default_rng(1)
    xq = c.vectors["sscd"][rng.choice(2400, 15, replace=False)].astype(np.float32)
    xq += 0.3 * rng.standard_normal(xq.shape).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    gt, gs = _flat(c.vectors["sscd"], xq, 10)
    for qi, got in enumerate(idx.search_vectors("sscd", xq, 10)):
        _same_up_to_ties(got, gt[qi], gs[qi], c.rows)
    q = c.vectors["pdq"][[3, 1500, 2399]]
    res = idx.search_vectors("pdq", q, 3)
    assert [r[0].id for r in res] == ["item-00003", "item-01500", "item-02399"] and all(r[0].distance == 0 for r in res)


def test_default_probe_share_finds_copies(tmp_path, monkeypatch):
    """With the default (partial) probing, the source of a near copy still comes first."""
    monkeypatch.setattr(store, "MERGED_ANN_MIN_ROWS", 1000)
    c = _contents(4000, seed=3)
    write_index(tmp_path / "i", c, {}, use_gpu=False, part_size=500)
    idx = ProvenanceIndex.open(tmp_path / "i")
    plan = ma.MergedPlan.from_dict(idx.manifest["ann"]["descriptors"]["sscd"])
    assert plan.nprobe < plan.nlist
    rows = np.arange(0, 4000, 97)
    xq = c.vectors["sscd"][rows].astype(np.float32) + 0.05 * np.random.default_rng(0).standard_normal(
        (len(rows), DIM)
    ).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    got = idx.search_vectors("sscd", xq, 1)
    assert [g[0].id for g in got] == [c.rows[r]["id"] for r in rows]


def test_removed_item_is_never_returned_by_the_merged_ann(tmp_path, exhaustive):
    c = _contents(2000, seed=5)
    d = tmp_path / "i"
    write_index(d, c, {}, use_gpu=False, part_size=250)
    gone = ["item-00007", "item-01234"]
    remove_items(d, gone)
    idx = ProvenanceIndex.open(d)
    xq = c.vectors["sscd"][[7, 1234]].astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    for got in idx.search_vectors("sscd", xq, 50):
        assert not {m.id for m in got} & set(gone) and len(got) == 50
    for got in idx.search_vectors("pdq", c.vectors["pdq"][[7, 1234]], 5):
        assert not {m.id for m in got} & set(gone) and got[0].distance > 0
    compact(d)  # rewrites the two parts (new ids): the merged ANN is rebuilt over them
    idx = ProvenanceIndex.open(d)
    assert idx._lay.ann_covered == list(range(8))
    for got in idx.search_vectors("sscd", xq, 50):
        assert not {m.id for m in got} & set(gone)


def test_per_part_codes_merge_to_the_same_lists_in_any_grouping(tmp_path):
    """add_part_codes is a function of one part (a Ray task): merging 3 parts at once, or 2 then the 3rd (an
    append), gives the same search results."""
    rng = np.random.default_rng(2)
    parts = [
        (lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))(
            rng.standard_normal((800, DIM)).astype(np.float32)
        )
        for _ in range(3)
    ]
    plan = ma.plan_merged(2400, DIM, "ip", nprobe=8)
    ma.train_template(parts, plan, tmp_path / "t.faiss")
    for i, p in enumerate(parts):
        np.save(tmp_path / f"p{i}.npy", p)
        assert ma.add_part_codes(tmp_path / "t.faiss", tmp_path / f"p{i}.npy", i + 1, tmp_path / f"c{i}.faiss") == 800
    codes = [tmp_path / f"c{i}.faiss" for i in range(3)]
    assert ma.merge_lists(tmp_path / "t.faiss", codes, tmp_path / "all.faiss", tmp_path / "all.ivfdata") == 2400
    ma.merge_lists(tmp_path / "t.faiss", codes[:2], tmp_path / "ab.faiss", tmp_path / "ab.ivfdata")
    ma.merge_lists(
        tmp_path / "t.faiss", [tmp_path / "ab.faiss", codes[2]], tmp_path / "abc.faiss", tmp_path / "abc.ivfdata"
    )
    xq = np.concatenate(parts)[::97].astype(np.float32)
    allx = np.concatenate(parts)
    read = lambda ids: allx[(ma.split_id(ids)[0] - 1) * 800 + ma.split_id(ids)[1]]  # noqa: E731
    a = ma.search_merged(ma.load_merged(tmp_path / "all.faiss", plan), plan, xq, 5, None, read)
    b = ma.search_merged(ma.load_merged(tmp_path / "abc.faiss", plan), plan, xq, 5, None, read)
    np.testing.assert_array_equal(a[2], b[2])
    assert (ma.split_id(a[2][:, 0])[0] - 1) * 800 + ma.split_id(a[2][:, 0])[1] == pytest.approx(np.arange(0, 2400, 97))


def test_append_adds_lists_without_retraining(coco_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MERGED_ANN_MIN_ROWS", 20)
    photos = sorted(coco_dir.glob("*.jpg"))
    src_a, src_b = tmp_path / "a", tmp_path / "b"
    for folder, ps in ((src_a, photos[:24]), (src_b, photos[24:36])):
        folder.mkdir()
        for p in ps:
            (folder / p.name).symlink_to(p)
    idx_dir = tmp_path / "idx"
    build(str(src_a), idx_dir, BuildOptions(descriptors=["sscd", "pdq"], part_size=8))
    before = ProvenanceIndex.open(idx_dir).manifest["ann"]
    template = (idx_dir / before["dir"] / "template.sscd.faiss").read_bytes()
    calls = []
    monkeypatch.setattr(ma, "train_template", lambda *a, **k: calls.append(a))  # an append must not train
    build(str(src_b), idx_dir, BuildOptions(descriptors=["sscd", "pdq"], part_size=8, append=True))
    idx = ProvenanceIndex.open(idx_dir)
    after = idx.manifest["ann"]
    assert not calls and after["gen"] == before["gen"] + 1 and after["trained_rows"] == 24
    assert (idx_dir / after["dir"] / "template.sscd.faiss").read_bytes() == template
    assert not (idx_dir / before["dir"]).exists() and idx._lay.ann_covered == list(range(len(idx.parts)))
    assert not [p for p in (idx_dir / after["dir"]).iterdir() if p.name.startswith("codes.")]
    # an appended photo is found through the merged lists (no part is searched on its own)
    for p in idx.parts:
        p.search = lambda *a, **k: (_ for _ in ()).throw(AssertionError("per-part search"))
    assert Searcher(idx).search_image(load_image(photos[30]).image, k=1)["sscd"][0].id == photos[30].name
