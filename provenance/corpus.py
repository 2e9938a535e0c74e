"""Reading a corpus: image folders, webdataset/img2dataset shards and Hugging Face datasets, as CorpusItems.

Shards may be local paths or remote URLs (`https://…`, `s3://…`, any fsspec protocol), read as streams through
fsspec. A shard URL is the operator's own source, like a local path: it is not an untrusted URL, so it does not
go through the consent fetcher's guard against private and loopback addresses (the tests serve shards on
127.0.0.1). Remote listings: a glob (`s3://bucket/shards/*.tar`, or an http(s) folder whose page lists links,
as `python -m http.server` serves), a folder URL ending in `/`, or webdataset's brace range
(`https://host/{00000..00099}.tar`).

Readers yield items lazily and never decode pixels: decoding happens in the indexer's worker threads,
so that a corrupt file becomes a counted, logged skip rather than an exception in the reader.
Item ids are stable across rebuilds: a folder's relative path, a shard's key, a dataset's id column.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provenance.errors import CorpusError
from provenance.extras import require
from provenance.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text", "prompt", "TEXT")


@dataclass
class CorpusItem:
    """One image of a corpus: its stable id, its encoded bytes (or an error) and its metadata."""

    id: str
    data: bytes | None  # encoded image file; None when the reader itself could not get it
    caption: str | None = None
    source: str | None = None  # where the image came from: file path, url, or shard:key
    license: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other metadata columns
    error: str | None = None  # reader-level failure (missing file, unreadable member)
    # its kind: missing, permission, dangling_link, symlink_loop, special_file, too_large, unreadable
    error_kind: str | None = None


@dataclass(frozen=True)
class CorpusSource:
    """A parsed corpus location, recorded in the manifest so that a resumed or appended build can check it."""

    kind: str  # "folder" | "webdataset" | "hf"
    location: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "options": dict(self.options)}


def detect_source(
    location: str,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
) -> CorpusSource:
    """Decide how to read `location`: a folder of images, tar shards (folder or glob), or a HF dataset."""
    hf_options = {
        k: v
        for k, v in {
            "image_column": image_column,
            "caption_column": caption_column,
            "id_column": id_column,
            "split": split,
        }.items()
        if v
    }
    if location.startswith("hf://"):
        return CorpusSource("hf", location[len("hf://") :], hf_options)
    if is_url(location):
        return CorpusSource("webdataset", location)
    if any(ch in location for ch in "*?[") or location.endswith(".tar"):
        return CorpusSource("webdataset", location)
    p = Path(location)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or image_column:
            return CorpusSource("hf", str(p), hf_options)
        if any(p.glob("*.tar")):
            return CorpusSource("webdataset", str(p))
        return CorpusSource("folder", str(p))
    if p.exists():
        raise CorpusError(f"{location}: a single file is not a corpus; give a folder, shards (.tar) or a dataset")
    if "/" in location and not location.startswith((".", "/")):
        return CorpusSource("hf", location, hf_options)  # looks like a hub dataset id "org/name"
    raise CorpusError(f"{location}: no such folder, shard glob or dataset")


def count_items(source: CorpusSource) -> int:
    """How many items `read_corpus` yields for a folder or a dataset (listing only: no image is read)."""
    if source.kind == "folder":
        _, files, skipped, missing = _folder_listing(Path(source.location))
        return len(skipped) + len(missing) + len(files)
    if source.kind == "hf":
        return len(_load_hf(source.location, source.options.get("split"))[0])
    raise CorpusError(f"{source.location}: count_items takes a folder or a dataset, not {source.kind}")


def read_corpus_range(source: CorpusSource, start: int, stop: int) -> Iterator[CorpusItem]:
    """Items [start, stop) of `read_corpus(source)`, reading only their images (the Ray engine's units)."""
    if source.kind == "folder":
        return read_image_folder(source.location, start=start, stop=stop)
    if source.kind == "hf":
        return read_hf_dataset(source.location, **source.options, start=start, stop=stop)
    raise CorpusError(f"{source.location}: read_corpus_range takes a folder or a dataset, not {source.kind}")


def read_corpus(source: CorpusSource, limit: int | None = None) -> Iterator[CorpusItem]:
    readers = {"folder": read_image_folder, "webdataset": read_webdataset, "hf": read_hf_dataset}
    it = readers[source.kind](source.location, **source.options)
    for n, item in enumerate(it):
        if limit is not None and n >= limit:
            return
        yield item


# ---------------------------------------------------------------------------------------- folders


def _load_folder_metadata(root: Path) -> dict[str, dict[str, Any]]:
    """metadata.jsonl or metadata.csv (Hugging Face imagefolder convention), keyed by file_name."""
    rows: dict[str, dict[str, Any]] = {}
    jsonl, csv_path = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.exists():
        with jsonl.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    logger.warning("%s:%d: skipping bad JSON line (%s)", jsonl, lineno, e)
                    continue
                if "file_name" not in row:
                    logger.warning("%s:%d: no file_name, skipping", jsonl, lineno)
                    continue
                rows[Path(row["file_name"]).as_posix()] = row
    elif csv_path.exists():
        with csv_path.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                if row.get("file_name"):
                    rows[Path(row["file_name"]).as_posix()] = row
    return rows


def _split_row(row: dict[str, Any]) -> tuple[str | None, str | None, dict[str, Any]]:
    caption = next((row[k] for k in CAPTION_KEYS if row.get(k)), None)
    license_ = row.get("license")
    extra = {k: v for k, v in row.items() if k not in ("file_name", "license") and k not in CAPTION_KEYS}
    return (str(caption) if caption is not None else None), (str(license_) if license_ else None), extra


def _walk_images(root: Path) -> tuple[list[Path], list[tuple[Path, str, str]]]:
    """Image files under `root` (sorted), and every path skipped on the way as (path, reason_kind, reason):
    folders that cannot be listed, folder symlink loops, and image-named entries that are not readable regular
    files (dangling links, loops, FIFOs and other special files, files over the size limit)."""
    from provenance.images import file_problem

    files: list[Path] = []
    skipped: list[tuple[Path, str, str]] = []

    def onerror(e: OSError) -> None:
        kind = "permission" if isinstance(e, PermissionError) else "unreadable"
        skipped.append((Path(e.filename), kind, f"{e.filename}: cannot list folder ({e.strerror or e})"))

    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink back to a folder already walked
            skipped.append((Path(dirpath), "symlink_loop", f"{dirpath}: symbolic link loop (folder already read)"))
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if Path(d).suffix.lower() in IMAGE_EXTENSIONS]:
            f = Path(dirpath) / name
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            problem = file_problem(f)
            if problem is None:
                files.append(f)
            elif problem[0] != "directory":
                skipped.append((f, *problem))
    return sorted(files), skipped


