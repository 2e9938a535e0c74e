"""The part-based index: resume from complete parts, byte-identical appends, search over parts = one flat search,
opening without reading metadata, removals honoured everywhere, one writer at a time, format-1 upgrade, verify."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from provenance import parts as parts_mod
from provenance.cli import app
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import IndexFormatError, IndexLockedError, ItemNotFoundError
from provenance.images import load_image
from provenance.indexer import BuildOptions, build
from provenance.locking import IndexWriteLock
from provenance.search import Searcher
from provenance.store import IndexContents, ProvenanceIndex, write_index

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
PART = 16  # items per part: the 51 COCO photos make 4 parts


def _out(r) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(r.output.split())


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _file_hashes(index_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(index_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((index_dir / "parts").rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def parts_index(coco_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("parts") / "coco"
    build(str(coco_dir), d, BuildOptions(descriptors=["sscd", "pdq"], batch_size=8, part_size=PART))
    return d


@pytest.fixture
def index_copy(parts_index, tmp_path) -> Path:
    d = tmp_path / "coco"
    shutil.copytree(parts_index, d)
    return d


def _folder(tmp_path: Path, name: str, photos: list[Path]) -> Path:
    d = tmp_path / name
    d.mkdir()
    for p in photos:
        shutil.copy(p, d / p.name)
    return d


def test_parts_layout_and_global_rows(parts_index, coco_dir):
    idx = ProvenanceIndex.open(parts_index)
    assert [len(p) for p in idx.parts] == [16, 16, 16, 3] and len(idx) == 51
    assert idx.manifest["format_version"] == 2 and idx.manifest["counts"]["parts"] == 4
    for p in idx.parts:
        files = p.marker["files"]
        assert {"metadata.arrow", "sscd.f16.npy", "pdq.u8.npy", "captions.sqlite", "ids.u64.npy"} <= set(files)
        assert all(len(f["sha256"]) == 64 and f["size"] == (p.dir / n).stat().st_size for n, f in files.items())
    name = sorted(coco_dir.glob("*.jpg"))[40].name
    g = idx.row(name)
    pi, r = idx.locate(g)
    assert pi == 2 and idx.parts[pi].column_value(r, "id") == name and idx.ids[g] == name


def test_killed_build_keeps_complete_parts_and_the_rerun_does_only_the_rest(coco_dir, tmp_path, monkeypatch):
    idx_dir = tmp_path / "idx"
    script = (
        "from provenance.indexer import BuildOptions, build; "
        f"build({str(coco_dir)!r}, {str(idx_dir)!r}, BuildOptions(descriptors=['sscd','pdq'], batch_size=8, "
        f"part_size={PART}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env())
    deadline = time.time() + 120

    def complete():
        return [d for d in (idx_dir / "parts").glob("0*") if (d / "part.json").exists()]

    while time.time() < deadline and len(complete()) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = sorted(complete())
    assert len(kept) >= 2 and not (idx_dir / "manifest.json").exists()
    before = {str(p.relative_to(idx_dir)): p.read_bytes() for d in kept for p in d.iterdir()}

    from provenance import indexer

    embedded = []
    real_embed = indexer._embed
    monkeypatch.setattr(
        indexer, "_embed", lambda models, ready: (embedded.append(len(ready)), real_embed(models, ready))[1]
    )
    res = build(str(coco_dir), idx_dir, BuildOptions(descriptors=["sscd", "pdq"], batch_size=8, part_size=PART))
    assert res.resumed == PART * len(kept) and res.added == 51
    assert sum(embedded) == 51 - res.resumed  # only the rest was decoded and embedded
    idx = ProvenanceIndex.open(idx_dir)
    assert len(idx) == 51 and len(set(idx.ids)) == 51 and len(idx.parts) == 4
    assert {str(p.relative_to(idx_dir)): p.read_bytes() for d in kept for p in d.iterdir()} == before
    p = sorted(coco_dir.glob("*.jpg"))[3]
    assert Searcher(idx).search_image(load_image(p).image, k=1)["sscd"][0].id == p.name


def test_append_leaves_every_old_part_file_byte_identical(coco_dir, tmp_path):
    photos = sorted(coco_dir.glob("*.jpg"))
    idx_dir = tmp_path / "idx"
    build(str(_folder(tmp_path, "a", photos[:20])), idx_dir, BuildOptions(descriptors=["sscd", "pdq"], part_size=8))
    old = _file_hashes(idx_dir)
    old_ids = ProvenanceIndex.open(idx_dir).ids
    res = build(
        str(_folder(tmp_path, "b", photos[18:30])),
        idx_dir,
        BuildOptions(descriptors=["sscd", "pdq"], part_size=8, append=True),
    )
    assert res.added == 10 and res.reused == 20 and res.parts == 2
    new = _file_hashes(idx_dir)
    assert {k: new[k] for k in old} == old  # every old part file is still there, byte for byte
    idx = ProvenanceIndex.open(idx_dir)
    assert len(idx) == 30 and idx.ids[:20] == old_ids and len(idx.manifest["builds"]) == 2
    # the build's merged lookup covers its parts; the appended ones are probed one by one until a compact
    assert idx._unmerged == [3, 4] and idx.row(photos[2].name) == 2 and idx.row(photos[29].name) == 29
    assert runner.invoke(app, ["index", "compact", "--index", str(idx_dir)]).exit_code == 0
    idx = ProvenanceIndex.open(idx_dir)
    assert idx._unmerged == [] and idx.row(photos[29].name) == 29 and _file_hashes(idx_dir) == new
    assert Searcher(idx).search_image(load_image(photos[29]).image, k=1)["sscd"][0].id == photos[29].name


def _synthetic(n: int, seed: int = 0) -> IndexContents:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 64)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    pdq = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    specs = {
        "sscd": DescriptorSpec("sscd", "test", "", 64, "cosine"),
        "pdq": DescriptorSpec("pdq", "pdq", None, 256, "hamming"),
    }
    rows = [
        {"id": f"item-{i:05d}", "caption": f"synthetic caption {i}", "sha256": hashlib.sha256(b"%d" % i).hexdigest()}
        for i in range(n)
    ]
    return IndexContents(rows, {"sscd": x, "pdq": pdq}, specs, {}, [None] * n, [])


def test_search_over_parts_equals_one_flat_search(tmp_path):
    c = _synthetic(1000)
    write_index(tmp_path / "one", c, {}, use_gpu=False)
    write_index(tmp_path / "many", c, {}, use_gpu=False, part_size=90)
    one, many = ProvenanceIndex.open(tmp_path / "one"), ProvenanceIndex.open(tmp_path / "many")
    assert len(one.parts) == 1 and len(many.parts) == 12
    rng = np.random.default_rng(1)
    xq = rng.standard_normal((20, 64)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    gt = np.argsort(-(xq @ c.vectors["sscd"].astype(np.float32).T), axis=1, kind="stable")[:, :10]  # flat search
    got_many, got_one = many.search_vectors("sscd", xq, 10), one.search_vectors("sscd", xq, 10)
    for qi in range(len(xq)):
        assert [m.id for m in got_many[qi]] == [c.rows[i]["id"] for i in gt[qi]]
        assert [(m.id, m.score) for m in got_many[qi]] == [(m.id, m.score) for m in got_one[qi]]
    q = c.vectors["pdq"][[3, 500, 999]]
    for a, b in zip(many.search_vectors("pdq", q, 5), one.search_vectors("pdq", q, 5), strict=False):
        assert [(m.id, m.distance) for m in a] == [(m.id, m.distance) for m in b]
        assert a[0].distance == 0
    assert [m[0].id for m in many.search_vectors("pdq", q, 1)] == ["item-00003", "item-00500", "item-00999"]


def test_opening_reads_no_metadata_and_no_part_file(tmp_path, monkeypatch):
    import pyarrow as pa
    from pyarrow import ipc

    write_index(tmp_path / "idx", _synthetic(600), {}, use_gpu=False, part_size=100)
    calls: dict[str, int] = {}

    def counting(owner, name):
        real = getattr(owner, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)

        monkeypatch.setattr(owner, name, wrapper)

    counting(ipc, "open_file")
    counting(pa, "memory_map")
    counting(np, "load")
    counting(parts_mod, "read_marker")
    counting(parts_mod.sqlite3, "connect")
    idx = ProvenanceIndex.open(tmp_path / "idx")
    assert len(idx) == 600 and len(idx.parts) == 6 and idx.specs["sscd"].dim == 64
    assert calls == {}  # the manifest only: no metadata, vectors, lookups, markers or databases
    # a lookup is one binary search of the merged lookup, then one part's marker and one metadata batch
    assert idx.row("item-00250") == 250 and idx.id_with_sha256(hashlib.sha256(b"250").hexdigest()) == "item-00250"
    assert calls["open_file"] == 1 and calls["read_marker"] == 1 and calls["load"] == 4


def test_removed_item_never_comes_back(index_copy, coco_dir):
    from provenance.scan import Scanner, ScanOptions

    photo = sorted(coco_dir.glob("*.jpg"))[20]
    gone = photo.name
    idx = ProvenanceIndex.open(index_copy)
    caption = idx.item(gone)["caption"]
    r = runner.invoke(app, ["index", "remove", "--index", str(index_copy), "--id", gone, "--id", "no-such-id"])
    assert r.exit_code == 1 and "removed 1 item" in _out(r) and "no-such-id" in _out(r)
    idx = ProvenanceIndex.open(index_copy)
    assert len(idx) == 50 and idx.manifest["counts"]["removed"] == 1 and gone not in idx.ids

    def absent(idx: ProvenanceIndex) -> None:
        s = Searcher(idx)
        res = s.search_image(load_image(photo).image, k=60)
        assert gone not in [m.id for ms in res.values() for m in ms]
        assert len(res["sscd"]) == 50  # every other item is still found
        assert gone not in [h.id for h in idx.search_caption(caption, k=60)]
        with pytest.raises(ItemNotFoundError):
            idx.item(gone)
        assert idx.thumbnail(gone) is None and idx.id_with_sha256(load_image(photo).sha256) is None
        rec = Scanner(s, ScanOptions(k=5, visible=False, invisible=False)).scan_paths([photo])[0]
        assert gone not in [m.id for m in rec.matches] and "identical_file" not in rec.extra

    absent(idx)
    r = runner.invoke(app, ["index", "remove", "--index", str(index_copy), "--id", gone])
    assert "1 already removed" in _out(r)
    r = runner.invoke(app, ["index", "compact", "--index", str(index_copy)])
    assert r.exit_code == 0 and "1 part(s) rewritten" in _out(r), r.output
    idx = ProvenanceIndex.open(index_copy)
    assert len(idx) == idx.n_rows == 50 and idx.manifest["counts"]["removed"] == 0
    absent(idx)
    assert runner.invoke(app, ["index", "verify", str(index_copy)]).exit_code == 0


def test_removed_item_is_404_in_the_api(index_copy, coco_dir):
    from fastapi.testclient import TestClient

    from provenance.api import ServerConfig, create_app

    gone = sorted(coco_dir.glob("*.jpg"))[7].name
    assert runner.invoke(app, ["index", "remove", "--index", str(index_copy), "--id", gone]).exit_code == 0
    with TestClient(create_app(ServerConfig(index_dir=index_copy))) as client:
        assert client.app.state.service.wait(120)
        assert client.get(f"/v1/items/{gone}").status_code == 404
        assert client.get(f"/v1/items/{gone}/thumbnail").status_code == 404
        other = sorted(coco_dir.glob("*.jpg"))[8].name
        assert client.get(f"/v1/items/{other}").json()["id"] == other
        photo = sorted(coco_dir.glob("*.jpg"))[7]
        r = client.post("/v1/scan", files={"file": ("upload.jpg", photo.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        assert gone not in json.dumps(r.json())


def _append_cmd(source: Path, index: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "provenance.cli",
        "index",
        "build",
        str(source),
        "--index",
        str(index),
        "--append",
        "--part-size",
        "8",
        *extra,
    ]


def test_two_concurrent_appends_both_land_or_the_second_is_refused(coco_dir, tmp_path):
    photos = sorted(coco_dir.glob("*.jpg"))
    idx_dir = tmp_path / "idx"
    build(str(_folder(tmp_path, "base", photos[:4])), idx_dir, BuildOptions(descriptors=["sscd", "pdq"]))
    a, b = _folder(tmp_path, "a", photos[10:16]), _folder(tmp_path, "b", photos[20:26])
    # 1. with --wait: the second waits for the lock, and both land
    procs = [
        subprocess.Popen(
            _append_cmd(src, idx_dir, "--wait", "300"),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in (a, b)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = set(ProvenanceIndex.open(idx_dir).ids)
    assert ids == {p.name for p in photos[:4] + photos[10:16] + photos[20:26]}
    # 2. without --wait: whatever the timing, each run lands or says it was refused, and nothing is lost
    c, d = _folder(tmp_path, "c", photos[30:36]), _folder(tmp_path, "d", photos[40:46])
    procs = [
        subprocess.Popen(
            _append_cmd(src, idx_dir), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for src in (c, d)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    ids = set(ProvenanceIndex.open(idx_dir).ids)
    landed = set()
    for (_out, err), p, src in zip(outs, procs, (c, d), strict=False):
        if p.returncode == 0:
            landed |= {f.name for f in src.iterdir()}
        else:
            err = " ".join(err.split())
            assert p.returncode == 2 and "being written by pid" in err and "--wait" in err, err
    assert landed and ids == {p.name for p in photos[:4] + photos[10:16] + photos[20:26]} | landed


def test_a_held_lock_refuses_a_writer_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    idx_dir = tmp_path / "idx"
    with IndexWriteLock(idx_dir, action="append"):
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()} on .*append.*--wait"):
            IndexWriteLock(idx_dir).acquire()
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError, match="waited 0.3 s"):
            IndexWriteLock(idx_dir, wait=0.3).acquire()
        assert time.monotonic() - t0 >= 0.3
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from provenance.locking import IndexWriteLock; "
            f"IndexWriteLock({str(idx_dir)!r}, action='build').acquire(); print('held', flush=True); "
            "time.sleep(600)",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(IndexLockedError, match=f"pid {holder.pid}"):
        IndexWriteLock(idx_dir).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="provenance.locking"):
        with IndexWriteLock(idx_dir, wait=5):  # the kernel dropped the dead process's flock
            pass
    assert f"left by pid {holder.pid}" in caplog.text


def _write_format1(index_dir: Path, c: IndexContents) -> None:
    """A format-1 index as the previous store wrote it (one set of files, manifest format_version 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    index_dir.mkdir(parents=True)
    thumbs, offsets, pos = b"", [], 0
    for i in range(len(c.rows)):
        t = b"\xff\xd8thumb%d" % i
        thumbs += t
        offsets.append((pos, len(t)))
        pos += len(t)
    (index_dir / "thumbnails.bin").write_bytes(thumbs)
    cols = {k: [r.get(k) for r in c.rows] for k in ("id", "caption", "source", "license", "sha256")}
    table = pa.table(
        {
            **{k: pa.array(v, pa.string()) for k, v in cols.items()},
            "width": pa.array([64] * len(c.rows), pa.int32()),
            "height": pa.array([48] * len(c.rows), pa.int32()),
            "extra": pa.array(["{}"] * len(c.rows)),
            "thumb_offset": pa.array([o for o, _ in offsets], pa.int64()),
            "thumb_size": pa.array([s for _, s in offsets], pa.int32()),
        }
    )
    pq.write_table(table, index_dir / "metadata.parquet")
    np.save(index_dir / "sscd.f16.npy", c.vectors["sscd"])
    np.save(index_dir / "pdq.u8.npy", c.vectors["pdq"])
    (index_dir / "skipped.jsonl").write_text(
        json.dumps({"id": "bad.jpg", "source": None, "reason": "empty file", "reason_kind": "unreadable"}) + "\n"
    )
    descriptors = {
        n: {**s.to_dict(), "vectors": parts_mod.vectors_file(n), "faiss": f"{n}.faiss"} for n, s in c.specs.items()
    }
    (index_dir / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "tool_version": "0.1.0",
                "name": index_dir.name,
                "built_at": "2026-01-01T00:00:00Z",
                "descriptors": descriptors,
                "counts": {"indexed": len(c.rows), "skipped": 1, "skipped_by_reason": {"unreadable": 1}},
                "source": {"kind": "folder", "location": "/x", "options": {}},
                "builds": [],
            }
        )
    )


