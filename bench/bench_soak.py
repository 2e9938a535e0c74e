"""Soak test of `provenance serve` under abuse: well-formed scans keep working, memory stays bounded.

Run:  .venv/bin/python bench/bench_soak.py [--minutes 5] [--clients 4]

A real server (`python -m provenance.cli serve`, uvicorn on 127.0.0.1, default scan checks: SSCD + PDQ copy
detection, visible and invisible watermarks, C2PA, metadata) serves an SSCD + PDQ index of the coco-cc photos
in ../shared/data. Each of --clients threads (its own API key) uploads photos to /v1/scan in a closed loop;
503 busy answers are retried after their Retry-After (counted apart), anything else that is not a 200 is an
error. The run has two phases of equal length:
  1. clean: the clients alone (the baseline);
  2. abuse: the same clients, plus one thread each of
     - batch uploads of 8 photos (well-formed: their latency is reported apart, errors counted),
     - bombs: a 7900x7900 1-bit PNG (8 kB, 62 MP decoded: under max_pixels, so it is scanned: the per-image
       bound), 32 of them to /v1/scan/batch (413 at the pixel budget, before any is decoded), and a 500-file
       batch (400 at the 33rd part header),
     - slow clients: a scan whose body stops after its first bytes (408 after the body idle timeout), and a
       connection that never finishes its request headers (closed after the header timeout);
The server's RSS is sampled every 0.5 s. Reported: errors of well-formed requests (expected 0), p50/p99 scan
latency in each phase and their ratio, the RSS before, peak and after, and what each abuse got back.
Results: bench/results/soak.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_api  # noqa: E402

DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
COCO = DATA / "coco-cc"
NONMEMBERS = DATA / "flickr8k-nonmember"
CACHE = REPO / "bench" / "results" / ".cache" / "soak"
RESULTS = REPO / "bench" / "results" / "soak.md"
KEYS = [f"soak-key-{i}" for i in range(8)]
# Settings of the soak server (PROVENANCE_*): short deadlines so slow clients are let go within the run; one
# loopback address for every client, so the per-client rate limit is off and each client has its own key.
SERVER_ENV = {
    "PROVENANCE_API_KEYS": ",".join(KEYS),
    "PROVENANCE_CLIENT_RATE_PER_MINUTE": "0",
    "PROVENANCE_BODY_IDLE_TIMEOUT_S": "5",
    "PROVENANCE_HEADER_TIMEOUT_S": "5",
}


def ensure_index() -> Path:
    from provenance.indexer import BuildOptions, build

    out = CACHE / "coco-sscd-pdq"
    if not (out / "manifest.json").exists():
        build(str(COCO), out, BuildOptions(descriptors=["sscd", "pdq"]))
    return out


class Server(bench_api.Server):
    """`provenance serve` (bench_api.Server) with the soak settings, and its RSS sampled in a thread."""

    def __init__(self, index: Path):
        super().__init__(index, env=SERVER_ENV)
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()

    def __enter__(self) -> Server:
        super().__enter__()
        self.started = time.monotonic()
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        p = psutil.Process(self.proc.pid)
        while not self._stop.wait(0.5):
            self.rss.append((time.monotonic() - self.started, p.memory_info().rss / 2**20))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        super().__exit__(*exc)


# ------------------------------------------------------------------------------------ traffic


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}
        self.outcomes: Counter = Counter()

    def add(self, kind: str, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if seconds is not None:
                self.latency.setdefault(kind, []).append(seconds)


def scan_client(
    url: str, key: str, photos: list[tuple[str, bytes]], stop: threading.Event, tally: Tally, phase: list[str]
) -> None:
    rng = random.Random(key)
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as http:
        while not stop.is_set():
            name, data = rng.choice(photos)
            started = time.perf_counter()
            while True:
                try:
                    r = http.post("/v1/scan", files={"file": (name, data, "image/jpeg")})
                except httpx.HTTPError as e:
                    tally.add(f"scan/{phase[0]}", f"error {type(e).__name__}")
                    break
                if r.status_code == 503 and r.json()["error"]["code"] == "busy":
                    tally.add(f"scan/{phase[0]}", "busy (retried)")
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                ok = r.status_code == 200 and r.json()["verdict"] != "error"
                tally.add(
                    f"scan/{phase[0]}",
                    "ok" if ok else f"error {r.status_code}",
                    time.perf_counter() - started if ok else None,
                )
                break


def batch_client(url: str, photos: list[tuple[str, bytes]], stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(1)
    with httpx.Client(base_url=url, headers={"X-API-Key": KEYS[4]}, timeout=300) as http:
        while not stop.is_set():
            chosen = rng.sample(photos, 8)
            started = time.perf_counter()
            r = http.post("/v1/scan/batch", files=[("files", (n, d, "image/jpeg")) for n, d in chosen])
            ok = r.status_code == 200 and all(rec["verdict"] != "error" for rec in r.json())
            tally.add("batch of 8", "ok" if ok else f"error {r.status_code}", time.perf_counter() - started)
            stop.wait(2.0)


def bilevel_png(w: int, h: int) -> bytes:
    raw = zlib.compress(b"\x00" * ((w + 7) // 8 + 1) * h, 9)  # a filter byte + ceil(w/8) bytes per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def bomb_client(url: str, stop: threading.Event, tally: Tally) -> None:
    bomb = bilevel_png(7900, 7900)
    with httpx.Client(base_url=url, headers={"X-API-Key": KEYS[5]}, timeout=120) as http:
        while not stop.is_set():
            for kind, call in (
                (
                    "bomb: 1 x 62 MP PNG (under max_pixels)",
                    lambda: http.post("/v1/scan", files={"file": ("b.png", bomb, "image/png")}),
                ),
                (
                    "bomb: batch of 32 x 62 MP",
                    lambda: http.post(
                        "/v1/scan/batch", files=[("files", (f"b{i}.png", bomb, "image/png")) for i in range(32)]
                    ),
                ),
                (
                    "batch of 500 files",
                    lambda: http.post(
                        "/v1/scan/batch", files=[("files", (f"{i}.jpg", b"x" * 64, "image/jpeg")) for i in range(500)]
                    ),
                ),
            ):
                started = time.perf_counter()
                try:
                    r = call()
                    body = r.json()
                    error = body.get("error") if isinstance(body, dict) else None
                    said = error["code"] if isinstance(error, dict) else "scanned"
                    tally.add(kind, f"{r.status_code} {said}", time.perf_counter() - started)
                except httpx.HTTPError as e:
                    tally.add(kind, f"transport {type(e).__name__}")
            stop.wait(1.0)


def slow_client(port: int, stop: threading.Event, tally: Tally) -> None:
    head = (
        f"POST /v1/scan HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEYS[6]}\r\nContent-Length: 5000000\r\n"
        "Content-Type: multipart/form-data; boundary=zzz\r\n\r\n--zzz\r\n"
    ).encode()
    while not stop.is_set():
        for kind, payload in (("slow body (stalls)", head), ("slow headers (never end)", b"GET /healthz HTTP/1.1\r\n")):
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                    s.sendall(payload)
                    answer = s.recv(200)
                    status = answer.split(b" ", 2)[1].decode() if answer else "closed"
                tally.add(kind, f"{status} after the deadline", time.perf_counter() - started)
            except OSError as e:
                tally.add(kind, f"transport {type(e).__name__}")


# ------------------------------------------------------------------------------------ report


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    args = ap.parse_args()

    index = ensure_index()
    photos = [(p.name, p.read_bytes()) for p in sorted(COCO.glob("*.jpg"))]
    photos += [(p.name, p.read_bytes()) for p in sorted(NONMEMBERS.glob("*.jpg"))[:50]]
    tally, stop, abuse_stop = Tally(), threading.Event(), threading.Event()
    phase = ["clean"]
    half = args.minutes * 60 / 2
    with Server(index) as server:
        rss_before = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        clients = [
            threading.Thread(target=scan_client, args=(server.url, KEYS[i % 4], photos, stop, tally, phase))
            for i in range(args.clients)
        ]
        for t in clients:
            t.start()
        time.sleep(half)
        phase[0] = "abuse"
        abusers = [
            threading.Thread(target=batch_client, args=(server.url, photos, abuse_stop, tally)),
            threading.Thread(target=bomb_client, args=(server.url, abuse_stop, tally)),
            threading.Thread(target=slow_client, args=(server.port, abuse_stop, tally)),
        ]
        for t in abusers:
            t.start()
        time.sleep(half)
        abuse_stop.set()
        stop.set()
        for t in clients + abusers:
            t.join(120)
        time.sleep(1.0)
        rss_after = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        rss = [m for _, m in server.rss]
    write_report(args, tally, rss_before, max(rss), rss_after, len(photos))


def write_report(args, tally: Tally, before: float, peak: float, after: float, n_photos: int) -> None:
    clean, abuse = tally.latency.get("scan/clean", []), tally.latency.get("scan/abuse", [])
    well_formed = ("scan/clean", "scan/abuse", "batch of 8")
    errors = sum(
        n for (kind, outcome), n in tally.outcomes.items() if kind in well_formed and outcome.startswith("error")
    )
    busy = sum(n for (kind, outcome), n in tally.outcomes.items() if outcome.startswith("busy"))
    setup = (
        f"{time.strftime('%Y-%m-%d')}, `python bench/bench_soak.py --minutes {args.minutes:g} --clients "
        f"{args.clients}`, {platform.machine()}, {os.cpu_count()} cores shared with other work, no GPU. The "
        "server runs the default checks (SSCD + PDQ, visible and invisible watermarks, C2PA, metadata) on an "
        f"SSCD + PDQ index of the 52 coco-cc photos; clients upload {n_photos} photos (coco-cc and Flickr8k "
        f"non-members). Half the time the {args.clients} scan clients run alone (clean), half beside batch "
        "uploads, bombs and slow clients (abuse)."
    )
    latency = (
        f"- **Scan latency p99: {pct(clean, 99):.0f} ms clean, {pct(abuse, 99):.0f} ms under abuse "
        f"(x{pct(abuse, 99) / pct(clean, 99):.2f})**; p50 {pct(clean, 50):.0f} / {pct(abuse, 50):.0f} ms; "
        f"{len(clean)} + {len(abuse)} scans"
    )
    lines = [
        "# Soak: `provenance serve` under abuse",
        "",
        setup,
        "",
        f"- **Errors of well-formed requests: {errors}** (busy 503s retried after Retry-After: {busy})",
        latency,
        f"- **Server RSS: {before:.0f} MiB ready, {peak:.0f} MiB peak, {after:.0f} MiB at the end** (sampled every 0.5 s)",
        "",
        "| request | answer | count | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for (kind, outcome), n in sorted(tally.outcomes.items()):
        xs = tally.latency.get(kind, []) if outcome in ("ok",) or not outcome.startswith(("error", "busy")) else []
        lines.append(f"| {kind} | {outcome} | {n} | {pct(xs, 50):.0f} | {pct(xs, 99):.0f} |")
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
