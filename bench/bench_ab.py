"""Two checkouts back to back (A = a baseline commit, B = this tree), interleaved A B A B on the same inputs:
server CPU per scan and p99 at 4 clients, the same scan outputs, and the scan / embed benchmarks' ratios.

    git worktree add /tmp/base 14a615b
    nice -n 10 .venv/bin/python bench/bench_ab.py --base /tmp/base [--rounds 2] [--scans 160] [--parts serve scan embed]

On a shared machine absolute times drift with the load; each pair (A then B, run back to back) gives one ratio
B/A, and the ratios are the numbers to read. Each tree runs its own code (PYTHONPATH = that tree):
  * serve: `provenance serve` of each tree in a subprocess on an index of the 51-photo sample corpus built by that
    tree; uploads are the 51 COCO photos (~640x480) and 10 openimages-hires photos (~2048x1536), round robin,
    from 4 closed-loop clients. Server CPU (psutil, user + system, all threads) over the measured scans / scans.
    Before timing, every photo is scanned once and the two trees' records are compared (verdict, match ids and
    descriptors, scores to 1e-4, PDQ distances, watermark evidence): any difference is printed and fails the run.
  * scan, embed: each tree's own bench/bench_scan.py / bench_embed.py in a subprocess (images/s, wall clock).
Results: printed, and --out (Markdown rows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_api import Server, run_load, scan_request  # noqa: E402

# the photos beside the checkout (as tests/conftest.py finds them), or where PROVENANCE_SHARED_DATA says
DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / "bench" / "results" / ".cache" / "ab"
SCORE_TOL = 1e-4


def photos(n_hires: int) -> list[tuple[str, bytes]]:
    coco = sorted((REPO / "provenance" / "sample" / "coco-cc").glob("*.jpg"))
    hires = sorted((DATA / "openimages-hires").glob("*.jpg"))[:n_hires]
    return [(p.name, p.read_bytes()) for p in coco + hires]


def tree_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVENANCE_")}
    env["PYTHONPATH"] = str(tree)
    return env


def ensure_index(tree: Path, label: str) -> Path:
    """The sample corpus indexed (SSCD + PDQ) by `tree`'s own code, once per commit."""
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    out = CACHE / f"index-{label}-{commit}"
    if not (out / "manifest.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "provenance.cli",
                "index",
                "build",
                "provenance/sample/coco-cc",
                "--index",
                str(out),
                "--descriptors",
                "sscd,pdq",
            ],
            cwd=tree,
            env=tree_env(tree),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


# --------------------------------------------------------------------------------- outputs


def essentials(record: dict) -> dict:
    """What a user reads in a scan record: fields added since the baseline (schema_version, checks, error_code)
    are left out, scores kept as numbers to compare within SCORE_TOL."""
    wm = record.get("watermarks") or {}
    visible = wm.get("visible") or {}
    return {
        "verdict": record.get("verdict"),
        "size": (record.get("width"), record.get("height")),
        "sha256": record.get("sha256"),
        "scores": record.get("scores") or {},
        "matches": [(m["id"], m["descriptor"], m["score"], m.get("distance")) for m in record.get("matches") or []],
        "invisible": [
            (m["scheme"], m["bit_accuracy"], m["p_value"], m.get("payload")) for m in wm.get("invisible") or []
        ],
        "visible": (visible.get("probability"), visible.get("flagged")),
        "c2pa": wm.get("c2pa"),
        "metadata": wm.get("metadata"),
    }


def differences(a, b, path: str = "") -> list[str]:
    """Where two essentials() trees differ; numbers within SCORE_TOL are equal."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if math.isclose(a, b, abs_tol=SCORE_TOL) else [f"{path}: {a} != {b}"]
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


async def scan_all(url: str, items: list[tuple[str, bytes]]) -> dict[str, dict]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        out = {}
        for name, data in items:
            r = await client.post("/v1/scan", files={"file": (name, data, "image/jpeg")})
            r.raise_for_status()
            out[name] = r.json()
        return out


# ----------------------------------------------------------------------------------- parts


def serve_once(tree: Path, index: Path, items, clients: int, scans: int, records: dict | None) -> dict:
    with Server(index, tree=tree) as srv:
        first = asyncio.run(scan_all(srv.url, items))  # warm-up, and the outputs to compare
        if records is not None:
            records.update(first)
        cpu0 = srv.cpu_s()
        r = asyncio.run(run_load(srv.url, "/v1/scan", scan_request(items), clients, scans))
        cpu = srv.cpu_s() - cpu0
    if r.errors:
        raise RuntimeError(f"{tree}: {r.errors} failed scans: {r.error_samples}")
    return {"cpu_ms": cpu / r.requests * 1000, "p50": r.pct(50), "p99": r.pct(99), "rps": r.rps}


def bench_script(tree: Path, script: str, args: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run(
            [sys.executable, f"bench/{script}", *args, "--json", str(out)],
            cwd=tree,
            env=tree_env(tree),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        data = json.loads(out.read_text())
    if script == "bench_scan.py":
        return {k: v for k, v in data["images_per_s"].items() if "ViT" not in k}
    return {
        f"{name} {kind}": v[f"{kind}_img_s"] for name, v in data["results"].items() for kind in ("bare", "end_to_end")
    }


# A child run in each tree (PYTHONPATH = the tree): CPU ms per image (time.process_time: every thread of the
# process), which a busy machine inflates far less than wall-clock rates. argv: index dir, photo dir, count, out.
_CPU_CHILD = """
import json, shutil, sys, tempfile, time
from pathlib import Path
from provenance.indexer import BuildOptions, build
from provenance.scan import ScanOptions, Scanner
index, photos, n, out = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
files = sorted(photos.glob("*.jpg"))[:n]
configs = {
    "sscd+pdq only": dict(visible=False, invisible=False, c2pa=False, metadata=False),
    "full (default checks)": {},
    "full, --centre-view": dict(centre_view=True),
    "full, --invisible-crops": dict(invisible_crops=True),
}
res = {}
for name, kw in configs.items():
    s = Scanner.open(index, ScanOptions(use_clip=False, **kw))
    s.scan_paths(files[:8])  # warm-up
    t = time.process_time()
    assert all(r.verdict != "error" for r in s.scan_paths(files))
    res["scan CPU ms/image: " + name] = (time.process_time() - t) / len(files) * 1000
