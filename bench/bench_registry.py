"""The do-not-train registry at scale: /v1/consent/check's work for 10,000 URLs and 10,000 file hashes against a
1M-row index and a 100k-entry registry, and registering a content opt-out against a 1M-item index.

The index is a real format-2 index written by `parts.PartWriter`: 1M synthetic rows (ids, URLs on 1,000 hosts,
sha256s), random L2-normalised 512-d SSCD vectors (float16) and random PDQ hashes, parts of --part-size rows with
the FAISS plan the writer picks. One "artwork" is planted: its own vector and hash at one row, and near copies
(SSCD cosine about 0.85, PDQ 0-8 bits away) at 5 more, so a content opt-out has something to cover. The registry
holds 100k opt-outs (60k URLs, 30k domains, 10k ids), added through `Registry.add_many` (the timed registration).

Measured (each the median of --repeats runs, in this process, page cache warm):
- consent check of 10,000 URLs (half opted out by URL or domain) through `registry.consent_check`, the function
  the route calls: registry only, and with the consent signals cache (offline: answers from the cache only; the
  cache is filled first so every URL is a hit), against a baseline of the same check on an empty registry;
- consent check of 10,000 sha256 hashes (half indexed) against the 1M-row index;
- a content opt-out's coverage over the 1M index (`registry.content_coverage`: SSCD and PDQ searches with k up to
  1,000, decide_verdict per candidate), against a baseline of one scan-sized search (k=10) of the same vector.

    python bench/bench_registry.py --n 1000000 --part-size 10000 --dir /tmp/bench-registry
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIM = 512
PLANTED = 6  # rows holding the artwork or a near copy of it
HOSTS = 1000


def url_of(i: int) -> str:
    return f"https://img{i % HOSTS}.example{i % 7}.com/p/{i}.jpg"


def sha_of(i: int) -> str:
    import hashlib

    return hashlib.sha256(b"item %d" % i).hexdigest()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def artwork(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal(DIM)).astype(np.float32), rng.integers(0, 256, 32, dtype=np.uint8)


def generate(index_dir: Path, n: int, part_size: int) -> float:
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
    specs = {
        "sscd": DescriptorSpec("sscd", "bench/random", "", DIM, "cosine"),
        "pdq": DescriptorSpec("pdq", "pdq/pdqhash-128px", "", 256, "hamming"),
    }
    art_v, art_p = artwork()
    rng = np.random.default_rng(0)
    planted = {int(r): j for j, r in enumerate(rng.choice(n, PLANTED, replace=False))}
    index_dir.mkdir(parents=True, exist_ok=True)
    with IndexWriteLock(index_dir, action="bench"):
        manifest = new_manifest(index_dir, specs, {}, {"source": {"kind": "synthetic", "location": f"{n} rows"}})
        for seq, start in enumerate(range(0, n, part_size)):
            name = part_name(seq, "synthetic")
            end = min(n, start + part_size)
            d = index_dir / PARTS / name
            if (d / "part.json").exists():
                manifest["parts"].append(part_entry(read_marker(d)))
                continue
            m = end - start
            sscd = _unit(rng.standard_normal((m, DIM), dtype=np.float32))
            pdq = rng.integers(0, 256, (m, 32), dtype=np.uint8)
            for r, j in planted.items():
                if start <= r < end:
                    noise = 0.0 if j == 0 else 0.62  # cosine ~0.85 after normalising
                    sscd[r - start] = _unit(art_v + noise * _unit(rng.standard_normal(DIM)))
                    flip = np.zeros(256, np.uint8)
                    flip[rng.choice(256, min(8, 2 * j), replace=False)] = 1
                    pdq[r - start] = art_p ^ np.packbits(flip)
            rows = [
                {
                    "id": f"{i:010d}.jpg",
                    "caption": None,
                    "source": url_of(i),
                    "license": None,
                    "width": 640,
                    "height": 480,
                    "sha256": sha_of(i),
                    "extra": "{}",
                }
                for i in range(start, end)
            ]
            w = PartWriter(index_dir / PARTS, name, {"sscd": DIM, "pdq": 32}, unit="synthetic", build_id="bench")
            w.add(rows, {"sscd": sscd.astype(np.float16), "pdq": pdq}, [None] * m)
            manifest["parts"].append(part_entry(w.finish(1 << 30, False, specs)))
            print(f"  {name}: {end:,} rows, {time.perf_counter() - t0:.0f} s", flush=True)
        manifest["next_part"] = len(manifest["parts"])
        write_tombstones(index_dir, manifest, [])
        write_merged_lookup(index_dir, manifest)
        commit_manifest(index_dir, manifest)
    return time.perf_counter() - t0


def fill_registry(path: Path, n_entries: int) -> float:
    from provenance.registry import NewOptout, Registry

    entries = (
        [NewOptout("url", url_of(i)) for i in range(0, 2 * int(n_entries * 0.6), 2)]  # even rows' URLs
        + [NewOptout("domain", f"optout{i}.example.org") for i in range(int(n_entries * 0.3))]
        + [NewOptout("id", f"{i:010d}.jpg") for i in range(1, 2 * int(n_entries * 0.1), 2)]
    )
    with Registry(path) as reg:
        t0 = time.perf_counter()
        reg.add_many(entries, key="k_bench")
        return time.perf_counter() - t0


def _median(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def fill_signals_cache(cache: Path, urls: list[str]) -> bool:
    """Put an answer for every request `url_consent` makes for these URLs into the consent cache (a 404 for the
    site files, a plain 200 for each image), so an offline check is all hits. False without provenance.consent."""
    try:
        from provenance.consent.fetch import ConsentCache, FetchRequest, FetchResult
        from provenance.consent.urls import PAGE_MAX_BYTES, SITE_FILES, _site_request
    except ImportError:
        return False
    c = ConsentCache(cache)
    origins = {u.split("/p/")[0] for u in urls}
    for o in origins:
        for name in SITE_FILES:
            r = _site_request(o, name)
            c.put(r.key, FetchResult(r.url, status=404), 3600 * 24)
    for u in urls:
        r = FetchRequest(u, PAGE_MAX_BYTES, "html")
        c.put(r.key, FetchResult(u, status=200, headers={"content-type": "image/jpeg"}), 3600 * 24)
    c.close()
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--registry-size", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--part-size", type=int, default=10_000)  # the build default: Flat parts
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench-registry"))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "registry.md")
    args = ap.parse_args()

    from provenance.registry import (
        ContentPrint,
        Registry,
        consent_check,
        content_coverage,
    )
    from provenance.store import ProvenanceIndex

    d = args.dir / f"n{args.n}"
    gen_s = generate(d, args.n, args.part_size) if not (d / "manifest.json").exists() else None
    index = ProvenanceIndex.open(d)
    index.preload()
    reg_path = args.dir / f"registry{args.registry_size}.sqlite"
    for f in args.dir.glob(f"registry{args.registry_size}.sqlite*"):
        f.unlink()  # registration is timed every run
    reg_s = fill_registry(reg_path, args.registry_size)
    empty = Registry(args.dir / "empty.sqlite")
    reg = Registry(reg_path)
    rng = np.random.default_rng(1)
    q = args.queries
    # half the URLs opted out (even rows' URLs are registered), half not; half the hashes indexed
    # registered URLs are those of the even rows below 2 * 60% of the registry size (fill_registry)
    registered = 2 * int(args.registry_size * 0.6)
    rows = rng.choice(args.n, q, replace=False)
    urls = [
        url_of(int(2 * rng.integers(0, registered // 2))) if k % 2 == 0 else url_of(int(i) | 1)
        for k, i in enumerate(rows)
    ]
    shas = [sha_of(int(i)) if k % 2 else sha_of(args.n + k) for k, i in enumerate(rows)]

    res: dict[str, float] = {}
    res["urls_empty"] = _median(lambda: consent_check(empty, index, urls), args.repeats)
    res["urls"] = _median(lambda: consent_check(reg, index, urls), args.repeats)
    hits = sum(r["opted_out"] is not None for r in consent_check(reg, index, urls))
    cache = args.dir / "signals.sqlite"
    have_signals = fill_signals_cache(cache, urls)
    if have_signals:
        from provenance.consent import Fetcher, FetchOptions

        def with_signals():
            with Fetcher(FetchOptions(offline=True, cache_path=cache)) as f:
                consent_check(reg, index, urls, (), f)

        res["urls_signals"] = _median(with_signals, args.repeats)
    res["shas"] = _median(lambda: consent_check(reg, index, (), shas), args.repeats)
    res["shas_lookup"] = _median(lambda: [index.rows_with_sha256(s) for s in shas], args.repeats)
    indexed = sum(bool(r["indexed"]) for r in consent_check(reg, index, (), shas))

    art_v, art_p = artwork()
    content = ContentPrint("0" * 64, art_v, art_p, "bench/random:")
    index.search_vectors("sscd", art_v[None], 10)  # warm: FAISS files mapped, as on a serving index
    res["search_k10"] = _median(
        lambda: (index.search_vectors("sscd", art_v[None], 10), index.search_vectors("pdq", art_p[None], 10)),
        args.repeats,
    )
    res["coverage"] = _median(lambda: content_coverage(index, content), args.repeats)
    covered = content_coverage(index, content)

    plans = sorted({pr.marker["descriptors"]["sscd"]["ann"]["factory"] for pr in index.parts})

    def ms(s: float) -> str:
        return f"{s * 1000:.0f} ms"

    lines = [
        "# Do-not-train registry at scale (bench/bench_registry.py)",
        "",
        (
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python bench/bench_registry.py --n {args.n} "
            f"--registry-size {args.registry_size} --part-size {args.part_size}`, {platform.node()}: {os.cpu_count()} "
            f"cores (shared with other jobs), 24 GB, no GPU. Index: {args.n:,} synthetic rows in {len(index.parts)} "
            f"parts (SSCD 512-d float16, FAISS {', '.join(plans)}; PDQ), written by the real PartWriter; registry: "
            f"{args.registry_size:,} opt-outs (60% URLs, 30% domains, 10% ids). Medians of {args.repeats}."
        ),
        "",
        "| what | time | per item | baseline (same run) | ratio |",
        "|---|---|---|---|---|",
        (
            f"| consent check, {q:,} URLs, registry only ({hits:,} opted out) | {ms(res['urls'])} | "
            f"{res['urls'] / q * 1e6:.0f} µs | empty registry: {ms(res['urls_empty'])} | "
            f"{res['urls'] / res['urls_empty']:.2f}x |"
        ),
    ]
    if have_signals:
        lines.append(
            f"| consent check, {q:,} URLs, registry + signals cache (all hits, offline) | "
            f"{ms(res['urls_signals'])} | {res['urls_signals'] / q * 1e6:.0f} µs | registry only: "
            f"{ms(res['urls'])} | {res['urls_signals'] / res['urls']:.2f}x |"
        )
    lines += [
        (
            f"| consent check, {q:,} sha256 ({indexed:,} indexed) | {ms(res['shas'])} | {res['shas'] / q * 1e6:.0f} µs | "
            f"the index's sha256 lookups alone: {ms(res['shas_lookup'])} | {res['shas'] / res['shas_lookup']:.1f}x |"
        ),
        (
            f"| content opt-out coverage over {args.n:,} items ({len(covered)} covered of {PLANTED} planted) | "
            f"{ms(res['coverage'])} | - | one scan-sized search (SSCD + PDQ, k=10): {ms(res['search_k10'])} | "
            f"{res['coverage'] / res['search_k10']:.1f}x |"
        ),
    ]
    if reg_s is not None:
        lines.append(
            f"| registering {args.registry_size:,} opt-outs (one transaction) | {reg_s:.1f} s | "
            f"{reg_s / args.registry_size * 1e6:.0f} µs | - | - |"
        )
    if gen_s is not None:
        lines.append(f"\nWriting the index took {gen_s:.0f} s.")
    lines += [
        "",
        (
            "The URL check is SQLite lookups (URL, then each parent domain) in IN-lists of 500; a hash is a "
            "binary search in the index's merged sha256 lookup, then the registry's id/URL/domain/content checks "
            "of the items holding that file (their SSCD and PDQ vectors read by row). Coverage searches SSCD and "
            "PDQ with k=100 (growing to 1,000 while the k-th neighbour still scores as a copy) and decides each "
            "candidate with scan's decide_verdict."
        ),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
