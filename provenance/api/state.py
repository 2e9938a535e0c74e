"""What the server holds for its lifetime: the index, the models and scanner, loaded once in a background thread."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from starlette.concurrency import run_in_threadpool

from provenance.api.batcher import ScanBatcher
from provenance.api.config import ServerConfig
from provenance.api.privacy import PathRedactor
from provenance.captions import CaptionLimits
from provenance.errors import ProvenanceError
from provenance.options import ScanOptions
from provenance.scan import Scanner
from provenance.search import Searcher
from provenance.store import ProvenanceIndex
from provenance.types import ScanRecord

if TYPE_CHECKING:
    from provenance.registry import Registry

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "error"]
T = TypeVar("T")


class ServiceState:
    """Loading status plus, once ready, the shared index, searcher, scanner and executors."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.status: Status = "loading"
        self.error: str | None = None
        self.index: ProvenanceIndex | None = None
        self.searcher: Searcher | None = None
        self.scanner: Scanner | None = None
        # the do-not-train registry (config.registry), opened by the first route or scan using it
        self.registry: Registry | None = None
        # what a scan with the server's options checks (Scanner.checks), and why a check asked for is off
        self.checks: dict[str, Any] = {}
        self.notes: list[str] = []
        self.load_seconds: float | None = None
        # what answers may say about server paths: the index folder now, the corpus folders once it is open
        self.redactor = PathRedactor(config.index_dir)
        self.caption_limits = CaptionLimits(
            config.caption_max_terms, config.caption_max_chars, config.caption_time_budget_s
        )
        self.search_pool = ThreadPoolExecutor(max_workers=max(1, config.search_threads), thread_name_prefix="search")
        # the per-request options (ScanOptions.request_names) -> (scanner, batcher): the server's own from loading,
        # another from the first request that asks for it
        self._variants: dict[tuple[Any, ...], tuple[Scanner, ScanBatcher | None]] = {}
        self._variants_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._torch_threads_before: int | None = None

    # 1. Loading

    def start(self) -> None:
        """Load in a background thread (so /healthz answers meanwhile), or inline when configured."""
        if self.config.load_in_background:
            self._thread = threading.Thread(target=self.load, name="provenance-load", daemon=True)
            self._thread.start()
        else:
            self.load()

    def load(self) -> None:
        started = time.perf_counter()
        try:
            index = ProvenanceIndex.open(self.config.index_dir)
            self.redactor = PathRedactor(self.config.index_dir, index.manifest)
            index.preload()  # every part's files checked and its FAISS indexes loaded: not ready until usable
            searcher = Searcher(index)
            scanner = Scanner(searcher, self.config.scan)
            if self.config.registry is not None:  # scan matches carry `opted_out`
                from provenance.registry import Registry

                self.registry = self.registry or Registry(self.config.registry)
                scanner.registry = self.registry
            if "sscd" in scanner.descriptors:
                # Scan workers and image searches call SSCD side by side: give each overlapping call one core.
                searcher.model("sscd").prepare_concurrent_calls()
            self._torch_threads_before = _set_torch_threads(self.config.torch_threads)
        except ProvenanceError as e:
            logger.error("cannot load the index at %s: %s", self.config.index_dir, e)
            self.error, self.status = str(e), "error"
            self._ready.set()
            return
        except Exception as e:
            logger.exception("unexpected error while loading %s", self.config.index_dir)
            self.error, self.status = f"{type(e).__name__}: {e}", "error"
            self._ready.set()
            return
        self.index, self.searcher, self.scanner, self.checks = index, searcher, scanner, scanner.checks
        requested = self.config.scan.requested_checks()
        # a check asked for that cannot run here (weights missing, no SSCD for the centre view)
        self.notes = [
            f"{name}: asked for but unavailable on this server (see the server log)"
            for name, on in requested.items()
            if on and not self.checks.get(name)
        ]
        self._variants[_variant_key(self.config.scan)] = (scanner, self._batcher(scanner))
        self.load_seconds = time.perf_counter() - started
        self.status = "ready"
        self._ready.set()
        logger.info(
            "ready: %s (%d items, %s) in %.1fs",
            index.dir,
            len(index),
            ", ".join(scanner.descriptors),
            self.load_seconds,
        )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (ready or failed); True if it did within `timeout`."""
        return self._ready.wait(timeout)

    # 2. Work, off the event loop

    def options_for(self, overrides: dict[str, Any]) -> ScanOptions:
        """The server's scan options with a request's overrides (None = the server's), validated by ScanOptions:
        a broken rule raises InvalidOptionsError (a 400)."""
        return self.config.scan.with_overrides(**overrides)

    async def scan(self, items: list[tuple[str, bytes]], options: ScanOptions | None = None) -> list[ScanRecord]:
        """Scan (name, bytes) pairs with `options` (from `options_for`; None = the server's): through the
        micro-batcher, or in a worker thread when batching is off. Another combination of the per-request options
        gets its scanner (sharing the loaded models) on first use, and keeps it."""
        assert self.scanner is not None
        options = options or self.config.scan
        variant = self._variants.get(_variant_key(options))  # the server's own is there from loading
        if variant is None:
            variant = await run_in_threadpool(self._variant, options)
        scanner, batcher = variant
        if batcher is not None:
            return await asyncio.wrap_future(batcher.submit(items))
        return await run_in_threadpool(scanner.scan_many_bytes, items)

    def _variant(self, options: ScanOptions) -> tuple[Scanner, ScanBatcher | None]:
        key = _variant_key(options)
        with self._variants_lock:
            if key not in self._variants:
                assert self.searcher is not None
                scanner = Scanner(self.searcher, options)
                scanner.registry = self.registry
                self._variants[key] = (scanner, self._batcher(scanner))
                logger.info(
                    "loaded a scan with %s for requests that ask for it",
                    ", ".join(f"{n}={getattr(options, n)}" for n in ScanOptions.request_names()),
                )
            return self._variants[key]

    def _batcher(self, scanner: Scanner) -> ScanBatcher | None:
        if self.config.scan_batch <= 0:
            return None
        return ScanBatcher(
            scanner.scan_many_bytes, self.config.scan_batch, self.config.scan_window_ms / 1000, self.config.scan_workers
        )

    async def run_search(self, fn: Callable[..., T], *args: Any) -> T:
        """Run model work (image/text search) on the bounded search executor."""
        return await asyncio.get_running_loop().run_in_executor(self.search_pool, fn, *args)

    # 3. Shutdown

    def close(self) -> None:
        for _, batcher in self._variants.values():
            if batcher is not None:
                batcher.close()
        self.search_pool.shutdown(wait=False, cancel_futures=True)
        if self._torch_threads_before is not None:  # the setting is process-wide: hand it back
            _set_torch_threads(self._torch_threads_before)
            self._torch_threads_before = None


def _set_torch_threads(n: int) -> int | None:
    """Set torch's intra-op threads to n (0: leave them); the previous value, or None when nothing changed.

    torch applies it to each thread when that thread first runs torch work, so it reaches the scan and search
    threads, which start after loading. Only when a model loaded torch: importing it just to set its threads
    would cost seconds of startup."""
    torch = sys.modules.get("torch")
    if n <= 0 or torch is None:
        return None
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def _variant_key(options: ScanOptions) -> tuple[Any, ...]:
    # variants differ only in what a request may set; everything else is the server's
    return tuple(getattr(options, n) for n in ScanOptions.request_names())
