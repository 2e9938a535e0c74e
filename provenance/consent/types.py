"""The consent result types: one signal per machine-readable statement found, and their combined answer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

TrainingUse = Literal["not_allowed", "constrained", "allowed", "unknown"]
# Most restrictive first: the combined answer is the first of these that any counted signal says.
TRAINING_ORDER: tuple[TrainingUse, ...] = ("not_allowed", "constrained", "allowed", "unknown")
_RANK = {t: i for i, t in enumerate(TRAINING_ORDER)}


@dataclass(frozen=True)
class ConsentSignal:
    """One statement about AI-training use, read from one place (a file's XMP, a robots.txt, a header...).

    `source` names where it was read ("c2pa", "cawg", "iptc-plus", "tdmrep.json", "tdm-header",
    "html-meta", "x-robots-tag", "ai.txt", "robots.txt", or "fetch"/"xmp"/"url" for failures);
    `value` is what it said, in the source's own words ("c2pa.ai_training=notAllowed",
    "DMI-PROHIBITED-AIMLTRAINING", "noai"...); `training` is our reading of it, or None when the
    statement is not about training (a `User-agent: *` crawl rule, `c2pa.ai_inference`): such a
    signal is listed but does not count. `overridden_by` marks a statement that a higher-precedence
    one of the same protocol replaces (TDMRep: the header overrides the well-known file); it is
    listed and does not count either. `extra` holds source-specific facts (constraint text, the
    crawlers a robots.txt rule names, a C2PA manifest's validation status...).
    """

    source: str
    value: str
    training: TrainingUse | None
    detail: str | None = None
    overridden_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> bool:
        return self.training is not None and self.overridden_by is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "value": self.value, "training": self.training,
                             "detail": self.detail}  # fmt: skip
        if self.overridden_by is not None:
            d["overridden_by"] = self.overridden_by
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsentSignal:
        known = {"source", "value", "training", "detail", "overridden_by"}
        return cls(
            source=str(d["source"]), value=str(d["value"]), training=d.get("training"), detail=d.get("detail"),
            overridden_by=d.get("overridden_by"), extra={k: v for k, v in d.items() if k not in known},
        )  # fmt: skip


@dataclass(frozen=True)
class Consent:
    """The answer for one image or URL: the most restrictive counted signal, and every signal found."""

    training: TrainingUse = "unknown"
    signals: tuple[ConsentSignal, ...] = ()

    @classmethod
    def of(cls, signals: Iterable[ConsentSignal]) -> Consent:
        signals = tuple(signals)
        return cls(training=combine(signals), signals=signals)

    def merged(self, other: Consent) -> Consent:
        """Both answers' signals under one answer (e.g. a file's signals and its URL's)."""
        return Consent.of(self.signals + other.signals)

    def to_dict(self) -> dict[str, Any]:
        return {"training": self.training, "signals": [s.to_dict() for s in self.signals]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Consent:
        return cls.of(ConsentSignal.from_dict(s) for s in d.get("signals") or [])


def combine(signals: Iterable[ConsentSignal]) -> TrainingUse:
    """The most restrictive training use among the counted signals: not_allowed > constrained > allowed > unknown."""
    best: TrainingUse = "unknown"
    for s in signals:
        if s.counts and _RANK[s.training] < _RANK[best]:  # type: ignore[index]
            best = s.training  # type: ignore[assignment]
    return best


def stored_consent(extra: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The consent an index recorded for an item (its `extra["consent"]`, a Consent.to_dict()), or None.

    `extra` is the metadata column as stored (a JSON string) or already parsed. Most items carry no signal,
    so the string is only parsed when it mentions one."""
    if isinstance(extra, str):
        if '"consent"' not in extra:
            return None
        try:
            extra = json.loads(extra)
        except ValueError:
            return None
    value = extra.get("consent") if isinstance(extra, dict) else None
    return value if isinstance(value, dict) else None
