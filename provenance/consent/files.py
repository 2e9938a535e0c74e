"""Consent signals carried inside an image file: C2PA/CAWG training-mining assertions and IPTC/PLUS XMP."""

from __future__ import annotations

import logging
import struct
import xml.parsers.expat
import zlib
from typing import Any, NoReturn

from provenance.consent.types import Consent, ConsentSignal, TrainingUse

logger = logging.getLogger(__name__)

PLUS_NS = "http://ns.useplus.org/ldf/xmp/1.0/"
PLUS_VOCAB = "http://ns.useplus.org/ldf/vocab/"
_RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
# The PLUS "Data Mining" vocabulary (IPTC Photo Metadata 2023.1, property plus:DataMining): value -> our
# reading and its label. The SEE* values prohibit unless the referenced terms say otherwise: the
# terms are for a human to read, so we call them "constrained" and report the constraint text.
DATA_MINING: dict[str, tuple[TrainingUse, str]] = {
    "DMI-UNSPECIFIED": ("unknown", "Unspecified: no prohibition defined"),
    "DMI-ALLOWED": ("allowed", "Allowed"),
    "DMI-PROHIBITED-AIMLTRAINING": ("not_allowed", "Prohibited for AI/ML training"),
    "DMI-PROHIBITED-GENAIMLTRAINING": ("not_allowed", "Prohibited for generative AI/ML training"),
    "DMI-PROHIBITED-EXCEPTSEARCHENGINEINDEXING": ("not_allowed", "Prohibited except for search engine indexing"),
    "DMI-PROHIBITED": ("not_allowed", "Prohibited"),
    "DMI-PROHIBITED-SEECONSTRAINT": ("constrained", "Prohibited, see plus:OtherConstraints"),
    "DMI-PROHIBITED-SEEEMBEDDEDRIGHTSEXPR": ("constrained", "Prohibited, see iptcExt:EmbdEncRightsExpr"),
    "DMI-PROHIBITED-SEELINKEDRIGHTSEXPR": ("constrained", "Prohibited, see iptcExt:LinkedEncRightsExpr"),
}
# C2PA/CAWG training-and-mining entries ({c2pa,cawg}.<name>) and whether each is about training or
# data mining (the combined answer); ai_inference is listed but does not count.
TRAINING_ENTRIES = {"ai_generative_training": True, "ai_training": True, "data_mining": True, "ai_inference": False}
_C2PA_USE: dict[str, TrainingUse] = {"allowed": "allowed", "notAllowed": "not_allowed", "constrained": "constrained"}

# XMP packets are a few kB; a bigger one is refused rather than parsed (bounded parse cost).
MAX_XMP_BYTES = 1 << 20
MAX_TEXT_CHARS = 2000
_XMP_OPEN = (b"<x:xmpmeta", b"<rdf:RDF")
_XMP_CLOSE = {b"<x:xmpmeta": b"</x:xmpmeta>", b"<rdf:RDF": b"</rdf:RDF>"}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_XMP_KEY = b"XML:com.adobe.xmp"


