"""The result types shared by the library, the CLI, the API and the reports.

Scores are always "higher = more similar"; the one place that turns FAISS distances into
scores is `provenance.search`. `to_dict()` gives the JSON contract of each type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DescriptorName = Literal["sscd", "clip", "pdq"]
Verdict = Literal["exact", "replica", "similar", "novel", "error"]
VERDICT_ORDER: tuple[Verdict, ...] = ("exact", "replica", "similar", "novel", "error")
# The version of the scan record's JSON shape (JSON/JSONL reports, the API): bumped when a key changes meaning;
# /2 added `error_code` and `checks`, and wrapped the JSON report's records as {"schema_version", "records"}.
# Optional keys added since, without a bump: a match's `region` (scan --thorough's verified copies).
SCAN_SCHEMA_VERSION = "provenance.scan/2"


@dataclass(frozen=True)
class Match:
    """One corpus item matched by one descriptor."""

    id: str
    score: float  # cosine similarity for sscd/clip; for pdq, 1 - hamming/256
    descriptor: str
    caption: str | None = None
    source: str | None = None
    distance: int | None = None  # PDQ Hamming distance in bits, pdq matches only
    # the corpus item's do-not-train signals as the index recorded them (Consent.to_dict()), when it has any
    consent: dict[str, Any] | None = None
    # where the copy is, when geometric verification found it (scan --thorough): {"query": [x0, y0, x1, y1],
    # "corpus": [x0, y0, x1, y1]}, relative 0..1 in each image
    region: dict[str, list[float]] | None = None
    # set when a do-not-train registry covers the item: {"optout", "by": "content"|"id"|"url"|"domain", ...}
    opted_out: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("distance", "consent", "region", "opted_out"):
            if d[key] is None:
                d.pop(key)
        return d


@dataclass(frozen=True)
class CaptionHit:
    """A corpus item whose caption matched a full-text query."""

    id: str
    score: float  # higher = better (negated BM25 rank)
    caption: str | None
    source: str | None
    snippet: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InvisibleMark:
    """A decoded invisible watermark scheme (only detected schemes appear in scan records)."""

    scheme: str  # e.g. "sd-v1", "sdxl", "provenance"
    bit_accuracy: float  # fraction of payload bits that agree with the scheme's expected bits
    p_value: float  # binomial P(>= that many agreeing bits | random bits)
    payload: str | None = None  # decoded payload where the scheme carries one (e.g. our run id)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["payload"] is None:
            d.pop("payload")
        return d


@dataclass
class WatermarkEvidence:
    """Everything an image says about where it came from, beyond its pixels matching a corpus."""

    # {"probability": p, "flagged": p >= threshold, "threshold": the detector's flag threshold}, or None when the
    # detector was not run
    visible: dict[str, float | bool] | None = None
    invisible: list[InvisibleMark] = field(default_factory=list)
    c2pa: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "visible": self.visible,
            "invisible": [m.to_dict() for m in self.invisible],
            "c2pa": self.c2pa,
            "metadata": self.metadata,
        }


@dataclass
class ScanRecord:
    """The scan result of one image: the contract for the API and integrations (keys are stable)."""

    path: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    verdict: Verdict = "novel"
    matches: list[Match] = field(default_factory=list)  # best first
    scores: dict[str, float | int | None] = field(
        default_factory=lambda: {"sscd": None, "clip": None, "pdq_distance": None}
    )
    watermarks: WatermarkEvidence = field(default_factory=WatermarkEvidence)
    error: str | None = None
    # the failure kind beside its message: the `code` of the ProvenanceError raised (e.g. "not_an_image",
    # "too_many_pixels", "unreadable", "too_large"), "scan_failed" for an unexpected one; None when it worked
    error_code: str | None = None
    # which checks ran on this image: {"descriptors": ["sscd", "pdq"], "visible": True, "centre_view": False, ...}
    # (empty when the image could not be read, so nothing ran)
    checks: dict[str, Any] = field(default_factory=dict)
    # do-not-train signals read from the file (provenance.consent.Consent.to_dict()): {"training": "not_allowed" |
    # "constrained" | "allowed" | "unknown", "signals": [...]}; None when the image could not be read
    consent: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. memorization signals from the generator

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "path": self.path,
            "sha256": self.sha256,
            "width": self.width,
            "height": self.height,
            "verdict": self.verdict,
            "matches": [m.to_dict() for m in self.matches],
            "scores": dict(self.scores),
            "watermarks": self.watermarks.to_dict(),
            "error": self.error,
            "error_code": self.error_code,
            "checks": dict(self.checks),
            "consent": self.consent,
        }
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def failed(
        cls, path: str, error: str | BaseException, sha256: str | None = None, code: str | None = None
    ) -> ScanRecord:
        """The record of an image that could not be scanned; an exception gives its message and its class's
        `code` (ProvenanceError subclasses), anything else is "scan_failed"."""
        if isinstance(error, BaseException):
            code = code or getattr(error, "code", None) or "scan_failed"
            error = str(error) if hasattr(type(error), "code") else f"{type(error).__name__}: {error}"
        return cls(path=path, sha256=sha256, verdict="error", error=error, error_code=code or "scan_failed")
