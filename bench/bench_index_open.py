"""Opening an index, and one id and one sha256 lookup, at 100k, 1M and 10M rows of metadata: time and memory.

Each size is a real format-2 index written by `parts.PartWriter` (parts of --part-size rows: Arrow metadata,
SQLite FTS5 captions, sorted id/sha256 hashes, PDQ hashes with their FAISS index) plus the merged lookup a build
writes. Rows are synthetic: ids, captions drawn from a word list, random sha256s and PDQ hashes; no thumbnails,
no SSCD vectors (opening never reads vectors; the PDQ files stand for them).

Every measurement runs in a fresh Python process that has already imported the library, so the figures are
the open and the lookups themselves. Memory is read from /proc/self/status: RssAnon (the process's own memory)
and RssFile (pages of memory-mapped files, which the OS can drop) separately. The page cache is warm (the files
were just written or read); nothing is dropped from it, the machine being shared.

Baseline, in the same run: the format-1 open (what ProvenanceIndex.__init__ did before parts: the whole metadata
table read, ids/captions/sources as Python lists, a dict of every id), emulated on the same rows.

    python bench/bench_index_open.py --sizes 100000 1000000 10000000 --dir /tmp/bench-open
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "old",
    "young",
    "photo",
    "of",
    "on",
    "in",
    "with",
    "the",
    "near",
    "beside",
    "street",
    "beach",
    "city",
    "mountain",
    "river",
    "table",
    "kitchen",
    "pizza",
    "bike",
    "car",
    "train",
    "sky",
    "sunset",
    "tree",
    "house",
    "window",
    "garden",
    "boy",
    "girl",
    "playing",
    "sitting",
    "standing",
    "running",
    "holding",
    "looking",
    "white",
    "black",
    "wooden",
    "field",
    "snow",
    "water",
    "boat",
    "plate",
]


def _mem() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile", "VmRSS"):
            out[k] = int(v.split()[0]) * 1024
    return out


def item_id(i: int) -> str:
    return f"{i:010d}.jpg"


def item_sha(i: int) -> str:
    import hashlib

    return hashlib.sha256(b"item %d" % i).hexdigest()


def generate(index_dir: Path, n: int, part_size: int) -> float:
    """Write an n-row index (resumable: complete parts are kept); returns seconds spent."""
    from provenance.descriptors.base import DescriptorSpec
    from provenance.locking import IndexWriteLock
    from provenance.parts import PartWriter, read_marker
    from provenance.store import (
        PARTS,
        commit_manifest,
        new_manifest,
        part_entry,
        part_name,
        write_merged_lookup,
        write_tombstones,
    )

    t0 = time.perf_counter()
    specs = {"pdq": DescriptorSpec("pdq", "pdq/pdqhash-128px", None, 256, "hamming")}
    index_dir.mkdir(parents=True, exist_ok=True)
    with IndexWriteLock(index_dir, action="bench"):
        manifest = new_manifest(index_dir, specs, {}, {"source": {"kind": "synthetic", "location": f"{n} rows"}})
        rng = np.random.default_rng(0)
        words = np.array(WORDS)
        for seq, start in enumerate(range(0, n, part_size)):
            name = part_name(seq, "synthetic")
            end = min(n, start + part_size)
            d = index_dir / PARTS / name
            if (d / "part.json").exists():
                manifest["parts"].append(part_entry(read_marker(d)))
                continue
            m = end - start
            picks = rng.integers(0, len(words), (m, 8))
            captions = [" ".join(w) for w in words[picks].tolist()]
            rows = [
                {
                    "id": item_id(i),
                    "caption": c,
                    "source": f"https://example.com/img/{i}.jpg",
                    "license": "cc-by",
                    "width": 640,
                    "height": 480,
                    "sha256": item_sha(i),
                    "extra": "{}",
                }
                for i, c in zip(range(start, end), captions, strict=False)
            ]
            w = PartWriter(index_dir / PARTS, name, {"pdq": 32}, unit="synthetic", build_id="bench")
            w.add(rows, {"pdq": rng.integers(0, 256, (m, 32), dtype=np.uint8)}, [None] * m)
            manifest["parts"].append(part_entry(w.finish(1 << 30, False, specs)))
            if seq % 50 == 0:
                print(f"  {name}: {end:,} rows, {time.perf_counter() - t0:.0f} s", flush=True)
        manifest["next_part"] = len(manifest["parts"])
        write_tombstones(index_dir, manifest, [])
        write_merged_lookup(index_dir, manifest)
        commit_manifest(index_dir, manifest)
    return time.perf_counter() - t0


def measure(index_dir: Path, n: int, baseline: bool) -> dict:
    """In this (fresh) process: open, lookups, memory; the format-1 style open when baseline is set."""
    import sqlite3  # noqa: F401 - imports are not what is measured

    import pyarrow as pa
    import pyarrow.ipc

    from provenance.store import ProvenanceIndex

    out: dict = {"n": n}
    before = _mem()
    t = time.perf_counter()
    idx = ProvenanceIndex.open(index_dir)
    out["open_first_ms"] = (time.perf_counter() - t) * 1e3
    after = _mem()
    out["open_anon_bytes"] = after["RssAnon"] - before["RssAnon"]
    out["open_file_bytes"] = after["RssFile"] - before["RssFile"]
    times = []
    for _ in range(9):
        t = time.perf_counter()
        ProvenanceIndex.open(index_dir)
        times.append(time.perf_counter() - t)
    out["open_ms"] = statistics.median(times) * 1e3
    out["parts"] = len(idx.parts)
    assert len(idx) == n
    rng = random.Random(1)
    # one id lookup (cold: maps the merged lookup, reads one part's marker and metadata batch), then 100 more
    t = time.perf_counter()
    i = rng.randrange(n)
    assert idx.row(item_id(i)) == i
    out["id_first_ms"] = (time.perf_counter() - t) * 1e3

    def timed(fn, picks) -> float:
        lat = []
        for i in picks:
            t = time.perf_counter()
            fn(i)
            lat.append(time.perf_counter() - t)
        return statistics.median(lat) * 1e3

    def by_id(i: int) -> None:
        assert idx.row(item_id(i)) == i

    def by_sha(i: int) -> None:
        assert idx.id_with_sha256(item_sha(i)) == item_id(i)

    # 100 random ids: each in a part not read before (its marker is read: sizes checked), then the same again
    picks = [rng.randrange(n) for _ in range(100)]
    out["id_ms"] = timed(by_id, picks)
    out["id_warm_ms"] = timed(by_id, picks)
    t = time.perf_counter()
    by_sha(rng.randrange(n))
    out["sha_first_ms"] = (time.perf_counter() - t) * 1e3
    picks = [rng.randrange(n) for _ in range(100)]
    out["sha_ms"] = timed(by_sha, picks)
    out["sha_warm_ms"] = timed(by_sha, picks)
    end = _mem()
    out["lookups_anon_bytes"] = end["RssAnon"] - before["RssAnon"]
    out["lookups_file_bytes"] = end["RssFile"] - before["RssFile"]
    if baseline:
        # format 1's open: the whole metadata table, three Python lists and a dict of every id
        b0 = _mem()
        t = time.perf_counter()
        table = pa.concat_tables(
            [pa.ipc.open_file(pa.memory_map(str(p.dir / "metadata.arrow"))).read_all() for p in idx.parts]
        )
        ids = table.column("id").to_pylist()
        row_of = {x: j for j, x in enumerate(ids)}
        captions = table.column("caption").to_pylist()
        sources = table.column("source").to_pylist()
        offs = table.column("thumb_offset").to_numpy(), table.column("thumb_size").to_numpy()
        out["v1_open_ms"] = (time.perf_counter() - t) * 1e3
        b1 = _mem()
        out["v1_open_anon_bytes"] = b1["RssAnon"] - b0["RssAnon"]
        out["v1_open_file_bytes"] = b1["RssFile"] - b0["RssFile"]
        del table, ids, row_of, captions, sources, offs
    return out


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--part-size", type=int, default=10_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-index-open"))
    ap.add_argument("--baseline-max", type=int, default=1_000_000, help="largest n for the format-1 baseline")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "index_open.md")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.n, args.baseline)))
        return
    results, gen = [], {}
    for n in args.sizes:
        d = args.dir / f"n{n}"
        if not (d / "manifest.json").exists():
            print(f"writing {n:,} rows to {d}", flush=True)
            gen[n] = generate(d, n, args.part_size)
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        r = subprocess.run(
            [sys.executable, __file__, "--measure", str(d), "--n", str(n)]
            + (["--baseline"] if n <= args.baseline_max else []),
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["disk_bytes"] = _du(d)
        res["gen_s"] = gen.get(n)
        results.append(res)
        print(json.dumps(res), flush=True)
    write_results(args, results)


def write_results(args, results: list[dict]) -> None:
    def mib(b: float) -> str:
        return f"{b / 2**20:.1f}"

    lines = [
        "# Opening a part-based index (bench/bench_index_open.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python bench/bench_index_open.py --sizes "
        f"{' '.join(str(r['n']) for r in results)} --part-size {args.part_size}`, {platform.node()}: "
        f"{os.cpu_count()} cores (shared), no GPU. Synthetic rows (ids, 8-word captions, sha256s, PDQ hashes) "
        "written by the real PartWriter; page cache warm. Each size measured in a fresh process; memory from "
        "/proc/self/status (RssAnon = the process's own memory, RssFile = mapped file pages).",
        "",
        "| rows | parts | disk | open (median of 9) | open: anon / file RSS | id lookup: first / new part / warm | "
        "sha256 lookup: first / new part / warm | after 402 lookups: anon / file RSS | format-1 open (baseline) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = (
            f"{r['v1_open_ms']:.0f} ms, {mib(r['v1_open_anon_bytes'])} MiB anon"
            if "v1_open_ms" in r
            else "not run (memory)"
        )
        lines.append(
            f"| {r['n']:,} | {r['parts']} | {r['disk_bytes'] / 2**30:.2f} GiB | {r['open_ms']:.2f} ms "
            f"(first {r['open_first_ms']:.2f}) | {mib(r['open_anon_bytes'])} / {mib(r['open_file_bytes'])} MiB | "
            f"{r['id_first_ms']:.2f} / {r['id_ms']:.3f} / {r['id_warm_ms']:.3f} ms | "
            f"{r['sha_first_ms']:.2f} / {r['sha_ms']:.3f} / {r['sha_warm_ms']:.3f} ms | "
            f"{mib(r['lookups_anon_bytes'])} / {mib(r['lookups_file_bytes'])} MiB | {base} |"
        )
    lines += [
        "",
        "Opening reads manifest.json and the tombstones only (the part list, one entry per part, is read on first "
        "use: it is in the 'first' lookup). A lookup is a binary search in the merged lookup (memory-mapped sorted "
        "64-bit hashes), then one Arrow record batch of the part holding the row. 'new part': median over 100 random "
        "ids, where most land in a part not read before (its marker is read and its files' sizes checked, once); "
        "'warm': the same 100 ids again.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
