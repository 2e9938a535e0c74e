"""One part of an index: an immutable folder of vectors, FAISS indexes, metadata, captions and thumbnails.

A part holds the items of one input shard (or one chunk of `part_size` items of a folder or dataset):

  part.json            the completion marker, written last: row count, source unit, build id, per-descriptor
                       vector/FAISS files and ANN plan, caption statistics, and every file's size and sha256
  metadata.arrow       Arrow IPC file of fixed-size record batches (METADATA_BATCH rows): id, caption, source,
                       license, width, height, sha256, extra (JSON), thumb_offset, thumb_size. Memory-mapped:
                       row r is batch r // METADATA_BATCH, read without touching the others
  ids.u64.npy          (n,) uint64 sorted 64-bit hashes of the item ids;   ids.row.npy (n,) uint32: their rows
  sha.u64.npy          (n,) uint64 sorted first 64 bits of the sha256s;   sha.row.npy (n,) uint32: their rows
  {sscd,clip,clip_text}.f16.npy   (n, d) float16 L2-normalised embeddings;  pdq.u8.npy (n, 32) uint8 hashes
  <descriptor>.faiss   the FAISS index of this part's vectors (ids = rows of this part)
  captions.sqlite      SQLite FTS5 over the captions (rowid = row)
  thumbnails.bin       concatenated small JPEGs (offsets in the metadata)
  skipped.jsonl        the items of this unit that could not be indexed, with their reasons

`PartWriter` streams items into a temporary folder (no more than one metadata batch and the caller's batch
in memory) and renames it into place once every file is written, checksummed and synced: a part folder
without the `.tmp-` prefix is complete. Parts are never modified afterwards; removal is a tombstone list
kept by the index (`provenance.store`), and `compact` writes new parts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from provenance import ann
from provenance.descriptors.base import DescriptorSpec
from provenance.errors import IndexFormatError

logger = logging.getLogger(__name__)

PART_FORMAT = 2
MARKER = "part.json"
METADATA = "metadata.arrow"
CAPTIONS_DB = "captions.sqlite"
THUMBNAILS = "thumbnails.bin"
SKIPPED = "skipped.jsonl"
IDS_HASH, IDS_ROW = "ids.u64.npy", "ids.row.npy"
SHA_HASH, SHA_ROW = "sha.u64.npy", "sha.row.npy"
METADATA_BATCH = 4096  # rows per Arrow record batch: a row read maps one batch (~1 MB of columns at most)
TMP_PREFIX = ".tmp-"
FTS_TOKENIZE = "unicode61 remove_diacritics 2"


def vectors_file(name: str) -> str:
    return "pdq.u8.npy" if name == "pdq" else f"{name}.f16.npy"


def id_hash(ids: list[str]) -> np.ndarray:
    """(len(ids),) uint64: the first 8 bytes of blake2b of each id (collisions are resolved by reading the id)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest(), "little") for i in ids],
        dtype=np.uint64,
    )


def sha_hash(shas: list[str | None]) -> np.ndarray:
    """(len(shas),) uint64: the first 64 bits of each hex sha256 (0 for none; looked-up values are checked)."""
    out = np.zeros(len(shas), dtype=np.uint64)
    for i, s in enumerate(shas):
        if s:
            with contextlib.suppress(ValueError):
                out[i] = int(s[:16], 16)
    return out


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("caption", pa.string()),
            ("source", pa.string()),
            ("license", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("sha256", pa.string()),
            ("extra", pa.string()),
            ("thumb_offset", pa.int64()),
            ("thumb_size", pa.int32()),
        ]
    )


def searchable_text(row: dict[str, Any]) -> str:
    """The caption plus any alternative captions (COCO and Flickr8k carry five per image)."""
    texts = [row.get("caption") or ""]
    extra = row.get("extra") or {}
    if isinstance(extra, str):  # as stored in the metadata (compact, upgrade)
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            extra = {}
    more = extra.get("captions") if isinstance(extra, dict) else None
    if isinstance(more, list):
        texts += [str(c) for c in more if c and c != row.get("caption")]
    return "\n".join(texts)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
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


# ------------------------------------------------------------------------------------ writing