def read_file_consent(data: bytes, mime: str | None = None, *, c2pa_summary: dict[str, Any] | None = None) -> Consent:
    """Every consent signal in an image file's bytes, combined (used at scan time and at index time).

    `mime` is a hint for the C2PA reader. `c2pa_summary` is `read_c2pa(data, mime)`'s result when the
    caller has it already (a scan does), so the manifest is not parsed twice. Never raises on a bad
    file: malformed XMP or C2PA gives an `unknown` signal naming the problem.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if c2pa_summary is None:
        from provenance.watermarks.c2pa import read_c2pa

        c2pa_summary = read_c2pa(data, mime)
    return Consent.of(c2pa_signals(c2pa_summary) + xmp_signals(data))


# ------------------------------------------------------------------------------------------- C2PA


def c2pa_signals(summary: dict[str, Any] | None) -> list[ConsentSignal]:
    """Signals from `provenance.watermarks.c2pa.read_c2pa`'s summary: one per training-mining entry."""
    if summary is None:
        return []
    if "error" in summary:
        return [ConsentSignal("c2pa", "malformed", "unknown", str(summary["error"]))]
    status = manifest_status(summary)
    constraints = summary.get("training_mining_constraints") or {}
    out = []
    for key, use in (summary.get("training_mining") or {}).items():
        prefix, _, name = key.partition(".")
        source = prefix if prefix in ("c2pa", "cawg") else "c2pa"
        reading = _C2PA_USE.get(use)
        if name not in TRAINING_ENTRIES:
            training: TrainingUse | None = None
            detail = f"unknown training-mining entry {key!r}"
        elif reading is None:
            training, detail = "unknown", f"unknown use {use!r} (expected allowed, notAllowed or constrained)"
        else:
            training = reading if TRAINING_ENTRIES[name] else None
            detail = f"{name.replace('_', ' ')}: {use}"
        extra: dict[str, Any] = {"manifest": status}
        if key in constraints:
            extra["constraint_info"] = _clip(constraints[key])
        out.append(ConsentSignal(source, f"{key}={use}", training, detail, extra=extra))
    return out


def manifest_status(summary: dict[str, Any]) -> str:
    """`valid` (signer in a trust list), `untrusted` (validates, signer not trusted) or `invalid`.

    c2pa-rs says "Trusted" / "Valid" / "Invalid"; "Valid" means the signature and hashes check out but
    the signing certificate chains to no configured trust anchor (our reader configures none).
    """
    state = str(summary.get("validation_state") or "").lower()
    codes = summary.get("validation_status") or []
    if state == "trusted":
        return "valid"
    if state == "valid" or (state == "" and codes == ["signingCredential.untrusted"]):
        return "untrusted"
    return "invalid"


# -------------------------------------------------------------------------------------------- XMP


def xmp_signals(data: bytes) -> list[ConsentSignal]:
    """IPTC/PLUS `plus:DataMining` (and `plus:OtherConstraints`) from the file's XMP packets."""
    if PLUS_NS.encode() not in data and not (data.startswith(_PNG_SIG) and _PNG_XMP_KEY in data):
        return []  # no PLUS namespace anywhere: nothing to parse (the common case, one fast bytes scan)
    out: list[ConsentSignal] = []
    for packet in _xmp_packets(data):
        if isinstance(packet, str):  # an extraction problem
            out.append(ConsentSignal("xmp", "malformed", "unknown", packet))
            continue
        try:
            fields = parse_plus_xmp(packet)
        except ValueError as e:
            out.append(ConsentSignal("xmp", "malformed", "unknown", f"XMP packet not parsed: {e}"))
            continue
        out.extend(plus_signals(fields))
    return out


def plus_signals(fields: dict[str, list[str]]) -> list[ConsentSignal]:
    constraints = [_clip(c) for c in fields.get("OtherConstraints", []) if c.strip()]
    out = []
    for value in fields.get("DataMining", []):
        code = value.strip().rsplit("/", 1)[-1].upper()
        extra: dict[str, Any] = {"other_constraints": constraints} if constraints else {}
        if code in DATA_MINING:
            training, label = DATA_MINING[code]
            out.append(ConsentSignal("iptc-plus", code, training, f"plus:DataMining: {label}", extra=extra))
        else:
            out.append(ConsentSignal("iptc-plus", _clip(value, 200), "unknown",
                                     "plus:DataMining value not in the PLUS vocabulary", extra=extra))  # fmt: skip
    return out


