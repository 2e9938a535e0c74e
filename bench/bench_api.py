"""Load test of `provenance serve`: requests/s, p50/p99 latency and errors at 1, 4 and 16 concurrent clients.

Run:  .venv/bin/python bench/bench_api.py [--levels 1 4 16] [--configs 8x2 1x1 0] [--memory-requests 2000]

A real uvicorn server (`python -m provenance.cli serve`) runs in a subprocess on 127.0.0.1; closed-loop
httpx async clients (each sends its next request when the last one returns) drive it over loopback.
  * /v1/scan uploads the 51 sample-corpus COCO photos (about 640x480 JPEGs) round robin, against an
    index of that corpus built with SSCD + PDQ; the checks the server ran are read from /healthz.
    Each --scan-batch value (8 = micro-batching of concurrent requests, 1 = one scan at a time, 0 = no
    batcher: each request scans in its own thread) gets its own server.
  * /v1/search/caption with words drawn from the captions; /v1/search/text against a second index
    with a tiny random OpenCLIP (no hub weights offline: it measures the serving path, not ViT-B-32).
  * Memory: the server's RSS every 200 requests over --memory-requests mixed requests (one in five
    a scan, the rest caption searches, item lookups and thumbnails) at 4 clients.
  * Where a scan's CPU goes: each stage of Scanner's work on the same photos, timed in a child process on
    one thread (as each scan worker runs under load), median of 3 passes.
Indexes are cached under bench/results/.cache/ (not committed). Results: bench/results/api.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLE = REPO / "provenance" / "sample" / "coco-cc"
CACHE = REPO / "bench" / "results" / ".cache" / "api"
RESULTS = REPO / "bench" / "results" / "api.md"
TARGET_P99_MS = 300.0


# ---------------------------------------------------------------------------------- indexes


def ensure_indexes() -> tuple[Path, Path]:
    """(sscd+pdq index of the sample corpus, clip-tiny index of it), built once and cached."""
    from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint
    from provenance.indexer import BuildOptions, build
    from provenance.models import ModelOptions

    main, clip = CACHE / "sample-sscd-pdq", CACHE / "sample-clip-tiny"
    if not (main / "manifest.json").exists():
        build(str(SAMPLE), main, BuildOptions(descriptors=["sscd", "pdq"]))
    if not (clip / "manifest.json").exists():
        ckpt = make_tiny_checkpoint(CACHE / "tiny-clip.pt")
        models = ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(ckpt))
        build(str(SAMPLE), clip, BuildOptions(descriptors=["clip"], models=models))
    return main, clip


# ----------------------------------------------------------------------------------- server


class Server:
    """`provenance serve` in a subprocess on a free loopback port."""

    def __init__(self, index: Path, *extra: str, tree: Path = REPO, env: dict[str, str] | None = None):
        self.tree = tree  # the checkout whose `provenance` serves (bench_ab.py runs two side by side)
        # PROVENANCE_* settings of the server; by default the per-client rate limit is off (a load test is one client
        # sending as fast as it can)
        self.env = {"PROVENANCE_CLIENT_RATE_PER_MINUTE": "0"} if env is None else env
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "provenance.cli",
            "serve",
            "--index",
            str(index),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc: subprocess.Popen | None = None
        self.health: dict = {}

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVENANCE_")}
        env["PYTHONPATH"] = str(self.tree)
        env.update(self.env)
        # stderr to a file, not a pipe: a long run's warnings would fill a pipe nobody reads and block the server
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command, cwd=self.tree, env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                r = httpx.get(self.url + "/healthz", timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("server not ready after 180 s")

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server has used so far."""
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()


# ------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    endpoint: str
    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    server_cpu_s: float = float("nan")  # CPU the server used during the run: robust to a busy shared machine

    @property
    def cpu_ms_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1000 if self.requests else float("nan")

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


