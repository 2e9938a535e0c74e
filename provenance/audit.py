"""The replication audit of a model release: how often its outputs copy the corpus, with an interval.

Scan records in, one `AuditResult` out. The core is a fold (`AuditAccumulator.add`) over records that keeps
only what the result needs: counts, one float32 score per output, the top pairs in a bounded heap and one
small tally per distinct prompt; records and decoded images are not kept. `audit_paths` is the edge that
streams files through a `Scanner` into the fold.

Definitions (the JSON summary's contract, `AuditResult.to_dict()`):
- an *output* is an input the scanner could read; unreadable inputs get error records, are listed under
  `errors` and do not count as outputs (neither in the numerator nor in the denominator);
- the *replication rate* is the share of outputs whose verdict is `replica` or `exact`; `replica` and `exact`
  are also given alone. Each share has a 95% Wilson score interval (Wilson 1927), which stays inside [0, 1] and
  keeps its coverage at small counts and at rates near 0, where the normal approximation collapses to a
  zero-width interval;
- `sscd_above_0_5` is the share of outputs whose top-1 SSCD cosine exceeds 0.5, the figure Somepalli et al.
  2023 report for Stable Diffusion against LAION Aesthetics, so a release can be compared with the literature
  independently of this project's calibrated thresholds;
- the *reference* is a set of photos known NOT to be in the index (non-members), scanned against the same
  index: their top-1 SSCD scores are the distribution an output that copies nothing would have, and their
  `replica`/`exact` share is the false-alarm rate at the same thresholds. Without one, the distribution is
  shown alone and the calibrated verdict thresholds are the only yardstick.

A match's region (issue 29: copy detection over regions) is read from `match.region`, a dict
`{"query": [x0, y0, x1, y1], "corpus": [x0, y0, x1, y1]}` in coordinates relative to each image's width and
height (0..1); the report draws it on both thumbnails when present.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import os
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

from provenance.errors import InvalidOptionsError
from provenance.types import VERDICT_ORDER, Match, ScanRecord

logger = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = "provenance.audit/1"  # bumped when a key of AuditResult.to_dict() changes meaning or goes
CONFIDENCE = 0.95
SCORE_BINS = 50  # over SSCD cosine [0, 1]: 0.02 wide, fine enough to place the 0.45 / 0.5 lines
PAPER_SSCD = 0.5  # Somepalli et al. 2023's replication cut-off on SSCD cosine
REPLICATING: frozenset[str] = frozenset({"replica", "exact"})
GateOn = Literal["point", "upper"]
GATE_ON: tuple[GateOn, ...] = ("point", "upper")
_MAX_SIDECAR_BYTES = 1 << 20  # our sidecars are about 1 KB; never parse a large unrelated .json


# -- small value types ------------------------------------------------------------------------------------


def wilson_interval(count: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial share `count / total`; (0.0, 1.0) when total is 0."""
    if total < 0 or not 0 <= count <= total:
        raise ValueError(f"need 0 <= count <= total, got count={count}, total={total}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = count / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / total + z2n / (4 * total)) / (1 + z2n)
    # at count 0 (or total) the bound is exactly 0 (or 1); rounding must not leave it a hair outside
    low = 0.0 if count == 0 else max(0.0, centre - half)
    high = 1.0 if count == total else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class Rate:
    """A share with its Wilson interval; `rate`, `low`, `high` are None when there is nothing to count."""

    count: int
    total: int
    rate: float | None
    low: float | None
    high: float | None
    confidence: float = CONFIDENCE

    @classmethod
    def of(cls, count: int, total: int, confidence: float = CONFIDENCE) -> Rate:
        if total == 0:
            return cls(count, total, None, None, None, confidence)
        low, high = wilson_interval(count, total, confidence)
        return cls(count, total, count / total, low, high, confidence)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScoreDistribution:
    """Top-1 SSCD scores of a set of images: a histogram over [0, 1] and a few quantiles."""

    n: int  # images with an SSCD score
    bins: list[int]  # SCORE_BINS counts over [0, 1]; scores outside land in the end bins
    quantiles: dict[str, float | None]  # p50, p90, p95, p99, max

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreDistribution:
        scores = np.asarray(scores, dtype=np.float64)  # (n,)
        idx = np.clip((scores * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
        bins = np.bincount(idx, minlength=SCORE_BINS).tolist()
        qs = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
        quantiles = {k: (round(float(np.percentile(scores, q)), 4) if len(scores) else None) for k, q in qs.items()}
        return cls(len(scores), bins, quantiles)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "bin_width": 1 / SCORE_BINS, "bins": self.bins, "quantiles": self.quantiles}


def region_of(match: Match) -> dict[str, list[float]] | None:
    """The matched region of `match`, {"query": box, "corpus": box} with boxes [x0, y0, x1, y1] in 0..1, or None.

    Copy detection over regions (issue 29) sets `match.region`; until then matches carry none. A malformed
    region is dropped (with a log line) rather than drawn wrongly.
    """
    region = getattr(match, "region", None)
    if region is None:
        return None
    try:
        out = {side: [float(v) for v in region[side]] for side in ("query", "corpus")}
    except (TypeError, KeyError, ValueError):
        logger.warning("ignoring malformed region on match %s: %r", match.id, region)
        return None
    for box in out.values():
        x0, y0, x1, y1 = box if len(box) == 4 else (0.0, 0.0, -1.0, -1.0)
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            logger.warning("ignoring region outside 0..1 on match %s: %r", match.id, region)
            return None
    return out


@dataclass(frozen=True)
class Pair:
    """One output and the corpus item it is closest to (by SSCD), for the side-by-side view."""

    path: str
    sha256: str | None
    corpus_id: str
    score: float  # the pair's SSCD cosine (the match's own descriptor score when the index has no SSCD)
    descriptor: str
    verdict: str
    corpus_caption: str | None
    corpus_source: str | None
    prompt: str | None
    region: dict[str, list[float]] | None = None  # see region_of

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PromptStat:
    """How one prompt's outputs fared, with the prompt's memorization signals beside them."""

    prompt: str
    images: int = 0
    replicating: int = 0  # replica or exact
    exact: int = 0
    max_score: float | None = None  # best top-1 SSCD over the prompt's outputs
    best_corpus_id: str | None = None
    best_corpus_caption: str | None = None
    memorization: dict[str, Any] | None = None  # MemorizationSignals.to_dict() of the prompt, when recorded

    @property
    def rate(self) -> float:
        return self.replicating / self.images if self.images else 0.0

    @property
    def prompt_is_corpus_caption(self) -> bool:
        """The best match's caption is the prompt itself: the signature of a memorized caption-image pair."""
        a, b = _norm_text(self.prompt), _norm_text(self.best_corpus_caption)
        return bool(a) and a == b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rate"] = round(self.rate, 4)
        d["prompt_is_corpus_caption"] = self.prompt_is_corpus_caption
        return d


@dataclass(frozen=True)
class Gate:
    """The CI gate: fails when the chosen estimate of the replication rate exceeds `max_rate`."""

    max_rate: float
    on: GateOn
    value: float | None  # the estimate compared; None when there were no outputs
    failed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_gate(replication: Rate, max_rate: float, on: GateOn = "point") -> Gate:
    """Compare the point estimate (or the interval's upper bound) with `max_rate`; no outputs fails the gate."""
    if on not in GATE_ON:
        raise InvalidOptionsError(f"gate_on must be one of {', '.join(GATE_ON)}, got {on!r}")
    if not (isinstance(max_rate, (int, float)) and 0.0 <= max_rate <= 1.0):
        raise InvalidOptionsError(f"max replication rate must be a share in [0, 1], got {max_rate!r}")
    value = replication.rate if on == "point" else replication.high
    if value is None:
        return Gate(max_rate, on, None, True, "no readable outputs: the replication rate is unknown")
    what = "replication rate" if on == "point" else f"upper bound of the {replication.confidence:.0%} interval"
    failed = value > max_rate
    return Gate(
        max_rate,
        on,
        round(value, 6),
        failed,
        f"{what} {value:.4f} {'exceeds' if failed else 'is within'} the maximum {max_rate:g}",
    )


# -- the fold ---------------------------------------------------------------------------------------------


def prompt_of(record: ScanRecord) -> str | None:
    """The prompt an output was generated from, from what the scanner read: our `provenance` chunk, the
    generation facts `generate --scan-index` or a sidecar added (`extra["generation"]`), or another tool's
    parsed parameters (A1111, ComfyUI...)."""
    md = record.watermarks.metadata or {}
    for source in ((md.get("provenance") or {}), (record.extra.get("generation") or {}), (md.get("parameters") or {})):
        p = source.get("prompt") if isinstance(source, dict) else None
        if isinstance(p, str) and p.strip():
            return p.strip()
    return None


def memorization_of(record: ScanRecord) -> dict[str, Any] | None:
    m = record.extra.get("memorization")
    return m if isinstance(m, dict) else None


def _pair_match(record: ScanRecord) -> Match | None:
    """The record's best SSCD match (the descriptor the verdict rests on), else its first match."""
    for m in record.matches:
        if m.descriptor == "sscd":
            return m
    return record.matches[0] if record.matches else None


class _ScoreTally:
    """Verdict counts, errors and top-1 SSCD scores (float32, 4 bytes per image) of a stream of records."""

    def __init__(self) -> None:
        self.verdicts: dict[str, int] = dict.fromkeys(VERDICT_ORDER, 0)
        self.errors: list[dict[str, str]] = []
        self.scores = array("f")

    def add(self, record: ScanRecord) -> None:
        self.verdicts[record.verdict] = self.verdicts.get(record.verdict, 0) + 1
        if record.verdict == "error":
            self.errors.append(
                {
                    "path": record.path,
                    "error": record.error or "unreadable",
                    "error_code": record.error_code or "scan_failed",
                }
            )
            return
        s = record.scores.get("sscd")
        if s is not None:
            self.scores.append(float(s))

    @property
    def outputs(self) -> int:
        return sum(n for v, n in self.verdicts.items() if v != "error")

    def share(self, verdicts: Iterable[str]) -> Rate:
        return Rate.of(sum(self.verdicts.get(v, 0) for v in verdicts), self.outputs)

    def score_array(self) -> np.ndarray:
        return np.array(self.scores, dtype=np.float32)  # a copy: a view would pin the array's buffer


@dataclass(frozen=True)
class AuditOptions:
    top_pairs: int = 12  # pairs shown side by side
    top_captions: int = 20  # prompts listed, most replicating first
    max_replication_rate: float | None = None  # None: no gate
    gate_on: GateOn = "point"

    def check(self) -> None:
        if self.top_pairs < 0 or self.top_captions < 0:
            raise InvalidOptionsError("top_pairs and top_captions must be >= 0")
        if self.gate_on not in GATE_ON:
            raise InvalidOptionsError(f"gate_on must be one of {', '.join(GATE_ON)}, got {self.gate_on!r}")
        if self.max_replication_rate is not None and not 0.0 <= self.max_replication_rate <= 1.0:
            raise InvalidOptionsError(
                f"max replication rate must be a share in [0, 1], got {self.max_replication_rate}"
            )


class AuditAccumulator:
    """Folds output records (and, separately, reference records) into an AuditResult, in bounded memory."""

    def __init__(self, thresholds: dict[str, Any], options: AuditOptions | None = None, index_name: str = ""):
        self.options = options or AuditOptions()
        self.options.check()
        self.thresholds = dict(thresholds)
        self.index_name = index_name
        self.outputs = _ScoreTally()
        self.reference: _ScoreTally | None = None
        self._heap: list[tuple[float, int, Pair]] = []  # min-heap of the best pairs by score
        self._seen = 0
        self._prompts: dict[str, PromptStat] = {}
        self._with_prompt = 0
        self._checks: dict[str, Any] = {}

    def add(self, record: ScanRecord) -> None:
        """Count one output's record."""
        self.outputs.add(record)
        self._seen += 1
        if record.verdict == "error":
            return
        if not self._checks and record.checks:
            self._checks = dict(record.checks)  # one scanner, one set of options: the first record says them
        prompt = prompt_of(record)
        top = _pair_match(record)
        sscd = record.scores.get("sscd")
        score = float(sscd) if sscd is not None else (top.score if top else None)
        if top is not None and score is not None and self.options.top_pairs:
            pair = Pair(
                record.path,
                record.sha256,
                top.id,
                round(score, 4),
                top.descriptor,
                record.verdict,
                top.caption,
                top.source,
                prompt,
                region_of(top),
            )
            item = (score, -self._seen, pair)  # ties: the earlier output ranks first
            if len(self._heap) < self.options.top_pairs:
                heapq.heappush(self._heap, item)
            elif item[:2] > self._heap[0][:2]:
                heapq.heapreplace(self._heap, item)
        if prompt is None:
            return
        self._with_prompt += 1
        st = self._prompts.get(prompt)
        if st is None:
            st = self._prompts[prompt] = PromptStat(prompt)
        st.images += 1
        st.replicating += record.verdict in REPLICATING
        st.exact += record.verdict == "exact"
        if score is not None and (st.max_score is None or score > st.max_score):
            st.max_score = round(score, 4)
            st.best_corpus_id = top.id if top else None
            st.best_corpus_caption = top.caption if top else None
        mem = memorization_of(record)
        if mem is not None and st.memorization is None:
            st.memorization = mem  # shared by the prompt's images (generator.MemorizationSignals)

    def add_reference(self, record: ScanRecord) -> None:
        """Count one reference (non-member) photo's record."""
        if self.reference is None:
            self.reference = _ScoreTally()
        self.reference.add(record)

    def result(self) -> AuditResult:
        o, out = self.options, self.outputs
        scores = out.score_array()
        replication = out.share(REPLICATING)
        reference = None
        if self.reference is not None:
            ref = self.reference
            ref_scores = ref.score_array()
            ref_dist = ScoreDistribution.of(ref_scores)
            p99 = ref_dist.quantiles["p99"]
            reference = ReferenceSummary(
                images=ref.outputs,
                errors=ref.errors,
                scores=ref_dist,
                false_alarms=ref.share(REPLICATING),
                exact=ref.verdicts.get("exact", 0),
                outputs_above_reference_p99=Rate.of(int((scores > p99).sum()), len(scores))
                if p99 is not None
                else Rate.of(0, 0),
                ks_statistic=ks_statistic(scores, ref_scores),
            )
        pairs = [p for _, _, p in sorted(self._heap, key=lambda t: t[:2], reverse=True)]
        ranked = sorted(
            self._prompts.values(), key=lambda s: (-s.replicating, -s.rate, -(s.max_score or 0.0), s.prompt)
        )
        gate = (
            evaluate_gate(replication, o.max_replication_rate, o.gate_on)
            if o.max_replication_rate is not None
            else None
        )
        return AuditResult(
            index=self.index_name,
            thresholds=self.thresholds,
            checks=self._checks,
            inputs=self._seen,
            outputs=out.outputs,
            errors=out.errors,
            verdicts=dict(out.verdicts),
            replication=replication,
            replica=out.share(["replica"]),
            exact=out.share(["exact"]),
            similar=out.share(["similar"]),
            sscd_above_0_5=Rate.of(int((scores > PAPER_SSCD).sum()), len(scores)),
            scores=ScoreDistribution.of(scores),
            reference=reference,
            top_pairs=pairs,
            prompts=len(self._prompts),
            outputs_with_prompt=self._with_prompt,
            captions=ranked[: o.top_captions],
            memorization=_memorization_summary(self._prompts.values()),
            gate=gate,
        )


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float | None:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not len(a) or not len(b):
        return None
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    gap = np.abs(np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b))
    return round(float(gap.max()), 4)


def _memorization_summary(stats: Iterable[PromptStat]) -> dict[str, int]:
    """How the generator's memorization flags line up with what the scan found, per prompt."""
    s = {"prompts_with_signals": 0, "flagged": 0, "replicating_prompts": 0, "flagged_and_replicating": 0}
    for st in stats:
        flagged = bool(st.memorization and st.memorization.get("flag"))
        s["prompts_with_signals"] += st.memorization is not None
        s["flagged"] += flagged
        s["replicating_prompts"] += st.replicating > 0
        s["flagged_and_replicating"] += flagged and st.replicating > 0
    return s


@dataclass(frozen=True)
class ReferenceSummary:
    """The non-member photos scanned against the same index, and how the outputs compare with them."""

    images: int  # readable reference photos
    errors: list[dict[str, str]]
    scores: ScoreDistribution
    false_alarms: Rate  # reference photos called replica or exact: the false-alarm rate at these thresholds
    exact: int  # reference photos called exact: they are in the index, so not non-members (the report warns)
    outputs_above_reference_p99: Rate  # outputs scoring above the reference's 99th percentile (1% if alike)
    ks_statistic: float | None  # outputs vs reference top-1 SSCD, two-sample Kolmogorov-Smirnov D

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "errors": self.errors,
            "scores": self.scores.to_dict(),
            "false_alarms": self.false_alarms.to_dict(),
            "exact": self.exact,
            "outputs_above_reference_p99": self.outputs_above_reference_p99.to_dict(),
            "ks_statistic": self.ks_statistic,
        }


