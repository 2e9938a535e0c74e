"""The detector: for each image, does it copy a corpus image, and what provenance marks does it carry?

Per image (in worker threads): read bytes, decode, preprocess for each model, decode invisible marks,
read C2PA and generation metadata. Per batch (main thread): SSCD / CLIP / visible-watermark models and
FAISS searches. Then `decide_verdict`, a pure function of the scores and the calibrated thresholds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from provenance.consent.files import read_file_consent
from provenance.errors import ModelLoadError, ProvenanceError, UnreadableImageError
from provenance.images import DRAFT_MIN_SIDE, DecodedImage, decode_image, mime_type, read_bytes, sha256_bytes
from provenance.options import ScanOptions, Thresholds
from provenance.regions import RegionOptions
from provenance.search import Searcher, best_per_item, drop_far_pdq, merge_matches
from provenance.store import ProvenanceIndex
from provenance.types import Match, ScanRecord, Verdict, WatermarkEvidence

if TYPE_CHECKING:
    from provenance.registry import Registry
    from provenance.verify import Verifier
    from provenance.watermarks.visible import VisibleWatermarkDetector

logger = logging.getLogger(__name__)


def decide_verdict(scores: dict[str, float | int | None], t: Thresholds, same_bytes: bool = False) -> Verdict:
    """exact > replica > similar > novel, from the best score of each descriptor."""
    sscd, clip, pdq = scores.get("sscd"), scores.get("clip"), scores.get("pdq_distance")
    if same_bytes:
        return "exact"
    if pdq is not None and pdq <= t.exact_pdq_bits and (sscd is None or sscd >= t.exact_sscd):
        return "exact"
    if sscd is not None and sscd >= t.replica_sscd:
        return "replica"
    if (sscd is not None and sscd >= t.similar_sscd) or (clip is not None and clip >= t.similar_clip):
        return "similar"
    return "novel"


def match_verdict(m: Match, t: Thresholds, same_bytes: bool = False) -> Verdict:
    """One match's own verdict, from its descriptor's score alone (the page's badge beside each match)."""
    scores: dict[str, float | int | None] = (
        {"pdq_distance": m.distance} if m.descriptor == "pdq" else {m.descriptor: m.score}
    )
    return decide_verdict(scores, t, same_bytes=same_bytes)


def match_verdicts(record: ScanRecord, t: Thresholds) -> list[Verdict]:
    """`match_verdict` of each of the record's matches, in order; a match whose file is byte-identical is exact."""
    identical = record.extra.get("identical_file")
    return [match_verdict(m, t, same_bytes=(m.id == identical)) for m in record.matches]


# the centre view keeps the middle 60% of each side (36% of the area), the view the calibration chose
CENTRE_VIEW_SIDE = 0.6


def centre_crop(image: Image.Image, side: float = CENTRE_VIEW_SIDE) -> Image.Image:
    """The middle `side` of each dimension of the image."""
    margin = (1.0 - side) / 2
    w, h = image.size
    return image.crop((round(w * margin), round(h * margin), round(w * (1 - margin)), round(h * (1 - margin))))


@dataclass
class _Work:
    """What a worker thread produced for one input."""

    name: str
    record: ScanRecord
    inputs: dict[str, Any] = field(default_factory=dict)  # per model: an array, or a dict/list of them
    image: Image.Image | None = None  # kept for verification (region search only)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # the region views' boxes
    region_matches: list[Match] = field(default_factory=list)  # best per corpus item over the region views
    whole_scores: list[float] = field(default_factory=list)  # the whole image's SSCD scores, best first


class Scanner:
    """Scans images against one index; models and the index load once and are reused for every batch."""

    def __init__(self, searcher: Searcher, options: ScanOptions | None = None):
        self.searcher = searcher
        self.index: ProvenanceIndex = searcher.index
        self.registry: Registry | None = None  # a do-not-train registry: the matches it covers carry `opted_out`
        self.options = options or ScanOptions()
        o = self.options
        self.descriptors: list[str] = [n for n in ("sscd", "pdq") if n in self.index.specs]
        if (o.use_clip is None and "clip" in self.index.specs) or o.use_clip:
            self.descriptors.append("clip")
        self._models = {n: searcher.model(n) for n in self.descriptors}
        self._visible: VisibleWatermarkDetector | None = None
        if o.visible:
            try:
                self._visible = _load_visible(o)
            except ModelLoadError as e:
                if o.visible_model or o.visible_laion_checkpoint or o.visible_thorough:
                    raise  # the user asked for these weights: failing to load them is their error to see
                # the shipped weights missing (a broken install) must not stop copy detection
                logger.warning("visible-watermark check is off: %s", e)
        if self._visible is not None:
            # a head on SSCD's maps at 288 px reads them from the index's own SSCD pass when it is the same model
            self._visible = self._visible.sharing_scan_pass(self._models.get("sscd"))
        requested = o.requested_checks()
        self._centre_view = requested["centre_view"] and "sscd" in self._models  # a view of SSCD's: none without it
        self._invisible_crops = requested["invisible_crops"]
        self._region_search = requested["region_search"] and "sscd" in self._models
        self._verifier: Verifier | None = None
        self.region_options = RegionOptions()
        if self._region_search:
            from provenance.verify import Verifier

            self._verifier = Verifier(self._corpus_thumbnail)
        # what every record of this scanner says ran: what was asked for, less what could not run here
        self.checks: dict[str, Any] = {
            "descriptors": list(self.descriptors),
            **requested,
            "visible": self._visible is not None,
            "centre_view": self._centre_view,
            "region_search": self._region_search,
        }
        self.checks["visible_thorough"] = self.checks["visible"] and requested["visible_thorough"]

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], options: ScanOptions | None = None) -> Scanner:
        options = options or ScanOptions()
        return cls(Searcher.open(index_dir, options.models), options)

    def _corpus_thumbnail(self, item_id: str) -> Image.Image | None:
        """The pixels verification compares with: the index's stored thumbnail (None when it has none)."""
        data = self.index.thumbnail(item_id)
        try:
            return decode_image(data, item_id).image if data else None
        except UnreadableImageError as e:  # a damaged thumbnails.bin: this item goes unverified, the scan goes on
            logger.warning("thumbnail of corpus item %s is unreadable: %s", item_id, e)
            return None

    # ------------------------------------------------------------------------------ public API

    def scan_paths(
        self, paths: Iterable[str | os.PathLike[str]], progress: Callable[[ScanRecord], None] | None = None
    ) -> list[ScanRecord]:
        return list(self.iter_scan(((str(p), None) for p in paths), progress))

    def scan_bytes(self, data: bytes, name: str = "upload") -> ScanRecord:
        return next(self.iter_scan([(name, data)]))

    def scan_many_bytes(self, items: list[tuple[str, bytes]]) -> list[ScanRecord]:
        if len(items) == 1:  # one upload (the server's usual batch): nothing to overlap, no decode threads to start
            return self._finish_batch([self._prepare(*items[0])])
        return list(self.iter_scan(items))

    def iter_scan(
        self, items: Iterable[tuple[str, bytes | None]], progress: Callable[[ScanRecord], None] | None = None
    ) -> Iterator[ScanRecord]:
        """Scan (name, bytes-or-None) pairs in input order; None bytes means read the file `name`."""
        o = self.options
        it = iter(items)
        with ThreadPoolExecutor(max_workers=max(1, o.workers), thread_name_prefix="scan-decode") as pool:

            def submit() -> list[Future[_Work]]:
                futures: list[Future[_Work]] = []
                for name, data in it:
                    futures.append(pool.submit(self._prepare, name, data))
                    if len(futures) >= o.batch_size:
                        break
                return futures

            current = submit()
            while current:
                upcoming = submit()  # decoded while the models run on `current`
                for rec in self._finish_batch([f.result() for f in current]):
                    if progress:
                        progress(rec)
                    yield rec
                current = upcoming

    # --------------------------------------------------------------------------- worker thread

    def _prepare(self, name: str, data: bytes | None) -> _Work:
        try:
            raw = data if data is not None else read_bytes(name)
        except UnreadableImageError as e:
            return _Work(name, ScanRecord.failed(name, e))
        try:
            # invisible marks are read from every pixel; without them a JPEG may decode at reduced size
            min_side = None if self.options.invisible else DRAFT_MIN_SIDE
            decoded = decode_image(raw, name, self.options.max_pixels, min_side)  # hashes the bytes too
        except UnreadableImageError as e:
            return _Work(name, ScanRecord.failed(name, e, sha256_bytes(raw) if raw else None))
        try:
            record = ScanRecord(
                path=name, sha256=decoded.sha256, width=decoded.width, height=decoded.height, checks=dict(self.checks)
            )
            record.watermarks = self._evidence(decoded)
            # do-not-train signals in the file (C2PA/CAWG training-mining, IPTC/PLUS XMP); the C2PA summary is reused
            record.consent = read_file_consent(
                decoded.raw, mime_type(decoded.format), c2pa_summary=record.watermarks.c2pa
            ).to_dict()
            memo = ((record.watermarks.metadata or {}).get("provenance") or {}).get("memorization")
            if isinstance(memo, dict):
                record.extra["memorization"] = memo
            inputs: dict[str, Any] = {n: m.preprocess(decoded.image) for n, m in self._models.items()}
            if self._centre_view:
                inputs["sscd_centre"] = self._models["sscd"].preprocess(centre_crop(decoded.image))
            if self._visible is not None:
                inputs["visible"] = self._visible.preprocess(decoded.image)
            work = _Work(name, record, inputs)
            if self._region_search:
                from provenance.regions import propose_regions, region_views

                ro = self.region_options
                work.image, work.boxes = decoded.image, propose_regions(decoded.image, ro)
                inputs["sscd_regions"] = region_views(decoded.image, work.boxes, ro.view_side)
        except Exception as e:
            logger.exception("scan of %s failed", name)
            return _Work(name, ScanRecord.failed(name, e, decoded.sha256))
        return work

    def _evidence(self, decoded: DecodedImage) -> WatermarkEvidence:
        o = self.options
        ev = WatermarkEvidence()
        if o.invisible:
            from provenance.watermarks.invisible import detect_invisible_marks

            ev.invisible = detect_invisible_marks(decoded.image, try_cropped=self._invisible_crops)
        if o.c2pa:
            from provenance.watermarks.c2pa import read_c2pa

            mime = mime_type(decoded.format)
            ev.c2pa = read_c2pa(decoded.raw, mime)
        if o.metadata:
            from provenance.watermarks.metadata import read_generation_metadata

            ev.metadata = read_generation_metadata(decoded)
        return ev

    # ----------------------------------------------------------------------------- main thread

    def _finish_batch(self, work: list[_Work]) -> list[ScanRecord]:
        ok = [w for w in work if w.record.verdict != "error"]
        if ok:
            vectors: dict[str, np.ndarray] = {}
            taps = None
            for n in self.descriptors:
                batch = [w.inputs[n] for w in ok]
                if n == "sscd" and self._visible is not None and self._visible.needs_scan_taps:
                    vectors[n], taps = self._models[n].embed_batch_with_taps(batch)
                else:
                    vectors[n] = self._models[n].embed_batch(batch)
            with _faiss_threads(1 if len(ok) == 1 else None):
                results = self.searcher.search_vectors(vectors, self.options.k)
            if self._region_search:  # the whole image's own SSCD neighbours, before other views join them
                for w, full in zip(ok, results, strict=True):
                    w.whole_scores = [m.score for m in full.get("sscd", [])]
            if self._centre_view:
                centre = self._models["sscd"].embed_batch([w.inputs["sscd_centre"] for w in ok])
                with _faiss_threads(1 if len(ok) == 1 else None):
                    views = self.searcher.search_vectors({"sscd": centre}, self.options.k)
                for w, full, part in zip(ok, results, views, strict=True):
                    full["sscd"] = best_per_item([full["sscd"], part["sscd"]], self.options.k)
                    if full["sscd"] and any(full["sscd"][0] is m for m in part["sscd"]):
                        w.record.extra["sscd_view"] = "centre"  # the top match came from the centre view
            if self._region_search:
                self._search_regions(ok)
            if self._visible is not None:
                probs = self._visible.probabilities([w.inputs["visible"] for w in ok], taps)
                threshold = self._visible.config.flag_threshold
                sizes: Any = self._visible.input_sizes  # a list in WatermarkEvidence.visible (typed float | bool)
                for w, p in zip(ok, probs, strict=True):
                    p = round(float(p), 4)
                    w.record.watermarks.visible = {
                        "probability": p,
                        "flagged": p >= threshold,
                        "threshold": threshold,
                        "input_sizes": sizes,
                    }
            for w, per_desc in zip(ok, results, strict=True):
                self._fill(w.record, per_desc)
                if self._region_search:
                    try:
                        self._verify(w, per_desc)
                    except Exception as e:
                        logger.exception("verification of %s failed", w.name)
                        w.record.extra["verification_error"] = f"{type(e).__name__}: {e}"
        return [w.record for w in work]

    def _search_regions(self, ok: list[_Work]) -> None:
        """Every image's region views in one SSCD call and one search; each corpus item's best region match."""
        views = [v for w in ok for v in w.inputs["sscd_regions"]]
        if not views:
            return
        found = self.searcher.search_vectors({"sscd": self._models["sscd"].embed_batch(views)}, self.options.k)
        i = 0
        for w in ok:
            per_view = found[i : i + len(w.boxes)]
            i += len(w.boxes)
            w.region_matches = best_per_item([r["sscd"] for r in per_view], self.options.k)

    def _verify(self, w: _Work, per_desc: dict[str, list[Match]]) -> None:
        """Geometric verification of the best candidates over all views: confirms a copy (at least replica, with
        the matched region) or calls a replica without a copy's consistent transform similar."""
        from provenance.verify import corpus_margin, decide_with_verification

        assert self._verifier is not None and w.image is not None  # region search on: _prepare kept the pixels
        rec = w.record
        if rec.verdict == "exact":  # identical bytes, or PDQ and SSCD agree: nothing for verification to change
            w.image = None
            return
        sscd = per_desc.get("sscd") or []
        candidates = best_per_item([sscd, w.region_matches], self.options.k)
        checks = self._verifier.check(w.image, candidates)
        verdict, match = decide_with_verification(
            rec.verdict, checks, sscd[0].id if sscd else None, self._verifier.options, corpus_margin(w.whole_scores)
        )
        if verdict != rec.verdict:
            rec.extra["verdict_before_verification"] = rec.verdict
            rec.verdict = verdict
        if match is not None:
            rec.matches = [match, *[m for m in rec.matches if m.id != match.id][: self.options.k - 1]]
        if checks:
            rec.extra["verification"] = [{"id": m.id, **v.to_dict()} for m, v in checks]
        w.image = None  # the pixels are not needed any more

    def _fill(self, record: ScanRecord, per_desc: dict[str, list[Match]]) -> None:
        t = self.options.thresholds
        scores: dict[str, float | int | None] = {"sscd": None, "clip": None, "pdq_distance": None}
        if per_desc.get("sscd"):
            scores["sscd"] = round(per_desc["sscd"][0].score, 4)
        if per_desc.get("clip"):
            scores["clip"] = round(per_desc["clip"][0].score, 4)
        if per_desc.get("pdq"):
            scores["pdq_distance"] = per_desc["pdq"][0].distance
            per_desc = drop_far_pdq(per_desc)
        same_item = self.index.id_with_sha256(record.sha256)  # per-part sorted sha256 arrays, removed items excluded
        record.scores = scores
        record.verdict = decide_verdict(scores, t, same_bytes=same_item is not None)
        record.matches = merge_matches(per_desc, self.options.k)
        if self.registry is not None:
            from provenance.registry import mark_matches

            record.matches = mark_matches(self.registry, self.index, record.matches, t)
        if same_item is not None:
            record.extra["identical_file"] = same_item