def parse_plus_xmp(packet: bytes) -> dict[str, list[str]]:
    """{"DataMining": [...], "OtherConstraints": [...]} from one XMP packet; ValueError when it is not XML.

    Safe by construction: a DTD (so any entity definition, the billion-laughs and external-entity
    attacks) is refused, and the caller has bounded the packet's size. XMP writes a property either
    as an attribute of rdf:Description, as element text, as rdf:resource, or (OtherConstraints, a
    language alternative) as rdf:li items; all four are read.
    """
    wanted = {PLUS_NS + "DataMining": "DataMining", PLUS_NS + "OtherConstraints": "OtherConstraints"}
    found: dict[str, list[str]] = {}
    stack: list[str | None] = []  # the wanted property each open element belongs to, if any
    text: list[str] = []
    parser = xml.parsers.expat.ParserCreate(namespace_separator="")

    def refuse_dtd(*_: Any) -> NoReturn:
        raise ValueError("XMP with a DTD or entity declaration is refused")

    def start(name: str, attrs: dict[str, str]) -> None:
        for attr, val in attrs.items():
            if attr in wanted:
                found.setdefault(wanted[attr], []).append(val)
        owner = wanted.get(name) or (stack[-1] if stack else None)
        if name in wanted and _RDF_NS + "resource" in attrs:
            found.setdefault(wanted[name], []).append(attrs[_RDF_NS + "resource"])
        stack.append(owner)
        text.clear()

    def end(name: str) -> None:
        owner = stack.pop()
        body = "".join(text).strip()
        text.clear()
        # Text belongs to the innermost element: the property itself or an rdf:li under it.
        if owner and body and (name in wanted or name == _RDF_NS + "li"):
            found.setdefault(owner, []).append(body)

    parser.StartDoctypeDeclHandler = refuse_dtd
    parser.EntityDeclHandler = refuse_dtd
    parser.UnparsedEntityDeclHandler = refuse_dtd
    parser.ExternalEntityRefHandler = refuse_dtd
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    try:
        parser.Parse(packet, True)
    except xml.parsers.expat.ExpatError as e:
        raise ValueError(str(e)) from None
    return found


def _xmp_packets(data: bytes) -> list[bytes | str]:
    """The XMP packets in `data` (bytes each), or a string saying why one could not be taken.

    Packet scanning (XMP spec part 3) finds uncompressed packets in any container (JPEG APP1, WebP
    XMP chunk, TIFF, GIF, PNG iTXt); PNG's compressed iTXt is inflated here with a size bound.
    """
    out: list[bytes | str] = []
    for opener in _XMP_OPEN:
        pos = 0
        while (start := data.find(opener, pos)) >= 0:
            end = data.find(_XMP_CLOSE[opener], start)
            if end < 0:
                out.append("XMP packet has no closing tag (truncated file?)")
                break
            end += len(_XMP_CLOSE[opener])
            if end - start > MAX_XMP_BYTES:
                out.append(f"XMP packet of {end - start} bytes exceeds the {MAX_XMP_BYTES}-byte limit")
            elif PLUS_NS.encode() in data[start:end]:
                out.append(data[start:end])
            pos = end
        if out:
            break  # rdf:RDF inside x:xmpmeta must not be read twice
    if data.startswith(_PNG_SIG):
        out.extend(_png_compressed_xmp(data))
    return out


def _png_compressed_xmp(data: bytes) -> list[bytes | str]:
    """Inflated XMP from PNG iTXt chunks with the compression flag set (packet scanning cannot see them)."""
    out: list[bytes | str] = []
    pos = len(_PNG_SIG)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if ctype == b"IEND":
            break
        if ctype != b"iTXt" or not body.startswith(_PNG_XMP_KEY + b"\x00"):
            continue
        rest = body[len(_PNG_XMP_KEY) + 1 :]
        if len(rest) < 2 or rest[0] != 1:
            continue  # uncompressed: packet scanning found it
        # iTXt: flag, method, language\0, translated keyword\0, text
        parts = rest[2:].split(b"\x00", 2)
        if len(parts) < 3:
            out.append("PNG iTXt XMP chunk is malformed")
            continue
        d = zlib.decompressobj()
        try:
            text = d.decompress(parts[2], MAX_XMP_BYTES + 1)
        except zlib.error as e:
            out.append(f"PNG compressed XMP does not inflate: {e}")
            continue
        if len(text) > MAX_XMP_BYTES:
            out.append(f"PNG compressed XMP exceeds the {MAX_XMP_BYTES}-byte limit")
        elif PLUS_NS.encode() in text:
            out.append(text)
    return out


def _clip(s: str, n: int = MAX_TEXT_CHARS) -> str:
    return s if len(s) <= n else s[:n] + "…"