@dataclass
class AuditResult:
    """Everything the audit found; `to_dict()` is the JSON summary (keys stable, see AUDIT_SCHEMA_VERSION)."""

    index: str  # the index's folder name
    thresholds: dict[str, Any]  # the verdict thresholds the scan used
    checks: dict[str, Any]  # which checks the scan ran (ScanRecord.checks: descriptors, centre_view...)
    inputs: int  # files given, readable or not
    outputs: int  # readable ones: the denominator of every rate
    errors: list[dict[str, str]]  # {"path", "error", "error_code"} per unreadable input; not counted as outputs
    verdicts: dict[str, int]
    replication: Rate  # replica or exact
    replica: Rate
    exact: Rate
    similar: Rate
    sscd_above_0_5: Rate  # Somepalli et al. 2023's measure
    scores: ScoreDistribution
    reference: ReferenceSummary | None
    top_pairs: list[Pair]
    prompts: int  # distinct prompts among the outputs
    outputs_with_prompt: int
    captions: list[PromptStat]  # the prompts that replicate most, first
    memorization: dict[str, int]
    gate: Gate | None = None
    schema_version: str = AUDIT_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "index": self.index,
            "thresholds": self.thresholds,
            "checks": self.checks,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "errors": self.errors,
            "verdicts": self.verdicts,
            "replication": self.replication.to_dict(),
            "replica": self.replica.to_dict(),
            "exact": self.exact.to_dict(),
            "similar": self.similar.to_dict(),
            "sscd_above_0_5": self.sscd_above_0_5.to_dict(),
            "scores": self.scores.to_dict(),
            "reference": self.reference.to_dict() if self.reference else None,
            "top_pairs": [p.to_dict() for p in self.top_pairs],
            "prompts": self.prompts,
            "outputs_with_prompt": self.outputs_with_prompt,
            "captions": [c.to_dict() for c in self.captions],
            "memorization": self.memorization,
            "gate": self.gate.to_dict() if self.gate else None,
        }


