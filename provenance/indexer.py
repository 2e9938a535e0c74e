"""Building an index: read a corpus, decode in worker threads, embed in batches, write one part at a time.

Decoding and per-model preprocessing run in a thread pool (PIL and numpy release the GIL) while the
main thread runs the models on the previous batch, so the models are never starved. Items stream into a
`parts.PartWriter` (one part per input shard, or per `part_size` items of a folder or dataset), which is
renamed into place complete; memory holds one batch and one metadata batch, never the corpus. The build
ends by committing a manifest that lists its parts (`store.commit_manifest`). A killed build keeps its
complete parts; the re-run (same source and settings) adopts them and does only the rest. The whole build
holds the index's writer lock (`provenance.locking`): a second writer is refused, or waits with `wait`.

Two engines run step 4 (embedding the units): this process (the default), or a Ray cluster
(`provenance.ray_engine`, `engine="ray"`). Both index each unit with `_Run.index_unit`, whose per-item work is
`prepare_item` (decode, every descriptor's preprocessing, the consent signals in the file, the thumbnail), so
per-item work added there reaches both; the lock, the resume and the commit are this module's in both cases.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from provenance.consent.files import read_file_consent
from provenance.corpus import CorpusItem, CorpusSource, detect_source, list_shards, read_corpus, read_shard, shard_name
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import DecompressionBombError, IndexFormatError, IndexMismatchError, UnreadableImageError
from provenance.images import DEFAULT_MAX_PIXELS, decode_image, mime_type
from provenance.locking import IndexWriteLock
from provenance.models import ModelOptions, check_same_model, load_descriptor, parse_descriptors
from provenance.parts import TMP_PREFIX, PartReader, PartWriter, id_hash, read_marker
from provenance.store import (
    DEFAULT_PART_SIZE,
    MANIFEST,
    PARTS,
    ProvenanceIndex,
    _remove_v1_files,
    commit_manifest,
    new_manifest,
    next_part_seq,
    part_entry,
    part_name,
    read_manifest,
    remove_unlisted_anns,
    remove_unlisted_lookups,
    remove_unlisted_parts,
    unlisted_parts,
    vector_dims,
    write_merged_ann,
    write_merged_lookup,
    write_tombstones,
)

logger = logging.getLogger(__name__)

# px, long side. Scan --thorough verifies copies against it (SIFT): at 160 px a heavy crop of a large photo is
# ~60 px of it and too few features match; 256 px verifies as many as 320 px at ~10 KB as JPEG q75, against ~5 KB
# at 160 px (sizes, and the choice over stored local features, in BENCHMARKS.md, "Copy detection: partial
# copies"). Indexes built with 160 px thumbnails still verify, from less detail.
THUMBNAIL_SIZE = 256
THUMBNAIL_QUALITY = 75  # JPEG


@dataclass
class BuildOptions:
    descriptors: list[str] = field(default_factory=lambda: ["sscd", "pdq"])
    batch_size: int = 32
    limit: int | None = None
    append: bool = False
    workers: int = 2  # decode threads
    part_size: int = DEFAULT_PART_SIZE  # items (and skips) per part of a folder or dataset; shards: one part each
    models: ModelOptions = field(default_factory=ModelOptions)
    memory_budget_bytes: int = 1 << 30  # per part's FAISS index
    thumbnails: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    use_gpu: bool | None = None
    wait: float = 0.0  # seconds to wait for another writer of the same index (0: refuse at once)
    # also record each URL source's do-not-train signals (TDMRep, X-Robots-Tag, ai.txt, robots.txt) through the
    # polite, cached fetcher; the signals inside each file are always read
    read_url_signals: bool = False
    url_fetch: Any = None  # provenance.consent.FetchOptions for read_url_signals (None: the defaults)
    registry: Path | None = None  # a do-not-train registry: items it covers are skipped as "opted_out"
    engine: str = "local"  # "local": this process; "ray": a Ray cluster (provenance.ray_engine)
    ray: Any = None  # provenance.ray_engine.RayOptions for engine="ray" (None: the defaults)


@dataclass
class BuildResult:
    index_dir: Path
    manifest: dict[str, Any]
    added: int  # items embedded by this run (including those resumed from complete parts)
    resumed: int  # of which were already in parts written by an interrupted run
    reused: int  # items kept from the existing index (--append)
    skipped: int  # items of this run that could not be indexed
    seconds: float
    parts: int = 0  # parts this build added


@dataclass
class _Prepared:
    row: dict[str, Any]
    inputs: dict[str, np.ndarray]  # descriptor name -> preprocessed input
    thumbnail: bytes | None


@dataclass
class _Skip:
    id: str
    source: str | None
    reason: str
    reason_kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "reason": self.reason, "reason_kind": self.reason_kind}


ProgressFn = Callable[[int, int], None]  # (items embedded so far, items skipped so far)


def build(  # noqa: C901 - the build's numbered steps, as a diffusers __call__ reads
    source: str | CorpusSource,
    index_dir: str | os.PathLike,
    options: BuildOptions | None = None,
    progress: ProgressFn | None = None,
    source_options: dict[str, Any] | None = None,
) -> BuildResult:
    """Index `source` into `index_dir` (see module docstring); returns counts and the manifest."""
    started = time.perf_counter()
    options = options or BuildOptions()
    if options.part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {options.part_size}")
    if options.engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {options.engine!r}")
    engine = None
    if options.engine == "ray":
        from provenance.ray_engine import RayEngine

        engine = RayEngine(options.ray)  # checks that Ray is installed before any model is loaded
    index_dir = Path(index_dir)
    # 1. Inputs and models
    names = parse_descriptors(options.descriptors)
    corpus = source if isinstance(source, CorpusSource) else detect_source(source, **(source_options or {}))
    models = {n: load_descriptor(n, options.models.load_args(n), options.models.device) for n in names}
    specs: dict[str, DescriptorSpec] = {n: m.spec for n, m in models.items()}
    if "clip" in specs:
        specs["clip_text"] = specs["clip"]
    load_args = {n: options.models.load_args(n) for n in names if options.models.load_args(n)}
    if "clip" in load_args:
        load_args["clip_text"] = load_args["clip"]

    index_dir.mkdir(parents=True, exist_ok=True)
    with (
        IndexWriteLock(index_dir, wait=options.wait, action="append" if options.append else "build"),
        engine if engine is not None else contextlib.nullcontext(),  # a Ray cluster the engine started stops
    ):
        # 2. The existing index: kept and extended (--append), or replaced when the new manifest lands
        old_manifest: dict[str, Any] | None = None
        if (index_dir / MANIFEST).exists():
            try:
                old_manifest = read_manifest(index_dir)
            except IndexFormatError:
                if options.append:
                    raise
                logger.warning("replacing the unreadable or old-format index at %s", index_dir)
        old = ProvenanceIndex(index_dir, old_manifest) if options.append and old_manifest else None
        if old is not None:
            _check_append_compatible(old, specs)

        # 3. Complete parts of an interrupted run with the same settings are adopted, others deleted
        build_key = {
            "source": corpus.to_dict(),
            "specs": {n: s.to_dict() for n, s in specs.items()},
            "append": options.append,
            "limit": options.limit,
            "part_size": options.part_size,
            "thumbnails": options.thumbnails,
            "base": [p["name"] for p in old_manifest["parts"]] if old_manifest is not None else None,
        }
        build_id = hashlib.sha256(json.dumps(build_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        parts_dir = index_dir / PARTS
        parts_dir.mkdir(exist_ok=True)
        for tmp in parts_dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)  # a killed writer's half part (we hold the lock)
        staged: list[dict[str, Any]] = []
        for d in unlisted_parts(index_dir, old_manifest):
            try:
                marker = read_marker(d)
            except IndexFormatError:
                marker = {}
            if marker.get("build") == build_id:
                staged.append(marker)
            else:
                logger.warning("discarding %s: a part of an interrupted build with other settings", d)
                shutil.rmtree(d, ignore_errors=True)
        resumed = sum(m["n"] for m in staged)
        if staged:
            logger.info("resuming: %d complete parts (%d items) of an interrupted build", len(staged), resumed)

        # 4. Embed what is new, one part at a time
        run = _Run(index_dir, options, models, specs, build_id, old, staged, progress)
        try:
            if engine is None:
                run.index_units(corpus)
            else:
                engine.index_units(run, corpus)
        finally:
            if run.fetcher is not None:
                run.fetcher.close()

        # 5. Commit: the manifest lists the parts (old ones too when appending); unlisted leftovers go
        entries = [part_entry(m) for m in sorted(run.staged, key=lambda m: m["name"])]
        this_build = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": corpus.to_dict(),
            "added": run.added,
            "skipped": run.skipped,
            "append": options.append,
            "parts": len(entries),
        }
        if old is not None:
            manifest = json.loads(json.dumps(old_manifest))
            manifest["parts"] += entries
            manifest["builds"] = [*manifest.get("builds", []), this_build]
        else:
            manifest = new_manifest(index_dir, specs, load_args, {"builds": [this_build]})
            manifest["parts"] = entries
            write_tombstones(index_dir, manifest, [])
        manifest["source"] = corpus.to_dict()
        manifest["next_part"] = run.next_seq
        if old is None:  # a build merges its parts' lookups; an append leaves them (compact merges them)
            write_merged_lookup(index_dir, manifest)
        # an append adds its parts' lists, no k-means; the Ray engine encodes each part's codes in a Ray task
        write_merged_ann(index_dir, manifest, append=old is not None, run_tasks=engine.run_tasks if engine else None)
        commit_manifest(index_dir, manifest)
        remove_unlisted_parts(index_dir, manifest)
        remove_unlisted_lookups(index_dir, manifest)
        remove_unlisted_anns(index_dir, manifest)
        if old is None:
            _remove_v1_files(index_dir)
    return BuildResult(
        index_dir,
        manifest,
        run.added,
        resumed,
        len(old) if old is not None else 0,
        run.skipped,
        time.perf_counter() - started,
        len(entries),
    )


class _Run:
    """One build's state: what is already indexed, the part being written, the counters."""

    def __init__(
        self,
        index_dir: Path,
        options: BuildOptions,
        models: dict[str, Any],
        specs: dict[str, DescriptorSpec],
        build_id: str,
        old: ProvenanceIndex | None,
        staged: list[dict[str, Any]],
        progress: ProgressFn | None,
    ):
        self.parts_dir = index_dir / PARTS
        self.options, self.models, self.specs, self.build_id = options, models, specs, build_id
        self.dims = vector_dims(specs)
        self.old = old
        self.staged = list(staged)
        # parts already written (old index + this build's): probed for ids, 8 bytes per item on disk
        self.known = [PartReader(self.parts_dir / m["name"], m["n"]) for m in staged]
        self.done_units = {m["unit"] for m in staged if m.get("unit") and m.get("unit") != "items"}
        # ids this build skipped (unreadable...): not indexed, but not to be decoded again by a resume
        self.skipped_ids = {s["id"] for r in self.known for s in r.skipped()}
        self.added = sum(m["n"] for m in staged)
        self.skipped = 0
        self.read = sum(m["n"] + m["skipped"] for m in staged)  # corpus items consumed (for --limit)
        self.next_seq = next_part_seq(index_dir, old.manifest if old is not None else None)
        self.progress = progress
        self.writer: PartWriter | None = None
        self.pending: dict[str, None] = {}  # ids accepted but not yet in a finished part (insertion-ordered)
        self.fetcher = None
        if options.read_url_signals:
            from provenance.consent import Fetcher

            self.fetcher = Fetcher(options.url_fetch)
        self.optouts = None
        if options.registry is not None:
            from provenance.registry import BuildFilter

            spec = specs.get("sscd")
            self.optouts = BuildFilter(options.registry, f"{spec.model_id}:{spec.checksum}" if spec else None)

    # 1. Units: one per shard, or the whole folder/dataset cut every part_size items

    def index_units(self, corpus: CorpusSource) -> None:
        if corpus.kind == "webdataset":
            for shard in list_shards(corpus.location):
                if shard_name(shard) in self.done_units:
                    logger.info("%s: already indexed by the interrupted run", shard_name(shard))
                    continue
                self.index_unit(read_shard(shard), unit=shard_name(shard))
        else:
            self.index_unit(read_corpus(corpus), unit=None)

    def index_unit(self, items: Iterator[CorpusItem], unit: str | None, seq: int | None = None) -> list[dict[str, Any]]:
        """Index one unit's items into parts (one part for a named unit; part_size items a part for None), part
        numbers from `seq` on (None: the next free one); returns the markers of the parts written."""
        if seq is not None:
            self.next_seq = seq
        first = len(self.staged)
        self._index_items(items, unit)
        return self.staged[first:]

    def _limited(self, items: Iterator[CorpusItem]) -> Iterator[CorpusItem]:
        for it in items:
            if self.options.limit is not None and self.read >= self.options.limit:
                return
            self.read += 1
            yield it

    def _index_items(self, items: Iterator[CorpusItem], unit: str | None) -> None:
        for batch in _prepared_batches(self._limited(items), self.models, self.options, self._fresh):
            ready = [p for p in batch if isinstance(p, _Prepared)]
            skips = [s for s in batch if isinstance(s, _Skip)]
            for s in skips:
                logger.warning("skipped %s: %s", s.id, s.reason)
            if self.fetcher is not None:
                _add_url_consent(ready, self.fetcher)
            vectors = _embed(self.models, ready)
            if self.optouts is not None:
                ready, vectors, opted = _drop_opted_out(self.optouts, ready, vectors)
                skips += opted
            entries: list[tuple[int | None, _Skip | None]] = [(i, None) for i in range(len(ready))] + [
                (None, s) for s in skips
            ]
            pos = 0
            while pos < len(entries):
                if self.writer is None:
                    self.writer = PartWriter(
                        self.parts_dir,
                        part_name(self.next_seq, unit),
                        self.dims,
                        unit=unit or "items",
                        build_id=self.build_id,
                    )
                    self.next_seq += 1
                room = len(entries) if unit is not None else self.options.part_size - self.writer.count
                take = entries[pos : pos + max(1, room)]
                pos += len(take)
                idx = [i for i, _ in take if i is not None]
                self.writer.add(
                    [ready[i].row for i in idx],
                    {n: x[idx] for n, x in vectors.items()},
                    [ready[i].thumbnail for i in idx],
                    [s.to_dict() for _, s in take if s is not None],
                )
                if unit is None and self.writer.count >= self.options.part_size:
                    self._finish_part()
            self.added += len(ready)
            self.skipped += len(skips)
            if self.progress:
                self.progress(self.added, self.skipped)
        if self.writer is not None:
            self._finish_part()

    def _finish_part(self) -> None:
        w, self.writer = self.writer, None
        assert w is not None  # called with a part open
        marker = w.finish(self.options.memory_budget_bytes, self.options.use_gpu, self.specs)
        self.staged.append(marker)
        reader = PartReader(self.parts_dir / marker["name"], marker["n"])
        self.known.append(reader)
        if marker["n"]:
            for _, batch in reader.iter_batches():
                for i in batch.column("id").to_pylist():
                    self.pending.pop(i, None)
        for s in w.skipped:
            self.pending.pop(s["id"], None)
        self.skipped_ids.update(s["id"] for s in w.skipped)
        logger.info("part %s: %d items, %d skipped", marker["name"], marker["n"], marker["skipped"])

    # 2. Which items are new: not in the old index, not in this build's parts, not seen in this run

    def _fresh(self, items: list[CorpusItem]) -> list[CorpusItem]:
        if not items:
            return items
        ids = [it.id for it in items]
        hashes = id_hash(ids)
        taken = np.zeros(len(items), bool)
        for part in self.known:
            if len(part):
                maybe = part.contains_hashes(hashes) & ~taken
                for j in np.flatnonzero(maybe):
                    taken[j] = bool(part.rows_of_id(ids[j]))
        if self.old is not None:
            taken |= self.old.contains_ids(ids)
        out = []
        for it, t in zip(items, taken, strict=False):
            if t or it.id in self.skipped_ids:
                continue
            if it.id in self.pending:
                logger.warning("duplicate id %s in the corpus: keeping the first", it.id)
                continue
            self.pending[it.id] = None
            out.append(it)
        return out


