"""Building an index on a Ray cluster: every unit of the corpus becomes one part, written by an actor of a pool.

`index build --engine ray` runs step 4 of `provenance.indexer.build` (embedding the units) here; the writer lock,
the resume, the manifest and the merged ANN stay the indexer's, in the driver. The units are the local engine's:
one per shard (named after it), or one per `part_size` items of a folder or dataset.

The pipeline is Ray Data: a dataset of unit descriptions (one row, one block per unit), mapped by `PartBuilder`
with `map_batches(PartBuilder, batch_size=1, compute=ActorPoolStrategy(size=N), num_cpus=..., num_gpus=...)`.
Each actor loads its models once, in `__init__`, sized to its CPUs (Ray sets OMP_NUM_THREADS=1 in its workers,
which would cap torch at one thread), on the GPU with `gpus_per_worker` > 0. Each call indexes one whole unit:
it reads the shard (a path, or a URL through fsspec), decodes and embeds it with the local engine's code
(`indexer._Run.index_unit`: decode threads overlapping the model, `prepare_item` per item), and writes the part
to a temporary folder renamed into place with its completion marker (`parts.PartWriter`).

Why one call per unit, and not decode tasks feeding embedding actors row by row:
  * fault tolerance by construction: a part is renamed into place only when complete, so a worker that dies
    mid-shard leaves a temporary folder (removed at the end) and no part; Ray Data restarts the actor and
    retries the call (its actor pools default to max_restarts=-1, max_task_retries=-1), which redoes the whole
    shard: nothing is lost and nothing is written twice. Rows streamed into a writer elsewhere would need a
    per-shard commit protocol on top of Ray Data's retries to get the same guarantee;
  * no pixels through the object store: a preprocessed image is 250-330 KB (SSCD: uint8, short side 288) and a
    CLIP input 600 KB (float32), while the encoded JPEG is ~30 KB; decoding beside the model (in the actor's
    threads, while the model runs on the previous batch) is as fast on one node and ships nothing;
  * the part files are written where they are computed, to the shared filesystem the index lives on.
The cost: a unit is the grain of parallelism and of a redo, so use many shards of ~10k images, as img2dataset
writes them. The per-part FAISS codes of the merged ANN are encoded in Ray tasks (`run_tasks`), then merged on
disk by the driver (`store.write_merged_ann`).

Duplicate ids: each actor drops ids already in the parts complete when the build started and in its own parts;
two shards indexed at the same time by different actors cannot see each other's ids, so an id present in two
shards is kept twice (the local engine keeps the first): `duplicate_ids` counts them after the build.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from provenance.corpus import (
    CorpusItem,
    CorpusSource,
    count_items,
    list_shards,
    read_corpus_range,
    read_shard,
    shard_name,
)
from provenance.errors import CorpusError, IndexMismatchError, MissingExtraError, ModelLoadError

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'provenance[ray]'"
# "<unit>:<after_n>:<marker file>": the actor indexing <unit> exits abruptly after reading <after_n> items, once
# (it creates the marker file first; with the file present nothing happens). The fault tests use it.
FAULT_ENV = "PROVENANCE_RAY_FAULT"
POLL_SECONDS = 0.5  # progress poll of the counter actor


@dataclass
class RayOptions:
    """Where and how wide the Ray build runs."""

    address: str | None = None  # None: RAY_ADDRESS, else a new local cluster; "auto": the `ray start` cluster here
    workers: int = 2  # embedding actors
    cpus_per_worker: float | None = None  # None: the cluster's CPUs / workers (at least 1)
    gpus_per_worker: float = 0.0  # > 0: the actors run their models on a GPU (ONNX Runtime CUDA, torch CUDA)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class Unit:
    """One part to write: a shard (kind "shard", location = its path or URL) or a range of a folder or dataset."""

    name: str  # the part's unit: the shard's file name, or "items-<start>"
    kind: str  # "shard" | "range"
    location: str
    seq: int  # the part's sequence number (its name's prefix)
    start: int = 0
    stop: int = 0


def require_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError(f"--engine ray needs Ray, which is not installed ({e}); {RAY_INSTALL_HINT}") from None
    return ray


# ----------------------------------------------------------------------------- device and thread choices


def onnx_providers(use_gpu: bool, available: list[str]) -> list[str]:
    """ONNX Runtime's providers for an actor: CUDA first on a GPU worker (which must have it), CPU only otherwise
    (a CPU worker on a GPU node must not take the GPU that another actor was given)."""
    if not use_gpu:
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ModelLoadError(
            f"--gpus-per-worker > 0 but onnxruntime has no CUDA provider (it has {available}); "
            "install onnxruntime-gpu on the workers"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def torch_device(use_gpu: bool, cuda_available: bool) -> str:
    if not use_gpu:
        return "cpu"
    if not cuda_available:
        raise ModelLoadError("--gpus-per-worker > 0 but torch sees no CUDA device on this worker")
    return "cuda"


def worker_threads(cpus: float) -> int:
    """Threads for an actor given `cpus` CPUs: its share, whatever OMP_NUM_THREADS Ray set (1)."""
    return max(1, int(cpus))


def size_threads(threads: int) -> None:
    """Size torch, OpenMP (FAISS, torch's OpenMP kernels) and the env of later imports to `threads`."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # Ray sets 1 in its workers
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def load_models(names: list[str], model_options: Any, threads: int, use_gpu: bool) -> dict[str, Any]:
    """The descriptors of a build, loaded for one actor: ONNX sessions with `threads` intra-op threads on the
    chosen providers, torch models on the chosen device."""
    from provenance.descriptors.sscd import SSCDDescriptor
    from provenance.models import load_descriptor

    models: dict[str, Any] = {}
    for n in names:
        args = model_options.load_args(n)
        if n == "sscd":
            path = args.get("path")
            if path is None or str(path).endswith(".onnx"):
                import onnxruntime as ort

                providers = onnx_providers(use_gpu, ort.get_available_providers())
                models[n] = SSCDDescriptor.load(path, threads=threads, providers=providers)
            else:  # an official TorchScript file: runs on the CPU (torch threads sized above)
                models[n] = SSCDDescriptor.load(path)
        elif n == "clip":
            import torch

            device = torch_device(use_gpu, torch.cuda.is_available())
            models[n] = load_descriptor(n, args, device)
        else:
            models[n] = load_descriptor(n, args or None)
    return models


# ----------------------------------------------------------------------------- units


def plan_units(corpus: CorpusSource, part_size: int, done: set[str], first_seq: int) -> list[Unit]:
    """The units still to index, numbered from `first_seq` in corpus order (the local engine's order)."""
    units: list[Unit] = []
    if corpus.kind == "webdataset":
        for shard in list_shards(corpus.location):
            if shard_name(shard) not in done:
                units.append(Unit(shard_name(shard), "shard", shard, first_seq + len(units)))
        return units
    n = count_items(corpus)
    for start in range(0, n, part_size):
        name = f"items-{start:09d}"
        if name not in done:
            units.append(Unit(name, "range", corpus.location, first_seq + len(units), start, min(n, start + part_size)))
    return units


def _with_fault(items: Iterator[CorpusItem], unit: str) -> Iterator[CorpusItem]:
    """The items, or (FAULT_ENV names this unit and its marker file is absent) the first after_n of them and then
    the end of this process, as a killed worker."""
    spec = os.environ.get(FAULT_ENV, "")
    parts = spec.split(":", 2)
    if len(parts) != 3 or parts[0] != unit or Path(parts[2]).exists():
        yield from items
        return
    after = int(parts[1])
    for i, it in enumerate(items):
        if i == after:
            Path(parts[2]).touch()
            logger.error("%s: injected fault after %d items (%s)", unit, after, FAULT_ENV)
            os._exit(17)
        yield it


# ----------------------------------------------------------------------------- the actor


class PartBuilder:
    """A Ray Data actor: loads the models once, then writes one complete part per unit it is given."""

    def __init__(
        self,
        index_dir: str,
        options: Any,  # indexer.BuildOptions
        specs: dict[str, dict[str, Any]],
        build_id: str,
        old_manifest: dict[str, Any] | None,
        staged: list[dict[str, Any]],
        cpus: float,
        gpus: float,
        counter: Any = None,  # the _Progress actor
    ):
        from provenance.indexer import _Run
        from provenance.models import parse_descriptors
        from provenance.store import ProvenanceIndex

        threads = worker_threads(cpus)
        size_threads(threads)
        use_gpu = gpus > 0
        names = parse_descriptors(options.descriptors)
        models = load_models(names, options.models, threads, use_gpu)
        # 1. The same models as the driver's (a worker with another model file would build a mixed index)
        for n, m in models.items():
            if m.spec.to_dict() != specs[n]:
                raise IndexMismatchError(
                    f"worker's {n} model {m.spec.to_dict()} differs from the driver's {specs[n]}: install the same "
                    "model files on every node"
                )
        spec_objs = {n: m.spec for n, m in models.items()}
        if "clip" in spec_objs:
            spec_objs["clip_text"] = spec_objs["clip"]
        # 2. Decode threads: the actor's CPUs (they overlap the model's threads, as the local engine's do)
        opts = dataclasses.replace(options, workers=max(2, threads))
        d = Path(index_dir)
        old = ProvenanceIndex(d, old_manifest) if old_manifest is not None else None
        self.run = _Run(d, opts, models, spec_objs, build_id, old, staged, None)
        self.build_id = build_id
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        markers = [self.index(Unit(**json.loads(str(u)))) for u in batch["unit"]]
        return {"marker": np.array([json.dumps(m) for m in markers], dtype=object)}

    def index(self, unit: Unit) -> dict[str, Any]:
        from provenance.parts import read_marker
        from provenance.store import part_name

        done = self.run.parts_dir / part_name(unit.seq, unit.name)
        if done.exists():  # a retry of a call whose worker died after the rename: the part is complete
            marker = read_marker(done)
            if marker.get("build") == self.build_id:
                return marker
        if unit.kind == "shard":
            items = read_shard(unit.location)
        else:
            items = read_corpus_range(CorpusSource(**json.loads(unit.location)), unit.start, unit.stop)
        added0, skipped0 = self.run.added, self.run.skipped
        counter = self.counter
        if counter is not None:
            self.run.progress = lambda a, s: counter.report.remote(unit.name, a - added0, s - skipped0)
        markers = self.run.index_unit(_with_fault(items, unit.name), unit.name, unit.seq)
        if not markers:  # every item was already indexed (by this actor's earlier parts): no part, as locally
            return {"name": None, "unit": unit.name, "n": 0, "skipped": 0, "skipped_by_reason": {}}
        assert len(markers) == 1, markers  # a named unit is one part
        return markers[0]


# ----------------------------------------------------------------------------- the driver


def _progress_actor(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class _Progress:
        """Items embedded and skipped so far, per unit (a redone unit's counts replace its first try's)."""

        def __init__(self) -> None:
            self.units: dict[str, tuple[int, int]] = {}

        def report(self, unit: str, added: int, skipped: int) -> None:
            self.units[unit] = (added, skipped)

        def totals(self) -> tuple[int, int]:
            return sum(a for a, _ in self.units.values()), sum(s for _, s in self.units.values())

    return _Progress.remote()  # type: ignore[attr-defined]  # ray.remote makes it an ActorClass


class RayEngine:
    """Runs a build's units on Ray (see module docstring); a context manager that shuts down a cluster it started."""

    def __init__(self, options: RayOptions | None = None):
        self.ray = require_ray()
        self.options = options or RayOptions()
        self._started = False
        self.startup_seconds = 0.0
        self.unit_summaries: list[dict[str, Any]] = []

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        t = time.perf_counter()
        ray.init(address=self.options.address, include_dashboard=False, logging_level=logging.WARNING)
        self._started = True
        self.startup_seconds = time.perf_counter() - t
        logger.info("Ray started in %.1f s: %s", self.startup_seconds, ray.cluster_resources())

    def close(self) -> None:
        if self._started and self.ray.is_initialized():
            self.ray.shutdown()
        self._started = False

    def index_units(self, run: Any, corpus: CorpusSource) -> None:
        """Index every unit not yet done into run's parts dir; add their markers and counts to `run`."""
        # 1. The units still to do
        if run.options.limit is not None:
            raise CorpusError("--limit is not supported with --engine ray (the units run in parallel); index a subset")
        units = plan_units(corpus, run.options.part_size, run.done_units, run.next_seq)
        for name in sorted(run.done_units):
            logger.info("%s: already indexed by the interrupted run", name)
        if not units:
            return
        if corpus.kind != "webdataset":  # the actors rebuild the source from its description
            units = [dataclasses.replace(u, location=json.dumps(corpus.to_dict())) for u in units]
        # 2. The pipeline: one block a unit, mapped by the actor pool
        self.connect()
        counter = _progress_actor(self.ray)
        out = self._pipeline(run, units, counter)
        # 3. Its markers, while the counter actor feeds the progress bar
        markers = self._collect(run, out, counter, len(units))
        # 4. The parts, as the local engine records them (part order: by name, i.e. by sequence number)
        for m in markers:
            if m["name"] is None:
                logger.info("%s: every item was already indexed; no part", m["unit"])
        for m in sorted((m for m in markers if m["name"] is not None), key=lambda m: m["name"]):
            run.staged.append(m)
            run.added += m["n"]
            run.skipped += m["skipped"]
            summary = {"unit": m["unit"], "part": m["name"], "indexed": m["n"], "skipped": m["skipped_by_reason"]}
            self.unit_summaries.append(summary)
            logger.info("%s: %d indexed, skipped %s", m["unit"], m["n"], m["skipped_by_reason"] or "none")
        _report_duplicates(run.parts_dir.parent, run.staged)
        run.next_seq = max(run.next_seq, max(u.seq for u in units) + 1)
        if run.progress is not None:
            run.progress(run.added, run.skipped)
        _remove_tmp(run.parts_dir)

    def _pipeline(self, run: Any, units: list[Unit], counter: Any) -> Any:
        """The Ray dataset of the units' markers (lazy: it runs as it is iterated)."""
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI shows one bar, fed by the counter actor
        ctx.print_on_execution_start = False
        o = self.options
        workers = min(o.workers, len(units))
        resources = self.ray.cluster_resources()
        if o.gpus_per_worker and resources.get("GPU", 0) < o.gpus_per_worker:
            # checked here: Ray would otherwise wait for a GPU forever
            raise ModelLoadError(
                f"--gpus-per-worker {o.gpus_per_worker} but the Ray cluster has {resources.get('GPU', 0):g} GPUs"
            )
        cpus = o.cpus_per_worker or max(1.0, float(int(resources.get("CPU", 1)) // workers))
        env = {k: v for k, v in os.environ.items() if k.startswith("PROVENANCE_")}
        # one block a unit (no shuffle task, which would wait for CPUs the actors hold): a redo is one unit
        rows = [{"unit": json.dumps(dataclasses.asdict(u))} for u in units]
        logger.info("Ray: %d units on %d actors (%.0f CPU, %g GPU each)", len(units), workers, cpus, o.gpus_per_worker)
        return self.ray.data.from_items(rows, override_num_blocks=len(units)).map_batches(
            PartBuilder,
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=o.gpus_per_worker or None,
            fn_constructor_kwargs={
                "index_dir": str(run.parts_dir.parent),
                "options": dataclasses.replace(run.options, ray=None),
                "specs": {n: s.to_dict() for n, s in run.specs.items() if n != "clip_text"},
                "build_id": run.build_id,
                "old_manifest": run.old.manifest if run.old is not None else None,
                "staged": run.staged,
                "cpus": cpus,
                "gpus": o.gpus_per_worker,
                "counter": counter,
            },
            runtime_env={"env_vars": env} if env else None,  # PROVENANCE_* settings reach the actors
        )

    def _collect(self, run: Any, out: Any, counter: Any, n_units: int) -> list[dict[str, Any]]:
        """Every unit's marker; meanwhile the counter's totals go to run.progress every POLL_SECONDS."""
        markers: list[dict[str, Any]] = []
        failure: list[BaseException] = []

        def consume() -> None:
            try:
                for row in out.iter_rows():
                    markers.append(json.loads(row["marker"]))
            except BaseException as e:  # re-raised in the driver's thread below
                failure.append(e)

        added0, skipped0 = run.added, run.skipped
        worker = threading.Thread(target=consume, name="ray-consume", daemon=True)
        worker.start()
        set_total = getattr(run.progress, "set_total", None)
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if run.progress is not None:
                a, s = self.ray.get(counter.totals.remote())
                run.progress(added0 + a, skipped0 + s)
            if set_total is not None and markers:  # the ETA: units to go at the mean size of those done
                per_unit = sum(m["n"] + m["skipped"] for m in markers) / len(markers)
                set_total(added0 + skipped0 + round(per_unit * n_units))
        if failure:
            raise _user_error(failure[0])
        return markers

    def run_tasks(self, jobs: list[Callable[[], Any]]) -> list[Any]:
        """Run independent, picklable calls as Ray tasks (one CPU each); their results in order."""
        if not jobs:
            return []
        self.connect()
        ray = self.ray
        call = ray.remote(num_cpus=1, max_retries=3)(_call)
        return list(ray.get([call.remote(j) for j in jobs]))


def _user_error(e: BaseException) -> BaseException:
    """The library's own error inside Ray's wrappers (RayTaskError, Ray Data's UserCodeException), else `e`.

    An actor whose __init__ raised reaches the driver as an ActorDiedError that keeps only the text of the
    error: the library's error is rebuilt from its last "provenance.errors.Name: message" line."""
    from provenance import errors

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, errors.ProvenanceError):
            return cur
        seen.add(id(cur))
        found = re.findall(r"provenance\.errors\.(\w+): ([^\n]*)", str(cur))
        cls = getattr(errors, found[-1][0], None) if found else None
        if isinstance(cls, type) and issubclass(cls, errors.ProvenanceError):
            try:
                return cls(found[-1][1])
            except TypeError:  # an error type with other constructor arguments: Ray's error, as it is
                return e
        cur = getattr(cur, "cause", None) or cur.__cause__
    return e


def _report_duplicates(index_dir: Path, staged: list[dict[str, Any]]) -> None:
    dup = duplicate_ids(index_dir, {"parts": staged})
    if dup:
        logger.warning(
            "%d ids are in more than one part: shards indexed at the same time by different actors keep their own "
            "copy (the local engine keeps the first)",
            dup,
        )


def _call(job: Callable[[], Any]) -> Any:
    return job()


def _remove_tmp(parts_dir: Path) -> None:
    """Temporary folders of workers that died mid-part (their units were redone); the build holds the lock."""
    from provenance.parts import TMP_PREFIX

    for tmp in parts_dir.glob(f"{TMP_PREFIX}*"):
        logger.info("removing %s, a dead worker's unfinished part", tmp.name)
        shutil.rmtree(tmp, ignore_errors=True)


def duplicate_ids(index_dir: Path, manifest: dict[str, Any]) -> int:
    """How many ids (64-bit id hashes) appear in more than one listed part (0 for a build without duplicate ids).
    Reads the parts' sorted id hashes only: 8 bytes an item."""
    from provenance.parts import IDS_HASH
    from provenance.store import PARTS

    hashes = [np.load(index_dir / PARTS / e["name"] / IDS_HASH) for e in manifest["parts"] if e["n"]]
    if not hashes:
        return 0
    _, counts = np.unique(np.concatenate(hashes), return_counts=True)
    return int((counts > 1).sum())
