"""Reading C2PA Content Credentials: is the image declared AI-generated, and may it be trained on."""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# IPTC digital source types (the last path segment of the URI) that declare generative-AI media.
# `trainedAlgorithmicData` is the C2PA 1.x spelling some early manifests used.
AI_SOURCE_TYPES = frozenset(
    {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia", "trainedAlgorithmicData"}
)
# Training-and-mining entries whose "notAllowed" means the owner opted out of AI use.
OPT_OUT_ENTRIES = ("ai_training", "ai_generative_training", "data_mining")

# Marks every embedded manifest store carries: the JUMBF label ("c2pa") in JPEG/WebP/ISO-BMFF and
# the PNG chunk type ("caBX"). Without one, a parse failure is the file's problem, not a manifest's.
_STORE_MARKERS = (b"c2pa", b"caBX")


@functools.cache
def _context() -> Any:
    """A c2pa Context that never touches the network (a scanner must not fetch on a file's say-so)."""
    import c2pa

    settings = c2pa.Settings.from_dict({"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}})
    return c2pa.Context(settings=settings)


def read_c2pa(data: bytes, mime_type: str | None = None) -> dict[str, Any] | None:
    """Summarise the C2PA manifest store embedded in `data` as a JSON-able dict.

    Returns None when the file carries no manifest (or is a format C2PA cannot carry): that is no
    evidence either way. A manifest that cannot be parsed gives {"error": "..."} instead of raising.
    `mime_type` is a hint; the format is detected from the bytes when it is None or wrong.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not any(m in data for m in _STORE_MARKERS):
        # No embedded store: nothing to read, and a parse failure (e.g. a truncated plain JPEG) would
        # be the container's problem, not a manifest's. Checking first skips c2pa's container parse,
        # which every scan would otherwise pay.
        return None

    import c2pa

    try:
        reader = c2pa.Reader.try_create(mime_type or None, io.BytesIO(data), None, _context())
    except c2pa.C2paError.NotSupported:
        logger.debug("c2pa: format not supported (%s), no manifest possible", mime_type)
        return None
    except c2pa.C2paError as e:
        logger.info("c2pa: malformed manifest store: %s", e)
        return {"error": f"malformed C2PA manifest: {e}"}
    if reader is None:
        return None
    try:
        with reader:
            store = json.loads(reader.json())
    except (c2pa.C2paError, ValueError) as e:
        logger.info("c2pa: manifest store unreadable: %s", e)
        return {"error": f"unreadable C2PA manifest: {e}"}
    try:
        return summarize_manifest_store(store)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        # The JSON shape comes from the file's author; an odd one must not crash a scan.
        logger.info("c2pa: unexpected manifest JSON: %s", e)
        return {"error": f"unexpected C2PA manifest structure: {e}"}


def summarize_manifest_store(store: dict[str, Any]) -> dict[str, Any]:
    """Turn c2pa's manifest-store JSON (Reader.json()) into the flat summary the reports show."""
    manifests: dict[str, Any] = store.get("manifests") or {}
    active_label = store.get("active_manifest")
    active = manifests.get(active_label) if active_label else None
    if active is None and manifests:
        active = next(iter(manifests.values()))
    active = active or {}

    # Active manifest first, so its source type wins; ingredients' manifests still count, because
    # an edit of an AI image (active: c2pa.edited) is still AI-derived.
    ordered = [active] + [m for label, m in manifests.items() if label != active_label and m is not active]
    source_types: list[str] = []
    for m in ordered:
        for t in _digital_source_types(m):
            if t not in source_types:
                source_types.append(t)
    ai_types = [t for t in source_types if _last_segment(t) in AI_SOURCE_TYPES]

    training, training_from = _training_mining(active), active
    if not training:
        for m in ordered[1:]:
            training, training_from = _training_mining(m), m
            if training:
                break
    sig = active.get("signature_info") or {}
    gen_info = active.get("claim_generator_info") or []
    if isinstance(gen_info, dict):
        gen_info = [gen_info]

    status = store.get("validation_status") or []
    shown_types = ai_types or source_types
    return {
        "claim_generator": active.get("claim_generator") or _generator_name(gen_info),
        "claim_generator_info": gen_info,
        "title": active.get("title"),
        "format": active.get("format"),
        "signature_issuer": sig.get("issuer"),
        "signature_common_name": sig.get("common_name"),
        "signature_time": sig.get("time"),
        "signature_alg": sig.get("alg"),
        "ai_generated": bool(ai_types),
        "digital_source_type": shown_types[0] if shown_types else None,
        "digital_source_types": source_types,
        "training_mining": training,
        "training_mining_constraints": _training_constraints(training_from) if training else {},
        "training_opt_out": any(
            training.get(f"{prefix}.{entry}") == "notAllowed"
            for prefix in ("c2pa", "cawg")
            for entry in OPT_OUT_ENTRIES
        ),
        "validation_state": store.get("validation_state"),
        "validation_status": [s.get("code") for s in status if isinstance(s, dict)],
        "ingredients": [i.get("title") for i in active.get("ingredients") or [] if isinstance(i, dict)],
        "manifest_count": len(manifests),
    }


def _last_segment(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _generator_name(gen_info: list[dict[str, Any]]) -> str | None:
    """`name/version` of the first claim_generator_info entry (C2PA 2.x dropped `claim_generator`)."""
    for g in gen_info:
        if isinstance(g, dict) and g.get("name"):
            return f"{g['name']}/{g['version']}" if g.get("version") else str(g["name"])
    return None


def _digital_source_types(manifest: dict[str, Any]) -> list[str]:
    """Every digitalSourceType a manifest declares: c2pa.actions(.v2) actions and IPTC metadata."""
    found: list[str] = []
    for a in manifest.get("assertions") or []:
        label = str(a.get("label", ""))
        data = a.get("data") or {}
        if label.startswith("c2pa.actions"):
            for action in data.get("actions") or []:
                t = action.get("digitalSourceType") or (action.get("parameters") or {}).get("digitalSourceType")
                if isinstance(t, str):
                    found.append(t)
        elif label in ("stds.iptc.photo-metadata", "stds.iptc"):
            t = data.get("Iptc4xmpExt:DigitalSourceType")
            if isinstance(t, str):
                found.append(t)
    return found


def _training_mining(manifest: dict[str, Any]) -> dict[str, str]:
    """{entry: use} from a c2pa.training-mining (or CAWG) assertion, e.g. {"c2pa.ai_training": "notAllowed"}."""
    out: dict[str, str] = {}
    for key, entry in _training_entries(manifest):
        use = entry.get("use") if isinstance(entry, dict) else entry
        if isinstance(use, str):
            out[key] = use
    return out


def _training_entries(manifest: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(entry name, entry) of every c2pa.training-mining or cawg.training-mining assertion in the manifest."""
    for a in manifest.get("assertions") or []:
        label = str(a.get("label", ""))
        if label.startswith(("c2pa.training-mining", "cawg.training-mining")):
            for key, entry in ((a.get("data") or {}).get("entries") or {}).items():
                yield str(key), entry


def _training_constraints(manifest: dict[str, Any]) -> dict[str, str]:
    """{entry: constraint text} of the training-mining entries that carry one.

    The C2PA spec names the field `constraint_info`; some writers say `constraints_info`.
    """
    out: dict[str, str] = {}
    for key, entry in _training_entries(manifest):
        if isinstance(entry, dict):
            info = entry.get("constraint_info", entry.get("constraints_info"))
            if info is not None:
                out[key] = info if isinstance(info, str) else json.dumps(info)[:2000]
    return out