def _drop_opted_out(
    optouts, ready: list[_Prepared], vectors: dict[str, np.ndarray]
) -> tuple[list[_Prepared], dict[str, np.ndarray], list[_Skip]]:
    """The batch without the items the registry covers, and those items as "opted_out" skips."""
    reasons = optouts.reasons([p.row for p in ready], vectors)
    keep = [i for i, r in enumerate(reasons) if r is None]
    if len(keep) == len(ready):
        return ready, vectors, []
    skips = [
        _Skip(ready[i].row["id"], ready[i].row["source"], f"opted out: {json.dumps(r, sort_keys=True)}", "opted_out")
        for i, r in enumerate(reasons)
        if r is not None
    ]
    for s in skips:
        logger.info("skipped %s: %s", s.id, s.reason)
    return [ready[i] for i in keep], {n: x[keep] for n, x in vectors.items()}, skips


def _check_append_compatible(old: ProvenanceIndex, specs: dict[str, DescriptorSpec]) -> None:
    if set(old.specs) != set(specs):
        raise IndexMismatchError(
            f"cannot append to {old.dir}: it has descriptors {sorted(old.specs)} but this build computes "
            f"{sorted(specs)}; use the same --descriptors"
        )
    for name, spec in specs.items():
        check_same_model(old.specs[name], spec)