def _folder_listing(
    root: Path,
) -> tuple[dict[str, dict[str, Any]], list[Path], list[tuple[Path, str, str]], list[str]]:
    """(metadata rows, image files, skipped paths, metadata rows whose file is missing) of a folder corpus."""
    if not root.is_dir():
        raise CorpusError(f"{root}: not a folder")
    metadata = _load_folder_metadata(root)
    files, skipped = _walk_images(root)
    listed = {f.relative_to(root).as_posix() for f in files}
    listed |= {p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p, _, _ in skipped}
    missing = sorted(set(metadata) - listed)
    if not files and not metadata and not skipped:
        raise CorpusError(f"{root}: no image files found")
    return metadata, files, skipped, missing


def read_image_folder(location: str, start: int = 0, stop: int | None = None) -> Iterator[CorpusItem]:
    """The folder's items: first the paths that cannot be read (with their reasons), then metadata rows whose file
    is missing, then the images in path order; only items [start, stop) of that order are yielded (and read)."""
    from provenance.errors import FileUnreadableError
    from provenance.images import read_bytes

    root = Path(location)
    metadata, files, skipped, missing = _folder_listing(root)
    end = len(skipped) + len(missing) + len(files) if stop is None else stop
    for path, kind, reason in skipped[max(0, start) : max(0, end)]:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        caption, license_, extra = _split_row(metadata.get(rel, {}))
        yield CorpusItem(rel, None, caption, rel, license_, extra, error=reason, error_kind=kind)
    start, end = start - len(skipped), end - len(skipped)
    for rel in missing[max(0, start) : max(0, end)]:
        # A metadata row whose image is absent is a skip the user should see, not a silent drop.
        caption, license_, extra = _split_row(metadata[rel])
        yield CorpusItem(
            rel,
            None,
            caption,
            rel,
            license_,
            extra,
            error="listed in metadata but the file is missing",
            error_kind="missing",
        )
    start, end = start - len(missing), end - len(missing)
    for f in files[max(0, start) : max(0, end)]:
        rel = f.relative_to(root).as_posix()
        caption, license_, extra = _split_row(metadata.get(rel, {}))
        data: bytes | None
        err: str | None
        err_kind: str | None
        try:
            data, err, err_kind = read_bytes(f), None, None
        except FileUnreadableError as e:
            data, err, err_kind = None, str(e), getattr(e, "reason_kind", "unreadable")
        # the source is relative to the corpus folder (in the manifest): a server never shows its own paths
        yield CorpusItem(rel, data, caption, rel, license_, extra, error=err, error_kind=err_kind)


