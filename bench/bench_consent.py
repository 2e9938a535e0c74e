"""Benchmark of `provenance consent check`: 10,000 URLs answered from the SQLite cache (target >= 5,000 URLs/s).

Run:  .venv/bin/python bench/bench_consent.py [--urls 10000] [--sites 20] [--repeat 3]

Real components end to end: --sites ThreadingHTTPServers on 127.0.0.1 (one origin each, different
ports) serve a robots.txt with AI-crawler and `*` groups, an ai.txt, a /.well-known/tdmrep.json with
two locations, and the image URLs with TDMRep / X-Robots-Tag headers on some. One cold pass fetches
everything through the real Fetcher (--allow-private-addresses, no rate limit) into a fresh cache;
then, timed:
  * baseline: the cache's own bulk read of the same keys (ConsentCache.get_many), the floor any
    cached answer pays;
  * library: url_consent(urls, Fetcher(...)) on a warm cache, median of --repeat runs;
  * CLI: `python -m provenance.cli consent check --file urls.txt --json` in a subprocess, end to end
    (interpreter start, imports, cache read, evaluation, JSON out), and the same CLI's start-up alone
    (`consent --help`) to show what is fixed cost.
Results: bench/results/consent.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance.consent import Fetcher, FetchOptions, url_consent  # noqa: E402
from provenance.consent.fetch import ConsentCache, FetchRequest  # noqa: E402
from provenance.consent.urls import PAGE_MAX_BYTES, SITE_FILES, _site_request  # noqa: E402

RESULTS = REPO / "bench" / "results" / "consent.md"
TARGET = 5000.0

ROBOTS = b"""User-agent: GPTBot
User-agent: ClaudeBot
Disallow: /private/
Disallow: /*.png$

User-agent: CCBot
Allow: /
Disallow: /drafts/

User-agent: *
Disallow: /admin/
Disallow: /private/
Crawl-delay: 1
Sitemap: https://example.org/sitemap.xml
"""
AI_TXT = b"User-Agent: *\nDisallow: *.gif\nAllow: *.txt\n"
TDMREP = json.dumps(
    [
        {"location": "/", "tdm-reservation": 0},
        {"location": "/photos/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy"},
    ]
).encode()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        p = self.path
        if p == "/robots.txt":
            body, ctype, extra = ROBOTS, "text/plain", {}
        elif p == "/ai.txt":
            body, ctype, extra = AI_TXT, "text/plain", {}
        elif p == "/.well-known/tdmrep.json":
            body, ctype, extra = TDMREP, "application/json", {}
        else:
            body, ctype = b"\xff\xd8\xff", "image/jpeg"
            n = int("".join(c for c in p if c.isdigit()) or 0)
            extra = {"tdm-reservation": "0"} if n % 5 == 0 else {"X-Robots-Tag": "noai"} if n % 7 == 0 else {}
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _urls(n: int, origins: list[str]) -> list[str]:
    dirs = ["photos", "private", "drafts", "public/2024", "img"]
    exts = ["jpg", "png", "gif", "webp"]
    return [f"{origins[i % len(origins)]}/{dirs[i % 5]}/{i}.{exts[i % 4]}" for i in range(n)]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=10_000)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    servers = []
    for _ in range(args.sites):
        s = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    origins = [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    urls = _urls(args.urls, origins)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-consent-"))
    cache_path = tmp / "consent.sqlite"
    opts = FetchOptions(
        allow_private_addresses=True, cache_path=cache_path, per_host_rate=0.0, max_per_host=4, workers=16
    )

    # Cold: every URL and every site file fetched over loopback into the cache.
    t0 = time.perf_counter()
    with Fetcher(opts) as f:
        cold = url_consent(urls, f)
    cold_s = time.perf_counter() - t0
    trainings = {}
    for c in cold.values():
        trainings[c.training] = trainings.get(c.training, 0) + 1

    # Baseline: the bulk cache read alone, the same keys url_consent reads.
    keys = [FetchRequest(u, PAGE_MAX_BYTES, "html").key for u in urls]
    keys += [_site_request(o, name).key for o in origins for name in SITE_FILES]
    cache = ConsentCache(cache_path)
    base, base_cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        got = cache.get_many(keys, private=True)
        base.append(time.perf_counter() - t0)
        base_cpu.append(time.process_time() - c0)
    cache.close()
    assert len(got) == len(keys), (len(got), len(keys))

    lib, lib_cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        with Fetcher(opts) as f:
            warm = url_consent(urls, f)
        lib.append(time.perf_counter() - t0)
        lib_cpu.append(time.process_time() - c0)
    assert warm == cold, "the cached answers must equal the fetched ones"

    url_file = tmp / "urls.txt"
    url_file.write_text("\n".join(urls) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "provenance.cli", "consent", "check", "--file", str(url_file), "--json",
           "--cache", str(cache_path), "--allow-private-addresses"]  # fmt: skip
    cli, cli_cpu, startup, startup_cpu = [], [], [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), _children_cpu()
        res = subprocess.run(cmd, capture_output=True, env=env, check=True)
        cli.append(time.perf_counter() - t0)
        cli_cpu.append(_children_cpu() - c0)
        t0, c0 = time.perf_counter(), _children_cpu()
        help_cmd = [sys.executable, "-m", "provenance.cli", "consent", "--help"]
        subprocess.run(help_cmd, capture_output=True, env=env, check=True)
        startup.append(time.perf_counter() - t0)
        startup_cpu.append(_children_cpu() - c0)
    rows = json.loads(res.stdout)
    assert len(rows) == len(urls) and all(r["consent"] == cold[r["url"]].to_dict() for r in rows)
    load_after = os.getloadavg()
    for s in servers:
        s.shutdown()

    n = len(urls)
    med = statistics.median
    lib_rate, cli_rate = n / med(lib), n / med(cli)
    lib_cpu_rate, cli_cpu_rate = n / med(lib_cpu), n / med(cli_cpu)
    cli_net = n / max(med(cli_cpu) - med(startup_cpu), 1e-9)
    load = " / ".join(f"{x:.1f}" for x in load_before), " / ".join(f"{x:.1f}" for x in load_after)
    answers = ", ".join(f"{k} {v}" for k, v in sorted(trainings.items()))

    def verdict(rate: float) -> str:
        return "met" if rate >= TARGET else "not met"

    lines = [
        "## Consent check (`provenance consent check`) from the cache",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Command: "
        f"`.venv/bin/python bench/bench_consent.py --urls {args.urls} --sites {args.sites} --repeat {args.repeat}`.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} logical CPUs, shared with other jobs (load average before "
        f"{load[0]}, after {load[1]}); no GPU. On a shared machine the wall-clock rate depends on the other jobs; "
        "the CPU-time rate (URLs per CPU-second of this process, or of the CLI's process) does much less.",
        "",
        f"Workload: {n} image URLs over {args.sites} loopback origins (ThreadingHTTPServer), each with a robots.txt "
        f"(AI-crawler and `*` groups), an ai.txt and a tdmrep.json; TDMRep or X-Robots-Tag headers on some URLs. "
        f"Answers: {answers}. Medians of {args.repeat} runs.",
        "",
        "| step | wall s | URLs/s (wall) | CPU s | URLs per CPU-s | wall vs cache read |",
        "|---|---:|---:|---:|---:|---:|",
        f"| cold: fetch everything over loopback (no rate limit, 4 per host, 16 workers) | {cold_s:.2f} "
        f"| {n / cold_s:,.0f} | | | |",
        f"| baseline: ConsentCache.get_many of the {len(keys)} keys | {med(base):.3f} | {n / med(base):,.0f} "
        f"| {med(base_cpu):.3f} | {n / med(base_cpu):,.0f} | 1.00x |",
        f"| library: url_consent(urls, Fetcher) from the cache | {med(lib):.3f} | {lib_rate:,.0f} "
        f"| {med(lib_cpu):.3f} | {lib_cpu_rate:,.0f} | {med(lib) / med(base):.2f}x |",
        f"| CLI end to end: consent check --file --json | {med(cli):.3f} | {cli_rate:,.0f} "
        f"| {med(cli_cpu):.3f} | {cli_cpu_rate:,.0f} | {med(cli) / med(base):.2f}x |",
        f"| CLI start-up alone (consent --help) | {med(startup):.3f} | | {med(startup_cpu):.3f} | | |",
        "",
        f"Target >= {TARGET:,.0f} URLs/s from the cache: library {lib_rate:,.0f} URLs/s wall "
        f"(**{verdict(lib_rate)}**), {lib_cpu_rate:,.0f} per CPU-second (**{verdict(lib_cpu_rate)}**); "
        f"CLI end to end {cli_rate:,.0f} URLs/s wall (**{verdict(cli_rate)}**), {cli_cpu_rate:,.0f} per CPU-second "
        f"(**{verdict(cli_cpu_rate)}**; {cli_net:,.0f} per CPU-second without the interpreter and import start-up).",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