def audit_records(
    records: Iterable[ScanRecord],
    thresholds: dict[str, Any],
    options: AuditOptions | None = None,
    reference: Iterable[ScanRecord] | None = None,
    index_name: str = "",
) -> AuditResult:
    """The audit of already-made scan records (e.g. read back from `scan --format jsonl`)."""
    acc = AuditAccumulator(thresholds, options, index_name)
    for r in records:
        acc.add(r)
    if reference is not None:
        for r in reference:
            acc.add_reference(r)
    return acc.result()


# -- the edge: files through a scanner --------------------------------------------------------------------


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The generator's sidecar next to an image (`x.png` -> `x.json`), or None when absent or not ours."""
    side = Path(path).with_suffix(".json")
    try:
        if not side.is_file() or side.stat().st_size > _MAX_SIDECAR_BYTES:
            return None
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        logger.debug("no sidecar for %s: %s", path, e)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("prompt"), str) else None


def _with_sidecar(record: ScanRecord) -> ScanRecord:
    """Fill a prompt (and memorization signals) from the image's sidecar when its pixels' file carries none,
    e.g. an output re-encoded to JPEG, which drops the PNG chunks."""
    if record.verdict == "error" or prompt_of(record) is not None:
        return record
    side = read_sidecar(record.path)
    if side is None:
        return record
    record.extra["generation"] = {k: side.get(k) for k in ("prompt", "seed", "run_id", "model")}
    if "memorization" not in record.extra and isinstance(side.get("memorization"), dict):
        record.extra["memorization"] = side["memorization"]
    return record