# ---------------------------------------------------------------------------------- webdataset


def is_url(location: str) -> bool:
    """A remote location read through fsspec (`https://`, `s3://`, ...); `hf://` names a Hugging Face dataset."""
    return "://" in location and not location.startswith(("hf://", "file://"))


def expand_braces(location: str) -> list[str]:
    """webdataset's shard ranges: `a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar (zero-padded as
    written). Only the first range is expanded per pass; several ranges multiply."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", location)
    if m is None:
        return [location]
    lo, hi = int(m.group(1)), int(m.group(2))
    if hi < lo:
        raise CorpusError(f"{location}: empty shard range {m.group(0)}")
    width = len(m.group(1))
    out: list[str] = []
    for i in range(lo, hi + 1):
        out += expand_braces(f"{location[: m.start()]}{i:0{width}d}{location[m.end() :]}")
    return out


def shard_name(shard: str | Path) -> str:
    """The shard's file name (`00000.tar`): its unit in the index, whatever folder or server it is read from."""
    return str(shard).rstrip("/").rsplit("/", 1)[-1]


def list_shards(location: str) -> list[str]:
    """The .tar shards of `location` (a folder, a glob, one shard, a brace range, or the same as URLs), sorted."""
    if "{" in location and ".." in location:
        shards = [s for part in expand_braces(location) for s in list_shards(part)]
    elif is_url(location):
        shards = _list_remote_shards(location)
    elif any(ch in location for ch in "*?["):
        shards = sorted(glob.glob(location))
    elif location.endswith(".tar"):
        shards = [location]
    else:
        shards = [str(p) for p in sorted(Path(location).glob("*.tar"))]
    if not shards:
        raise CorpusError(f"{location}: no .tar shards found")
    return shards


def _fsspec():
    return require("fsspec", "reading shards from a URL")


def _list_remote_shards(location: str) -> list[str]:
    fsspec = _fsspec()
    try:
        fs, _ = fsspec.core.url_to_fs(location)
        if location.endswith(".tar") and not any(ch in location for ch in "*?["):
            return [location]  # one shard: opened (and its errors reported) when read
        pattern = location if any(ch in location for ch in "*?[") else location.rstrip("/") + "/*.tar"
        found = fs.glob(pattern)
    except Exception as e:  # fsspec and its backends raise their own error types (aiohttp, botocore...)
        raise CorpusError(f"{location}: cannot list shards ({type(e).__name__}: {e})") from None
    protocol = location.split("://", 1)[0]
    # http(s) globs return full URLs; object stores return bucket/key paths without the protocol
    return sorted(f if "://" in f else f"{protocol}://{f}" for f in found if f.endswith(".tar"))