@contextmanager
def _faiss_threads(n: int | None) -> Iterator[None]:
    """FAISS searches of the calling thread on `n` OpenMP threads (None: unchanged) inside the block.

    For one-image batches (every scan of the API server): a one-query search gains nothing from OpenMP, yet the
    binary (PDQ) search still wakes the other OpenMP threads, which then spin-wait; that cost several times the
    search itself in CPU, and milliseconds of wall time on a busy machine (BENCHMARKS.md, "API server"). OpenMP's
    thread count is a per-thread setting, so concurrent scans and searches on other threads are not affected."""
    if n is None:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _load_visible(o: ScanOptions) -> VisibleWatermarkDetector:
    from provenance.watermarks.visible import THOROUGH_WEIGHTS, VisibleWatermarkDetector

    if o.visible_thorough:
        return VisibleWatermarkDetector.load(THOROUGH_WEIGHTS)
    if o.visible_laion_checkpoint:
        return VisibleWatermarkDetector.from_laion_checkpoint(o.visible_laion_checkpoint)
    return VisibleWatermarkDetector.load(o.visible_model)


def fail_on_met(records: list[ScanRecord], conditions: list[str]) -> bool:
    """Whether any record meets a --fail-on condition (exact | replica | similar | watermark).
    Conditions are cumulative upward: `similar` also fails on replica and exact."""
    rank = {"exact": 0, "replica": 1, "similar": 2}
    for rec in records:
        for cond in conditions:
            if cond in rank and rec.verdict in rank and rank[rec.verdict] <= rank[cond]:
                return True
            if cond == "watermark":
                wm = rec.watermarks
                if (
                    wm.invisible
                    or (wm.visible and wm.visible.get("flagged"))
                    or (wm.c2pa and wm.c2pa.get("ai_generated"))
                ):
                    return True
    return False


def load_thresholds(path: str | os.PathLike[str] | None) -> Thresholds:
    if path is None:
        return Thresholds()
    try:
        return Thresholds(**json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ProvenanceError(f"{path}: cannot read thresholds ({e})") from None