def test_format1_index_is_refused_with_the_upgrade_command_and_upgrade_keeps_everything(tmp_path):
    c = _synthetic(250)
    idx_dir = tmp_path / "old"
    _write_format1(idx_dir, c)
    with pytest.raises(IndexFormatError, match=f"provenance index upgrade {idx_dir}"):
        ProvenanceIndex.open(idx_dir)
    r = runner.invoke(app, ["search", "--index", str(idx_dir), "--caption", "synthetic"])
    assert r.exit_code == 4 and "index upgrade" in _out(r)
    r = runner.invoke(app, ["index", "upgrade", str(idx_dir), "--part-size", "100"])
    assert r.exit_code == 0, r.output
    idx = ProvenanceIndex.open(idx_dir)
    assert [len(p) for p in idx.parts] == [100, 100, 50] and idx.manifest["counts"]["skipped"] == 1
    np.testing.assert_array_equal(idx.vectors("sscd"), c.vectors["sscd"])
    np.testing.assert_array_equal(idx.vectors("pdq"), c.vectors["pdq"])
    assert idx.ids == [r["id"] for r in c.rows] and idx.thumbnail("item-00123") == b"\xff\xd8thumb123"
    assert idx.item("item-00200")["caption"] == "synthetic caption 200"
    assert not (idx_dir / "metadata.parquet").exists() and not (idx_dir / "sscd.f16.npy").exists()