def _parquet_rows(shard: str) -> dict[str, dict[str, Any]]:
    pq_path = shard[: -len(".tar")] + ".parquet" if shard.endswith(".tar") else shard + ".parquet"
    try:
        import pyarrow.parquet as pq

        if is_url(shard):
            fs, path = _fsspec().core.url_to_fs(pq_path)
            if not fs.exists(path):
                return {}
            with fs.open(path, "rb") as f:
                table = pq.read_table(f)
        else:
            if not Path(pq_path).exists():
                return {}
            table = pq.read_table(pq_path)
        return {str(r["key"]): r for r in table.to_pylist() if "key" in r}
    except Exception as e:
        logger.warning("%s: cannot read parquet sidecar (%s); using tar metadata only", pq_path, e)
        return {}


def read_webdataset(location: str) -> Iterator[CorpusItem]:
    """img2dataset layout: members `{key}.jpg|png|webp`, `{key}.txt`, `{key}.json`, grouped by key."""
    for shard in list_shards(location):
        yield from read_shard(shard)


def read_shard(shard: str) -> Iterator[CorpusItem]:
    """The items of one shard (a path or a URL); a shard that cannot be opened is one item with its error, and a
    truncated one yields the items before the damage (both logged)."""
    name = shard_name(shard)
    sidecar = _parquet_rows(shard)
    try:
        if is_url(shard):
            stream = _fsspec().open(shard, "rb").open()
            # a stream ("r|"): members are read in order, with no seeks (one HTTP request, no range reads)
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed by `with tar:` below
        else:
            stream = None
            tar = tarfile.open(shard)  # noqa: SIM115 - closed by `with tar:` below, once the open is known to work
    except Exception as e:  # OSError, TarError, or a remote filesystem's own error (aiohttp, botocore...)
        logger.error("%s: cannot open shard (%s); skipping it", shard, e)
        yield CorpusItem(name, None, source=str(shard), error=f"cannot open shard ({e})", error_kind="unreadable")
        return
    with tar:
        group_key: str | None = None
        group: dict[str, bytes] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                if key != group_key and group_key is not None:
                    yield _wds_item(name, group_key, group, sidecar)
                    group = {}
                group_key = key
                f = tar.extractfile(member)
                group[ext.lower()] = f.read() if f else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            logger.error("%s: shard is truncated or corrupt after key %s (%s)", shard, group_key, e)
        if group_key is not None:
            yield _wds_item(name, group_key, group, sidecar)
    if stream is not None:
        stream.close()


def _wds_item(shard: str, key: str, group: dict[str, bytes], sidecar: dict[str, dict[str, Any]]) -> CorpusItem:
    meta: dict[str, Any] = dict(sidecar.get(key, {}))
    if "json" in group:
        try:
            meta.update(json.loads(group["json"]))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.warning("%s: %s.json is not valid JSON", shard, key)
    caption = meta.get("caption")
    if not caption and "txt" in group:
        caption = group["txt"].decode("utf-8", "replace").strip()
    image_ext = next((e for e in WDS_IMAGE_EXTENSIONS if e in group), None)
    source = meta.get("url") or f"{shard}:{key}"
    license_ = meta.get("license")
    extra = {k: v for k, v in meta.items() if k not in ("key", "caption", "url", "license")}
    extra["shard"] = shard
    if image_ext is None:
        return CorpusItem(key, None, caption, source, license_, extra, error="no image member in shard")
    return CorpusItem(key, group[image_ext], caption, source, license_, extra)


# ------------------------------------------------------------------------------- HF datasets


