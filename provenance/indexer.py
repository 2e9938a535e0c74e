"""Building an index: read a corpus, decode in worker threads, embed in batches, stage chunks, write atomically.

Decoding and per-model preprocessing run in a thread pool (PIL and numpy release the GIL) while the
main thread runs the models on the previous batch, so the models are never starved. Every
`chunk_size` items the results are staged to `.<name>.partial/` next to the index; an interrupted
build resumes from there, and the live index is only replaced by `store.write_index`'s swap.
"""

from __future__ import annotations

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

from provenance.corpus import CorpusItem, CorpusSource, detect_source, read_corpus
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import DecompressionBombError, IndexMismatchError, UnreadableImageError
from provenance.images import DEFAULT_MAX_PIXELS, decode_image
from provenance.models import ModelOptions, check_same_model, load_descriptor, parse_descriptors
from provenance.store import IndexContents, ProvenanceIndex, recover_interrupted_swap, write_index

logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 160  # px, long side; big enough for a results grid, ~5 KB as JPEG


@dataclass
class BuildOptions:
    descriptors: list[str] = field(default_factory=lambda: ["sscd", "pdq"])
    batch_size: int = 32
    limit: int | None = None
    append: bool = False
    workers: int = 2  # decode threads
    chunk_size: int = 1024  # items per staged chunk (the unit of resume)
    models: ModelOptions = field(default_factory=ModelOptions)
    memory_budget_bytes: int = 1 << 30
    thumbnails: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    use_gpu: bool | None = None


@dataclass
class BuildResult:
    index_dir: Path
    manifest: dict[str, Any]
    added: int  # items embedded by this run (including those resumed from staged chunks)
    resumed: int  # of which were already staged by an interrupted run
    reused: int  # items kept from the existing index (--append)
    skipped: int  # items of this run that could not be indexed
    seconds: float


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


def build(source: str | CorpusSource, index_dir: str | os.PathLike, options: BuildOptions | None = None,
          progress: ProgressFn | None = None, source_options: dict[str, Any] | None = None) -> BuildResult:
    """Index `source` into `index_dir` (see module docstring); returns counts and the manifest."""
    started = time.perf_counter()
    options = options or BuildOptions()
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

    # 2. The existing index (kept when appending, replaced otherwise)
    recover_interrupted_swap(index_dir)
    old: ProvenanceIndex | None = None
    if options.append and (index_dir / "manifest.json").exists():
        old = ProvenanceIndex.open(index_dir)
        _check_append_compatible(old, specs)

    # 3. Staged chunks of an interrupted run
    staging = index_dir.parent / f".{index_dir.name}.partial"
    build_key = {"source": corpus.to_dict(), "specs": {n: s.to_dict() for n, s in specs.items()},
                 "append": options.append, "limit": options.limit}
    done_ids = _open_staging(staging, build_key)
    resumed = len(done_ids)
    known_ids = set(old.ids) if old is not None else set()

    # 4. Embed everything new, staging a chunk every `chunk_size` items
    writer = _ChunkWriter(staging, start=len(list(staging.glob("chunk-*.npz"))))
    n_added, n_skipped = resumed, 0
    for batch in _prepared_batches(read_corpus(corpus, options.limit), models, options, skip=done_ids | known_ids):
        ready = [p for p in batch if isinstance(p, _Prepared)]
        skips = [s for s in batch if isinstance(s, _Skip)]
        for s in skips:
            logger.warning("skipped %s: %s", s.id, s.reason)
        vectors = _embed(models, ready)
        writer.add(ready, vectors, skips)
        n_added += len(ready)
        n_skipped += len(skips)
        if writer.pending >= options.chunk_size:
            writer.flush()
        if progress:
            progress(n_added, n_skipped)
    writer.flush()

    # 5. Assemble old + staged, write the new index, swap it in, drop the staging area
    contents = _assemble(old, staging, specs, load_args)
    manifest_extra = {
        "source": corpus.to_dict(),
        "builds": (old.manifest.get("builds", []) if old else [])
        + [{"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": corpus.to_dict(),
            "added": n_added, "skipped": n_skipped, "append": options.append}],
    }
    manifest = write_index(index_dir, contents, manifest_extra, options.memory_budget_bytes, options.use_gpu)
    shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(index_dir, manifest, n_added, resumed, len(old) if old else 0, n_skipped,
                       time.perf_counter() - started)


def _check_append_compatible(old: ProvenanceIndex, specs: dict[str, DescriptorSpec]) -> None:
    if set(old.specs) != set(specs):
        raise IndexMismatchError(
            f"cannot append to {old.dir}: it has descriptors {sorted(old.specs)} but this build computes "
            f"{sorted(specs)}; use the same --descriptors"
        )
    for name, spec in specs.items():
        check_same_model(old.specs[name], spec)


# ------------------------------------------------------------------------- decode + preprocess


def _prepare(item: CorpusItem, models: dict[str, Any], options: BuildOptions) -> _Prepared | _Skip:
    """Worker-thread work for one item: decode, preprocess for every model, make a thumbnail."""
    if item.error or item.data is None:
        return _Skip(item.id, item.source, item.error or "no image data", "missing")
    try:
        decoded = decode_image(item.data, item.source or item.id, options.max_pixels)
        inputs = {n: m.preprocess(decoded.image) for n, m in models.items()}
    except DecompressionBombError as e:
        return _Skip(item.id, item.source, str(e), "decompression_bomb")
    except UnreadableImageError as e:
        return _Skip(item.id, item.source, str(e), "unreadable")
    except Exception as e:  # noqa: BLE001 - one bad image must not stop a million-image build
        return _Skip(item.id, item.source, f"{type(e).__name__}: {e}", "error")
    thumb = _thumbnail(decoded.image) if options.thumbnails else None
    row = {"id": item.id, "caption": item.caption, "source": item.source, "license": item.license,
           "width": decoded.width, "height": decoded.height, "sha256": decoded.sha256, "extra": item.extra}
    return _Prepared(row, inputs, thumb)