def test_caption_ranking_over_parts_is_bm25_with_corpus_statistics(coco_dir, tmp_path):
    # real COCO captions (all five per photo) on synthetic vectors: one part vs parts of 7
    import sqlite3

    rows = [json.loads(line) for line in (coco_dir / "metadata.jsonl").read_text().splitlines() if line.strip()]
    c = _synthetic(len(rows))
    for r, meta in zip(c.rows, rows, strict=False):
        r["caption"] = meta.get("caption") or meta.get("text")
        r["extra"] = {"captions": meta.get("captions") or []}
    write_index(tmp_path / "one", c, {}, use_gpu=False)
    write_index(tmp_path / "many", c, {}, use_gpu=False, part_size=7)
    one, many = ProvenanceIndex.open(tmp_path / "one"), ProvenanceIndex.open(tmp_path / "many")
    assert len(many.parts) > 5
    con = sqlite3.connect(one.parts[0].dir / "captions.sqlite")
    for q in ("pizza", "table", "man kitchen", "skateb*", '"on a table"', "a"):
        fts = [
            (c.rows[r]["id"], -s)
            for r, s in con.execute(
                "SELECT rowid, bm25(captions) FROM captions WHERE captions MATCH ? ORDER BY bm25(captions), rowid LIMIT 10",
                (" ".join(t.fts for t in __import__("provenance.store", fromlist=["_fts_terms"])._fts_terms(q)),),
            )
        ]
        a, b = one.search_caption(q, 10), many.search_caption(q, 10)
        assert [(h.id, round(h.score, 9)) for h in a] == [(i, round(s, 9)) for i, s in fts], q  # FTS5's own bm25
        assert [(h.id, round(h.score, 9)) for h in b] == [(h.id, round(h.score, 9)) for h in a], q  # parts agree