# ------------------------------------------------------------------------- decode + preprocess


def prepare_item(item: CorpusItem, models: dict[str, Any], options: BuildOptions) -> _Prepared | _Skip:
    """The per-item work of both engines (a decode thread's work): decode, preprocess for every model, read the
    consent signals the file carries, make a thumbnail; or the item's skip with its reason."""
    if item.error or item.data is None:
        return _Skip(item.id, item.source, item.error or "no image data", item.error_kind or "missing")
    try:
        decoded = decode_image(item.data, item.source or item.id, options.max_pixels)
        inputs = {n: m.preprocess(decoded.image) for n, m in models.items()}
    except DecompressionBombError as e:
        return _Skip(item.id, item.source, str(e), "decompression_bomb")
    except UnreadableImageError as e:
        return _Skip(item.id, item.source, str(e), "unreadable")
    except Exception as e:
        return _Skip(item.id, item.source, f"{type(e).__name__}: {e}", "error")
    thumb = _thumbnail(decoded.image) if options.thumbnails else None
    extra = dict(item.extra or {})
    consent = read_file_consent(decoded.raw, mime_type(decoded.format))
    if consent.signals:  # most files carry none: keep their metadata as small as before
        extra["consent"] = consent.to_dict()
    row = {
        "id": item.id,
        "caption": item.caption,
        "source": item.source,
        "license": item.license,
        "width": decoded.width,
        "height": decoded.height,
        "sha256": decoded.sha256,
        "extra": extra,
    }
    return _Prepared(row, inputs, thumb)