async def run_load(
    url: str, endpoint: str, make_request, clients: int, n_requests: int, warmup: int = 0, on_progress=None
) -> LoadResult:
    """`clients` closed-loop workers share `n_requests` requests; warm-up requests are not counted."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for i in range(warmup):
            await make_request(client, i)
        counter = itertools.count()
        result = LoadResult(endpoint, clients, 0, 0, 0.0)

        async def worker() -> None:
            while (i := next(counter)) < n_requests:
                t0 = time.perf_counter()
                try:
                    r = await make_request(client, i)
                    ok = r.status_code == 200
                    err = None if ok else f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, err = False, f"{type(e).__name__}: {e}"
                result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                result.requests += 1
                if not ok:
                    result.errors += 1
                    if len(result.error_samples) < 3:
                        result.error_samples.append(err)
                if on_progress is not None:
                    on_progress(result.requests)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        result.seconds = time.perf_counter() - t0
    return result


def scan_request(photos: list[tuple[str, bytes]]):
    async def make(client: httpx.AsyncClient, i: int) -> httpx.Response:
        name, data = photos[i % len(photos)]
        return await client.post("/v1/scan", files={"file": (name, data, "image/jpeg")})

    return make


def caption_request(words: list[str]):
    async def make(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.get("/v1/search/caption", params={"q": words[i % len(words)], "k": 10})

    return make


def text_request(captions: list[str]):
    async def make(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post("/v1/search/text", json={"text": captions[i % len(captions)], "k": 10})

    return make


def mixed_request(photos, words, ids):
    scan, caption = scan_request(photos), caption_request(words)

    async def make(client: httpx.AsyncClient, i: int) -> httpx.Response:
        kind = i % 5
        if kind == 0:
            return await scan(client, i // 5)
        if kind in (1, 2):
            return await caption(client, i)
        item = ids[i % len(ids)]
        if kind == 3:
            return await client.get(f"/v1/items/{item}")
        return await client.get(f"/v1/items/{item}/thumbnail")

    return make


def measured(srv: Server, load) -> LoadResult:
    """Run one load coroutine, recording the server's CPU time over it (warm-up included, a few requests)."""
    cpu0 = srv.cpu_s()
    result = asyncio.run(load)
    result.server_cpu_s = srv.cpu_s() - cpu0
    return result


