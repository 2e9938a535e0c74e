"""The on-disk index (`indexes/<name>/`): a manifest over immutable parts, tombstones, one writer at a time.

Layout (format 2):
  manifest.json        format version, descriptors (model id, checksum, dim, load args), counts, source, builds, and
                       the size and sha256 of each small file below: its size does not grow with the corpus
  parts-<gen>.json     the ordered part list (name, rows, skips, caption tokens): global row g is row g - start(p)
                       of the part p whose range holds it. Read on first use, not on open
  tombstones.jsonl     removed items (id, part, row, time), honoured by every search; `compact` drops them
  lookup-<gen>/        every part's sorted id and sha256 hashes merged (one binary search per lookup), written by
                       builds and `compact`; parts appended since are searched one by one
  ann-<gen>/           for indexes of MERGED_ANN_MIN_ROWS rows or more in several parts: one IVF index per descriptor
                       over the parts it covers, its lists merged in one memory-mapped file (`provenance.merged_ann`);
                       written by builds and `compact`, extended (no retraining) by appends; parts it does not cover
                       are searched one by one
  .lock                the writer lock (`provenance.locking`): build, append, remove, compact, upgrade
  parts/<name>/        one part per input shard or chunk of items (`provenance.parts` describes its files)

Part folders are never modified. A build or an append writes new part folders, then commits: a new part list
and lookup, then manifest.json by rename. A part folder the manifest does not list is an interrupted build's work
(adopted by its resume) or garbage (deleted by the next writer).

Opening reads manifest.json and the tombstones only, so it costs the same at 10M items as at 10k
(bench/bench_index_open.py); no part file is touched until a search, a lookup or a row read needs it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from provenance.captions import CaptionLimits, CaptionTerm, caption_terms, sqlite_time_budget
from provenance.consent.types import stored_consent
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import (
    DescriptorUnavailableError,
    IndexFormatError,
    IndexNotFoundError,
    ItemNotFoundError,
)
from provenance.locking import IndexWriteLock
from provenance.parts import (
    FTS_TOKENIZE,
    TMP_PREFIX,
    PartReader,
    PartWriter,
    RowReader,
    VerifyProblem,
    atomic_write_text,
    file_sha256,
    fsync_dir,
    read_marker,
    vectors_file,
    verify_part,
)
from provenance.types import CaptionHit, Match

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "IndexContents", "ProvenanceIndex", "RowReader", "vectors_file", "write_index"]

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PARTS = "parts"
TOMBSTONES = "tombstones.jsonl"
VECTOR_NAMES = ("sscd", "clip", "clip_text", "pdq")
DEFAULT_PART_SIZE = 10_000  # items per part for folders and datasets (img2dataset's default shard size)
CAPTION_CANDIDATES = 200  # over all parts (at least k per part), before the global BM25 re-scoring (`search_caption`)
BM25_K1, BM25_B = 1.2, 0.75  # FTS5's bm25() constants
_V1_FILES = ("metadata.parquet", "captions.sqlite", "thumbnails.bin", "skipped.jsonl")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _tool_version() -> str:
    from provenance import __version__

    return __version__


def vector_dims(specs: dict[str, DescriptorSpec]) -> dict[str, int]:
    """Descriptor name -> stored row width: the embedding dim, or 32 bytes for PDQ's 256 bits."""
    return {n: (s.dim // 8 if n == "pdq" else s.dim) for n, s in specs.items()}


def next_part_seq(index_dir: Path, manifest: dict[str, Any] | None) -> int:
    """The next part number: past the manifest's counter and every part folder on disk (listed or not)."""
    d = index_dir / PARTS
    seqs = [int(p.name[:6]) for p in d.iterdir() if p.name[:6].isdigit()] if d.is_dir() else []
    return max([int((manifest or {}).get("next_part", 0)) - 1, *seqs, -1]) + 1


def part_name(seq: int, unit: str | None) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(unit).stem if unit else "items")[:80] or "items"
    return f"{seq:06d}-{label}"


# ------------------------------------------------------------------------------- manifest


def read_manifest(index_dir: Path, with_parts: bool = True) -> dict[str, Any]:
    path = index_dir / MANIFEST
    if not path.exists():
        raise IndexNotFoundError(
            f"no index at {index_dir} (no {MANIFEST}); build one with `provenance index build SOURCE --index {index_dir}`"
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable manifest ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == 1:
        raise IndexFormatError(
            f"{index_dir} is a format-1 index (one set of files, before parts); convert it in place, keeping every "
            f"vector, with `provenance index upgrade {index_dir}`, or rebuild it with "
            f"`provenance index build SOURCE --index {index_dir}`"
        )
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"{index_dir}: index format {version} but this tool reads {FORMAT_VERSION}; rebuild it")
    if with_parts:
        load_part_list(index_dir, manifest)
    return manifest


def load_part_list(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Put the part list (`parts-<gen>.json`, checked against the manifest's size and sha256) into the manifest:
    manifest["parts"], and manifest["lookup"]["covers"]. A no-op when it is already there."""
    if "parts" in manifest:
        return
    ref = manifest.get("parts_list") or {}
    path = index_dir / ref.get("file", "")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexFormatError(
            f"{index_dir.name}/{ref.get('file')}: the manifest's part list is unreadable ({e.strerror or e}); if the "
            "index was rewritten since it was opened (compact, build), open it again"
        ) from None
    if len(data) != ref.get("size") or file_sha256_bytes(data) != ref.get("sha256"):
        raise IndexFormatError(
            f"{index_dir.name}/{ref.get('file')}: does not match the manifest's size and sha256; "
            "run `provenance index verify` on the index"
        )
    listing = json.loads(data)
    manifest["parts"] = listing["parts"]
    if manifest.get("lookup") is not None:
        manifest["lookup"]["covers"] = listing.get("lookup_covers", [])
    if manifest.get("ann") is not None:
        manifest["ann"]["covers"] = listing.get("ann_covers", [])


PART_LIST_PREFIX = "parts-"


def commit_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Recount and atomically replace the manifest: the moment a build, append, removal or compaction lands.

    The part list (one entry per part) goes to a new `parts-<gen>.json` first, and manifest.json, which names it
    with its size and sha256, replaces the old one by rename: opening reads manifest.json only, whose size does
    not grow with the corpus; the part list is read on first use. The previous list is kept for readers that
    opened the previous manifest; older ones are deleted."""
    parts = manifest["parts"]
    removed = int(manifest.get("tombstones", {}).get("count", 0))
    by_reason: dict[str, int] = {}
    for p in parts:
        for r, c in (p.get("skipped_by_reason") or {}).items():
            by_reason[r] = by_reason.get(r, 0) + c
    rows = sum(p["n"] for p in parts)
    manifest["counts"] = {
        "indexed": rows - removed,
        "rows": rows,
        "removed": removed,
        "skipped": sum(p.get("skipped", 0) for p in parts),
        "skipped_by_reason": by_reason,
        "parts": len(parts),
    }
    manifest["updated_at"] = _now()
    on_disk = [
        int(p.name[len(PART_LIST_PREFIX) : -5])
        for p in index_dir.glob(f"{PART_LIST_PREFIX}*.json")
        if p.name[len(PART_LIST_PREFIX) : -5].isdigit()
    ]
    gen = max([int((manifest.get("parts_list") or {}).get("gen", -1)), *on_disk]) + 1
    lookup = manifest.get("lookup")
    merged = manifest.get("ann")
    listing = json.dumps(
        {
            "parts": parts,
            "lookup_covers": (lookup or {}).get("covers", []),
            "ann_covers": (merged or {}).get("covers", []),
        },
        default=str,
    )
    name = f"{PART_LIST_PREFIX}{gen:06d}.json"
    atomic_write_text(index_dir / name, listing)
    data = listing.encode("utf-8")
    manifest["parts_list"] = {"file": name, "gen": gen, "size": len(data), "sha256": file_sha256_bytes(data)}
    head = {k: v for k, v in manifest.items() if k != "parts"}
    if lookup is not None:
        head["lookup"] = {k: v for k, v in lookup.items() if k != "covers"}
    if merged is not None:
        head["ann"] = {k: v for k, v in merged.items() if k != "covers"}
    atomic_write_text(index_dir / MANIFEST, json.dumps(head, indent=1, default=str))
    fsync_dir(index_dir)
    for g in on_disk:
        if g < gen - 1:
            (index_dir / f"{PART_LIST_PREFIX}{g:06d}.json").unlink(missing_ok=True)


def new_manifest(
    index_dir: Path, specs: dict[str, DescriptorSpec], load_args: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    descriptors = {}
    for name, spec in specs.items():
        entry: dict[str, Any] = {**spec.to_dict(), "vectors": vectors_file(name)}
        if load_args.get(name):
            entry["load"] = load_args[name]
        descriptors[name] = entry
    return {
        "format_version": FORMAT_VERSION,
        "tool_version": _tool_version(),
        "name": index_dir.name,
        "built_at": _now(),
        "descriptors": descriptors,
        "parts": [],
        "next_part": 0,
        "tombstones": {"file": TOMBSTONES, "count": 0},
        **(extra or {}),
    }


def part_entry(marker: dict[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of a part: enough to place its rows and count, without opening it."""
    return {
        "name": marker["name"],
        "n": marker["n"],
        "skipped": marker["skipped"],
        "skipped_by_reason": marker.get("skipped_by_reason") or {},
        "unit": marker.get("unit"),
        "caption_tokens": marker.get("caption_tokens", 0),
    }


def specs_of(manifest: dict[str, Any]) -> dict[str, DescriptorSpec]:
    return {n: DescriptorSpec.from_dict(d) for n, d in manifest["descriptors"].items()}


def remove_unlisted_parts(index_dir: Path, manifest: dict[str, Any], keep: frozenset[str] = frozenset()) -> None:
    """Delete part folders the manifest does not list (replaced, compacted, interrupted): writers only."""
    listed = {p["name"] for p in manifest["parts"]} | set(keep)
    parts_dir = index_dir / PARTS
    if not parts_dir.is_dir():
        return
    for d in parts_dir.iterdir():
        if d.is_dir() and d.name not in listed:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------- merged lookups

LOOKUP_PREFIX = "lookup-"


def write_merged_lookup(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Merge every listed part's sorted id and sha256 hashes into one sorted array each (`lookup-<gen>/`), so
    that a lookup is one binary search instead of one per part. Written by builds and `compact`; an append
    leaves it as it is (its new parts are searched one by one until the next compact).

    Files: {ids,sha}.u64.npy (n,) uint64 sorted hashes; {ids,sha}.loc.npy (n,) uint64 part number << 32 | row.
    Building it holds 16 bytes per item in memory (160 MB at 10M) for the sort.
    """
    on_disk = [
        int(d.name[len(LOOKUP_PREFIX) :])
        for d in index_dir.glob(f"{LOOKUP_PREFIX}*")
        if d.name[len(LOOKUP_PREFIX) :].isdigit()
    ]
    gen = max([int((manifest.get("lookup") or {}).get("gen", -1)), *on_disk]) + 1  # never a live one's name
    d = index_dir / f"{LOOKUP_PREFIX}{gen:06d}"
    tmp = index_dir / f"{TMP_PREFIX}{d.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    covers = []
    for kind in ("ids", "sha"):
        hashes, locs = [], []
        for e in manifest["parts"]:
            if not e["n"]:
                continue
            seq = int(e["name"][:6])
            pd = index_dir / PARTS / e["name"]
            hashes.append(np.load(pd / f"{kind}.u64.npy"))
            locs.append((np.uint64(seq) << np.uint64(32)) | np.load(pd / f"{kind}.row.npy").astype(np.uint64))
            if kind == "ids":
                covers.append(seq)
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        loc = np.concatenate(locs) if locs else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")
        np.save(tmp / f"{kind}.u64.npy", h[order])
        np.save(tmp / f"{kind}.loc.npy", loc[order])
        del h, loc, order
    files = {}
    for f in sorted(tmp.iterdir()):
        files[f.name] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(d, ignore_errors=True)
    os.rename(tmp, d)
    fsync_dir(index_dir)
    manifest["lookup"] = {"dir": d.name, "gen": gen, "covers": covers, "files": files}


def remove_unlisted_lookups(index_dir: Path, manifest: dict[str, Any]) -> None:
    keep = (manifest.get("lookup") or {}).get("dir")
    for d in [*index_dir.glob(f"{LOOKUP_PREFIX}*"), *index_dir.glob(f"{TMP_PREFIX}{LOOKUP_PREFIX}*")]:
        if d.is_dir() and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------- merged ANN

ANN_PREFIX = "ann-"
# Below this many rows the parts' own indexes are searched (each exact or nearly so, and few); at or above it, and
# with more than one part, a merged IVF index is written (provenance.merged_ann). Tests lower it.
MERGED_ANN_MIN_ROWS = 200_000
MERGED_ANN_NPROBE: int | None = None  # None: merged_ann.plan_merged's rule (~SCAN_ROWS rows); tests set it to nlist


def _ann_dirs(index_dir: Path) -> list[int]:
    return [
        int(d.name[len(ANN_PREFIX) :]) for d in index_dir.glob(f"{ANN_PREFIX}*") if d.name[len(ANN_PREFIX) :].isdigit()
    ]


def write_merged_ann(
    index_dir: Path,
    manifest: dict[str, Any],
    *,
    append: bool = False,
    run_tasks: Callable[[list[Callable[[], Any]]], list[Any]] | None = None,
) -> None:
    """Write `ann-<gen>/`: per descriptor a merged IVF index over every listed part (manifest["ann"] names it).

    append=True (an append's commit): when a merged index exists, its template is reused (no k-means) and only
    the parts it does not cover are encoded, then merged with its lists into a new file; the covered rows must
    not have grown past RETRAIN_GROWTH times the trained ones, else it is rebuilt. Without a merged index an
    append leaves it absent (the new parts are searched one by one until the next build or compact).
    Indexes under MERGED_ANN_MIN_ROWS rows or of one part get none (and lose an old one).
    run_tasks: runs the per-part encodings (independent, picklable calls) and returns their results, e.g. as Ray
    tasks (`provenance.ray_engine`); None runs them here, one after another.
    """
    from provenance import merged_ann as ma

    old: dict[str, Any] | None = manifest.get("ann")
    live = [e for e in manifest["parts"] if e["n"]]
    rows = sum(int(e["n"]) for e in live)
    if rows < MERGED_ANN_MIN_ROWS or len(live) < 2:
        manifest.pop("ann", None)
        return
    if append and old is None:
        return
    listed = {int(e["name"][:6]) for e in live}
    old_covers = set(int(s) for s in (old or {}).get("covers", []))
    incremental = (
        old is not None
        and append
        and old_covers <= listed
        and rows <= ma.RETRAIN_GROWTH * int(old.get("trained_rows", 0))
    )
    gen = max([int((old or {}).get("gen", -1)), *_ann_dirs(index_dir)]) + 1
    d = index_dir / f"{ANN_PREFIX}{gen:06d}"
    tmp = index_dir / f"{TMP_PREFIX}{d.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    specs = specs_of(manifest)
    dims = vector_dims(specs)
    plans: dict[str, Any] = {}
    todo = [e for e in live if not incremental or int(e["name"][:6]) not in old_covers]
    for name, dim in dims.items():
        metric = "hamming" if name == "pdq" else "ip"
        vec = vectors_file(name)
        template = tmp / f"template.{name}.faiss"
        if incremental:
            assert old is not None  # incremental implies an old merged index
            plan = ma.MergedPlan.from_dict(old["descriptors"][name])
            os.link(index_dir / old["dir"] / template.name, template)  # the trained quantizer, unchanged
            sources = [index_dir / old["dir"] / f"{name}.faiss"]
        else:
            plan = ma.plan_merged(rows, dim * 8 if metric == "hamming" else dim, metric, MERGED_ANN_NPROBE)
            arrays = [np.load(index_dir / PARTS / e["name"] / vec, mmap_mode="r") for e in live]
            ma.train_template(arrays, plan, template)
            del arrays
            sources = []
        jobs: list[Callable[[], Any]] = []
        for e in todo:  # one independent task per part
            out = tmp / f"codes.{e['name']}.{name}.faiss"
            vectors = index_dir / PARTS / e["name"] / vec
            jobs.append(functools.partial(ma.add_part_codes, template, vectors, int(e["name"][:6]), out, metric))
            sources.append(out)
        if run_tasks is not None:
            run_tasks(jobs)
        else:
            for job in jobs:
                job()
        ma.merge_lists(template, sources, tmp / f"{name}.faiss", tmp / f"{name}.ivfdata", metric)
        ma.remove_files([s for s in sources if s.parent == tmp])
        plans[name] = plan.to_dict()
    files = {}
    for f in sorted(tmp.iterdir()):
        files[f.name] = {"size": f.stat().st_size}  # sizes only: hashing GBs of lists at every commit costs minutes
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, d)
    fsync_dir(index_dir)
    manifest["ann"] = {
        "dir": d.name,
        "gen": gen,
        "covers": sorted(listed),
        "descriptors": plans,
        "files": files,
        "trained_rows": int(old["trained_rows"]) if old is not None and incremental else rows,
    }


def remove_unlisted_anns(index_dir: Path, manifest: dict[str, Any]) -> None:
    keep = (manifest.get("ann") or {}).get("dir")
    for d in [*index_dir.glob(f"{ANN_PREFIX}*"), *index_dir.glob(f"{TMP_PREFIX}{ANN_PREFIX}*")]:
        if d.is_dir() and d.name != keep:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------- tombstones


def read_tombstones(index_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    meta = manifest.get("tombstones") or {}
    if not meta.get("count"):
        return []
    path = index_dir / meta.get("file", TOMBSTONES)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IndexFormatError(
            f"{path}: the manifest lists {meta['count']} removed items but the file is "
            f"unreadable ({e.strerror or e}); run `provenance index verify {index_dir}`"
        ) from None
    if meta.get("size") is not None and (len(data) != meta["size"] or file_sha256_bytes(data) != meta.get("sha256")):
        raise IndexFormatError(
            f"{path}: does not match the manifest's size and sha256 (corrupted); "
            f"run `provenance index verify {index_dir}`"
        )
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]


def file_sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def write_tombstones(index_dir: Path, manifest: dict[str, Any], records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if records:
        atomic_write_text(index_dir / TOMBSTONES, text)
    elif (index_dir / TOMBSTONES).exists():
        (index_dir / TOMBSTONES).unlink()
    data = text.encode("utf-8")
    manifest["tombstones"] = {
        "file": TOMBSTONES,
        "count": len(records),
        "size": len(data),
        "sha256": file_sha256_bytes(data),
    }


# ------------------------------------------------------------------------------- writing a whole index


@dataclass
class IndexContents:
    """Everything a small index holds, in memory, for `write_index` (tests, synthetic benchmarks)."""

    rows: list[dict[str, Any]]  # metadata rows (id, caption, source, license, width, height, sha256, extra)
    vectors: dict[str, np.ndarray]  # name -> (n, d) float16 / (n, 32) uint8
    specs: dict[str, DescriptorSpec]  # descriptor specs ("clip_text" shares clip's spec)
    load_args: dict[str, dict[str, Any]]
    thumbnails: list[bytes | None]
    skipped: list[dict[str, Any]]


def write_index(
    index_dir: Path,
    contents: IndexContents,
    manifest_extra: dict[str, Any],
    memory_budget_bytes: int = 1 << 30,
    use_gpu: bool | None = None,
    part_size: int | None = None,
) -> dict[str, Any]:
    """Write `contents` as a new index at `index_dir` (replacing any), in parts of `part_size` rows (default: one)."""
    index_dir = Path(index_dir)
    n = len(contents.rows)
    for name, x in contents.vectors.items():
        if len(x) != n:
            raise IndexFormatError(f"{name}: {len(x)} vectors for {n} items")
    with IndexWriteLock(index_dir, action="write"):
        manifest = new_manifest(index_dir, contents.specs, contents.load_args, manifest_extra)
        manifest["next_part"] = next_part_seq(index_dir, None)
        size = part_size or max(n, 1)
        dims = vector_dims(contents.specs)
        for start in range(0, max(n, 1), size):
            end = min(n, start + size)
            w = PartWriter(index_dir / PARTS, part_name(manifest["next_part"], None), dims)
            manifest["next_part"] += 1
            try:
                w.add(
                    contents.rows[start:end],
                    {k: v[start:end] for k, v in contents.vectors.items()},
                    contents.thumbnails[start:end],
                    contents.skipped if start == 0 else [],
                )
            except BaseException:
                w.abort()
                raise
            manifest["parts"].append(part_entry(w.finish(memory_budget_bytes, use_gpu, contents.specs)))
        _commit_rewritten(index_dir, manifest)
    return manifest


def _remove_v1_files(index_dir: Path) -> None:
    for f in list(_V1_FILES) + [p.name for p in index_dir.glob("*.npy")] + [p.name for p in index_dir.glob("*.faiss")]:
        with contextlib.suppress(FileNotFoundError):
            (index_dir / f).unlink()


# ------------------------------------------------------------------------------------ reading


class _LazyParts:
    """The index's parts as a sequence of PartReaders, each made on first access."""

    def __init__(self, parts_dir: Path, entries: list[dict[str, Any]]):
        self._dir = parts_dir
        self._entries = entries
        self._readers: list[PartReader | None] = [None] * len(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> PartReader:
        r = self._readers[i]
        if r is None:
            e = self._entries[i]
            r = self._readers[i] = PartReader(self._dir / e["name"], int(e["n"]))
        return r

    def __iter__(self) -> Iterator[PartReader]:
        return (self[i] for i in range(len(self)))


@dataclass
class _Layout:
    """What the part list gives: readers, global row starts, removed rows per part, the merged lookup's cover."""

    parts: _LazyParts
    starts: np.ndarray  # (n_parts + 1,) int64: global row of each part's first row
    removed: dict[int, np.ndarray]  # part index -> sorted removed rows
    part_of_seq: dict[int, int]
    unmerged: list[int]  # parts the merged lookup does not cover (appended since)
    unmerged_set: set[int]
    caption_tokens: int  # over every part (BM25's average caption length)
    ann_covered: list[int] = field(default_factory=list)  # parts the merged ANN covers (their vectors are in it)

    @classmethod
    def of(cls, index_dir: Path, manifest: dict[str, Any], tombstones: list[dict[str, Any]]) -> _Layout:
        entries = manifest["parts"]
        starts = np.concatenate([[0], np.cumsum([int(e["n"]) for e in entries], dtype=np.int64)])
        part_of = {e["name"]: i for i, e in enumerate(entries)}
        removed: dict[int, list[int]] = {}
        for t in tombstones:
            if t["part"] in part_of:
                removed.setdefault(part_of[t["part"]], []).append(int(t["row"]))
        lk = manifest.get("lookup") or {}
        covered = {int(s) for s in lk.get("covers", [])}
        unmerged = [i for i, e in enumerate(entries) if int(e["name"][:6]) not in covered]
        ann_covers = {int(s) for s in (manifest.get("ann") or {}).get("covers", [])}
        return cls(
            _LazyParts(index_dir / PARTS, entries),
            starts,
            {pi: np.array(sorted(rs), dtype=np.int64) for pi, rs in removed.items()},
            {int(e["name"][:6]): i for i, e in enumerate(entries)},
            unmerged,
            set(unmerged),
            sum(int(e.get("caption_tokens", 0)) for e in entries),
            [i for i, e in enumerate(entries) if int(e["name"][:6]) in ann_covers],
        )


class ProvenanceIndex:
    """A built index opened for search. Opening reads the manifest and tombstones; parts open on first use."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], use_gpu: bool | None = None):
        self.dir = Path(index_dir)
        self._manifest = manifest  # without its part list until something needs the parts
        self.specs = specs_of(manifest)
        self._use_gpu = use_gpu
        self._tombstones = read_tombstones(self.dir, manifest)
        self._removed_ids = {t["id"] for t in self._tombstones}
        self._lock = threading.Lock()
        lk = manifest.get("lookup") or {}
        self._lookup_dir = self.dir / lk["dir"] if lk.get("dir") else None
        self._lookup_files = lk.get("files") or {}
        self._merged: dict[str, np.ndarray] = {}
        self._layout: _Layout | None = None
        self._anns: dict[str, Any] = {}  # descriptor -> (merged index, MergedPlan), loaded on first search

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], use_gpu: bool | None = None) -> ProvenanceIndex:
        """Read manifest.json and the tombstones: nothing that grows with the corpus (see module docstring)."""
        index_dir = Path(index_dir)
        return cls(index_dir, read_manifest(index_dir, with_parts=False), use_gpu=use_gpu)

    @property
    def manifest(self) -> dict[str, Any]:
        """The whole manifest, its part list included (read on first use)."""
        self._lay  # noqa: B018
        return self._manifest

    @property
    def _lay(self) -> _Layout:
        if self._layout is None:
            with self._lock:
                if self._layout is None:
                    load_part_list(self.dir, self._manifest)
                    self._layout = _Layout.of(self.dir, self._manifest, self._tombstones)
        return self._layout

    @property
    def parts(self) -> _LazyParts:
        return self._lay.parts

    @property
    def _starts(self) -> np.ndarray:
        return self._lay.starts

    @property
    def _removed(self) -> dict[int, np.ndarray]:
        return self._lay.removed

    @property
    def _part_of_seq(self) -> dict[int, int]:
        return self._lay.part_of_seq

    @property
    def _unmerged(self) -> list[int]:
        return self._lay.unmerged

    @property
    def _unmerged_set(self) -> set[int]:
        return self._lay.unmerged_set

    def __len__(self) -> int:
        """Live items (rows less removed ones), from the manifest's counts."""
        return int(self._manifest["counts"]["indexed"])

    @property
    def n_rows(self) -> int:
        return int(self._manifest["counts"]["rows"])

    @property
    def descriptor_names(self) -> list[str]:
        return list(self.specs)

    def load_args(self, name: str) -> dict[str, Any]:
        return dict(self.manifest["descriptors"][name].get("load") or {})

    def locate(self, global_row: int) -> tuple[int, int]:
        """(part index, row in the part) of a global row number."""
        if not 0 <= global_row < self.n_rows:
            raise IndexError(f"row {global_row} out of range [0, {self.n_rows})")
        pi = int(np.searchsorted(self._starts, global_row, "right")) - 1
        return pi, int(global_row - self._starts[pi])

    def is_removed(self, pi: int, row: int) -> bool:
        rs = self._removed.get(pi)
        if rs is None:
            return False
        j = int(np.searchsorted(rs, row))
        return j < len(rs) and int(rs[j]) == row

    # -- lookups: per-part sorted hash arrays, no dict of the corpus

    def _merged_array(self, fname: str) -> np.ndarray | None:
        if self._lookup_dir is None:
            return None
        arr = self._merged.get(fname)
        if arr is None:
            path = self._lookup_dir / fname
            rec = self._lookup_files.get(fname)
            try:
                size = path.stat().st_size
                if rec is not None and size != rec["size"]:
                    raise IndexFormatError(f"{path}: {size} bytes, the manifest says {rec['size']}")
                arr = self._merged[fname] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(
                    f"{path}: unreadable merged lookup ({e}); run `provenance index compact "
                    f"--index {self.dir}` to rewrite it"
                ) from None
        return arr

    def _merged_candidates(self, kind: str, h: int) -> list[tuple[int, int]]:
        """(part index, row) of merged-lookup entries with hash h, in listed parts (others were replaced)."""
        hashes = self._merged_array(f"{kind}.u64.npy")
        if hashes is None or not len(hashes):
            return []
        lo = int(np.searchsorted(hashes, np.uint64(h), "left"))
        hi = int(np.searchsorted(hashes, np.uint64(h), "right"))
        out = []
        locs = self._merged_array(f"{kind}.loc.npy")
        assert locs is not None  # written beside the hashes
        for loc in np.asarray(locs[lo:hi]).tolist():
            pi = self._part_of_seq.get(loc >> 32)
            if pi is not None and pi not in self._unmerged_set:
                out.append((pi, loc & 0xFFFFFFFF))
        return out

    def _probe_order(self) -> list[int]:
        """Parts to probe one by one: all without a merged lookup, else those it does not cover."""
        return list(range(len(self.parts))) if self._lookup_dir is None else self._unmerged

    def _locations_of_id(self, item_id: str) -> list[tuple[int, int]]:
        from provenance.parts import id_hash

        found = [
            (pi, r)
            for pi, r in self._merged_candidates("ids", int(id_hash([item_id])[0]))
            if self.parts[pi].column_value(r, "id") == item_id
        ]
        for pi in reversed(self._probe_order()):
            if len(self.parts[pi]):
                found += [(pi, r) for r in self.parts[pi].rows_of_id(item_id)]
        return found

    def find(self, item_id: str) -> tuple[int, int] | None:
        """(part index, row) of a live item, or None: one binary search in the merged lookup, plus one per part
        it does not cover (appended since the last build or compact)."""
        if item_id in self._removed_ids:
            return None
        for pi, r in self._locations_of_id(item_id):
            if not self.is_removed(pi, r):
                return pi, r
        return None

    def row(self, item_id: str) -> int:
        """The item's global row number; ItemNotFoundError if the index does not hold it (or it was removed)."""
        loc = self.find(item_id)
        if loc is None:
            raise ItemNotFoundError(f"no item {item_id!r} in the index at {self.dir}")
        return int(self._starts[loc[0]]) + loc[1]

    def contains_ids(self, ids: list[str]) -> np.ndarray:
        """(len(ids),) bool: which ids the index holds (removed ones included: an append must not bring them back)."""
        from provenance.parts import id_hash

        hashes = id_hash(ids)
        hit = np.zeros(len(ids), bool)
        merged = self._merged_array("ids.u64.npy")
        if merged is not None and len(merged):
            pos = np.minimum(np.searchsorted(merged, hashes), len(merged) - 1)
            for j in np.flatnonzero(np.asarray(merged[pos]) == hashes):
                hit[j] = any(
                    self.parts[pi].column_value(r, "id") == ids[j]
                    for pi, r in self._merged_candidates("ids", int(hashes[j]))
                )
        for pi in self._probe_order():
            part = self.parts[pi]
            if len(part):
                maybe = part.contains_hashes(hashes) & ~hit
                for j in np.flatnonzero(maybe):
                    hit[j] = bool(part.rows_of_id(ids[j]))
        return hit

    def rows_with_sha256(self, sha: str) -> list[tuple[int, int]]:
        """Live (part, row) pairs of items whose file has this sha256."""
        from provenance.parts import sha_hash

        h = int(sha_hash([sha])[0])
        if not h:
            return []
        out = [
            (pi, r) for pi, r in self._merged_candidates("sha", h) if self.parts[pi].column_value(r, "sha256") == sha
        ]
        for pi in self._probe_order():
            if len(self.parts[pi]):
                out += [(pi, r) for r in self.parts[pi].rows_of_sha256(sha)]
        return sorted((pi, r) for pi, r in out if not self.is_removed(pi, r))

    def id_with_sha256(self, sha: str | None) -> str | None:
        """The id of the first live item whose file has this sha256 (scan's "identical file"), or None."""
        if not sha:
            return None
        rows = self.rows_with_sha256(sha)
        return self.parts[rows[0][0]].column_value(rows[0][1], "id") if rows else None

    def item(self, item_id: str) -> dict[str, Any]:
        loc = self.find(item_id)
        if loc is None:
            raise ItemNotFoundError(f"no item {item_id!r} in the index at {self.dir}")
        rec = self.parts[loc[0]].record(loc[1])
        rec["extra"] = json.loads(rec.get("extra") or "{}")
        rec["has_thumbnail"] = rec.pop("thumb_offset") >= 0
        rec.pop("thumb_size", None)
        return rec

    def thumbnail(self, item_id: str) -> bytes | None:
        """The item's small JPEG thumbnail, or None if none was stored (or no such live item)."""
        loc = self.find(item_id)
        return None if loc is None else self.parts[loc[0]].thumbnail(loc[1])

    # -- whole-corpus reads (tools and benchmarks: O(n), never on open)

    @property
    def ids(self) -> list[str]:
        """Every live item id in global row order. Reads all the metadata: for tools, not for serving."""
        out: list[str] = []
        for pi, part in enumerate(self.parts):
            if not len(part):
                continue
            for start, batch in part.iter_batches():
                ids = batch.column("id").to_pylist()
                if pi in self._removed:
                    keep = self._live_mask(pi, start, len(ids))
                    ids = [i for i, k in zip(ids, keep, strict=False) if k]
                out += ids
        return out

    def _live_mask(self, pi: int, start: int, n: int) -> np.ndarray:
        keep = np.ones(n, bool)
        rs = self._removed.get(pi)
        if rs is not None:
            sel = rs[(rs >= start) & (rs < start + n)] - start
            keep[sel] = False
        return keep

    def vectors(self, name: str) -> np.ndarray:
        """(live items, d) float16 or (.., 32) uint8 in global row order: a memory map for one part without
        removals, else a copy (O(n) memory: for tools such as calibration, not for serving)."""
        if name not in self.specs:
            raise DescriptorUnavailableError(f"the index at {self.dir} has no {name!r} descriptor")
        parts = [(pi, p) for pi, p in enumerate(self.parts) if len(p)]
        if len(parts) == 1 and not self._removed:
            only: np.ndarray = parts[0][1].vectors(name)
            return only
        xs = [p.vectors(name)[self._live_mask(pi, 0, len(p))] for pi, p in parts]
        dim = vector_dims({name: self.specs[name]})[name]
        return np.concatenate(xs) if xs else np.zeros((0, dim), np.uint8 if name == "pdq" else np.float16)

    def sample_captions(self, n: int, seed: int = 0) -> list[str]:
        """Up to n captions of live items drawn at random (rows sampled, not the whole caption column read)."""
        rng = random.Random(seed)
        total = self.n_rows
        rows = rng.sample(range(total), min(total, 4 * n + 64))
        out: list[str] = []
        for g in rows:
            pi, r = self.locate(g)
            if self.is_removed(pi, r):
                continue
            c = self.parts[pi].column_value(r, "caption")
            if c:
                out.append(c)
                if len(out) >= n:
                    break
        return out

    def skipped(self) -> list[dict[str, Any]]:
        return [s for p in self.parts for s in p.skipped()]

    def describe(self) -> dict[str, Any]:
        """The manifest plus, per descriptor, the FAISS plan of its largest part and how many parts use each
        plan (reads every part's marker: `index info`, not search)."""
        m: dict[str, Any] = json.loads(json.dumps(self.manifest))
        big = max(range(len(self.parts)), key=lambda i: len(self.parts[i]), default=None)
        for name, d in m["descriptors"].items():
            counts: dict[str, int] = {}
            for p in self.parts:
                plan = p.marker["descriptors"].get(name, {}).get("ann")
                if plan:
                    counts[plan["factory"]] = counts.get(plan["factory"], 0) + 1
            if big is not None and len(self.parts[big]):
                d["ann"] = self.parts[big].marker["descriptors"][name].get("ann")
            d["ann_parts"] = counts
        return m

    def preload(self, descriptors: list[str] | None = None) -> None:
        """Open every part now: markers (with their file-size checks), FAISS indexes and caption databases, so
        that a server is not ready until its index is usable and a broken file fails the load, naming the file.
        O(parts): for servers, not for the CLI's open. The merged ANN, where there is one, is loaded too."""
        for name in descriptors or list(self.specs):
            self._merged_ann(name)
        for part in self.parts:
            if not len(part):
                part.marker  # noqa: B018 - checks the part's files even when it holds only skips
                continue
            for name in descriptors or list(self.specs):
                part.faiss_index(name, self._use_gpu)
                if part.marker["descriptors"][name]["ann"].get("params", {}).get("rerank_k"):
                    part.row_reader(name)
            part.db()

    # -- search over parts

    def _check_descriptor(self, name: str) -> None:
        if name not in self.specs:
            raise DescriptorUnavailableError(
                f"the index at {self.dir} has no {name!r} descriptor (it has {', '.join(self.specs)}); "
                f"rebuild with --descriptors including {name.split('_')[0]}"
            )

    def search_vectors(self, name: str, xq: np.ndarray, k: int = 10) -> list[list[Match]]:
        """Nearest live corpus items for each query vector, best first, as Matches of descriptor `name`.

        Each part is searched for its k (plus its removed rows) best, and the lists are merged by score (PDQ:
        by Hamming distance) then global row: with exact per-part plans this is one flat search over all rows.
        """
        self._check_descriptor(name)
        nq = len(xq)
        if len(self) == 0 or nq == 0:
            return [[] for _ in range(nq)]
        hamming = name == "pdq"
        scores, dists, grows = [], [], []
        covered: set[int] = set()
        merged = self._merged_ann(name)
        if merged is not None:  # one search of the merged lists for the parts it covers
            covered = set(self._lay.ann_covered)
            S, D, G = self._search_merged(name, merged, xq, k)
            scores.append(S)
            dists.append(D)
            grows.append(G)
        for pi, part in enumerate(self.parts):
            if not len(part) or pi in covered:
                continue
            removed = self._removed.get(pi)
            extra = 0 if removed is None else len(removed)
            nb = part.search(name, xq, k + extra, self._use_gpu)
            assert nb is not None  # a part with rows answers
            ids = nb.ids.copy()
            if removed is not None:
                ids[np.isin(ids, removed)] = -1
            s = np.where(ids < 0, -np.inf, nb.scores)
            scores.append(s)
            dists.append(
                np.where(ids < 0, np.iinfo(np.int32).max, nb.distances)
                if hamming and nb.distances is not None
                else np.zeros_like(ids)
            )
            grows.append(np.where(ids < 0, -1, ids + self._starts[pi]))
        S, D, G = np.concatenate(scores, 1), np.concatenate(dists, 1), np.concatenate(grows, 1)
        descriptor = "clip" if name == "clip_text" else name
        out: list[list[Match]] = []
        for qi in range(nq):
            order = np.lexsort((G[qi], D[qi], -S[qi])) if hamming else np.lexsort((G[qi], -S[qi]))
            matches = []
            for j in order[:k]:
                g = int(G[qi, j])
                if g < 0:
                    break
                pi, r = self.locate(g)
                batch, b = self.parts[pi].batch_of(r)
                matches.append(
                    Match(
                        batch.column("id")[b].as_py(),
                        float(S[qi, j]),
                        descriptor,
                        batch.column("caption")[b].as_py(),
                        batch.column("source")[b].as_py(),
                        int(D[qi, j]) if hamming else None,
                        consent=stored_consent(batch.column("extra")[b].as_py()),
                    )
                )
            out.append(matches)
        return out

    def _merged_ann(self, name: str) -> tuple[Any, Any] | None:
        """(index, MergedPlan) of the merged ANN for `name`, loaded (lists memory-mapped) on first use; None without."""
        meta = self._manifest.get("ann")
        if not meta or name not in meta.get("descriptors", {}):
            return None
        got: tuple[Any, Any] | None = self._anns.get(name)
        if got is None:
            from provenance import merged_ann as ma

            plan = ma.MergedPlan.from_dict(meta["descriptors"][name])
            d = self.dir / meta["dir"]
            for f in (f"{name}.faiss", f"{name}.ivfdata"):
                rec = (meta.get("files") or {}).get(f)
                size = (d / f).stat().st_size if (d / f).is_file() else None
                if rec is None or size != rec["size"]:
                    raise IndexFormatError(
                        f"{meta['dir']}/{f}: missing or not the size the manifest records "
                        f"({size} != {rec and rec['size']}); run `provenance index compact` to rebuild it"
                    )
            try:
                index = ma.load_merged(d / f"{name}.faiss", plan)
            except RuntimeError as e:
                raise IndexFormatError(
                    f"{meta['dir']}/{name}.faiss: unreadable merged index ({str(e).splitlines()[0]})"
                ) from None
            got = self._anns.setdefault(name, (index, plan))
        return got

    def _search_merged(
        self, name: str, merged: tuple[Any, Any], xq: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, hamming distances, global rows), each (nq, k), of the merged ANN's top k live rows."""
        from provenance import merged_ann as ma

        index, plan = merged
        lay = self._lay
        entries = self._manifest["parts"]
        removed = [ma.make_id(int(entries[pi]["name"][:6]), rs) for pi, rs in lay.removed.items()]
        removed_ids = np.concatenate(removed) if removed else None

        def read_rows(ids: np.ndarray) -> np.ndarray:  # (len(ids), d) float16 rows of merged ids, by pread
            seq, row = ma.split_id(ids)
            out = np.empty((len(ids), plan.dim), np.float16)
            for s in np.unique(seq):
                sel = seq == s
                out[sel] = self.parts[lay.part_of_seq[int(s)]].row_reader(name).read_rows(row[sel])
            return out

        xq = np.asarray(xq)
        S, D, ids = ma.search_merged(
            index, plan, xq if name == "pdq" else np.asarray(xq, np.float32), k, removed_ids, read_rows
        )
        seq, row = ma.split_id(np.maximum(ids, 0))
        starts = np.array([lay.starts[lay.part_of_seq.get(int(s), 0)] for s in seq.ravel()], np.int64).reshape(
            ids.shape
        )
        G = np.where(ids < 0, -1, starts + row)
        return S, (D if name == "pdq" else np.zeros_like(G)), G

    def search_caption(self, query: str, k: int = 10, limits: CaptionLimits | None = None) -> list[CaptionHit]:
        """Full-text search of captions: words are ANDed, quotes keep phrases, `word*` is a prefix.

        BM25 scores of separate FTS5 tables are not comparable (each has its own document count, term
        frequencies and average length), so: each part proposes its best (by its own bm25; at least k, and
        CAPTION_CANDIDATES over all parts), and the union is re-scored with FTS5's own BM25 formula over corpus-wide statistics (rows and
        tokens from the manifest, each term's document frequency counted in every part). On one part the
        scores are FTS5's bm25() (negated: higher = better). A document outside every part's candidates
        cannot be returned: with several parts the top k is exact when each part's local order agrees.
        """
        limits = limits or CaptionLimits()  # what the query may cost: terms, length, time (provenance.captions)
        terms = caption_terms(query, limits.max_terms, limits.max_chars)
        started = time.monotonic()
        if not terms:
            return []
        fts_query = " ".join(t.fts for t in terms)
        k = int(k)
        cand: list[tuple[int, int, str, str]] = []  # (part, row, text, snippet)
        df = [0] * len(terms)
        for pi, part in enumerate(self.parts):
            if not len(part):
                continue
            con = part.db()
            removed = self._removed.get(pi)
            # CAPTION_CANDIDATES over all parts, at least k from each (the global top k is among them when
            # each part's local order agrees with the global one)
            limit = max(k, -(-CAPTION_CANDIDATES // len(self.parts))) + (0 if removed is None else len(removed))
            try:
                with sqlite_time_budget(con, limits.time_budget_s, started):
                    hits = con.execute(
                        "SELECT rowid, caption, snippet(captions, 0, '[', ']', '…', 12) FROM captions WHERE captions MATCH ? "
                        "ORDER BY bm25(captions) LIMIT ?",
                        (fts_query, limit),
                    ).fetchall()
                    for j, t in enumerate(terms):  # document frequencies over every part, matched or not
                        df[j] += con.execute(
                            "SELECT count(*) FROM captions WHERE captions MATCH ?", (t.fts,)
                        ).fetchone()[0]
            except sqlite3.Error as e:
                raise IndexFormatError(
                    f"{part.label}/captions.sqlite: unreadable caption database ({e}); "
                    "run `provenance index verify` on the index"
                ) from None
            cand += [(pi, int(r), text, snip) for r, text, snip in hits if not self.is_removed(pi, int(r))]
        if not cand:
            return []
        n_docs = self.n_rows
        tokens = self._lay.caption_tokens
        scores = _bm25(terms, [c[2] for c in cand], df, n_docs, tokens / max(1, n_docs))
        order = sorted(range(len(cand)), key=lambda i: (-scores[i], cand[i][0], cand[i][1]))[:k]
        out = []
        for i in order:
            pi, r, _, snip = cand[i]
            batch, b = self.parts[pi].batch_of(r)
            out.append(
                CaptionHit(
                    batch.column("id")[b].as_py(),
                    float(scores[i]),
                    batch.column("caption")[b].as_py(),
                    batch.column("source")[b].as_py(),
                    snip,
                )
            )
        return out


# ------------------------------------------------------------------------------------ caption ranking


_Term = CaptionTerm  # (text, prefix, fts): the words as typed, `word*`, and the safe FTS5 form


def _fts_terms(text: str) -> list[_Term]:
    """User words as FTS5 terms: each word quoted (so punctuation can't inject syntax); quotes keep phrases."""
    phrases = re.findall(r'"([^"]+)"', text)
    rest = re.sub(r'"[^"]*"', " ", text)
    words = re.findall(r"\w+\*?", rest, flags=re.UNICODE)
    terms = [_Term(p, False, '"' + p.replace('"', " ") + '"') for p in phrases if re.search(r"\w", p)]
    for w in words:
        terms.append(_Term(w[:-1], True, f'"{w[:-1]}"*') if w.endswith("*") else _Term(w, False, f'"{w}"'))
    return terms


def _fts_query(text: str) -> str:
    return " ".join(t.fts for t in _fts_terms(text))


def _bm25(terms: list[_Term], texts: list[str], df: list[int], n_docs: int, avgdl: float) -> list[float]:
    """FTS5's BM25 (k1 1.2, b 0.75, idf floored at 1e-6) of each text for the terms, with the given corpus
    statistics. Tokens and positions come from FTS5 itself (an in-memory table with the parts' tokenizer)."""
    mem = sqlite3.connect(":memory:")
    try:
        mem.execute(f"CREATE VIRTUAL TABLE t USING fts5(x, tokenize='{FTS_TOKENIZE}')")
        mem.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")
        mem.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((i + 1, s or "") for i, s in enumerate(texts)))
        mem.executemany("INSERT INTO t(rowid, x) VALUES (?, ?)", ((-(j + 1), t.text) for j, t in enumerate(terms)))
        docs: dict[int, dict[int, str]] = {}
        for doc, term, off in mem.execute("SELECT doc, term, offset FROM v"):
            docs.setdefault(int(doc), {})[int(off)] = term
    finally:
        mem.close()
    term_tokens = [[tok for _, tok in sorted(docs.get(-(j + 1), {}).items())] for j in range(len(terms))]
    idf = [max(1e-6, math.log((n_docs - d + 0.5) / (d + 0.5))) for d in df]
    out = []
    for i in range(len(texts)):
        toks = docs.get(i + 1, {})
        dl = len(toks)
        score = 0.0
        for j, t in enumerate(terms):
            want = term_tokens[j]
            if not want:
                continue
            tf = 0
            for off in toks:
                ok = True
                for q, w in enumerate(want):
                    tok = toks.get(off + q)
                    last_prefix = t.prefix and q == len(want) - 1
                    if tok is None or not (tok.startswith(w) if last_prefix else tok == w):
                        ok = False
                        break
                tf += ok
            score += idf[j] * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * dl / max(avgdl, 1e-9)))
        out.append(score)
    return out


# ------------------------------------------------------------------------------------ maintenance


@dataclass
class RemoveResult:
    removed: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    already_removed: list[str] = field(default_factory=list)


def remove_items(index_dir: str | os.PathLike[str], ids: list[str], wait: float = 0.0) -> RemoveResult:
    """Tombstone `ids` (takedowns, opt-outs): every search, lookup and scan stops returning them at once."""
    index_dir = Path(index_dir)
    res = RemoveResult()
    with IndexWriteLock(index_dir, wait=wait, action="remove"):
        idx = ProvenanceIndex.open(index_dir)
        records = list(idx._tombstones)
        seen: set[str] = set()
        for item_id in ids:
            if item_id in seen:
                continue
            seen.add(item_id)
            if item_id in idx._removed_ids:
                res.already_removed.append(item_id)
                continue
            loc = idx.find(item_id)
            if loc is None:
                res.not_found.append(item_id)
                continue
            records.append({"id": item_id, "part": idx.parts[loc[0]].name, "row": loc[1], "at": _now()})
            res.removed.append(item_id)
        if res.removed:
            manifest = idx.manifest
            write_tombstones(index_dir, manifest, records)
            commit_manifest(index_dir, manifest)
    return res


def _copy_rows(src: PartReader, writer: PartWriter, names: list[str], keep: np.ndarray | None) -> None:
    """Stream a part's rows (all, or where keep is True) into a writer, one metadata batch at a time."""
    thumbs_path = src.dir / "thumbnails.bin"
    with open(thumbs_path, "rb") as tf:
        for start, batch in src.iter_batches():
            n = batch.num_rows
            sel = np.arange(n) if keep is None else np.flatnonzero(keep[start : start + n])
            if not len(sel):
                continue
            rows = batch.take(sel).to_pylist()
            thumbs: list[bytes | None] = []
            for r in rows:
                off, size = r.pop("thumb_offset"), r.pop("thumb_size")
                if off < 0:
                    thumbs.append(None)
                else:
                    tf.seek(off)
                    thumbs.append(tf.read(size))
            vectors = {nm: np.asarray(src.vectors(nm)[start : start + n])[sel] for nm in names}
            writer.add(rows, vectors, thumbs)


def compact(
    index_dir: str | os.PathLike[str],
    wait: float = 0.0,
    memory_budget_bytes: int = 1 << 30,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Rewrite every part that has removed rows without them, and clear those tombstones. Returns counts.

    Parts without removals stay as they are. Global row numbers change; item ids do not. A process that
    opened the index before the compaction must reopen it (its removed parts' files are deleted).
    """
    index_dir = Path(index_dir)
    with IndexWriteLock(index_dir, wait=wait, action="compact"):
        idx = ProvenanceIndex.open(index_dir)
        manifest = idx.manifest
        dims = vector_dims(idx.specs)
        rewritten, dropped = 0, 0
        for pi, part in enumerate(idx.parts):
            removed = idx._removed.get(pi)
            if removed is None:
                continue
            keep = np.ones(len(part), bool)
            keep[removed] = False
            entry = manifest["parts"][pi]
            w = PartWriter(
                index_dir / PARTS,
                part_name(manifest["next_part"], entry.get("unit")),
                dims,
                unit=entry.get("unit"),
                build_id=part.marker.get("build"),
            )
            manifest["next_part"] += 1
            try:
                _copy_rows(part, w, list(dims), keep)
                w.skipped.extend(part.skipped())
            except BaseException:
                w.abort()
                raise
            manifest["parts"][pi] = part_entry(w.finish(memory_budget_bytes, use_gpu, idx.specs))
            rewritten += 1
            dropped += len(removed)
        write_tombstones(index_dir, manifest, [])
        write_merged_lookup(index_dir, manifest)  # also merges the lookups of parts appended since the build
        write_merged_ann(index_dir, manifest)  # rewritten parts have new ids: retrain and re-encode
        commit_manifest(index_dir, manifest)
        remove_unlisted_parts(index_dir, manifest)
        remove_unlisted_lookups(index_dir, manifest)
        remove_unlisted_anns(index_dir, manifest)
    return {"parts_rewritten": rewritten, "rows_dropped": dropped, "items": manifest["counts"]["indexed"]}


def upgrade(
    index_dir: str | os.PathLike[str],
    wait: float = 0.0,
    part_size: int = DEFAULT_PART_SIZE,
    memory_budget_bytes: int = 1 << 30,
    use_gpu: bool | None = None,
) -> dict[str, Any]:
    """Convert a format-1 index in place into format 2 (parts of `part_size` rows), keeping every vector,
    caption and thumbnail (nothing is re-embedded). The format-1 files are deleted once the new manifest lands."""
    import pyarrow.parquet as pq

    index_dir = Path(index_dir)
    with IndexWriteLock(index_dir, wait=wait, action="upgrade"):
        try:
            old: dict[str, Any] = json.loads((index_dir / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise IndexNotFoundError(f"no index at {index_dir} (no {MANIFEST})") from None
        if old.get("format_version") == FORMAT_VERSION:
            return old
        if old.get("format_version") != 1:
            raise IndexFormatError(f"{index_dir}: format {old.get('format_version')} cannot be upgraded; rebuild it")
        specs = specs_of(old)
        load_args = {n: d["load"] for n, d in old["descriptors"].items() if d.get("load")}
        extra: dict[str, Any] = {k: old[k] for k in ("source", "builds") if k in old}
        manifest = new_manifest(index_dir, specs, load_args, extra)
        manifest["built_at"] = old.get("built_at", manifest["built_at"])
        manifest["upgraded_from"] = {"format_version": 1, "tool_version": old.get("tool_version"), "at": _now()}
        dims = vector_dims(specs)
        vecs = {n: np.load(index_dir / vectors_file(n), mmap_mode="r") for n in specs}
        skipped = (
            [
                json.loads(line)
                for line in (index_dir / "skipped.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
            if (index_dir / "skipped.jsonl").exists()
            else []
        )
        pf = pq.ParquetFile(index_dir / "metadata.parquet")
        writer: PartWriter | None = None
        start = 0
        with open(index_dir / "thumbnails.bin", "rb") as tf:
            for batch in pf.iter_batches(batch_size=min(part_size, 4096)):
                rows = batch.to_pylist()
                thumbs = []
                for r in rows:
                    off, size = r.pop("thumb_offset"), r.pop("thumb_size")
                    tf.seek(max(off, 0))
                    thumbs.append(tf.read(size) if off >= 0 else None)
                pos = 0
                while pos < len(rows):
                    if writer is None:
                        writer = PartWriter(
                            index_dir / PARTS, part_name(manifest["next_part"], "upgraded"), dims, unit="upgraded"
                        )
                        manifest["next_part"] += 1
                    take = min(len(rows) - pos, part_size - writer.n)
                    sl = slice(start + pos, start + pos + take)
                    writer.add(
                        rows[pos : pos + take],
                        {n: np.asarray(v[sl]) for n, v in vecs.items()},
                        thumbs[pos : pos + take],
                    )
                    pos += take
                    if writer.n >= part_size:
                        manifest["parts"].append(part_entry(writer.finish(memory_budget_bytes, use_gpu, specs)))
                        writer = None
                start += len(rows)
        if writer is None and not manifest["parts"]:
            writer = PartWriter(index_dir / PARTS, part_name(manifest["next_part"], "upgraded"), dims, unit="upgraded")
            manifest["next_part"] += 1
        if writer is not None:
            writer.skipped.extend(skipped)
            manifest["parts"].append(part_entry(writer.finish(memory_budget_bytes, use_gpu, specs)))
        elif skipped:  # the skips ride on an extra empty part so that the counts survive
            w = PartWriter(
                index_dir / PARTS, part_name(manifest["next_part"], "upgraded-skipped"), dims, unit="upgraded"
            )
            manifest["next_part"] += 1
            w.skipped.extend(skipped)
            manifest["parts"].append(part_entry(w.finish(memory_budget_bytes, use_gpu, specs)))
        _commit_rewritten(index_dir, manifest)
    return manifest


def verify(index_dir: str | os.PathLike[str], checksums: bool = True) -> list[VerifyProblem]:
    """Every file of the index against the manifest and the part markers: [] when all is well."""
    index_dir = Path(index_dir)
    try:
        manifest = read_manifest(index_dir)
        read_tombstones(index_dir, manifest)
    except (IndexFormatError, IndexNotFoundError) as e:
        return [VerifyProblem(str(index_dir / MANIFEST), str(e))]
    problems: list[VerifyProblem] = []
    lk = manifest.get("lookup") or {}
    for fname, rec in (lk.get("files") or {}).items():
        p = index_dir / lk["dir"] / fname
        if not p.is_file():
            problems.append(VerifyProblem(str(p), "missing or not a regular file"))
        elif p.stat().st_size != rec["size"]:
            problems.append(VerifyProblem(str(p), f"{p.stat().st_size} bytes, the manifest says {rec['size']}"))
        elif checksums and file_sha256(p) != rec["sha256"]:
            problems.append(VerifyProblem(str(p), "sha256 differs from the manifest's (corrupted)"))
    for entry in manifest["parts"]:
        d = index_dir / PARTS / entry["name"]
        found = verify_part(d, checksums)
        if not found:
            marker = read_marker(d)
            if marker["n"] != entry["n"]:
                found.append(VerifyProblem(str(d / "part.json"), f"{marker['n']} rows, the manifest says {entry['n']}"))
        problems += found
    return problems


def unlisted_parts(index_dir: Path, manifest: dict[str, Any] | None) -> list[Path]:
    """Complete part folders the manifest does not list (an interrupted build's work), and temporary ones."""
    listed = {p["name"] for p in (manifest or {}).get("parts", [])}
    d = index_dir / PARTS
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name not in listed and not p.name.startswith(TMP_PREFIX))


__all__ += ["IndexWriteLock", "RemoveResult", "compact", "file_sha256", "remove_items", "upgrade", "verify"]


def _commit_rewritten(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Commit a manifest whose parts were all rewritten (compact, upgrade): no tombstones, fresh merged lookup and
    ANN, then the files no longer listed (old parts, lookups, ANNs, format-1 files) go."""
    write_tombstones(index_dir, manifest, [])
    write_merged_lookup(index_dir, manifest)
    write_merged_ann(index_dir, manifest)
    commit_manifest(index_dir, manifest)
    remove_unlisted_parts(index_dir, manifest)
    remove_unlisted_lookups(index_dir, manifest)
    remove_unlisted_anns(index_dir, manifest)
    _remove_v1_files(index_dir)
