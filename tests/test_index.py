"""Build -> search round trips on real photos, caption search, append, resume, killed builds, mismatches."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from provenance.errors import DescriptorUnavailableError, IndexMismatchError, IndexNotFoundError, ItemNotFoundError
from provenance.images import load_image
from provenance.indexer import THUMBNAIL_SIZE, BuildOptions, build
from provenance.models import ModelOptions
from provenance.search import Searcher
from provenance.store import ProvenanceIndex

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(coco_dir, tmp_path_factory) -> Path:
    """The COCO photos plus the bad inputs a real crawl contains."""
    root = tmp_path_factory.mktemp("corpus") / "coco"
    shutil.copytree(coco_dir, root)
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(sorted(coco_dir.glob("*.jpg"))[0].read_bytes()[:1500])
    (root / "notes.png").write_text("not an image at all")
    big = io.BytesIO()
    Image.new("L", (9000, 9000)).save(big, "PNG")  # 81 MP of zeros: a few hundred KB on disk
    (root / "bomb.png").write_bytes(big.getvalue())
    cmyk = Image.open(sorted(coco_dir.glob("*.jpg"))[1]).convert("CMYK")
    cmyk.save(root / "cmyk.jpg")
    return root


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("idx") / "coco"
    build(str(corpus), index_dir, BuildOptions(descriptors=["sscd", "pdq"], batch_size=8))
    return index_dir


def test_manifest_counts_and_skips(built):
    idx = ProvenanceIndex.open(built)
    m = idx.describe()  # the manifest with each descriptor's FAISS plan (of its largest part)
    assert m["counts"]["indexed"] == 52  # 51 photos + the CMYK copy
    assert m["counts"]["skipped"] == 4
    assert m["counts"]["skipped_by_reason"] == {"unreadable": 3, "decompression_bomb": 1}
    reasons = {s["id"]: s["reason"] for s in idx.skipped()}
    assert "empty file" in reasons["zero.jpg"] and "not an image" in reasons["notes.png"]
    for name in ("sscd", "pdq"):
        d = m["descriptors"][name]
        assert d["ann"]["factory"] and d["checksum"] is not None and d["model_id"]
    assert m["descriptors"]["sscd"]["dim"] == 512
    vec = idx.vectors("sscd")
    assert vec.dtype == np.float16 and vec.shape == (52, 512)
    assert m["format_version"] == 2 and m["counts"]["parts"] == len(m["parts"]) >= 1


def test_every_corpus_photo_is_its_own_top_match(built, coco_dir):
    s = Searcher.open(built)
    photos = sorted(coco_dir.glob("*.jpg"))
    for p in photos[::5]:
        res = s.search_image(load_image(p).image, k=3)
        assert res["sscd"][0].id == p.name and res["sscd"][0].score > 0.99
        assert res["pdq"][0].id == p.name and res["pdq"][0].distance == 0


def test_edited_copy_is_found_by_sscd(built, coco_dir):
    s = Searcher.open(built)
    p = sorted(coco_dir.glob("*.jpg"))[11]
    im = load_image(p).image
    w, h = im.size
    edited = ImageEnhance.Brightness(im.crop((w // 5, h // 8, w - w // 10, h - h // 6))).enhance(1.3)
    buf = io.BytesIO()
    edited.resize((w // 2, h // 2)).save(buf, "JPEG", quality=40)
    res = s.search_image(Image.open(buf).convert("RGB"), k=5)
    assert res["sscd"][0].id == p.name
    assert res["sscd"][0].score > 0.5 > res["sscd"][1].score


def test_caption_search_words_prefix_and_alt_captions(built):
    idx = ProvenanceIndex.open(built)
    hits = idx.search_caption("pizza", k=10)
    assert hits and all("pizza" in (h.caption or "").lower() or "pizza" in (h.snippet or "").lower() for h in hits)
    assert len(idx.search_caption("skateb*", k=5)) >= 2
    # "baker" is only in an alternative COCO caption of 000000397133.jpg, not its first caption
    assert "000000397133.jpg" in [h.id for h in idx.search_caption("baker", k=10)]
    assert idx.search_caption('"; DROP TABLE captions; --', k=5) == []  # no FTS syntax injection


def test_item_metadata_and_thumbnail(built):
    idx = ProvenanceIndex.open(built)
    item = idx.item("000000397133.jpg")
    assert item["caption"] == "A man is in a kitchen making pizzas."
    assert item["license"] == "Attribution License" and item["extra"]["flickr_url"].startswith("http")
    thumb = idx.thumbnail("000000397133.jpg")
    assert max(Image.open(io.BytesIO(thumb)).size) <= THUMBNAIL_SIZE
    with pytest.raises(ItemNotFoundError):
        idx.item("../../etc/passwd")


def test_text_search_needs_clip(built):
    with pytest.raises(DescriptorUnavailableError, match="clip"):
        Searcher.open(built).search_text("a pizza")


def test_missing_index_is_clear(tmp_path):
    with pytest.raises(IndexNotFoundError, match="provenance index build"):
        ProvenanceIndex.open(tmp_path / "none")


def test_append_adds_without_reembedding(coco_dir, tmp_path):
    photos = sorted(coco_dir.glob("*.jpg"))
    part1, part2 = tmp_path / "p1", tmp_path / "p2"
    part1.mkdir(), part2.mkdir()
    for p in photos[:6]:
        shutil.copy(p, part1 / p.name)
    for p in photos[4:10]:  # two overlap: kept once
        shutil.copy(p, part2 / p.name)
    idx_dir = tmp_path / "idx"
    build(str(part1), idx_dir, BuildOptions(descriptors=["sscd", "pdq"]))
    before = np.asarray(ProvenanceIndex.open(idx_dir).vectors("sscd")).copy()
    res = build(str(part2), idx_dir, BuildOptions(descriptors=["sscd", "pdq"], append=True))
    assert res.reused == 6 and res.added == 4 and res.parts == 1
    idx = ProvenanceIndex.open(idx_dir)
    assert len(idx) == 10 and idx.ids[:6] == [p.name for p in photos[:6]]
    np.testing.assert_array_equal(idx.vectors("sscd")[:6], before)  # old vectors kept as they were
    s = Searcher(idx)
    assert s.search_image(load_image(photos[9]).image, k=1)["sscd"][0].id == photos[9].name
    assert len(idx.manifest["builds"]) == 2


def test_append_with_other_descriptors_is_refused(built, tmp_path, coco_dir):
    copy = tmp_path / "idx"
    shutil.copytree(built, copy)
    with pytest.raises(IndexMismatchError, match="descriptors"):
        build(str(coco_dir), copy, BuildOptions(descriptors=["sscd"], append=True))


def test_query_with_another_model_is_refused(built, tmp_path):
    import torch

    class Other(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)).repeat(1, 171)[:, :512])

    path = tmp_path / "other.torchscript.pt"
    torch.jit.script(Other()).save(str(path))
    s = Searcher.open(built, ModelOptions(sscd_model=str(path)))
    with pytest.raises(IndexMismatchError, match="query with the model the index was built with"):
        s.model("sscd")


def test_resume_after_interrupted_build(coco_dir, tmp_path):
    idx_dir = tmp_path / "idx"
    calls = {"n": 0}

    def interrupt(done, skipped):
        calls["n"] += 1
        if done >= 24:
            raise KeyboardInterrupt

    opts = BuildOptions(descriptors=["sscd", "pdq"], batch_size=8, part_size=8)
    with pytest.raises(KeyboardInterrupt):
        build(str(coco_dir), idx_dir, opts, progress=interrupt)
    assert not (idx_dir / "manifest.json").exists()  # no index yet: nothing half-written is served
    with pytest.raises(IndexNotFoundError):
        ProvenanceIndex.open(idx_dir)
    staged = sorted((idx_dir / "parts").iterdir())
    assert len(staged) >= 2 and all((d / "part.json").exists() for d in staged)
    res = build(str(coco_dir), idx_dir, opts)
    assert res.resumed >= 16 and res.added == 51
    idx = ProvenanceIndex.open(idx_dir)
    assert len(idx) == 51 and len(set(idx.ids)) == 51
    assert set(staged) <= set((idx_dir / "parts").iterdir())  # the interrupted run's parts were adopted
    p = sorted(coco_dir.glob("*.jpg"))[30]
    assert Searcher(idx).search_image(load_image(p).image, k=1)["sscd"][0].id == p.name


def test_killed_build_leaves_previous_index_usable(built, coco_dir, flickr_shards_dir, tmp_path):
    idx_dir = tmp_path / "live"
    shutil.copytree(built, idx_dir)
    manifest_before = (idx_dir / "manifest.json").read_text()
    script = (
        "import sys; from provenance.indexer import BuildOptions, build; "
        f"build({str(flickr_shards_dir / '00002.tar')!r}, {str(idx_dir)!r}, "
        "BuildOptions(descriptors=['sscd','pdq'], batch_size=8))"
    )
    # a shard is one part: kill the rebuild once its first batches are in (the part is not finished)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and not list((idx_dir / "parts").glob(".tmp-*/captions.sqlite")):
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (idx_dir / "manifest.json").read_text() == manifest_before
    idx = ProvenanceIndex.open(idx_dir)
    assert len(idx) == 52
    p = sorted(coco_dir.glob("*.jpg"))[5]
    assert Searcher(idx).search_image(load_image(p).image, k=1)["sscd"][0].id == p.name
    # the killed rebuild left a half part (and its lock file) that the next writer cleans up
    from provenance.locking import IndexWriteLock

    with IndexWriteLock(idx_dir):  # the killed process's flock went with it
        pass
    assert ProvenanceIndex.open(idx_dir).manifest["parts_list"] == json.loads(manifest_before)["parts_list"]


def test_clip_index_text_search_and_caption_embeddings(coco_dir, tmp_path):
    from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny-clip.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(coco_dir.glob("*.jpg"))[:8]:
        shutil.copy(p, photos / p.name)
    idx_dir = tmp_path / "idx"
    models = ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(ckpt))
    build(str(photos), idx_dir, BuildOptions(descriptors=["sscd", "clip"], models=models))
    idx = ProvenanceIndex.open(idx_dir)
    assert set(idx.specs) == {"sscd", "clip", "clip_text"}
    assert idx.manifest["descriptors"]["clip"]["load"]["pretrained"] == str(ckpt)
    s = Searcher(idx)  # reloads the tiny model from the manifest, as a fresh process would
    hits = s.search_text("a photo", k=3)
    assert len(hits) == 3 and all(h.descriptor == "clip" for h in hits)
    p = sorted(photos.glob("*.jpg"))[2]
    assert s.search_image(load_image(p).image, k=1)["clip"][0].id == p.name
    # another checkpoint of the same architecture is another model: refused
    other = make_tiny_checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(IndexMismatchError):
        Searcher(idx, ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(other))).model("clip")


@pytest.fixture
def one_faiss_thread():
    # tiny IVF-PQ trainings are all OpenMP barriers: on a busy 2-core machine, next to torch's own
    # OpenMP threads, two faiss threads took ~70 s per 3,000-row build, one thread ~2 s
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def test_ivf_pq_index_reranks_with_rows_read_from_the_file(tmp_path, one_faiss_thread):
    # a budget too small for any uncompressed index forces IVF-PQ; the store then re-ranks with rows
    # read by pread (RowReader), and the scores are the exact cosines of the stored float16 rows
    from provenance.descriptors.base import DescriptorSpec
    from provenance.store import IndexContents, RowReader, write_index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 512)).astype(np.float32)
    x = centres[rng.integers(0, 40, 3000)] + rng.standard_normal((3000, 512)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    spec = DescriptorSpec("sscd", "test-model", "", 512, "cosine")
    rows = [{"id": f"r{i}", "caption": None} for i in range(len(x))]
    contents = IndexContents(rows, {"sscd": x}, {"sscd": spec}, {}, [None] * len(x), [])
    write_index(tmp_path / "idx", contents, {}, memory_budget_bytes=1 << 20, use_gpu=False)
    idx = ProvenanceIndex.open(tmp_path / "idx")
    assert idx.parts[0].marker["descriptors"]["sscd"]["ann"]["kind"] == "ivf_pq"
    q = x[[5, 1234]].astype(np.float32) + 0.01 * rng.standard_normal((2, 512)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    matches = idx.search_vectors("sscd", q, k=5)
    assert [m[0].id for m in matches] == ["r5", "r1234"]
    assert isinstance(idx.parts[0].row_reader("sscd"), RowReader)
    for qi, ms in enumerate(matches):
        rows_ = [idx.row(m.id) for m in ms]
        expect = x[rows_].astype(np.float32) @ q[qi]
        np.testing.assert_allclose([m.score for m in ms], expect, atol=1e-5)


def _synthetic_sscd(n: int, seed: int = 0) -> np.ndarray:
    """(n, 512) float16 unit rows around 40 centres (groups of similar photos)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, 512)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + rng.standard_normal((n, 512)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def test_ivf_pq_fast_scan_index_returns_float16_cosines_and_grows_on_append(tmp_path, one_faiss_thread):
    # a 4 MiB budget: in-memory IVF-PQ fast-scan (no uncompressed index fits); the store gives the PQ top
    # candidates their exact float16 cosines
    import faiss

    from provenance import ann
    from provenance.descriptors.base import DescriptorSpec
    from provenance.store import IndexContents, write_index
    from training import ann_eval

    x = _synthetic_sscd(3000)
    spec = DescriptorSpec("sscd", "test-model", "", 512, "cosine")

    def write(rows_x: np.ndarray) -> ProvenanceIndex:
        rows = [{"id": f"r{i}", "caption": None} for i in range(len(rows_x))]
        contents = IndexContents(rows, {"sscd": rows_x}, {"sscd": spec}, {}, [None] * len(rows_x), [])
        write_index(
            tmp_path / "idx",
            contents,
            {"source": {"kind": "test", "location": "synthetic"}},
            memory_budget_bytes=4 << 20,
            use_gpu=False,
        )
        return ProvenanceIndex.open(tmp_path / "idx")

    idx = write(x[:2600])
    plan = ann.AnnPlan.from_dict(idx.parts[0].marker["descriptors"]["sscd"]["ann"])
    assert plan.kind == "ivf_pq" and plan.refine == "" and plan.factory == "IVF64(SQfp16),PQ256x4fs"
    assert "exact cosines" in plan.reason and plan.est_memory_bytes <= 3 << 20
    rng = np.random.default_rng(1)
    q = x[[5, 1234, 2599]].astype(np.float32) + 0.01 * rng.standard_normal((3, 512)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    matches = idx.search_vectors("sscd", q, k=10)
    assert [m[0].id for m in matches] == ["r5", "r1234", "r2599"]
    _exact_d, exact_i = ann_eval.exact_search(q, x[:2600], 10)
    for qi, ms in enumerate(matches):
        rows_ = [idx.row(m.id) for m in ms]
        # the scores are the exact cosines of the stored float16 rows, best first
        np.testing.assert_allclose([m.score for m in ms], x[rows_].astype(np.float32) @ q[qi], atol=1e-5)
        assert rows_ == exact_i[qi].tolist()  # nprobe 8 of 64 lists, well separated groups: exact top-10
    # a rewrite with more rows: the FAISS index holds every row
    idx = write(x)
    index, plan2 = idx.parts[0].faiss_index("sscd")
    assert plan2.refine == "" and not isinstance(index, faiss.IndexRefine) and index.ntotal == 3000
    assert idx.search_vectors("sscd", x[2999:3000].astype(np.float32), k=1)[0][0].id == "r2999"