def read_hf_dataset(
    location: str,
    image_column: str | None = None,
    caption_column: str | None = None,
    id_column: str | None = None,
    split: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[CorpusItem]:
    """A Hugging Face dataset by hub name (fetched when online) or a local `save_to_disk` folder; rows
    [start, stop) only when given (their ids keep their row numbers)."""
    datasets = require("datasets", "a Hugging Face dataset corpus")

    from provenance.errors import FileUnreadableError
    from provenance.images import read_bytes

    ds, split = _load_hf(location, split)
    split = split or "train"
    columns = ds.column_names
    image_column = (
        image_column
        or next((c for c in columns if isinstance(ds.features[c], datasets.Image)), None)
        or ("image" if "image" in columns else None)
    )
    if image_column not in columns:
        raise CorpusError(
            f"{location}: no image column {image_column!r}; columns are {columns} (choose one with --image-column)"
        )
    caption_column = caption_column or next((c for c in CAPTION_KEYS if c in columns), None)
    if caption_column is not None and caption_column not in columns:
        raise CorpusError(f"{location}: no caption column {caption_column!r}; columns are {columns}")
    if id_column is not None and id_column not in columns:
        raise CorpusError(f"{location}: no id column {id_column!r}; columns are {columns}")
    feature = ds.features[image_column]
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        sample = ds[0][image_column] if len(ds) else ""
        if isinstance(sample, str) and sample.startswith(("http://", "https://")):
            raise CorpusError(
                f"{location}: column {image_column!r} holds image URLs; downloading URL datasets is not "
                "supported yet — download them first (e.g. with img2dataset) and index the shards"
            )
    # Keep the encoded bytes: the indexer decodes them in worker threads, and a broken one is a skip.
    ds = ds.cast_column(image_column, datasets.Image(decode=False)) if isinstance(feature, datasets.Image) else ds
    stop = len(ds) if stop is None else min(stop, len(ds))
    rows = ds.select(range(start, stop)) if (start, stop) != (0, len(ds)) else ds
    for i, row in enumerate(rows, start):
        item_id = str(row[id_column]) if id_column else f"{split}/{i}"
        value = row[image_column]
        data, err, kind, source = None, None, None, f"{location}[{split}][{i}]"
        path = (
            value.get("path")
            if isinstance(value, dict) and value.get("bytes") is None
            else (value if isinstance(value, str) else None)
        )
        if isinstance(value, dict) and value.get("bytes") is not None:
            data = value["bytes"]
        elif isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif path:
            try:  # a regular file of bounded size only (a FIFO or a huge file is a skip with its reason)
                data, source = read_bytes(path), path
            except FileUnreadableError as e:
                err, kind = str(e), getattr(e, "reason_kind", "unreadable")
        else:
            err = f"unsupported image value of type {type(value).__name__}"
        if data is None and err is None:
            err = "empty image cell"
        caption = row.get(caption_column) if caption_column else None
        extra = {k: v for k, v in row.items() if k not in (image_column, caption_column, id_column) and _jsonable(v)}
        license_ = extra.pop("license", None)
        yield CorpusItem(
            item_id,
            data,
            str(caption) if caption is not None else None,
            source,
            str(license_) if license_ else None,
            extra,
            error=err,
            error_kind=kind,
        )


def _load_hf(location: str, split: str | None) -> tuple[Any, str | None]:
    """(datasets.Dataset, its split's name): of a DatasetDict, `split`, else "train", else the first."""
    datasets = require("datasets", "a Hugging Face dataset corpus")
    try:
        if Path(location).is_dir():
            ds = datasets.load_from_disk(location)
        else:
            ds = datasets.load_dataset(location, split=split or "train")
    except FileNotFoundError as e:
        raise CorpusError(f"{location}: dataset not found ({e})") from None
    except Exception as e:
        raise CorpusError(f"{location}: cannot load dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise CorpusError(f"{location}: no split {name!r}; splits are {list(ds)}")
        ds, split = ds[name], name
    return ds, split


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False
