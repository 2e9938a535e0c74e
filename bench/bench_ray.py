"""Benchmark of `index build --engine ray` against the local engine, on the same shards, in one run.

Run:  .venv/bin/python bench/bench_ray.py [--shards '../shared/data/flickr8k-dev/{00000..00001}.tar'] [--workers 2]
                                          [--repeats 2] [--out bench/results/ray.md]

What it measures (SSCD + PDQ, the default descriptors, thumbnails on):
  * the local engine's build: images/s over the whole `indexer.build` call (models loaded, parts written, commit);
  * Ray's start-up: `ray.init` of a local cluster with every core (what `--engine ray` pays when no cluster runs);
  * the Ray engine's build on that running cluster, the same call: images/s, and the ratio to the local engine.
    The actors' start-up and model loading are in it (they are paid per build); Ray's start-up is not (paid once
    per cluster), and is reported beside it;
  * that the two indexes hold the same ids in the same parts and give the same top-10 for a sample of their own
    vectors, and the largest absolute difference between their SSCD vectors (int8 ONNX output can move with the
    batch composition and the thread count).
The builds alternate, local first and last (L R L R L for --repeats 2): each Ray build is compared with the mean
of the local builds just before and after it, so that the shared machine's load drifting during the run shows up
as a spread between the ratios rather than as a bias; the median ratio is the figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))


def _items(index_dir: Path) -> tuple[list[str], np.ndarray, list[str]]:
    from provenance.parts import PartReader
    from provenance.store import PARTS

    ids: list[str] = []
    vectors = []
    units = []
    for d in sorted((index_dir / PARTS).iterdir()):
        r = PartReader(d)
        units.append(f"{d.name}:{r.marker['unit']}")
        for _, batch in r.iter_batches():
            ids += batch.column("id").to_pylist()
        vectors.append(np.asarray(r.vectors("sscd"), np.float32))
    return ids, np.concatenate(vectors), units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=str(DATA / "flickr8k-dev" / "{00000..00001}.tar"))
    ap.add_argument("--workers", type=int, default=2, help="Ray actors (each gets cores / workers CPUs)")
    ap.add_argument("--repeats", type=int, default=2, help="Ray builds, each between two local ones")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from provenance.indexer import BuildOptions, build
    from provenance.ray_engine import RayOptions
    from provenance.store import ProvenanceIndex

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    timings: dict[str, float] = {}
    results = {}

    def run(label: str, options: BuildOptions) -> None:
        t = time.perf_counter()
        results[label] = build(args.shards, work / label, options)
        timings[label] = time.perf_counter() - t
        print(f"{label}: {results[label].added} items in {timings[label]:.1f} s", flush=True)

    t = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t
    print(f"ray.init: {startup:.1f} s", flush=True)
    run("local-0", BuildOptions())
    for i in range(args.repeats):
        run(f"ray-{i}", BuildOptions(engine="ray", ray=RayOptions(workers=args.workers)))
        run(f"local-{i + 1}", BuildOptions())
    ray.shutdown()
    load_after = os.getloadavg()

    n = results["ray-0"].added + results["ray-0"].skipped
    ratios = [
        (timings[f"local-{i}"] + timings[f"local-{i + 1}"]) / 2 / timings[f"ray-{i}"] for i in range(args.repeats)
    ]
    ratio = float(np.median(ratios))
    local_s = float(np.mean([timings[f"local-{i}"] for i in range(args.repeats + 1)]))
    local_ips = n / local_s
    ray_s = float(np.mean([timings[f"ray-{i}"] for i in range(args.repeats)]))
    ray_ips = n / ray_s
    ids_l, vec_l, units_l = _items(work / "local-0")
    ids_r, vec_r, units_r = _items(work / "ray-0")
    max_diff = float(np.abs(vec_l - vec_r).max())
    ix_l, ix_r = ProvenanceIndex.open(work / "local-0"), ProvenanceIndex.open(work / "ray-0")
    xq = vec_l[:: max(1, len(vec_l) // 100)]
    same_topk = sum(
        [m.id for m in a] == [m.id for m in b]
        for a, b in zip(ix_l.search_vectors("sscd", xq, 10), ix_r.search_vectors("sscd", xq, 10), strict=True)
    )
    lines = [
        "# Building with Ray vs the local engine (bench/bench_ray.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python bench/bench_ray.py --shards '{args.shards}' "
        f"--workers {args.workers} --repeats {args.repeats}`, {platform.machine()} vm: {os.cpu_count()} cores (shared with other jobs), "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, no GPU; Ray {ray.__version__}. "
        f"Load average before {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, "
        f"after {load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f}. SSCD (int8 ONNX) + PDQ, thumbnails.",
        "",
        "| build (in run order) | items | seconds | images/s | Ray / mean of the local builds around it |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {n} | {timings[label]:.1f} | {n / timings[label]:.1f} | "
            f"{ratios[int(label.split('-')[1])]:.2f} |"
            if label.startswith("ray")
            else f"| {label} | {n} | {timings[label]:.1f} | {n / timings[label]:.1f} | |"
            for label in timings
        ],
        "",
        f"- **Ray / local images/s, median of {args.repeats}: {ratio:.2f}** (Ray: {args.workers} actors x "
        f"{max(1, (os.cpu_count() or 1) // args.workers)} CPU on a running local cluster; the actors' start-up and "
        f"model loading are in each Ray build). Means: local {local_ips:.1f}, Ray {ray_ips:.1f} images/s.",
        f"- Ray's overhead: {100 * (1 - ratio):.0f}% of the local rate (the issue's budget: at most 15%; negative: "
        "Ray was faster).",
        f"- Ray start-up (`ray.init` of a local cluster, paid once, not in the Ray rows): {startup:.1f} s. Paid by a "
        f"single Ray build, it gives {n / (ray_s + startup) / local_ips:.2f} of the local rate on these {n} images.",
        f"- Same ids in the same order: {ids_l == ids_r}; same parts: {units_l == units_r} ({', '.join(units_r)}).",
        f"- Same top-10 ids for {same_topk} of {len(xq)} sampled queries; largest |SSCD vector difference|: "
        f"{max_diff:.3g} (float16 storage).",
        "- GPU actors (`--gpus-per-worker`): not measured by this script (CPU only); `bench/gpu_ray_actor.py` runs one "
        "actor's work on CUDA without Ray when a GPU is lent.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