class PartWriter:
    """Streams items into `parts_dir/.tmp-<name>-<pid>/` and, on `finish`, renames it to `parts_dir/<name>`.

    vector_dims: descriptor name -> dim (pdq: 32 bytes); the part stores exactly these vector files.
    """

    def __init__(
        self,
        parts_dir: Path,
        name: str,
        vector_dims: dict[str, int],
        *,
        unit: str | None = None,
        build_id: str | None = None,
    ):
        self.parts_dir = Path(parts_dir)
        self.name = name
        self.unit = unit
        self.build_id = build_id
        self.dims = dict(vector_dims)
        self.tmp = self.parts_dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.n = 0
        self.skipped: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []  # at most one metadata batch, waiting to be written
        self._id_hashes: list[np.ndarray] = []  # (n,) uint64 in pieces: 8 bytes per item, not the ids
        self._sha_hashes: list[np.ndarray] = []
        # kept open while the part is written, closed by finish() or abort()
        self._vec = {n: open(self.tmp / f"{n}.raw", "wb") for n in self.dims}  # noqa: SIM115
        self._thumbs = open(self.tmp / THUMBNAILS, "wb")  # noqa: SIM115
        self._thumb_pos = 0
        self._meta = None  # pyarrow RecordBatchFileWriter, opened on the first batch
        self._meta_sink = None
        self._db = sqlite3.connect(self.tmp / CAPTIONS_DB)
        # unicode61 with diacritics removed, so "Dali" finds "Dalí"; prefix indexes speed up "name*".
        self._db.execute(f"CREATE VIRTUAL TABLE captions USING fts5(caption, tokenize='{FTS_TOKENIZE}', prefix='2 3')")

    def add(
        self,
        rows: list[dict[str, Any]],
        vectors: dict[str, np.ndarray],
        thumbnails: list[bytes | None],
        skipped: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Append items: rows (id, caption, source, license, width, height, sha256, extra), their vectors
        ((len(rows), d) float16 / (len(rows), 32) uint8 per descriptor) and thumbnails; plus skipped records."""
        self.skipped.extend(skipped)
        if not rows:
            return
        for name in self.dims:
            x = vectors.get(name)
            if x is None or len(x) != len(rows):
                raise IndexFormatError(f"{name}: {0 if x is None else len(x)} vectors for {len(rows)} items")
            dtype = np.uint8 if name == "pdq" else np.float16
            self._vec[name].write(np.ascontiguousarray(x, dtype=dtype).tobytes())
        self._db.executemany(
            "INSERT INTO captions(rowid, caption) VALUES (?, ?)",
            ((self.n + i, searchable_text(r)) for i, r in enumerate(rows)),
        )
        for r, t in zip(rows, thumbnails, strict=False):
            r = dict(r)
            if t:
                self._thumbs.write(t)
                r["thumb_offset"], r["thumb_size"] = self._thumb_pos, len(t)
                self._thumb_pos += len(t)
            else:
                r["thumb_offset"], r["thumb_size"] = -1, 0
            self._rows.append(r)
        self._id_hashes.append(id_hash([r["id"] for r in rows]))
        self._sha_hashes.append(sha_hash([r.get("sha256") for r in rows]))
        self.n += len(rows)
        while len(self._rows) >= METADATA_BATCH:
            self._write_batch(self._rows[:METADATA_BATCH])
            self._rows = self._rows[METADATA_BATCH:]

    @property
    def count(self) -> int:
        """Items and skips so far (the unit of a part's size)."""
        return self.n + len(self.skipped)

    def _write_batch(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        from pyarrow import ipc

        schema = _schema()
        if self._meta is None:
            self._meta_sink = pa.OSFile(str(self.tmp / METADATA), "wb")
            self._meta = ipc.new_file(self._meta_sink, schema)
        cols = {
            "id": [r["id"] for r in rows],
            "caption": [r.get("caption") for r in rows],
            "source": [r.get("source") for r in rows],
            "license": [r.get("license") for r in rows],
            "width": [r.get("width") for r in rows],
            "height": [r.get("height") for r in rows],
            "sha256": [r.get("sha256") for r in rows],
            "extra": [
                r["extra"] if isinstance(r.get("extra"), str) else json.dumps(r.get("extra") or {}, default=str)
                for r in rows
            ],
            "thumb_offset": [r["thumb_offset"] for r in rows],
            "thumb_size": [r["thumb_size"] for r in rows],
        }
        assert self._meta is not None  # opened above on the first batch
        self._meta.write_batch(pa.record_batch([pa.array(cols[f.name], f.type) for f in schema], schema=schema))

    def abort(self) -> None:
        for f in self._vec.values():
            f.close()
        self._thumbs.close()
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._meta is not None:
            try:
                self._meta.close()
                self._meta_sink.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(
        self,
        memory_budget_bytes: int = 1 << 30,
        use_gpu: bool | None = None,
        specs: dict[str, DescriptorSpec] | None = None,
    ) -> dict[str, Any]:
        """Write the remaining files, the FAISS indexes and the marker; rename into place; return the marker."""
        try:
            return self._finish(memory_budget_bytes, use_gpu, specs or {})
        except BaseException:
            self.abort()
            raise

    def _finish(
        self, memory_budget_bytes: int, use_gpu: bool | None, specs: dict[str, DescriptorSpec]
    ) -> dict[str, Any]:
        import pyarrow as pa
        from pyarrow import ipc

        tmp, n = self.tmp, self.n
        # 1. Metadata: the last (short) batch; an empty part still gets a readable, empty file
        if self._rows:
            self._write_batch(self._rows)
            self._rows = []
        if self._meta is None:
            with pa.OSFile(str(tmp / METADATA), "wb") as sink, ipc.new_file(sink, _schema()):
                pass
        else:
            self._meta.close()
            self._meta_sink.close()
        # 2. Captions: the token total (for BM25 statistics across parts)
        self._db.commit()
        self._db.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, captions, 'row')")
        tokens = int(self._db.execute("SELECT coalesce(sum(cnt), 0) FROM temp.vocab").fetchone()[0])
        self._db.close()
        # 3. Thumbnails, skipped
        self._thumbs.close()
        with open(tmp / SKIPPED, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, default=str) + "\n" for s in self.skipped)
        # 4. Lookups: sorted hashes and their rows (np.searchsorted on the memory-mapped files)
        for (hash_file, row_file), pieces in (
            ((IDS_HASH, IDS_ROW), self._id_hashes),
            ((SHA_HASH, SHA_ROW), self._sha_hashes),
        ):
            h = np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)
            order = np.argsort(h, kind="stable")
            np.save(tmp / hash_file, h[order])
            np.save(tmp / row_file, order.astype(np.uint32))
        # 5. Vectors: raw rows -> .npy (header + the same bytes), then this part's FAISS index
        descriptors: dict[str, Any] = {}
        for name, dim in self.dims.items():
            self._vec[name].close()
            raw, npy = tmp / f"{name}.raw", tmp / vectors_file(name)
            dtype = np.dtype(np.uint8 if name == "pdq" else np.float16)
            if raw.stat().st_size != n * dim * dtype.itemsize:
                raise IndexFormatError(f"{name}: {raw.stat().st_size} bytes of vectors for {n} x {dim} {dtype}")
            with open(npy, "wb") as f:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n, dim)}
                )
                with open(raw, "rb") as r:
                    shutil.copyfileobj(r, f, 1 << 20)
            raw.unlink()
            entry: dict[str, Any] = {"vectors": vectors_file(name), "dim": dim}
            if n:
                metric = "hamming" if name == "pdq" else "ip"
                plan = ann.plan_index(
                    n, dim * 8 if name == "pdq" else dim, metric=metric, memory_budget_bytes=memory_budget_bytes
                )
                index = ann.build_index(np.load(npy, mmap_mode="r"), plan, use_gpu=use_gpu)
                ann.save_index(index, tmp / f"{name}.faiss")
                entry.update({"faiss": f"{name}.faiss", "ann": plan.to_dict()})
            if name in specs:
                entry["checksum"] = specs[name].checksum
            descriptors[name] = entry
        # 6. The marker: every file with its size and sha256, written last
        files = {}
        for p in sorted(tmp.iterdir()):
            if p.is_file():
                files[p.name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        by_reason: dict[str, int] = {}
        for s in self.skipped:
            by_reason[s.get("reason_kind", "error")] = by_reason.get(s.get("reason_kind", "error"), 0) + 1
        marker = {
            "format": PART_FORMAT,
            "name": self.name,
            "n": n,
            "unit": self.unit,
            "build": self.build_id,
            "skipped": len(self.skipped),
            "skipped_by_reason": by_reason,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "metadata_batch": METADATA_BATCH,
            "caption_tokens": tokens,
            "descriptors": descriptors,
            "files": files,
        }
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))
        fsync_dir(tmp)
        final = self.parts_dir / self.name
        if final.exists():
            raise IndexFormatError(f"{final}: a part of this name already exists")
        os.rename(tmp, final)
        fsync_dir(self.parts_dir)
        return marker


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    def from_npy(cls, path: str | os.PathLike) -> RowReader:
        """A reader of a 2-D C-order .npy file (as parts store the embeddings)."""
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
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def read_marker(part_dir: Path) -> dict[str, Any]:
    path = part_dir / MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexFormatError(f"{part_dir}: no {MARKER}: the part is incomplete or was deleted") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable part marker ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != PART_FORMAT:
        raise IndexFormatError(f"{path}: not a format-{PART_FORMAT} part marker")
    return marker