tmp = Path(tempfile.mkdtemp())
t = time.process_time()
build(str(photos), tmp / "idx", BuildOptions(descriptors=["sscd", "pdq"], limit=n))
res["index build CPU ms/image (sscd+pdq)"] = (time.process_time() - t) / n * 1000
shutil.rmtree(tmp)
out.write_text(json.dumps(res))
"""


def cpu_child(tree: Path, index: Path, photo_dir: Path, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run(
            [sys.executable, "-c", _CPU_CHILD, str(index), str(photo_dir), str(n), str(out)],
            cwd=tree,
            env=tree_env(tree),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="checkout of the baseline commit (A)")
    ap.add_argument("--new", type=Path, default=REPO, help="checkout to compare (B; default: this tree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["serve", "cpu", "scan", "embed"],
        help="serve: API CPU/scan, p99, same outputs; cpu: in-process scan and index-build CPU per image; "
        "scan, embed: each tree's bench_scan.py / bench_embed.py (wall clock)",
    )
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--scans", type=int, default=160, help="measured scans per server run")
    ap.add_argument("--hires", type=int, default=10, help="openimages-hires photos among the uploads")
    ap.add_argument("--scan-images", type=int, default=100)
    ap.add_argument("--embed-limit", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    trees = {"A": args.base.resolve(), "B": args.new.resolve()}
    items = photos(args.hires)
    if len(items) != 51 + args.hires:
        raise SystemExit(f"found {len(items)} photos, expected {51 + args.hires}: set PROVENANCE_SHARED_DATA")
    rows: list[str] = []
    load0 = os.getloadavg()
    indexes = {k: ensure_index(t, k) for k, t in trees.items()} if {"serve", "cpu"} & set(args.parts) else {}
    for rnd in range(args.rounds if "cpu" in args.parts else 0):
        got = {k: cpu_child(t, indexes[k], DATA / "flickr8k-nonmember", args.scan_images) for k, t in trees.items()}
        for name in got["A"]:
            rows.append(
                f"| {name} (round {rnd}) | {got['A'][name]:.1f} | {got['B'][name]:.1f} | "
                f"{got['B'][name] / got['A'][name]:.3f} |"
            )
            print(rows[-1], flush=True)
    if "serve" in args.parts:
        records: dict[str, dict[str, dict]] = {"A": {}, "B": {}}
        for rnd in range(args.rounds):
            got = {}
            for k, tree in trees.items():
                got[k] = serve_once(tree, indexes[k], items, args.clients, args.scans, records[k] if rnd == 0 else None)
                print(f"serve round {rnd} {k}: {got[k]}", flush=True)
            if rnd == 0:
                diffs = [
                    f"{name}{d}"
                    for name in records["A"]
                    for d in differences(essentials(records["A"][name]), essentials(records["B"][name]))
                ]
                print(f"outputs: {len(records['A'])} photos compared, {len(diffs)} differences", flush=True)
                for d in diffs[:20]:
                    print("  ", d)
                rows.append(f"| outputs, {len(records['A'])} photos | {len(diffs)} differences | | |")
            for m in ("cpu_ms", "p50", "p99", "rps"):
                rows.append(
                    f"| serve {m} (round {rnd}) | {got['A'][m]:.1f} | {got['B'][m]:.1f} | "
                    f"{got['B'][m] / got['A'][m]:.3f} |"
                )
    scan_args = ["--images", str(args.scan_images), "--inputs", str(DATA / "flickr8k-nonmember")]
    embed_args = [
        "--limit",
        str(args.embed_limit),
        "--repeats",
        "1",
        "--descriptors",
        "sscd,pdq",
        "--shard",
        str(DATA / "flickr8k-dev" / "00000.tar"),
    ]
    for part, script, sargs in (("scan", "bench_scan.py", scan_args), ("embed", "bench_embed.py", embed_args)):
        if part not in args.parts:
            continue
        for rnd in range(args.rounds):
            got = {k: bench_script(t, script, sargs) for k, t in trees.items()}
            for name in got["A"]:
                if name in got["B"]:
                    rows.append(
                        f"| {part}: {name} (round {rnd}) | {got['A'][name]:.1f} | {got['B'][name]:.1f} | "
                        f"{got['B'][name] / got['A'][name]:.3f} |"
                    )
                    print(rows[-1], flush=True)
    load1 = os.getloadavg()
    head = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; A = {trees['A']}, B = {trees['B']}; "
        f"load average {load0[0]:.1f} before, {load1[0]:.1f} after"
    )
    text = "\n".join([head, "", "| measure | A | B | B/A |", "|---|---:|---:|---:|", *rows, ""])
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
