"""What the server holds for its lifetime: the index, the models and scanner, loaded once in a background thread."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

from starlette.concurrency import run_in_threadpool

from provenance.api.batcher import ScanBatcher
from provenance.api.config import ServerConfig
from provenance.errors import ModelLoadError, ProvenanceError
from provenance.scan import ScanOptions, Scanner
from provenance.search import Searcher
from provenance.store import ProvenanceIndex
from provenance.types import ScanRecord

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "error"]
T = TypeVar("T")


class VisibleCheckOff(ProvenanceError):
    """A scan asked for a visible-watermark head on a server that does not check visible watermarks."""


class InvisibleCheckOff(ProvenanceError):
    """A scan asked for the invisible-mark crop search on a server that does not read invisible marks."""


@dataclass
class Checks:
    """Which evidence a scan gathers; reported by /healthz so clients know what "no marks" means."""

    descriptors: list[str] = field(default_factory=list)  # e.g. ["sscd", "pdq"]
    visible: bool = False
    visible_thorough: bool = False  # the server's default; a scan request may ask for the other head
    centre_view: bool = False  # SSCD also matches each upload's centre (scan --centre-view)
    invisible_crops: bool = False  # invisible marks also read as in a crop of a marked image (scan --invisible-crops)
    invisible: bool = False
    c2pa: bool = False
    metadata: bool = False
    notes: list[str] = field(default_factory=list)  # why a check is off


class ServiceState:
    """Loading status plus, once ready, the shared index, searcher, scanner and executors."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.status: Status = "loading"
        self.error: str | None = None
        self.index: ProvenanceIndex | None = None
        self.searcher: Searcher | None = None
        self.scanner: Scanner | None = None
        self.checks = Checks()
        self.load_seconds: float | None = None
        self.search_pool = ThreadPoolExecutor(max_workers=max(1, config.search_threads),
                                              thread_name_prefix="search")
        # (visible_thorough, centre_view, invisible_crops) -> (scanner, batcher): the server's default from loading,
        # another (the other visible-watermark head, SSCD's centre view or the crop search on or off) from the first
        # request that asks for it
        self._variants: dict[tuple[bool, bool, bool], tuple[Scanner, ScanBatcher | None]] = {}
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
            searcher = Searcher(index)
            scanner, checks = _build_scanner(searcher, self.config)
            if "sscd" in scanner.descriptors:
                # Scan workers and image searches call SSCD side by side: give each overlapping call one core.
                searcher.model("sscd").prepare_concurrent_calls()
            self._torch_threads_before = _set_torch_threads(self.config.torch_threads)
        except ProvenanceError as e:
            logger.error("cannot load the index at %s: %s", self.config.index_dir, e)
            self.error, self.status = str(e), "error"
            self._ready.set()
            return
        except Exception as e:  # noqa: BLE001 - report any load failure through /healthz instead of dying silently
            logger.exception("unexpected error while loading %s", self.config.index_dir)
            self.error, self.status = f"{type(e).__name__}: {e}", "error"
            self._ready.set()
            return
        self.index, self.searcher, self.scanner, self.checks = index, searcher, scanner, checks
        self._variants[(self.config.visible_thorough, self.config.centre_view, checks.invisible_crops)] = (
            scanner, self._batcher(scanner))
        self.load_seconds = time.perf_counter() - started
        self.status = "ready"
        self._ready.set()
        logger.info("ready: %s (%d items, %s) in %.1fs", index.dir, len(index), ", ".join(checks.descriptors),
                    self.load_seconds)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (ready or failed); True if it did within `timeout`."""
        return self._ready.wait(timeout)

    # 2. Work, off the event loop

    async def scan(self, items: list[tuple[str, bytes]], visible_thorough: bool | None = None,
                   centre_view: bool | None = None, invisible_crops: bool | None = None) -> list[ScanRecord]:
        """Scan (name, bytes) pairs: through the micro-batcher, or in a worker thread when batching is off.

        visible_thorough picks the visible-watermark check (the thorough mix when True, the 288 px head when False);
        centre_view whether SSCD also matches the image's centre (scan --centre-view); invisible_crops whether invisible
        marks are also read as in a crop of a marked image (scan --invisible-crops); None is the server's default.
        Another combination's scanner is built on first use (about a second) and kept."""
        assert self.scanner is not None
        key = (self.config.visible_thorough if visible_thorough is None else visible_thorough,
               self.config.centre_view if centre_view is None else centre_view,
               self.checks.invisible_crops if invisible_crops is None else invisible_crops)
        variant = self._variants.get(key)  # the default's is there from loading
        scanner, batcher = variant or await run_in_threadpool(self._variant, key)
        if batcher is not None:
            return await asyncio.wrap_future(batcher.submit(items))
        return await run_in_threadpool(scanner.scan_many_bytes, items)

    def _variant(self, key: tuple[bool, bool, bool]) -> tuple[Scanner, ScanBatcher | None]:
        """The scanner (sharing the searcher's models) and batcher for another (visible_thorough, centre_view,
        invisible_crops)."""
        visible_thorough, centre_view, invisible_crops = key
        if visible_thorough != self.config.visible_thorough and not self.checks.visible:
            raise VisibleCheckOff("this server does not check visible watermarks, so it has no head to choose")
        if invisible_crops and not self.checks.invisible:
            raise InvisibleCheckOff("this server does not read invisible watermarks, so it cannot search crops for them")
        with self._variants_lock:
            if key not in self._variants:
                assert self.scanner is not None and self.searcher is not None
                options = replace(self.scanner.options, visible_thorough=visible_thorough, centre_view=centre_view,
                                  invisible_crops=invisible_crops)
                scanner = Scanner(self.searcher, options)
                self._variants[key] = (scanner, self._batcher(scanner))
                logger.info("loaded the scan with the %s visible-watermark check, the centre view %s and the crop "
                            "search %s for requests that ask for it", "thorough" if visible_thorough else "288 px",
                            "on" if centre_view else "off", "on" if invisible_crops else "off")
            return self._variants[key]

    def _batcher(self, scanner: Scanner) -> ScanBatcher | None:
        if self.config.scan_batch <= 0:
            return None
        return ScanBatcher(scanner.scan_many_bytes, self.config.scan_batch, self.config.scan_window_ms / 1000,
                           self.config.scan_workers)

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