# ------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["1x2", "1x1", "1x4", "8x2", "0"],
        help="BxW = --scan-batch B --scan-workers W, or 0 (no batcher); the first is the default",
    )
    ap.add_argument(
        "--scan-requests",
        type=int,
        default=0,
        help="scans per level (default: max(200, 8 x clients); p99 of fewer is little more than the max)",
    )
    ap.add_argument("--search-requests", type=int, default=400)
    ap.add_argument("--memory-requests", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage CPU profile of a scan")
    ap.add_argument("--_stages", type=Path, help=argparse.SUPPRESS)  # child process: write the profile here
    args = ap.parse_args()
    if args._stages:
        args._stages.write_text(json.dumps(stage_profile(ensure_indexes()[0])), encoding="utf-8")
        return

    main_index, clip_index = ensure_indexes()
    photos = [(p.name, p.read_bytes()) for p in sorted(SAMPLE.glob("*.jpg"))]
    rows = [json.loads(line) for line in (SAMPLE / "metadata.jsonl").read_text().splitlines() if line.strip()]
    captions = [r["caption"] for r in rows]
    rng = random.Random(0)
    words = sorted({w.strip(".,").lower() for c in captions for w in c.split() if len(w.strip(".,")) > 3})
    words = rng.sample(words, min(200, len(words)))
    ids = [p.name for p in sorted(SAMPLE.glob("*.jpg"))]
    load_before = os.getloadavg()
    started = time.time()

    def n_scans(c: int) -> int:
        return args.scan_requests or max(200, 8 * c)

    scan_results: dict[str, list[LoadResult]] = {}
    search_results: list[LoadResult] = []
    memory: list[tuple[int, float]] = []
    checks: dict = {}
    for config in args.configs:
        batch, _, workers = config.partition("x")
        server_args = ["--scan-batch", batch] + (["--scan-workers", workers] if workers else [])
        default = config == args.configs[0]
        with Server(main_index, *server_args) as srv:
            checks = srv.health["checks"]
            scan_results[config] = []
            for c in args.levels if default else [c for c in args.levels if c >= 4]:
                r = measured(srv, run_load(srv.url, "/v1/scan", scan_request(photos), c, n_scans(c), warmup=3))
                scan_results[config].append(r)
                print(
                    f"scan {config} clients={c}: {r.rps:.2f} req/s p50 {r.pct(50):.0f} ms "
                    f"p99 {r.pct(99):.0f} ms errors {r.errors} cpu {r.cpu_ms_per_request:.0f} ms/req",
                    flush=True,
                )
            if not default:
                continue
            for c in args.levels if args.search_requests else []:
                r = measured(
                    srv,
                    run_load(srv.url, "/v1/search/caption", caption_request(words), c, args.search_requests, warmup=5),
                )
                search_results.append(r)
                print(
                    f"caption clients={c}: {r.rps:.1f} req/s p50 {r.pct(50):.1f} ms p99 {r.pct(99):.1f} ms "
                    f"errors {r.errors}",
                    flush=True,
                )
            if not args.memory_requests:
                continue
            # Memory over many mixed requests, sampled every 200.
            memory.append((0, srv.rss_mb()))

            def sample(done: int) -> None:
                if done % 200 == 0:
                    memory.append((done, srv.rss_mb()))

            mem_load = measured(
                srv,
                run_load(
                    srv.url, "mixed", mixed_request(photos, words, ids), 4, args.memory_requests, on_progress=sample
                ),
            )
            search_results.append(mem_load)
            print(f"memory: {memory} errors {mem_load.errors}", flush=True)
    with Server(clip_index) as srv:
        for c in args.levels if args.search_requests else []:
            r = measured(
                srv,
                run_load(
                    srv.url, "/v1/search/text (tiny CLIP)", text_request(captions), c, args.search_requests, warmup=5
                ),
            )
            search_results.append(r)
            print(
                f"text clients={c}: {r.rps:.1f} req/s p50 {r.pct(50):.1f} ms p99 {r.pct(99):.1f} ms errors {r.errors}",
                flush=True,
            )

    stages = None
    if not args.no_stages:
        out = CACHE / "stages.json"
        subprocess.run([sys.executable, __file__, "--_stages", str(out)], cwd=REPO, check=True)
        stages = json.loads(out.read_text(encoding="utf-8"))
    write_report(args, checks, scan_results, search_results, memory, load_before, time.time() - started, stages)


def stage_profile(index: Path, passes: int = 3) -> dict[str, float]:
    """CPU ms per photo of each stage of a scan with the server's checks, on one thread: {stage: median ms}."""
    import torch

    from provenance.images import decode_image
    from provenance.scan import Scanner, ScanOptions
    from provenance.watermarks.c2pa import read_c2pa
    from provenance.watermarks.invisible import detect_invisible_marks
    from provenance.watermarks.metadata import read_generation_metadata

    torch.set_num_threads(1)
    os.environ["PROVENANCE_ORT_SPINNING"] = "0"
    scanner = Scanner.open(index, ScanOptions())
    sscd, pdq, visible = scanner._models["sscd"], scanner._models["pdq"], scanner._visible
    sscd.prepare_concurrent_calls()
    sscd._running = 1  # as when the other scan worker is busy: the one-thread session
    photos = [p.read_bytes() for p in sorted(SAMPLE.glob("*.jpg"))]
    times: dict[str, list[float]] = {}

    def timed(stage: str, fn, *a):
        t0 = time.process_time()
        out = fn(*a)
        times.setdefault(stage, []).append((time.process_time() - t0) * 1000)
        return out

    per_pass: dict[str, list[float]] = {}
    for _ in range(passes):
        times.clear()
        for data in photos:
            d = timed("decode (+ sha256, EXIF rotation)", decode_image, data, "x")
            timed("invisible marks (4 schemes)", detect_invisible_marks, d.image)
            timed(
                "C2PA + generation metadata", lambda d=d: (read_c2pa(d.raw, "image/jpeg"), read_generation_metadata(d))
            )
            xs = timed("SSCD resize (short side 288)", sscd.preprocess, d.image)
            xp = timed("PDQ resize (128 px)", pdq.preprocess, d.image)
            h = timed("PDQ hash", pdq.embed_batch, [xp])
            taps = None
            if visible.needs_scan_taps:  # the head reads the maps of the descriptor's own pass
                v, taps = timed("SSCD model (int8 ONNX) + its maps", sscd.embed_batch_with_taps, [xs])
            else:
                v = timed("SSCD model (int8 ONNX)", sscd.embed_batch, [xs])
            xv = timed("visible-watermark resize", visible.preprocess, d.image)
            timed("visible-watermark model", visible.probabilities, [xv], taps)
            timed("FAISS search", scanner.searcher.search_vectors, {"sscd": v, "pdq": h}, 10)
            timed("whole Scanner.scan_bytes", scanner.scan_bytes, data, "x")
        for stage, ms in times.items():
            per_pass.setdefault(stage, []).append(float(np.mean(ms)))
    return {stage: float(np.median(v)) for stage, v in per_pass.items()}


def write_report(args, checks, scan_results, search_results, memory, load_before, seconds, stages=None) -> None:
    default = args.configs[0]
    lines = [
        "## API server (`provenance serve`)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_api.py', *sys.argv[1:]])}`",
        "",
        f"Machine: 2-core x86_64 CPU, shared ({platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} logical CPUs); load average before the run "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} (other engineers' jobs), after it "
        f"{os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} / {os.getloadavg()[2]:.1f}; "
        f"run took {seconds / 60:.1f} min. One uvicorn worker on 127.0.0.1, closed-loop httpx async clients.",
        "",
        f"Scan checks on (from /healthz): descriptors {', '.join(checks.get('descriptors', []))}; "
        f"visible watermark {'on' if checks.get('visible') else 'off'}; invisible watermarks "
        f"{'on' if checks.get('invisible') else 'off'}; C2PA {'on' if checks.get('c2pa') else 'off'}; "
        f"generator metadata {'on' if checks.get('metadata') else 'off'}."
        + (f" Notes: {'; '.join(checks['notes'])}." if checks.get("notes") else ""),
        "",
        "Uploads: the 51 sample-corpus COCO photos (~640x480 JPEG, ~160 KB) round robin; index = that corpus.",
        "",
        "### /v1/scan",
        "",
        "| config (batch x workers) | clients | requests | req/s | p50 ms | p99 ms | errors | server CPU ms/req |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, results in scan_results.items():
        for r in results:
            lines.append(
                f"| {config} | {r.clients} | {r.requests} | {r.rps:.2f} | {r.pct(50):.0f} | {r.pct(99):.0f} "
                f"| {r.errors} | {r.cpu_ms_per_request:.0f} |"
            )
    lines += [
        "",
        "(BxW: W scan threads, each taking up to B queued scans as one Scanner batch (`--scan-batch B "
        "--scan-workers W`); 0: no batcher, each request scans in its own worker thread, unbounded.)",
        "",
    ]
    d = {r.clients: r for r in scan_results[default]}
    verdicts = []
    if 4 in d:
        p99 = d[4].pct(99)
        verdicts.append(
            f"p99 at 4 clients {p99:.0f} ms vs target <= {TARGET_P99_MS:.0f} ms: "
            f"**{'met' if p99 <= TARGET_P99_MS else 'MISSED'}**"
        )
    if 4 in d and 16 in d:
        ok = d[16].rps >= 0.95 * d[4].rps
        verdicts.append(
            f"throughput 16 vs 4 clients {d[16].rps:.2f} vs {d[4].rps:.2f} req/s: "
            f"**{'no collapse' if ok else 'COLLAPSE'}**"
        )
    errors = sum(r.errors for rs in scan_results.values() for r in rs) + sum(r.errors for r in search_results)
    verdicts.append(f"errors over all runs: **{errors}**")
    lines += ["Targets (default config " + default + "): " + "; ".join(verdicts) + ".", ""]
    lines += [
        "### Search and mixed traffic",
        "",
        "| endpoint | clients | requests | req/s | p50 ms | p99 ms | errors | server CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in search_results:
        lines.append(
            f"| {r.endpoint} | {r.clients} | {r.requests} | {r.rps:.1f} | {r.pct(50):.1f} | {r.pct(99):.1f} "
            f"| {r.errors} | {r.cpu_ms_per_request:.1f} |"
        )
    samples = [e for r in search_results for e in r.error_samples] + [
        e for rs in scan_results.values() for r in rs for e in r.error_samples
    ]
    if samples:
        lines += ["", "Error samples: " + "; ".join(f"`{s}`" for s in samples[:5])]
    if stages:
        whole = stages.pop("whole Scanner.scan_bytes", None)
        lines += [
            "",
            "### Where a scan's CPU goes",
            "",
            "Each stage of Scanner's work on the same 51 photos, in a child process on one thread (the SSCD "
            "model on its one-thread session, as when both scan workers are busy); CPU ms per photo, median "
            "of 3 passes. The rest of the server's CPU per request is HTTP, multipart parsing and JSON.",
            "",
            "| stage | CPU ms |",
            "|---|---:|",
        ]
        lines += [f"| {stage} | {ms:.1f} |" for stage, ms in stages.items()]
        lines += [f"| sum of the stages | {sum(stages.values()):.1f} |"]
        if whole is not None:
            lines += [f"| whole `Scanner.scan_bytes` (one call) | {whole:.1f} |"]
    if memory:
        start = next((m for n, m in memory if n >= 200), memory[0][1])
        end = memory[-1][1]
        lines += [
            "",
            f"### Memory over {args.memory_requests} mixed requests (1 in 5 a scan), 4 clients",
            "",
            "RSS of the server (MB) after N requests: " + ", ".join(f"{n}: {m:.0f}" for n, m in memory) + ".",
            f"From request 200 to the end: {end - start:+.0f} MB ({(end - start) / start * 100:+.1f}%): "
            f"**{'flat' if abs(end - start) <= max(20.0, 0.05 * start) else 'GROWING'}**.",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
