"""Scan speed of the default path against an older checkout, and of --thorough's copy detection, in one run.

    # c287df2: main just before issue 29 (region search, verification) was merged
    git worktree add --detach /work/wt/pre29 c287df2
    python -m provenance.cli index build ../shared/data/flickr8k-dev --index /tmp/copydet/index --limit 1500
    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 10 python bench/bench_copydet_speed.py --base /work/wt/pre29 \
        --index /tmp/copydet/index

Each (checkout, configuration) scans the same files in its own process (PYTHONPATH = that checkout), after a
warm-up, in alternating rounds so that a change in the machine's load falls on both; it reports images/s (wall)
and CPU ms per image (process time: every thread counted; on a shared machine CPU time is the figure that
drifts least with the load). Inputs: flickr8k-nonmember photos and, as many, copies of corpus photos from
training/copydet_eval.py's six families. The copy-detection part of --thorough is "centre view + region search"
less "copy detection only", both from the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run inside each checkout: options given as JSON, fields the checkout does not know are dropped (an older
# ScanOptions has no region_search; a newer one may have thorough)
_CHILD = r"""
import json, os, sys, time
from pathlib import Path
threads = int(os.environ.get("BENCH_ONNX_THREADS") or 0)
if threads:  # SSCD's ONNX session on this many threads (both checkouts have _onnx_session(path, threads, ...))
    import provenance.descriptors.sscd as sscd_module
    _session = sscd_module._onnx_session
    sscd_module._onnx_session = lambda path, n, *a, **k: _session(path, n or threads, *a, **k)
from provenance.scan import ScanOptions, Scanner
kw, index, files = json.loads(sys.argv[1]), sys.argv[2], sorted(Path(sys.argv[3]).glob("*.jpg"))
fields = getattr(ScanOptions, "model_fields", None) or ScanOptions.__dataclass_fields__
unknown = [k for k in kw if k not in fields]
scanner = Scanner.open(index, ScanOptions(**{k: v for k, v in kw.items() if k in fields}))
scanner.scan_paths(files[:16])
t, c = time.perf_counter(), time.process_time()
records = scanner.scan_paths(files)
wall, cpu = time.perf_counter() - t, time.process_time() - c
assert not [r for r in records if r.verdict == "error"]
print(json.dumps({"images_per_s": len(files) / wall, "cpu_ms": cpu * 1000 / len(files), "unknown": unknown}))
"""

QUIET = {"visible": False, "invisible": False, "c2pa": False, "metadata": False}
CONFIGS = {
    "default scan": {},
    "copy detection only (sscd+pdq)": QUIET,
    "copy detection, centre view (before this issue's --thorough)": {**QUIET, "centre_view": True},
    "copy detection, centre view + region search": {**QUIET, "centre_view": True, "region_search": True},
    "thorough scan (all checks)": {
        "thorough": True,
        "centre_view": True,
        "invisible_crops": True,
        "region_search": True,
    },
}


def make_inputs(folder: Path, n: int, seed: int = 3) -> None:
    """n non-member photos and n copies (the six families, round robin) as JPEG files in `folder`."""
    sys.path.insert(0, str(REPO))
    from training.copydet_eval import load_dev, load_nonmembers, make_queries

    folder.mkdir(parents=True, exist_ok=True)
    nonmembers = load_nonmembers()
    for p in nonmembers[-n:]:
        p.image.save(folder / f"nonmember-{p.id.split(':')[-1]}.jpg", quality=90)
    queries = make_queries(load_dev(1500), nonmembers[:-n], max(1, n // 6 + 1), seed)
    for q in queries[:: max(1, len(queries) // n)][:n]:
        (folder / f"copy-{q.name}.jpg").write_bytes(q.to_bytes())


def run(tree: Path, options: dict, index: Path, inputs: Path, onnx_threads: int = 0) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "BENCH_ONNX_THREADS": str(onnx_threads or ""),
    }
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(options), str(index), str(inputs)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="the older checkout (e.g. a worktree at c287df2)")
    ap.add_argument("--index", type=Path, default=Path("/tmp/copydet/index"))
    ap.add_argument("--inputs", type=Path, default=Path("/tmp/copydet/speed-inputs"))
    ap.add_argument("--images", type=int, default=60, help="non-members, and as many copies")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--onnx-threads",
        type=int,
        default=0,
        help="SSCD's ONNX session on this many threads (0: its default, every core). 1 measures the work itself: "
        "on a loaded machine a multi-threaded session's threads spin while they wait for each other, and CPU "
        "time grows with the load",
    )
    args = ap.parse_args(argv)
    if not any(args.inputs.glob("*.jpg")):
        make_inputs(args.inputs, args.images)
    runs = [("base", args.base, "default scan"), ("this", REPO, "default scan")]
    runs += [("this", REPO, name) for name in CONFIGS if name != "default scan"]
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for label, tree, name in runs:
            r = run(tree, CONFIGS[name], args.index, args.inputs, args.onnx_threads)
            results.setdefault(f"{label}: {name}", []).append(r)
            print(
                f"{label}: {name:62s} {r['images_per_s']:6.2f} images/s {r['cpu_ms']:7.1f} CPU ms/image"
                + (f" (unknown options dropped: {r['unknown']})" if r["unknown"] else ""),
                flush=True,
            )
    best = {k: max(v, key=lambda r: r["images_per_s"]) for k, v in results.items()}
    ratio = best["this: default scan"]["images_per_s"] / best["base: default scan"]["images_per_s"]
    print(f"default scan, this / base (best of {args.rounds} rounds each): {ratio:.2f}x wall")
    cpu = {k: min(r["cpu_ms"] for r in v) for k, v in results.items()}
    cpu_ratio = cpu["base: default scan"] / cpu["this: default scan"]
    print(f"default scan, CPU rate this / base (least CPU of {args.rounds} rounds each): {cpu_ratio:.2f}x")
    added = [
        a["cpu_ms"] - b["cpu_ms"]
        for a, b in zip(
            results["this: copy detection, centre view + region search"],
            results["this: copy detection only (sscd+pdq)"],
            strict=True,
        )
    ]
    print(f"--thorough's copy detection over copy detection only, CPU ms/image per round: {added}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rounds": results, "default_ratio": ratio, "default_cpu_ratio": cpu_ratio, "thorough_added": added},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