def _build_scanner(searcher: Searcher, config: ServerConfig) -> tuple[Scanner, Checks]:
    """A Scanner with the configured checks; optional ("auto") checks whose parts are missing are turned off."""
    checks = Checks(c2pa=config.c2pa, metadata=config.metadata)
    invisible = config.invisible
    if invisible is None:
        invisible = importlib.util.find_spec("provenance.watermarks.invisible") is not None
        if not invisible:
            checks.notes.append("invisible watermarks: decoder module not installed")
    checks.invisible = invisible
    options = ScanOptions(k=config.k, visible=config.visible is not False, invisible=invisible, c2pa=config.c2pa,
                          metadata=config.metadata, max_pixels=config.max_pixels,
                          visible_thorough=config.visible_thorough, centre_view=config.centre_view,
                          invisible_crops=config.invisible_crops and invisible)
    try:
        scanner = Scanner(searcher, options)
    except ModelLoadError as e:
        if config.visible is not None or config.visible_thorough or not options.visible:
            raise
        # The visible-watermark weights are optional in "auto" mode: scan without them and say so.
        logger.warning("visible-watermark check off: %s", e)
        checks.notes.append("visible watermark: detector weights not available (see the server log)")
        options.visible = False
        scanner = Scanner(searcher, options)
    checks.visible = options.visible
    checks.visible_thorough = options.visible and config.visible_thorough
    checks.centre_view = config.centre_view and "sscd" in scanner.descriptors
    checks.invisible_crops = options.invisible_crops
    checks.descriptors = list(scanner.descriptors)
    return scanner, checks