def _add_url_consent(ready: list[_Prepared], fetcher: Any) -> None:
    """Merge each http(s) source's URL signals into the consent its file gave (one batched, cached fetch)."""
    from provenance.consent import Consent, url_consent

    urls = [p.row["source"] for p in ready if str(p.row.get("source") or "").startswith(("http://", "https://"))]
    if not urls:
        return
    found = url_consent(urls, fetcher)
    for p in ready:
        url_signals = found.get(p.row.get("source") or "")
        if url_signals is None:
            continue
        stored = p.row["extra"].get("consent")
        merged = Consent.from_dict(stored).merged(url_signals) if stored else url_signals
        p.row["extra"]["consent"] = merged.to_dict()


def _thumbnail(image) -> bytes:
    from PIL import Image

    im = image.copy()
    im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


def _prepared_batches(
    items: Iterator[CorpusItem],
    models: dict[str, Any],
    options: BuildOptions,
    fresh: Callable[[list[CorpusItem]], list[CorpusItem]],
) -> Iterator[list[_Prepared | _Skip]]:
    """Batches of prepared items; the next batch is decoded while the caller embeds the current one.
    `fresh` drops, from each group of items read, those already indexed (one vectorised probe per group)."""

    def new_items() -> Iterator[CorpusItem]:
        group: list[CorpusItem] = []
        for it in items:
            group.append(it)
            if len(group) >= options.batch_size:
                yield from fresh(group)
                group = []
        yield from fresh(group)

    source = new_items()
    with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="decode") as pool:

        def submit_batch() -> list[Future]:
            futures = []
            for it in source:
                futures.append(pool.submit(prepare_item, it, models, options))
                if len(futures) >= options.batch_size:
                    break
            return futures

        current = submit_batch()
        while current:
            upcoming = submit_batch()  # queued now, decoded while the models run on `current`
            yield [f.result() for f in current]
            current = upcoming


def _embed(models: dict[str, Any], ready: list[_Prepared]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if not ready:
        return out
    for name, model in models.items():
        x = model.embed_batch([p.inputs[name] for p in ready])
        out[name] = x if name == "pdq" else x.astype(np.float16)  # (b, d) float16, L2-normalised
        if name == "clip":
            out["clip_text"] = model.embed_text([p.row["caption"] or "" for p in ready]).astype(np.float16)
    return out