@dataclass
class VerifyProblem:
    path: str
    problem: str


def verify_part(part_dir: Path, checksums: bool = True, marker: dict[str, Any] | None = None) -> list[VerifyProblem]:
    """Every file of the part against its marker: present, regular, of its size and (checksums=True) sha256."""
    if marker is None:
        try:
            marker = read_marker(part_dir)
        except IndexFormatError as e:
            return [VerifyProblem(str(part_dir / MARKER), str(e))]
    problems = []
    for fname, rec in marker["files"].items():
        p = part_dir / fname
        if not p.is_file():
            problems.append(VerifyProblem(str(p), "missing or not a regular file"))
            continue
        size = p.stat().st_size
        if size != rec["size"]:
            problems.append(VerifyProblem(str(p), f"{size} bytes, the marker says {rec['size']}"))
        elif checksums and file_sha256(p) != rec["sha256"]:
            problems.append(VerifyProblem(str(p), "sha256 differs from the marker's (corrupted)"))
    return problems


class PartReader:
    """A complete part opened lazily: nothing is read until a lookup, a search or a row read needs it.

    The first use reads the marker and checks that every file has the size it records (a stat each), so a
    truncated file is an IndexFormatError naming it, not a wrong answer; `verify_part` checks the checksums.
    """

    def __init__(self, part_dir: Path, n: int | None = None):
        self.dir = Path(part_dir)
        self.name = self.dir.name
        # how errors name the part's files: from the index's own folder, never the server's full path
        self.label = f"{self.dir.parent.parent.name}/{self.dir.parent.name}/{self.name}"
        self._n = n
        self._marker: dict[str, Any] | None = None
        self._lock = threading.RLock()
        self._local = threading.local()
        self._cache: dict[str, Any] = {}

    @property
    def marker(self) -> dict[str, Any]:
        if self._marker is None:
            with self._lock:
                if self._marker is None:
                    try:
                        marker = read_marker(self.dir)
                    except IndexFormatError as e:
                        raise IndexFormatError(str(e).replace(str(self.dir), self.label)) from None
                    bad = verify_part(self.dir, checksums=False, marker=marker)
                    if bad:
                        raise IndexFormatError(
                            f"{bad[0].path.replace(str(self.dir), self.label)}: {bad[0].problem}; the index is broken: "
                            "run `provenance index verify` on it, and rebuild it"
                        )
                    self._marker = marker
        return self._marker

    def __len__(self) -> int:
        return int(self._n if self._n is not None else self.marker["n"])

    def _get(self, key: str, make):
        v = self._cache.get(key)
        if v is None:
            with self._lock:
                v = self._cache.get(key)
                if v is None:
                    v = self._cache[key] = make()
        return v

    def _npy(self, fname: str) -> np.ndarray:
        def load():
            self.marker  # noqa: B018 - size checks first
            try:
                return np.load(self.dir / fname, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexFormatError(f"{self.label}/{fname}: unreadable ({e})") from None

        return self._get(f"npy:{fname}", load)

    # -- lookups

    def _find(self, hash_file: str, row_file: str, h: int) -> np.ndarray:
        hashes = self._npy(hash_file)
        if not len(hashes):
            return np.zeros(0, np.int64)
        lo = int(np.searchsorted(hashes, np.uint64(h), "left"))
        hi = int(np.searchsorted(hashes, np.uint64(h), "right"))
        return np.asarray(self._npy(row_file)[lo:hi], dtype=np.int64)

    def rows_of_id(self, item_id: str) -> list[int]:
        """Rows holding `item_id` (normally one, or none)."""
        rows = self._find(IDS_HASH, IDS_ROW, int(id_hash([item_id])[0]))
        return [int(r) for r in rows if self.column_value(int(r), "id") == item_id]

    def rows_of_sha256(self, sha: str) -> list[int]:
        h = int(sha_hash([sha])[0])
        if not h:
            return []
        return sorted(int(r) for r in self._find(SHA_HASH, SHA_ROW, h) if self.column_value(int(r), "sha256") == sha)

    def contains_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """(len(hashes),) bool: which 64-bit id hashes this part holds (a collision only costs a re-check)."""
        part = self._npy(IDS_HASH)
        if not len(part) or not len(hashes):
            return np.zeros(len(hashes), bool)
        pos = np.minimum(np.searchsorted(part, hashes), len(part) - 1)
        return np.asarray(part[pos] == hashes)

    # -- metadata

    def _metadata(self):
        def open_():
            import pyarrow as pa
            from pyarrow import ipc

            self.marker  # noqa: B018
            try:
                return ipc.open_file(pa.memory_map(str(self.dir / METADATA), "r"))
            except (OSError, pa.ArrowInvalid) as e:
                raise IndexFormatError(f"{self.label}/{METADATA}: unreadable metadata ({e})") from None

        return self._get("metadata", open_)

    def batch_of(self, row: int):
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range [0, {len(self)}) in part {self.name}")
        b = self.marker.get("metadata_batch", METADATA_BATCH)
        return self._metadata().get_batch(row // b), row % b

    def column_value(self, row: int, column: str) -> Any:
        batch, j = self.batch_of(row)
        return batch.column(column)[j].as_py()

    def record(self, row: int) -> dict[str, Any]:
        batch, j = self.batch_of(row)
        return {name: batch.column(name)[j].as_py() for name in batch.schema.names}

    def iter_batches(self) -> Iterator[tuple[int, Any]]:
        """(first row, RecordBatch) over the whole part, in row order (compact, upgrade, ids)."""
        reader = self._metadata()
        start = 0
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            yield start, b
            start += b.num_rows

    def thumbnail(self, row: int) -> bytes | None:
        batch, j = self.batch_of(row)
        off, size = batch.column("thumb_offset")[j].as_py(), batch.column("thumb_size")[j].as_py()
        if off < 0:
            return None
        with open(self.dir / THUMBNAILS, "rb") as f:
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            raise IndexFormatError(f"{self.label}/{THUMBNAILS}: truncated (row {row} needs bytes {off}..{off + size})")
        return data

    def skipped(self) -> list[dict[str, Any]]:
        path = self.dir / SKIPPED
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- vectors

    def vectors(self, name: str) -> np.ndarray:
        """(n, d) float16 or (n, 32) uint8, memory-mapped."""
        return self._npy(self.marker["descriptors"][name]["vectors"])

    def row_reader(self, name: str) -> RowReader:
        return self._get(
            f"rows:{name}", lambda: RowReader.from_npy(self.dir / self.marker["descriptors"][name]["vectors"])
        )

    def faiss_index(self, name: str, use_gpu: bool | None = None):
        """(index, plan) of this part's FAISS index for `name`, loaded (memory-mapped) on first use."""

        def load():
            entry = self.marker["descriptors"][name]
            plan = ann.AnnPlan.from_dict(entry["ann"])
            try:
                index = ann.load_index(self.dir / entry["faiss"], plan, use_gpu=use_gpu)
            except (ValueError, FileNotFoundError) as e:
                raise IndexFormatError(
                    f"{self.label}/{entry['faiss']}: {str(e).replace(str(self.dir), self.label)}"
                ) from None
            return index, plan

        return self._get(f"faiss:{name}", load)

    def search(self, name: str, xq: np.ndarray, k: int, use_gpu: bool | None = None) -> ann.Neighbors | None:
        """This part's k nearest rows of each query (row ids local to the part), or None for an empty part."""
        if len(self) == 0:
            return None
        index, plan = self.faiss_index(name, use_gpu)
        rerank = self.row_reader(name) if plan.params.get("rerank_k") else None
        return ann.search(index, xq, min(k, len(self)), plan, rerank_vectors=rerank)

    # -- captions

    def db(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            self.marker  # noqa: B018
            path = self.dir / CAPTIONS_DB
            try:
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
                con.execute("SELECT count(*) FROM captions WHERE rowid = 0").fetchone()
            except sqlite3.Error as e:
                raise IndexFormatError(f"{self.label}/{CAPTIONS_DB}: unreadable caption database ({e})") from None
            self._local.con = con
        return con
