"""Micro-batching of concurrent scans: one thread runs the Scanner on whatever requests are queued together."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from provenance.types import ScanRecord

logger = logging.getLogger(__name__)

ScanMany = Callable[[list[tuple[str, bytes]]], list[ScanRecord]]


@dataclass
class _Job:
    items: list[tuple[str, bytes]]
    future: Future = field(default_factory=Future)


class ScanBatcher:
    """Queue scan jobs; `workers` threads each take whatever is queued and scan it as one Scanner batch.

    A fixed number of scan threads bounds how many scans compete for the cores, however many requests
    arrive. While the workers are busy new requests queue up and are taken together next time, so
    batches grow with load without delaying a lone request; `window_s` > 0 additionally waits that long
    for company after the first job arrives. The server runs two workers (two scans side by side gave
    more throughput than one at a time on the 2-core machine) with max_batch 1 (batching saved no CPU on
    mixed-size photos); the figures are in BENCHMARKS.md.
    """

    def __init__(self, scan_many: ScanMany, max_batch: int = 8, window_s: float = 0.0, workers: int = 1):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._scan_many = scan_many
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0  # counters for benchmarks and tests
        self.images = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"scan-batcher-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, items: list[tuple[str, bytes]]) -> Future[list[ScanRecord]]:
        """Scan (name, bytes) pairs; the future gives their records in order."""
        if self._closed:
            raise RuntimeError("the scan batcher is closed")
        job = _Job(list(items))
        self._queue.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers once the jobs queued so far are scanned (each worker takes one stop mark)."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            self._scan(jobs)
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """`first` plus whatever else is queued (or arrives within the window), up to max_batch images."""
        jobs, n = [first], len(first.items)
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            n += len(job.items)
        return jobs, False

    def _scan(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        items = [it for j in live for it in j.items]
        if not items:
            for j in live:
                j.future.set_result([])
            return
        try:
            records = self._scan_many(items)
        except Exception as e:
            logger.exception("scan batch of %d images failed", len(items))
            for j in live:
                j.future.set_exception(e)
            return
        with self._lock:
            self.batches += 1
            self.images += len(items)
        pos = 0
        for j in live:
            j.future.set_result(records[pos : pos + len(j.items)])
            pos += len(j.items)