def test_verify_names_a_truncated_file_and_search_refuses_it(index_copy, coco_dir):
    part = sorted((index_copy / "parts").iterdir())[1]
    victim = part / "sscd.f16.npy"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 1000)
    r = runner.invoke(app, ["index", "verify", str(index_copy)])
    assert r.exit_code == 4 and str(victim) in r.output.replace("\n", "") and "bytes, the marker says" in _out(r)
    (part / "thumbnails.bin").write_bytes(b"garbage" + (part / "thumbnails.bin").read_bytes()[7:])
    r = runner.invoke(app, ["index", "verify", str(index_copy)])
    assert "thumbnails.bin: sha256 differs" in _out(r)
    with pytest.raises(IndexFormatError, match="sscd.f16.npy"):
        Searcher.open(index_copy).search_image(load_image(sorted(coco_dir.glob("*.jpg"))[0]).image, k=3)
    r = runner.invoke(
        app,
        [
            "scan",
            str(sorted(coco_dir.glob("*.jpg"))[0]),
            "--index",
            str(index_copy),
            "--no-visible",
            "--no-invisible",
            "--format",
            "jsonl",
        ],
    )
    assert r.exit_code == 4 and "sscd.f16.npy" in _out(r) and "index verify" in _out(r), r.output


def test_a_truncated_faiss_file_keeps_the_server_unready_and_healthz_names_it(index_copy):
    from fastapi.testclient import TestClient

    from provenance.api import ServerConfig, create_app

    victim = sorted((index_copy / "parts").iterdir())[2] / "sscd.faiss"
    with open(victim, "r+b") as f:
        f.truncate(1000)
    with TestClient(create_app(ServerConfig(index_dir=index_copy))) as client:
        assert client.app.state.service.wait(120)
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "error"
        err = r.json()["error"]
        assert "parts/" in err and "sscd.faiss" in err and str(index_copy.parent) not in err  # no server path