def audit_paths(
    scanner: Any,
    paths: Sequence[str | os.PathLike[str]],
    reference: Sequence[str | os.PathLike[str]] = (),
    options: AuditOptions | None = None,
    progress: Callable[[ScanRecord], None] | None = None,
) -> AuditResult:
    """Scan `paths` (the outputs) and `reference` (non-member photos) with `scanner`, streaming, and audit them.

    `scanner` is a `provenance.scan.Scanner`; `progress(record)` is called after each image of either set.
    """
    index = scanner.index
    acc = AuditAccumulator(scanner.options.thresholds.to_dict(), options, Path(index.dir).name)
    for rec in scanner.iter_scan(((str(p), None) for p in paths), progress):
        acc.add(_with_sidecar(rec))
    if reference:
        for rec in scanner.iter_scan(((str(p), None) for p in reference), progress):
            acc.add_reference(rec)
    return acc.result()


def _norm_text(s: str | None) -> str:
    return " ".join((s or "").lower().split()).rstrip(".")


__all__ = [
    "AUDIT_SCHEMA_VERSION",
    "AuditAccumulator",
    "AuditOptions",
    "AuditResult",
    "Gate",
    "Pair",
    "PromptStat",
    "Rate",
    "ReferenceSummary",
    "ScoreDistribution",
    "audit_paths",
    "audit_records",
    "evaluate_gate",
    "ks_statistic",
    "memorization_of",
    "prompt_of",
    "read_sidecar",
    "region_of",
    "wilson_interval",
]
