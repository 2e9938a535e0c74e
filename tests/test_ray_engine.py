"""The Ray engine of `index build` (provenance.ray_engine), against the local engine on real Flickr8k shards.

One local Ray cluster serves the whole run (`ray_cluster`, scope="session": starting Ray costs seconds). The
corpus is two shards of SHARD_ITEMS real Flickr8k dev photos each, cut from 00000.tar (a whole 500-image shard
takes ~15 s to embed on 2 cores; two small shards still exercise one part per shard, two actors and a redo).
The Ray builds read the shards from a loopback HTTP server (a real ThreadingHTTPServer), so remote reads through
fsspec are tested on the same build. Tests without Ray (selection logic, the missing-extra message, remote reads
by the local engine) run everywhere; the others skip when Ray is not installed.
"""

from __future__ import annotations

import functools
import http.server
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from provenance.errors import MissingExtraError, ModelLoadError
from provenance.indexer import BuildOptions, build
from provenance.parts import TMP_PREFIX, PartReader
from provenance.store import PARTS, ProvenanceIndex

SHARD_ITEMS = 20


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def small_shards(flickr_shards_dir, tmp_path_factory) -> Path:
    """00000.tar and 00001.tar of SHARD_ITEMS keys each, cut from the real 00000.tar (members and order kept)."""
    out = tmp_path_factory.mktemp("shards")
    with tarfile.open(flickr_shards_dir / "00000.tar") as src:
        members = [m for m in src.getmembers() if m.isfile()]
        keys: list[str] = []
        for m in members:
            k = m.name.rsplit("/", 1)[-1].split(".")[0]
            if k not in keys:
                keys.append(k)
        for i in range(2):
            chosen = set(keys[i * SHARD_ITEMS : (i + 1) * SHARD_ITEMS])
            with tarfile.open(out / f"{i:05d}.tar", "w") as dst:
                for m in members:
                    if m.name.rsplit("/", 1)[-1].split(".")[0] in chosen:
                        dst.addfile(m, src.extractfile(m))
    return out


