"""The scan options: one frozen, validated type that the library, the CLI, the server settings, the per-request
overrides, /healthz and the web page all derive from.

A field's `description` is its help text everywhere (CLI `--help`, query parameter docs, the page); its `title` is
the page's label. `json_schema_extra` says where else it shows up:
- "check": a check whose on/off state every scan record reports in its `checks`;
- "request": a client may set it per request (`/v1/scan?name=true`) and the page offers it as a box;
- "thorough": `thorough=True` turns it on;
- "needs": another check it is a way of running (off when that one is off);
- "cli": False to keep it off the command line, or the typer declaration to use (e.g. "--clip/--no-clip").
Adding a scan option therefore means adding a field here (with its description and title), using it in the
scanner, and nothing else. What each check costs is measured in BENCHMARKS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from provenance.errors import InvalidOptionsError
from provenance.images import DEFAULT_MAX_PIXELS
from provenance.models import ModelOptions


@dataclass(frozen=True)
class Thresholds:
    """Verdict thresholds, calibrated on edited copies of corpus photos against edited and untouched non-members
    (BENCHMARKS.md, "Calibration"): the replica threshold keeps the false-positive rate at about 1% on both."""

    exact_pdq_bits: int = 10  # PDQ Hamming distance <= this (or identical file bytes) -> exact
    exact_sscd: float = 0.92  # and SSCD must agree, so PDQ alone never says exact
    replica_sscd: float = 0.45  # SSCD cosine at about 1% false positives
    similar_sscd: float = 0.30  # the same rule at about 5% false positives
    # not calibrated offline (no pretrained CLIP here): conservative; the calibration script can calibrate it
    similar_clip: float = 0.90

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _meta(**kw: Any) -> dict[str, Any]:
    return kw


class ScanOptions(BaseModel):
    """What a scan runs. Frozen: a Scanner, a server and every request see the same options; make another with
    `with_overrides` (validated again)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    # 1. The one switch a user understands
    thorough: bool = Field(
        False,
        title="Thorough check",
        description=(
            "Turn on the slower checks that do better on real inputs: the centre view (a photo shown small inside a "
            "screenshot or frame), the region search (a photo pasted into another, a contact-sheet tile, a heavy crop; "
            "next frames of a scene told from copies) and the invisible-mark crop search (a mark in an image cut from "
            "a larger one). Takes longer; see BENCHMARKS.md."
        ),
        json_schema_extra=_meta(request=True),
    )
    # 2. Copy detection
    k: int = Field(10, ge=1, le=100, description="Corpus matches kept per image.", json_schema_extra=_meta(cli="-k"))
    use_clip: bool | None = Field(
        None,
        description="Also search OpenCLIP (default: when the index has it).",
        json_schema_extra=_meta(cli="--clip/--no-clip"),
    )
    centre_view: bool = Field(
        False,
        title="Look inside screenshots",
        description=(
            "Also match the centre of each image with SSCD, keeping the better score: finds photos shown small inside "
            "screenshots, frames or padding. A second SSCD pass per image."
        ),
        json_schema_extra=_meta(check=True, request=True, thorough=True),
    )
    region_search: bool = Field(
        False,
        title="Look for partial copies",
        description=(
            "Also match regions of each image with SSCD (rectangles found in it, a contact sheet's cells, corner crops) "
            "and verify the best candidates with local features against the index's thumbnails: finds a photo pasted "
            "into another, a tile of a contact sheet or a heavy crop, reports where the copy is, and calls a next "
            "frame of the same scene similar rather than replica. A few small SSCD passes and SIFT per image."
        ),
        json_schema_extra=_meta(check=True, request=True, thorough=True),
    )
    # 3. Provenance marks
    visible: bool = Field(
        True, description="Look for visible (stock-photo style) watermarks.", json_schema_extra=_meta(check=True)
    )
    visible_thorough: bool = Field(
        False,
        title="Thorough visible-watermark check",
        description=(
            "Look for visible watermarks with the thorough mix (a head tuned at 512 px reads the image and its mirror, "
            "mixed with the default head): more small and faint marks on synthetic tests, worse on real photos, and "
            "several times slower. Not part of --thorough."
        ),
        json_schema_extra=_meta(check=True, request=True, needs="visible"),
    )
    visible_model: str | None = Field(
        None, description=("Other provenance visible-watermark weights (default: the shipped head).")
    )
    visible_laion_checkpoint: str | None = Field(
        None,
        description=(
            "LAION's watermark detector (EfficientNet-B3 .pt, needs timm) instead of ours; not calibrated here, so it "
            "flags at its own 0.5 boundary."
        ),
        json_schema_extra=_meta(cli="--laion-watermark-model"),
    )
    invisible: bool = Field(
        True, description="Decode invisible watermarks (Stable Diffusion's, ours).", json_schema_extra=_meta(check=True)
    )
    invisible_crops: bool = Field(
        False,
        title="Look for invisible marks in crops",
        description=(
            "Also read invisible marks as in an image cropped from a marked one (every block-grid offset, original "
            "width and payload phase). Costs CPU per image."
        ),
        json_schema_extra=_meta(check=True, request=True, thorough=True, needs="invisible"),
    )
    c2pa: bool = Field(True, description="Read C2PA manifests.", json_schema_extra=_meta(check=True))
    metadata: bool = Field(
        True, description="Read generator metadata (PNG text, EXIF).", json_schema_extra=_meta(check=True)
    )
    # 4. Resources
    batch_size: int = Field(16, ge=1, le=1024, description="Images per model batch.")
    workers: int = Field(2, ge=1, le=64, description="Decode threads.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description=("Larger images are refused as decompression bombs."))
    thresholds: Thresholds = Field(
        default_factory=Thresholds, description="Verdict thresholds.", json_schema_extra=_meta(cli=False)
    )
    models: ModelOptions | None = Field(
        None,
        description="How to load the descriptor models (default: the index's).",
        json_schema_extra=_meta(cli=False),
    )

    @model_validator(mode="after")
    def _rules(self) -> ScanOptions:
        for name in self.check_names():
            needs = self.meta(name).get("needs")
            # thorough only turns a check on where it can run; an explicit request for it must be possible
            if needs and getattr(self, name) and not getattr(self, needs):
                raise ValueError(
                    f"{name} is a way of running the {needs} check, which is off: turn {needs} on or {name} off"
                )
        if self.visible_model and self.visible_laion_checkpoint:
            raise ValueError(
                "visible_model and visible_laion_checkpoint are two different visible-watermark detectors: give one"
            )
        if self.visible_thorough and (self.visible_model or self.visible_laion_checkpoint):
            raise ValueError(
                "visible_thorough picks the shipped thorough visible-watermark mix: it cannot go with "
                "visible_model or visible_laion_checkpoint"
            )
        return self

    # ------------------------------------------------------------------------ building, with one error type

    @classmethod
    def build(cls, **values: Any) -> ScanOptions:
        """Like the constructor, but a broken rule raises InvalidOptionsError with one readable line per problem."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise options_error(e) from None

    def with_overrides(self, **overrides: Any) -> ScanOptions:
        """These options with some fields changed (None = keep), validated again."""
        changed = {k: v for k, v in overrides.items() if v is not None}
        if not changed:
            return self
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).build(**{**values, **changed})

    # ---------------------------------------------------------------------------- what the fields say

    @classmethod
    def meta(cls, name: str) -> dict[str, Any]:
        extra = cls.model_fields[name].json_schema_extra
        return extra if isinstance(extra, dict) else {}

    @classmethod
    def check_names(cls) -> list[str]:
        return [n for n in cls.model_fields if cls.meta(n).get("check")]

    @classmethod
    def request_names(cls) -> list[str]:
        return [n for n in cls.model_fields if cls.meta(n).get("request")]

    def requested_checks(self) -> dict[str, bool]:
        """Which checks these options ask for: each check's own switch, or `thorough` for the checks it covers,
        where the check it needs is on."""
        out: dict[str, bool] = {}
        for name in self.check_names():
            meta = self.meta(name)
            on = bool(getattr(self, name)) or (self.thorough and bool(meta.get("thorough")))
            out[name] = on and (not meta.get("needs") or bool(getattr(self, meta["needs"])))
        return out


def options_error(e: ValidationError, what: str = "scan options") -> InvalidOptionsError:
    """One line per broken rule, naming the field, from pydantic's error list."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        problems.append(f"{loc}: {msg}" if loc else msg)
    return InvalidOptionsError(f"invalid {what}: " + "; ".join(problems))
