"""Request and response models of the API: the JSON shapes, kept apart from the library's dataclasses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from provenance.types import SCAN_SCHEMA_VERSION


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_an_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChecksOut(BaseModel):
    """What a scan with the server's options checks: the descriptors searched, and one boolean per check of
    provenance.options.ScanOptions (visible, invisible, c2pa, metadata, centre_view, invisible_crops, ...)."""

    model_config = ConfigDict(extra="allow")

    descriptors: list[str]
    notes: list[str] = Field(default_factory=list, description="why a check the server asks for is off")


class ScanOptionOut(BaseModel):
    """A scan option a request may set (`/v1/scan?name=true`), for clients and the web page."""

    name: str
    title: str
    description: str
    default: bool = Field(description="the server's setting, used when a request leaves it unset")
    available: bool = Field(description="false when it cannot run on this server (e.g. its check is off)")


class HealthOut(BaseModel):
    status: Literal["loading", "ready", "error"]
    index: str | None = None
    items: int | None = None
    checks: ChecksOut | None = None
    options: list[ScanOptionOut] = Field(default_factory=list, description="the options a scan request may set")
    text_search: bool = False  # the index has OpenCLIP embeddings
    auth: bool = False  # /v1 needs an API key
    registry: bool = False  # the server keeps a do-not-train registry (POST /v1/optout)
    anonymous_writes: bool = False  # opt-outs need no key (a server without keys started with --allow-anonymous-writes)
    contact: str | None = Field(default=None, description="how to reach the operator, e.g. to ask for an API key")
    max_upload_bytes: int
    limits: dict[str, float | int] = Field(
        default_factory=dict,
        description=(
            'what one request may send or cost (README, "Deploying it publicly"): files, bytes and pixels per batch, '
            "caption query words and characters"
        ),
    )
    error: str | None = None


class MatchOut(BaseModel):
    """A corpus item matched by one descriptor (provenance.types.Match)."""

    model_config = ConfigDict(extra="allow")

    id: str
    score: float = Field(description="higher = more similar: cosine for sscd/clip, 1 - hamming/256 for pdq")
    descriptor: str
    caption: str | None = None
    source: str | None = None
    distance: int | None = Field(default=None, description="PDQ Hamming distance in bits (pdq matches only)")
    region: dict[str, list[float]] | None = Field(
        default=None,
        description="where the copy is, when geometric verification found it (thorough scans): "
        '{"query": [x0, y0, x1, y1], "corpus": [x0, y0, x1, y1]}, relative 0..1 in each image',
    )
    verdict: str | None = Field(default=None, description="only with ?match_verdicts=true: this match's own verdict")
    opted_out: dict[str, Any] | None = Field(
        default=None,
        description="only on a server with a registry: the "
        "opt-out that covers this item ({optout, by, value, claimant, ownership})",
    )


class InvisibleMarkOut(BaseModel):
    scheme: str
    bit_accuracy: float
    p_value: float
    payload: str | None = None


class VisibleWatermarkOut(BaseModel):
    probability: float = Field(description="p(stock-photo style visible watermark)")
    flagged: bool = Field(description="probability >= threshold: what --fail-on watermark and the page flag")
    threshold: float = Field(description="the detector's flag threshold, chosen on held-out data")
    input_sizes: list[int] = Field(
        default_factory=list,
        description="input sizes (short side, px) the probability comes from (several with visible_thorough)",
    )


class WatermarksOut(BaseModel):
    visible: VisibleWatermarkOut | None = None
    invisible: list[InvisibleMarkOut] = []
    c2pa: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class ConsentSignalOut(BaseModel):
    """One do-not-train statement found (provenance.consent.ConsentSignal); source-specific keys ride along."""

    model_config = ConfigDict(extra="allow")

    source: str = Field(examples=["iptc-plus"], description="c2pa, cawg, iptc-plus, tdmrep.json, robots.txt, ...")
    value: str = Field(examples=["DMI-PROHIBITED-AIMLTRAINING"], description="what it said, in its own words")
    training: Literal["not_allowed", "constrained", "allowed", "unknown"] | None = Field(
        description="our reading of it; null when it is not about training (listed, not counted)"
    )
    detail: str | None = None
    overridden_by: str | None = Field(default=None, description="the higher-precedence signal that replaces it")


class ConsentOut(BaseModel):
    training: Literal["not_allowed", "constrained", "allowed", "unknown"] = Field(
        description="the most restrictive counted signal: not_allowed > constrained > allowed > unknown"
    )
    signals: list[ConsentSignalOut] = []


class ScanRecordOut(BaseModel):
    """The scan record (provenance.types.ScanRecord.to_dict()), the same as the CLI's JSON output."""

    model_config = ConfigDict(extra="allow")

    path: str
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    verdict: Literal["exact", "replica", "similar", "novel", "error"]
    matches: list[MatchOut] = []
    scores: dict[str, float | int | None] = {}
    watermarks: WatermarksOut = WatermarksOut()
    error: str | None = None
    error_code: str | None = Field(
        default=None,
        examples=["not_an_image"],
        description="the failure kind beside `error` (its HTTP status in /v1/scan)",
    )
    checks: dict[str, Any] = Field(default_factory=dict, description="which checks ran on this image")
    consent: ConsentOut | None = Field(default=None, description="do-not-train signals read from the file")
    schema_version: str = Field(default=SCAN_SCHEMA_VERSION, description="the version of this record's shape")
    extra: dict[str, Any] | None = None


class ImageSearchOut(BaseModel):
    matches: list[MatchOut] = Field(description="all descriptors merged, copy evidence first")
    by_descriptor: dict[str, list[MatchOut]]


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=1000, examples=["a dog catching a frisbee"])
    k: int = Field(default=10, ge=1, le=100)


class TextSearchOut(BaseModel):
    query: str
    matches: list[MatchOut]


class CaptionHitOut(BaseModel):
    id: str
    score: float = Field(description="higher = better (negated BM25)")
    caption: str | None = None
    source: str | None = None
    snippet: str | None = None


class CaptionSearchOut(BaseModel):
    query: str
    hits: list[CaptionHitOut]


class ItemOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    caption: str | None = None
    source: str | None = None
    license: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    extra: dict[str, Any] = {}
    has_thumbnail: bool = False
    opted_out: dict[str, Any] | None = Field(
        default=None,
        description="only on a server with a registry: the opt-out that covers this item "
        "({optout, by, value, claimant, ownership}), or null",
    )