@pytest.fixture(scope="session")
def shard_server(small_shards):
    """http://127.0.0.1:PORT/ serving the shard folder (its page lists the .tar links, as fsspec globs them)."""
    pytest.importorskip("aiohttp")  # fsspec's http(s) backend (provenance[remote])
    handler = functools.partial(_QuietHandler, directory=str(small_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="session")
def local_index(small_shards, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("local") / "index"
    build(str(small_shards), d, BuildOptions())
    return d


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the test run (2 CPUs, ~1 GB object store), shut down at its end."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _ray_options(**kw):
    from provenance.ray_engine import RayOptions

    return BuildOptions(engine="ray", ray=RayOptions(workers=2, **kw))


def _items(index_dir: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every row's id in part order, and each descriptor's vectors stacked in the same order."""
    ids: list[str] = []
    vectors: dict[str, list[np.ndarray]] = {}
    for d in sorted((index_dir / PARTS).iterdir()):
        r = PartReader(d)
        for _, batch in r.iter_batches():
            ids += batch.column("id").to_pylist()
        for name in ("sscd", "pdq"):
            vectors.setdefault(name, []).append(np.asarray(r.vectors(name)))
    return ids, {n: np.concatenate(v) for n, v in vectors.items()}


# ----------------------------------------------------------------------------- without Ray


def test_engine_ray_without_ray_says_how_to_install_it(small_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'provenance\[ray\]'"):
        build(str(small_shards), tmp_path / "index", BuildOptions(engine="ray"))
    assert not (tmp_path / "index").exists()  # refused before any model loads or any folder is made


def test_gpu_workers_choose_cuda_and_cpu_workers_never_do():
    from provenance.ray_engine import onnx_providers, torch_device, worker_threads

    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(True, both) == both
    # a CPU actor on a GPU node keeps off the GPU (another actor was given it)
    assert onnx_providers(False, both) == ["CPUExecutionProvider"]
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        onnx_providers(True, ["CPUExecutionProvider"])
    assert torch_device(True, True) == "cuda"
    assert torch_device(False, True) == "cpu"
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        torch_device(True, False)
    # an actor's threads follow its CPUs, not the OMP_NUM_THREADS=1 Ray sets
    assert [worker_threads(c) for c in (0.5, 1, 2.0, 7.9)] == [1, 1, 2, 7]


def test_ray_options_are_checked():
    from provenance.ray_engine import RayOptions

    with pytest.raises(ValueError, match="workers"):
        RayOptions(workers=0)
    with pytest.raises(ValueError, match="gpus_per_worker"):
        RayOptions(gpus_per_worker=-1)


def test_shard_ranges_and_remote_listing(small_shards, shard_server):
    from provenance.corpus import detect_source, expand_braces, list_shards

    assert expand_braces("s3://b/{00008..00010}.tar") == ["s3://b/00008.tar", "s3://b/00009.tar", "s3://b/00010.tar"]
    assert list_shards(str(small_shards / "{00000..00001}.tar")) == [str(small_shards / f"0000{i}.tar") for i in (0, 1)]
    assert detect_source(shard_server).kind == "webdataset"
    # an http folder is listed from its page's links, a glob too
    assert list_shards(shard_server) == [f"{shard_server}00000.tar", f"{shard_server}00001.tar"]
    assert list_shards(shard_server + "0000[1].tar") == [f"{shard_server}00001.tar"]


def test_local_engine_reads_shards_over_http_as_from_disk(local_index, shard_server, tmp_path):
    """Remote reads (fsspec over a loopback HTTP server): the same items, the same parts, the same vectors."""
    remote = build(shard_server, tmp_path / "index", BuildOptions())
    assert remote.skipped == 0
    ids, vec = _items(tmp_path / "index")
    want_ids, want_vec = _items(local_index)
    assert ids == want_ids and len(ids) == 2 * SHARD_ITEMS
    assert np.array_equal(vec["pdq"], want_vec["pdq"]) and np.array_equal(vec["sscd"], want_vec["sscd"])
    assert [p["unit"] for p in remote.manifest["parts"]] == ["00000.tar", "00001.tar"]


def test_a_missing_remote_shard_is_a_counted_skip(shard_server, tmp_path):
    result = build(shard_server + "{00001..00002}.tar", tmp_path / "index", BuildOptions())
    assert result.added == SHARD_ITEMS and result.skipped == 1
    assert result.manifest["counts"]["skipped_by_reason"] == {"unreadable": 1}


# ----------------------------------------------------------------------------- on a Ray cluster


def test_ray_build_equals_the_local_build(ray_cluster, local_index, shard_server, tmp_path, monkeypatch):
    """Same parts (one per shard, named after it, with markers), same ids, same top-k; vectors within int8 noise.
    The merged ANN is built too (its threshold lowered), each part's codes encoded in a Ray task."""
    from provenance import store
    from provenance.ray_engine import RayEngine

    monkeypatch.setattr(store, "MERGED_ANN_MIN_ROWS", 20)
    jobs: list[int] = []
    run_tasks = RayEngine.run_tasks
    monkeypatch.setattr(RayEngine, "run_tasks", lambda self, js: jobs.append(len(js)) or run_tasks(self, js))
    result = build(shard_server, tmp_path / "index", _ray_options())
    assert result.added == 2 * SHARD_ITEMS and result.skipped == 0 and result.parts == 2
    assert jobs == [2, 2] and set(result.manifest["ann"]["descriptors"]) == {"sscd", "pdq"}  # 2 parts x 2 descriptors
    parts = result.manifest["parts"]
    assert [(p["name"], p["unit"], p["n"]) for p in parts] == [
        ("000000-00000", "00000.tar", SHARD_ITEMS),
        ("000001-00001", "00001.tar", SHARD_ITEMS),
    ]
    ids, vec = _items(tmp_path / "index")
    want_ids, want_vec = _items(local_index)
    assert ids == want_ids
    assert np.array_equal(vec["pdq"], want_vec["pdq"])
    # int8 ONNX output may move with batch composition and thread count (each actor has 1 thread here); the
    # largest difference is reported by bench/bench_ray.py. 2e-3 is a float16 step near 0.1 times a few.
    assert float(np.abs(vec["sscd"].astype(np.float32) - want_vec["sscd"].astype(np.float32)).max()) < 2e-3
    ray_ix, local_ix = ProvenanceIndex.open(tmp_path / "index"), ProvenanceIndex.open(local_index)
    xq = want_vec["sscd"][::7].astype(np.float32)
    for got, want in zip(ray_ix.search_vectors("sscd", xq, 5), local_ix.search_vectors("sscd", xq, 5), strict=True):
        assert [m.id for m in got] == [m.id for m in want]


def test_a_worker_killed_mid_shard_leaves_a_complete_index(
    ray_cluster, local_index, small_shards, tmp_path, monkeypatch
):
    """The actor indexing 00001.tar dies (os._exit) after 7 items; Ray restarts it and redoes the shard."""
    from provenance.ray_engine import FAULT_ENV, duplicate_ids

    fired = tmp_path / "fault-fired"
    monkeypatch.setenv(FAULT_ENV, f"00001.tar:7:{fired}")
    result = build(str(small_shards), tmp_path / "index", _ray_options())
    assert fired.exists(), "the fault was not injected"
    ids, _ = _items(tmp_path / "index")
    want_ids, _ = _items(local_index)
    assert ids == want_ids and len(set(ids)) == len(ids) == result.added == 2 * SHARD_ITEMS
    assert duplicate_ids(tmp_path / "index", result.manifest) == 0
    assert not list((tmp_path / "index" / PARTS).glob(f"{TMP_PREFIX}*"))  # the dead worker's half part is gone


def test_a_restarted_ray_build_skips_complete_parts(ray_cluster, local_index, small_shards, tmp_path):
    import shutil

    index = tmp_path / "index"
    build(str(small_shards), index, BuildOptions())  # a local build, then "interrupted": no manifest, one part lost
    (index / "manifest.json").unlink()
    shutil.rmtree(index / PARTS / "000001-00001")
    first = (index / PARTS / "000000-00000" / "part.json").stat().st_mtime_ns
    result = build(str(small_shards), index, _ray_options())
    assert result.resumed == SHARD_ITEMS and result.added == 2 * SHARD_ITEMS
    assert (index / PARTS / "000000-00000" / "part.json").stat().st_mtime_ns == first  # adopted, not rewritten
    assert _items(index)[0] == _items(local_index)[0]


def test_ray_build_of_a_folder_cuts_it_into_part_size_units(ray_cluster, coco_dir, tmp_path):
    """A folder (or dataset) is cut into units of part_size items in the local engine's reading order."""
    options = _ray_options()
    options.part_size = 30
    result = build(str(coco_dir), tmp_path / "index", options)
    n = result.added + result.skipped
    assert [p["unit"] for p in result.manifest["parts"]] == [f"items-{s:09d}" for s in range(0, n, 30)]
    local = build(str(coco_dir), tmp_path / "local", BuildOptions(part_size=30))
    assert sorted(_items(tmp_path / "index")[0]) == sorted(_items(tmp_path / "local")[0])
    assert result.added == local.added and result.skipped == local.skipped


def test_a_worker_with_another_model_is_refused_with_a_clear_error(ray_cluster, small_shards, tmp_path, monkeypatch):
    """An actor whose model differs from the driver's (another file on a node) stops the build, naming why."""
    import dataclasses
    import types

    from provenance import indexer
    from provenance.errors import IndexMismatchError

    real = indexer.load_descriptor

    def driver_sees_another_file(name, *a, **k):  # the driver's SSCD has another checksum than the workers'
        m = real(name, *a, **k)
        return types.SimpleNamespace(spec=dataclasses.replace(m.spec, checksum="another-file")) if name == "sscd" else m

    monkeypatch.setattr(indexer, "load_descriptor", driver_sees_another_file)
    with pytest.raises(IndexMismatchError, match="same model files on every node"):
        build(str(small_shards), tmp_path / "index", _ray_options())
    assert not (tmp_path / "index" / "manifest.json").exists()


def test_gpu_workers_on_a_cluster_without_gpus_are_refused(ray_cluster, small_shards, tmp_path):
    with pytest.raises(ModelLoadError, match="has 0 GPUs"):
        build(str(small_shards), tmp_path / "index", _ray_options(gpus_per_worker=1))


def test_cli_engine_ray_without_ray_prints_the_install_command(small_shards, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from provenance.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    result = CliRunner().invoke(
        app, ["index", "build", str(small_shards), "-i", str(tmp_path / "i"), "--engine", "ray"]
    )
    assert result.exit_code != 0
    assert "pip install 'provenance[ray]'" in " ".join(result.output.split())
    result = CliRunner().invoke(
        app, ["index", "build", str(small_shards), "-i", str(tmp_path / "i"), "--gpus-per-worker", "1"]
    )
    assert result.exit_code != 0 and "need --engine ray" in result.output


def test_an_id_in_two_shards_is_kept_once_by_one_actor_and_reported_across_two(
    ray_cluster, small_shards, tmp_path, caplog
):
    """The same keys in two shards. One actor indexing both keeps the first, as the local engine does (and writes no
    part for the second); two actors at once each keep their copy (a known difference), and the build says so."""
    import logging
    import shutil

    from provenance.ray_engine import duplicate_ids

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(small_shards / "00000.tar", corpus / "00000.tar")
    shutil.copy(small_shards / "00000.tar", corpus / "00001.tar")  # the same keys again
    with caplog.at_level(logging.WARNING, logger="provenance.ray_engine"):
        result = build(str(corpus), tmp_path / "index", _ray_options())
    dup = duplicate_ids(tmp_path / "index", result.manifest)
    assert dup in (0, SHARD_ITEMS) and result.added == SHARD_ITEMS + dup  # which one depends on Ray's scheduling
    assert (f"{SHARD_ITEMS} ids are in more than one part" in caplog.text) == bool(dup)
    assert sorted(set(_items(tmp_path / "index")[0])) == sorted(_items(tmp_path / "index")[0][:SHARD_ITEMS])


def test_ray_append_indexes_only_the_new_items(ray_cluster, local_index, small_shards, tmp_path):
    """--append on Ray: the old index's ids are not embedded again (its shard's unit writes no part)."""
    import shutil

    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(small_shards / "00000.tar", first / "00000.tar")
    index = tmp_path / "index"
    build(str(first), index, BuildOptions())
    options = _ray_options()
    options.append = True
    result = build(str(small_shards), index, options)
    assert result.added == SHARD_ITEMS and result.reused == SHARD_ITEMS
    assert [p["unit"] for p in result.manifest["parts"]] == ["00000.tar", "00001.tar"]
    assert _items(index)[0] == _items(local_index)[0]