def _thumbnail(image) -> bytes:
    from PIL import Image

    im = image.copy()
    im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _prepared_batches(items: Iterator[CorpusItem], models: dict[str, Any], options: BuildOptions,
                      skip: set[str]) -> Iterator[list[_Prepared | _Skip]]:
    """Batches of prepared items; the next batch is decoded while the caller embeds the current one."""
    seen: set[str] = set()

    def fresh() -> Iterator[CorpusItem]:
        for it in items:
            if it.id in skip or it.id in seen:
                if it.id in seen:
                    logger.warning("duplicate id %s in the corpus: keeping the first", it.id)
                continue
            seen.add(it.id)
            yield it

    source = fresh()
    with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="decode") as pool:
        def submit_batch() -> list[Future]:
            futures = []
            for it in source:
                futures.append(pool.submit(_prepare, it, models, options))
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


# --------------------------------------------------------------------------------- staging area


def _open_staging(staging: Path, build_key: dict[str, Any]) -> set[str]:
    """Ids already embedded by an interrupted run with the same settings (others are discarded)."""
    key_path = staging / "build.json"
    if staging.exists():
        try:
            same = json.loads(key_path.read_text(encoding="utf-8")) == json.loads(json.dumps(build_key))
        except (OSError, json.JSONDecodeError):
            same = False
        if not same:
            logger.warning("discarding a partial build at %s made with other settings", staging)
            shutil.rmtree(staging)
    if not staging.exists():
        staging.mkdir(parents=True)
        key_path.write_text(json.dumps(build_key), encoding="utf-8")
        return set()
    done: set[str] = set()
    for chunk in sorted(staging.glob("chunk-*.npz")):
        meta = _read_chunk_meta(chunk)
        done.update(r["id"] for r in meta["rows"])
        done.update(s["id"] for s in meta["skipped"])
    logger.info("resuming: %d items already staged in %s", len(done), staging)
    return done


def _read_chunk_meta(chunk: Path) -> dict[str, Any]:
    with np.load(chunk, allow_pickle=False) as z:
        return json.loads(bytes(z["meta"]).decode("utf-8"))


class _ChunkWriter:
    def __init__(self, staging: Path, start: int):
        self.staging = staging
        self.next = start
        self._reset()

    def _reset(self) -> None:
        self.rows: list[dict] = []
        self.skips: list[dict] = []
        self.thumbs: list[bytes | None] = []
        self.vectors: dict[str, list[np.ndarray]] = {}

    @property
    def pending(self) -> int:
        return len(self.rows) + len(self.skips)

    def add(self, ready: list[_Prepared], vectors: dict[str, np.ndarray], skips: list[_Skip]) -> None:
        self.rows += [p.row for p in ready]
        self.thumbs += [p.thumbnail for p in ready]
        self.skips += [s.to_dict() for s in skips]
        for name, x in vectors.items():
            self.vectors.setdefault(name, []).append(x)

    def flush(self) -> None:
        if not self.pending:
            return
        thumbs = [t or b"" for t in self.thumbs]
        arrays = {f"v_{n}": np.concatenate(xs) for n, xs in self.vectors.items()}
        meta = {"rows": self.rows, "skipped": self.skips, "thumb_sizes": [len(t) for t in thumbs]}
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode("utf-8"), dtype=np.uint8)
        arrays["thumbs"] = np.frombuffer(b"".join(thumbs), dtype=np.uint8)
        path = self.staging / f"chunk-{self.next:06d}.npz"
        tmp = self.staging / f".chunk-{self.next:06d}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # a chunk is either fully there or absent
        self.next += 1
        self._reset()


def _assemble(old: ProvenanceIndex | None, staging: Path, specs: dict[str, DescriptorSpec],
              load_args: dict[str, Any]) -> IndexContents:
    rows: list[dict[str, Any]] = []
    thumbs: list[bytes | None] = []
    skipped: list[dict[str, Any]] = []
    parts: dict[str, list[np.ndarray]] = {n: [] for n in specs}
    if old is not None:
        rows += old.rows()
        thumbs += old.all_thumbnails()  # one open, not one per item
        skipped += old.skipped()
        for n in specs:
            parts[n].append(np.asarray(old.vectors(n)))
    for chunk in sorted(staging.glob("chunk-*.npz")):
        with np.load(chunk, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
            blob = bytes(z["thumbs"])
            for n in specs:
                if meta["rows"]:
                    parts[n].append(z[f"v_{n}"])
        rows += meta["rows"]
        skipped += meta["skipped"]
        pos = 0
        for size in meta["thumb_sizes"]:
            thumbs.append(blob[pos:pos + size] or None)
            pos += size
    vectors = {}
    for n, xs in parts.items():
        if xs:
            vectors[n] = np.concatenate(xs)
        else:
            dim = 32 if n == "pdq" else specs[n].dim
            vectors[n] = np.zeros((0, dim), dtype=np.uint8 if n == "pdq" else np.float16)
    return IndexContents(rows, vectors, specs, load_args, thumbs, skipped)
