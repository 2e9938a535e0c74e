"""Request and response models of the API: the JSON shapes, kept apart from the library's dataclasses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["not_an_image"])
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ChecksOut(BaseModel):
    descriptors: list[str]
    visible: bool
    visible_thorough: bool = False  # server default: thorough mix (true) or 288 px head; /v1/scan can ask for either
    centre_view: bool = False  # SSCD also matches the centre 60% of each upload (serve --centre-view)
    invisible_crops: bool = False  # invisible marks also read as in a crop of a marked image (serve --invisible-crops)
    invisible: bool
    c2pa: bool
    metadata: bool
    notes: list[str] = []


class HealthOut(BaseModel):
    status: Literal["loading", "ready", "error"]
    index: str | None = None
    items: int | None = None
    checks: ChecksOut | None = None
    text_search: bool = False  # the index has OpenCLIP embeddings
    auth: bool = False  # /v1 needs an API key
    max_upload_bytes: int
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
    verdict: str | None = Field(default=None, description="only with ?match_verdicts=true: this match's own verdict")


class InvisibleMarkOut(BaseModel):
    scheme: str
    bit_accuracy: float
    p_value: float
    payload: str | None = None


class VisibleWatermarkOut(BaseModel):
    probability: float = Field(description="p(stock-photo style visible watermark)")
    flagged: bool = Field(description="probability >= threshold: what --fail-on watermark and the page flag")
    threshold: float = Field(description="the detector's flag threshold, chosen on held-out data")
    input_sizes: list[int] = Field(default_factory=list,
                                   description="input sizes (short side, px) the probability comes from: SSCD's 288, "
                                               "or 288 and 512 with scan --visible-thorough")


class WatermarksOut(BaseModel):
    visible: VisibleWatermarkOut | None = None
    invisible: list[InvisibleMarkOut] = []
    c2pa: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


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