def test_broken_caption_database_thumbnails_and_metadata_are_named_errors(index_copy):
    parts = sorted((index_copy / "parts").iterdir())
    db = parts[0] / "captions.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + b"\x00" * (db.stat().st_size - 16))  # same size, garbage pages
    r = runner.invoke(app, ["search", "--index", str(index_copy), "--caption", "pizza"])
    assert r.exit_code == 4 and "captions.sqlite" in _out(r), r.output
    thumbs = parts[1] / "thumbnails.bin"
    with open(thumbs, "r+b") as f:
        f.truncate(thumbs.stat().st_size // 2)
    idx = ProvenanceIndex.open(index_copy)
    with pytest.raises(IndexFormatError, match="thumbnails.bin: .* bytes, the marker says"):
        idx.parts[1].thumbnail(0)
    meta = parts[3] / "metadata.arrow"
    with open(meta, "r+b") as f:
        f.truncate(100)
    with pytest.raises(IndexFormatError, match="metadata.arrow"):
        ProvenanceIndex.open(index_copy).parts[3].record(0)


def _odd_files(root: Path, photo: Path) -> None:
    """A folder with what a real crawl or a careless user leaves: a FIFO, links, a huge sparse file."""
    shutil.copy(photo, root / "ok.jpg")
    os.mkfifo(root / "fifo.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink("nothere.jpg", root / "dangling.jpg")
    with open(root / "big.png", "wb") as f:
        f.truncate(1 << 30)  # 1 GB, sparse: costs nothing on disk, everything if read
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")


def test_build_reports_every_skipped_path_with_its_true_reason(coco_dir, tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    _odd_files(src, sorted(coco_dir.glob("*.jpg"))[0])
    if os.geteuid() != 0:  # root reads anything: the permission case needs a normal user
        (src / "locked").mkdir()
        shutil.copy(src / "ok.jpg", src / "locked" / "a.jpg")
        os.chmod(src / "locked", 0)
    try:
        res = build(str(src), tmp_path / "idx", BuildOptions(descriptors=["pdq"]))
    finally:
        if (src / "locked").exists():
            os.chmod(src / "locked", 0o755)
    counts = res.manifest["counts"]
    expect = {"special_file": 1, "symlink_loop": 2, "dangling_link": 1, "too_large": 1}
    if os.geteuid() != 0:
        expect["permission"] = 1
    assert counts["indexed"] == 1 and counts["skipped_by_reason"] == expect
    reasons = {s["id"]: s["reason"] for s in ProvenanceIndex.open(tmp_path / "idx").skipped()}
    assert "FIFO" in reasons["fifo.jpg"] and "dangling" in reasons["dangling.jpg"] and "limit" in reasons["big.png"]


def test_scan_names_a_fifo_and_a_huge_file_without_hanging_or_reading_them(parts_index, coco_dir, tmp_path):
    _odd_files(tmp_path, sorted(coco_dir.glob("*.jpg"))[0])
    import tracemalloc

    from provenance.errors import FileUnreadableError
    from provenance.images import read_bytes

    cmd = [
        sys.executable,
        "-m",
        "provenance.cli",
        "scan",
        str(tmp_path / "fifo.jpg"),
        str(tmp_path / "big.png"),
        "--index",
        str(parts_index),
        "--format",
        "jsonl",
        "--no-visible",
        "--no-invisible",
    ]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    recs = {json.loads(line)["path"]: json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")}
    assert r.returncode == 3, r.stderr
    assert "FIFO" in recs[str(tmp_path / "fifo.jpg")]["error"]
    assert "limit" in recs[str(tmp_path / "big.png")]["error"]
    tracemalloc.start()
    with pytest.raises(FileUnreadableError, match="over the .*-byte limit"):
        read_bytes(tmp_path / "big.png")
    assert tracemalloc.get_traced_memory()[1] < 1 << 20  # refused from its size: the 1 GB was never read
    tracemalloc.stop()


def test_scan_of_a_folder_reports_its_odd_entries_instead_of_dropping_them(tmp_path, coco_dir):
    from provenance.images import iter_image_paths

    _odd_files(tmp_path, sorted(coco_dir.glob("*.jpg"))[0])
    names = {p.name for p in iter_image_paths([str(tmp_path)])}
    assert names == {"ok.jpg", "fifo.jpg", "loop.jpg", "dangling.jpg", "big.png"}
