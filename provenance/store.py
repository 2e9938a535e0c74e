"""The on-disk index (`indexes/<name>/`): manifest, embeddings, FAISS indexes, metadata, caption search.

Layout (row i of every file is corpus item i):
  manifest.json            format version, descriptors (model id, checksum, dim, ANN plan), counts, source
  metadata.parquet         id, caption, source, license, width, height, sha256, extra (JSON), thumbnail offsets
  captions.sqlite          SQLite FTS5 over captions (rowid = row), for name/word search
  thumbnails.bin           concatenated small JPEGs (offsets in metadata)
  {sscd,clip,clip_text}.f16.npy   (n, d) float16 L2-normalised embeddings (re-rank rows read with pread)
  pdq.u8.npy               (n, 32) uint8 packed PDQ hashes
  <descriptor>.faiss       the FAISS index over those vectors (with its SQ8 copy, for IVF-PQ plans that have one)
  skipped.jsonl            every item that could not be indexed, with its reason

Writes never modify a live index: `write_index` fills a temporary sibling folder and swaps it in
with renames, so a killed build leaves the previous index usable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from provenance import ann
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import IndexFormatError, IndexNotFoundError, ItemNotFoundError
from provenance.types import CaptionHit, Match

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.parquet"
CAPTIONS_DB = "captions.sqlite"
THUMBNAILS = "thumbnails.bin"
SKIPPED = "skipped.jsonl"
VECTOR_NAMES = ("sscd", "clip", "clip_text", "pdq")


def vectors_file(name: str) -> str:
    return "pdq.u8.npy" if name == "pdq" else f"{name}.f16.npy"


@dataclass
class IndexContents:
    """Everything an index holds, in memory or memory-mapped, ready to be written."""

    rows: list[dict[str, Any]]  # metadata rows (id, caption, source, license, width, height, sha256, extra)
    vectors: dict[str, np.ndarray]  # name -> (n, d) float16 / (n, 32) uint8
    specs: dict[str, DescriptorSpec]  # descriptor specs ("clip_text" shares clip's spec)
    load_args: dict[str, dict[str, Any]]
    thumbnails: list[bytes | None]
    skipped: list[dict[str, Any]]


def recover_interrupted_swap(index_dir: Path) -> None:
    """If a crash fell between the two renames of a swap, put the previous index back."""
    if index_dir.exists():
        return
    olds = sorted(index_dir.parent.glob(f".{index_dir.name}.old-*"))
    if olds:
        logger.warning("restoring %s from interrupted swap %s", index_dir, olds[-1])
        os.rename(olds[-1], index_dir)


def write_index(index_dir: Path, contents: IndexContents, manifest_extra: dict[str, Any],
                memory_budget_bytes: int = 1 << 30, use_gpu: bool | None = None) -> dict[str, Any]:
    """Write a complete index into a temporary folder, then swap it in place of `index_dir`."""
    index_dir = Path(index_dir)
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_dir.parent / f".{index_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    n = len(contents.rows)
    try:
        thumb_offsets = _write_thumbnails(tmp / THUMBNAILS, contents.thumbnails)
        _write_metadata(tmp / METADATA, contents.rows, thumb_offsets)
        _write_captions_db(tmp / CAPTIONS_DB, [_searchable_text(r) for r in contents.rows])
        descriptors: dict[str, Any] = {}
        for name, x in contents.vectors.items():
            if len(x) != n:
                raise IndexFormatError(f"{name}: {len(x)} vectors for {n} items")
            np.save(tmp / vectors_file(name), np.ascontiguousarray(x))
            spec = contents.specs[name]
            metric = "hamming" if name == "pdq" else "ip"
            entry: dict[str, Any] = {**spec.to_dict(), "vectors": vectors_file(name)}
            if n:
                plan = ann.plan_index(n, spec.dim, metric=metric, memory_budget_bytes=memory_budget_bytes)
                # float16 as stored: build_index converts chunk by chunk (a 1M x 512 float32 copy is 2 GB)
                index = ann.build_index(np.load(tmp / vectors_file(name), mmap_mode="r"), plan, use_gpu=use_gpu)
                ann.save_index(index, tmp / f"{name}.faiss")
                entry.update({"faiss": f"{name}.faiss", "ann": plan.to_dict()})
            if name in contents.load_args:
                entry["load"] = contents.load_args[name]
            descriptors[name] = entry
        with open(tmp / SKIPPED, "w", encoding="utf-8") as f:
            for s in contents.skipped:
                f.write(json.dumps(s) + "\n")
        by_reason: dict[str, int] = {}
        for s in contents.skipped:
            by_reason[s["reason_kind"]] = by_reason.get(s["reason_kind"], 0) + 1
        manifest = {
            "format_version": FORMAT_VERSION,
            "tool_version": _tool_version(),
            "name": index_dir.name,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "descriptors": descriptors,
            "counts": {"indexed": n, "skipped": len(contents.skipped), "skipped_by_reason": by_reason},
            **manifest_extra,
        }
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, index_dir)
    return manifest


def _swap_in(tmp: Path, index_dir: Path) -> None:
    old = index_dir.parent / f".{index_dir.name}.old-{os.getpid()}"
    if index_dir.exists():
        os.rename(index_dir, old)
    os.rename(tmp, index_dir)
    _fsync_dir(index_dir.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _write_thumbnails(path: Path, thumbs: list[bytes | None]) -> list[tuple[int, int]]:
    offsets = []
    pos = 0
    with open(path, "wb") as f:
        for t in thumbs:
            if t:
                f.write(t)
                offsets.append((pos, len(t)))
                pos += len(t)
            else:
                offsets.append((-1, 0))
    return offsets


def _write_metadata(path: Path, rows: list[dict[str, Any]], thumb_offsets: list[tuple[int, int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "caption": pa.array([r.get("caption") for r in rows], pa.string()),
        "source": pa.array([r.get("source") for r in rows], pa.string()),
        "license": pa.array([r.get("license") for r in rows], pa.string()),
        "width": pa.array([r.get("width") for r in rows], pa.int32()),
        "height": pa.array([r.get("height") for r in rows], pa.int32()),
        "sha256": pa.array([r.get("sha256") for r in rows], pa.string()),
        "extra": pa.array([json.dumps(r.get("extra") or {}, default=str) for r in rows], pa.string()),
        "thumb_offset": pa.array([o for o, _ in thumb_offsets], pa.int64()),
        "thumb_size": pa.array([s for _, s in thumb_offsets], pa.int32()),
    }
    pq.write_table(pa.table(cols), path)


def _searchable_text(row: dict[str, Any]) -> str:
    """The caption plus any alternative captions (COCO and Flickr8k carry five per image)."""
    texts = [row.get("caption") or ""]
    more = (row.get("extra") or {}).get("captions")
    if isinstance(more, list):
        texts += [str(c) for c in more if c and c != row.get("caption")]
    return "\n".join(texts)


def _write_captions_db(path: Path, captions: list[str | None]) -> None:
    con = sqlite3.connect(path)
    try:
        # unicode61 with diacritics removed, so "Dali" finds "Dalí"; prefix indexes speed up "name*".
        con.execute("CREATE VIRTUAL TABLE captions USING fts5(caption, tokenize='unicode61 remove_diacritics 2', "
                    "prefix='2 3')")
        con.executemany("INSERT INTO captions(rowid, caption) VALUES (?, ?)",
                        ((i, c or "") for i, c in enumerate(captions)))
        con.commit()
    finally:
        con.close()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tool_version() -> str:
    from provenance import __version__

    return __version__


# ------------------------------------------------------------------------------------ reading


class RowReader:
    """Rows of an (n, d) matrix in a file (a .npy, or raw rows at an offset), read with os.pread.

    The exact re-rank of an IVF-PQ search needs 16 (after an SQ8 refine) to 100 scattered rows per
    query. Read through a memory map, each row maps its pages (and the kernel's fault-around
    neighbours) into the process: after a few thousand queries at 1M x 512 the whole 977 MiB file counted as resident.
    pread copies just the rows out of the page cache (~3 us each here), so the process stays at
    its own memory; the OS still caches the file and drops it under pressure. Thread-safe.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], dtype: Any, offset: int = 0):
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.ndim = 2
        self._offset = int(offset)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        size = os.fstat(self._fd).st_size
        if size < self._offset + self.shape[0] * self._row_bytes:
            os.close(self._fd)
            raise IndexFormatError(f"{self.path}: {size} bytes, too short for {self.shape} {self.dtype} rows")

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> "RowReader":
        """A reader of a 2-D C-order .npy file (as `write_index` saves the embeddings)."""
        # np.load parses the header; the map it makes is never touched, only its offset is kept
        m = np.load(path, mmap_mode="r")
        if not isinstance(m, np.memmap) or m.ndim != 2 or not m.flags.c_contiguous:
            raise IndexFormatError(f"{path}: expected a 2-D C-order numeric array, got {m.shape} {m.dtype}")
        shape, dtype, offset = m.shape, m.dtype, m.offset
        del m
        return cls(path, shape, dtype, offset)

    def __len__(self) -> int:
        return self.shape[0]

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), d) array of the given row numbers (sorted rows read the file in order)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row out of range [0, {self.shape[0]}) in {self.path}")
        rb, off, fd = self._row_bytes, self._offset, self._fd
        if not hasattr(os, "pread"):  # Windows: no pread; a short-lived map of the file
            return np.asarray(np.memmap(self.path, self.dtype, "r", off, self.shape)[rows])
        data = b"".join([os.pread(fd, rb, off + r * rb) for r in rows.tolist()])
        if len(data) != rows.size * rb:
            raise IndexFormatError(f"{self.path}: short read (file truncated while open?)")
        return np.frombuffer(data, self.dtype).reshape(rows.size, self.shape[1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.read_rows(rows)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class ProvenanceIndex:
    """A built index opened for search: vectors memory-mapped, FAISS indexes loaded once."""

    def __init__(self, index_dir: Path, manifest: dict[str, Any], use_gpu: bool | None = None):
        import pyarrow.parquet as pq

        self.dir = index_dir
        self.manifest = manifest
        self.specs = {n: DescriptorSpec.from_dict(d) for n, d in manifest["descriptors"].items()}
        table = pq.read_table(index_dir / METADATA)
        self._rows = table
        self.ids: list[str] = table.column("id").to_pylist()
        self._row_of = {id_: i for i, id_ in enumerate(self.ids)}
        self._captions: list[str | None] = table.column("caption").to_pylist()
        self._sources: list[str | None] = table.column("source").to_pylist()
        self._thumb_offset = table.column("thumb_offset").to_numpy()
        self._thumb_size = table.column("thumb_size").to_numpy()
        self._vectors: dict[str, np.ndarray] = {}
        self._row_readers: dict[str, RowReader] = {}
        self._faiss: dict[str, Any] = {}
        self._plans: dict[str, ann.AnnPlan] = {}
        self._use_gpu = use_gpu
        self._lock = threading.Lock()
        self._local = threading.local()

    @classmethod
    def open(cls, index_dir: str | os.PathLike, use_gpu: bool | None = None) -> "ProvenanceIndex":
        index_dir = Path(index_dir)
        recover_interrupted_swap(index_dir)
        path = index_dir / MANIFEST
        if not path.exists():
            raise IndexNotFoundError(
                f"no index at {index_dir} (no {MANIFEST}); build one with `provenance index build SOURCE --index {index_dir}`"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise IndexFormatError(f"{path}: unreadable manifest ({e})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(
                f"{index_dir}: index format {manifest.get('format_version')} but this tool reads {FORMAT_VERSION}; rebuild it"
            )
        return cls(index_dir, manifest, use_gpu)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def descriptor_names(self) -> list[str]:
        return list(self.specs)

    def load_args(self, name: str) -> dict[str, Any]:
        return dict(self.manifest["descriptors"][name].get("load") or {})

    def vectors(self, name: str) -> np.ndarray:
        """(n, d) float16 or (n, 32) uint8, memory-mapped: only the rows a re-rank touches are read."""
        if name not in self._vectors:
            self._vectors[name] = np.load(self.dir / vectors_file(name), mmap_mode="r")
        return self._vectors[name]

    def row_reader(self, name: str) -> RowReader:
        """The (n, d) embeddings of `name` read row by row with pread (the re-rank's exact scores)."""
        with self._lock:
            if name not in self._row_readers:
                self._row_readers[name] = RowReader.from_npy(self.dir / vectors_file(name))
            return self._row_readers[name]

    def _faiss_index(self, name: str):
        with self._lock:
            if name not in self._faiss:
                entry = self.manifest["descriptors"][name]
                plan = ann.AnnPlan.from_dict(entry["ann"])
                self._plans[name] = plan
                self._faiss[name] = ann.load_index(self.dir / entry["faiss"], plan, use_gpu=self._use_gpu)
            return self._faiss[name], self._plans[name]

    def search_vectors(self, name: str, xq: np.ndarray, k: int = 10) -> list[list[Match]]:
        """Nearest corpus items for each query vector, best first, as Matches of descriptor `name`."""
        if name not in self.specs:
            from provenance.errors import DescriptorUnavailableError

            raise DescriptorUnavailableError(
                f"the index at {self.dir} has no {name!r} descriptor (it has {', '.join(self.specs)}); "
                f"rebuild with --descriptors including {name.split('_')[0]}"
            )
        if len(self) == 0:
            return [[] for _ in range(len(xq))]
        index, plan = self._faiss_index(name)
        k = min(k, len(self))
        rerank = self.row_reader(name) if plan.params.get("rerank_k") else None
        nb = ann.search(index, xq, k, plan, rerank_vectors=rerank)
        descriptor = "clip" if name == "clip_text" else name
        out: list[list[Match]] = []
        for qi in range(len(xq)):
            matches = []
            for j in range(nb.ids.shape[1]):
                row = int(nb.ids[qi, j])
                if row < 0:
                    continue
                dist = int(nb.distances[qi, j]) if nb.distances is not None else None
                matches.append(Match(self.ids[row], float(nb.scores[qi, j]), descriptor,
                                     self._captions[row], self._sources[row], dist))
            out.append(matches)
        return out

    def search_caption(self, query: str, k: int = 10) -> list[CaptionHit]:
        """Full-text search of captions (SQLite FTS5, BM25). Words are ANDed; quotes keep phrases."""
        fts_query = _fts_query(query)
        if not fts_query:
            return []
        con = self._db()
        rows = con.execute(
            "SELECT rowid, bm25(captions), snippet(captions, 0, '[', ']', '…', 12) FROM captions "
            "WHERE captions MATCH ? ORDER BY bm25(captions) LIMIT ?", (fts_query, int(k))
        ).fetchall()
        return [CaptionHit(self.ids[r], -float(score), self._captions[r], self._sources[r], snip)
                for r, score, snip in rows]

    def _db(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(f"file:{self.dir / CAPTIONS_DB}?mode=ro", uri=True, check_same_thread=False)
            self._local.con = con
        return con

    def row(self, item_id: str) -> int:
        try:
            return self._row_of[item_id]
        except KeyError:
            raise ItemNotFoundError(f"no item {item_id!r} in the index at {self.dir}") from None

    def item(self, item_id: str) -> dict[str, Any]:
        r = self.row(item_id)
        rec = self._rows.slice(r, 1).to_pylist()[0]
        rec["extra"] = json.loads(rec.get("extra") or "{}")
        rec["has_thumbnail"] = rec.pop("thumb_offset") >= 0
        rec.pop("thumb_size", None)
        return rec

    def rows(self) -> list[dict[str, Any]]:
        """All metadata rows as written (for --append), without the thumbnail bookkeeping."""
        rows = self._rows.drop_columns(["thumb_offset", "thumb_size"]).to_pylist()
        for r in rows:
            r["extra"] = json.loads(r.get("extra") or "{}")
        return rows

    def thumbnail(self, item_id: str) -> bytes | None:
        """The item's small JPEG thumbnail, or None if none was stored."""
        r = self._row_of.get(item_id)
        if r is None or self._thumb_offset[r] < 0:
            return None
        with open(self.dir / THUMBNAILS, "rb") as f:
            f.seek(int(self._thumb_offset[r]))
            return f.read(int(self._thumb_size[r]))

    def all_thumbnails(self) -> list[bytes | None]:
        """Every item's thumbnail in row order, from one pass over thumbnails.bin (used by --append)."""
        out: list[bytes | None] = []
        with open(self.dir / THUMBNAILS, "rb") as f:
            for off, size in zip(self._thumb_offset, self._thumb_size):
                if off < 0:
                    out.append(None)
                else:
                    f.seek(int(off))
                    out.append(f.read(int(size)))
        return out

    def sample_captions(self, n: int, seed: int = 0) -> list[str]:
        captions = [c for c in self._captions if c]
        rng = random.Random(seed)
        return rng.sample(captions, min(n, len(captions)))

    def skipped(self) -> list[dict[str, Any]]:
        path = self.dir / SKIPPED
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fts_query(text: str) -> str:
    """Turn user words into a safe FTS5 query: each word quoted (so punctuation can't inject syntax)."""
    import re

    phrases = re.findall(r'"([^"]+)"', text)
    rest = re.sub(r'"[^"]*"', " ", text)
    words = re.findall(r"\w+\*?", rest, flags=re.UNICODE)
    terms = [f'"{p}"' for p in phrases]
    for w in words:
        terms.append(f'"{w[:-1]}"*' if w.endswith("*") else f'"{w}"')
    return " ".join(terms)
