"""Tests of provenance.consent.files: real JPEG/PNG/WebP files carrying IPTC/PLUS XMP and signed C2PA manifests."""

from __future__ import annotations

import io
import json
import time
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_c2pa import _sign, signer_pems  # noqa: F401 - the session fixture signs with a throwaway CA
from typer.testing import CliRunner

from provenance.consent import Consent, ConsentSignal, combine, read_file_consent
from provenance.consent.files import MAX_XMP_BYTES, parse_plus_xmp

VOCAB = "http://ns.useplus.org/ldf/vocab/"
# c2pa-rs refuses to sign a manifest whose first action is not c2pa.created or c2pa.opened.
CREATED = {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created",
           "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"}]}}  # fmt: skip


def _xmp(body: str, extra_ns: str = "") -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" {extra_ns}>{body}'
        '</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def _attr_xmp(value: str) -> bytes:
    # The attribute form (exiftool and Photoshop write simple properties this way).
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" plus:DataMining="{VOCAB}{value}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


@pytest.fixture(scope="module")
def photo(coco_dir) -> Image.Image:
    return Image.open(coco_dir / "000000397133.jpg").convert("RGB").resize((160, 120))


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_with_xmp(img: Image.Image, xmp: bytes, *, compressed: bool) -> bytes:
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", xmp.decode(), zip=compressed)
    return _save(img, "PNG", pnginfo=info)


def test_jpeg_plus_prohibited_for_ai_training(photo):
    data = _save(photo, "JPEG", xmp=_attr_xmp("DMI-PROHIBITED-AIMLTRAINING"))
    c = read_file_consent(data, "image/jpeg")
    assert c.training == "not_allowed"
    (s,) = c.signals
    assert (s.source, s.value, s.training) == ("iptc-plus", "DMI-PROHIBITED-AIMLTRAINING", "not_allowed")
    assert "AI/ML training" in s.detail
    json.dumps(c.to_dict())


def test_png_see_constraint_reads_other_constraints(photo):
    xmp = _xmp(
        f'<plus:DataMining rdf:resource="{VOCAB}DMI-PROHIBITED-SEECONSTRAINT"/>'
        '<plus:OtherConstraints><rdf:Alt><rdf:li xml:lang="x-default">Licensed for research only; '
        "write to rights@example.org</rdf:li></rdf:Alt></plus:OtherConstraints>"
    )
    for compressed in (False, True):  # packet scanning finds the plain chunk; the zTXt-style one is inflated
        data = _png_with_xmp(photo, xmp, compressed=compressed)
        assert (b"useplus" in data) is not compressed
        c = read_file_consent(data, "image/png")
        assert c.training == "constrained", compressed
        (s,) = c.signals
        assert s.value == "DMI-PROHIBITED-SEECONSTRAINT"
        assert s.extra["other_constraints"] == ["Licensed for research only; write to rights@example.org"]


def test_webp_element_text_allowed(photo):
    data = _save(photo, "WEBP", xmp=_xmp(f"<plus:DataMining>{VOCAB}DMI-ALLOWED</plus:DataMining>"))
    c = read_file_consent(data, "image/webp")
    assert c.training == "allowed" and [s.value for s in c.signals] == ["DMI-ALLOWED"]


@pytest.mark.parametrize(
    ("value", "training"),
    [("DMI-UNSPECIFIED", "unknown"), ("DMI-PROHIBITED", "not_allowed"), ("DMI-PROHIBITED-GENAIMLTRAINING", "not_allowed"),
     ("DMI-PROHIBITED-EXCEPTSEARCHENGINEINDEXING", "not_allowed"), ("DMI-PROHIBITED-SEELINKEDRIGHTSEXPR", "constrained"),
     ("DMI-SOMETHING-NEW", "unknown")],
)  # fmt: skip
def test_plus_vocabulary(photo, value, training):
    c = read_file_consent(_save(photo, "JPEG", xmp=_attr_xmp(value)))
    assert c.training == training and c.signals[0].value.endswith(value)


def test_plain_photo_has_no_signals(coco_dir):
    data = (coco_dir / "000000397133.jpg").read_bytes()
    assert read_file_consent(data, "image/jpeg") == Consent("unknown", ())


def test_signed_c2pa_training_mining(photo, signer_pems):  # noqa: F811
    manifest = {
        "claim_generator_info": [{"name": "camera-app", "version": "1.0"}],
        "title": "reserved.jpg",
        "assertions": [
            CREATED,
            {"label": "c2pa.training-mining", "data": {"entries": {
                "c2pa.ai_generative_training": {"use": "notAllowed"},
                "c2pa.ai_inference": {"use": "allowed"},
                "c2pa.data_mining": {"use": "constrained", "constraint_info": "ask rights@example.org"},
            }}},
            {"label": "cawg.training-mining", "data": {"entries": {
                "cawg.ai_training": {"use": "constrained", "constraints_info": "non-commercial only"},
            }}},
        ],
    }  # fmt: skip
    data = _sign(_save(photo, "JPEG", quality=90), "image/jpeg", manifest, signer_pems)
    c = read_file_consent(data, "image/jpeg")
    assert c.training == "not_allowed"
    by_value = {s.value: s for s in c.signals}
    assert set(by_value) == {"c2pa.ai_generative_training=notAllowed", "c2pa.ai_inference=allowed",
                             "c2pa.data_mining=constrained", "cawg.ai_training=constrained"}  # fmt: skip
    assert by_value["c2pa.data_mining=constrained"].extra["constraint_info"] == "ask rights@example.org"
    assert by_value["cawg.ai_training=constrained"].extra["constraint_info"] == "non-commercial only"
    assert by_value["cawg.ai_training=constrained"].source == "cawg"
    # Inference is not training: listed, not counted.
    assert by_value["c2pa.ai_inference=allowed"].training is None and not by_value["c2pa.ai_inference=allowed"].counts
    # Our throwaway CA is in no trust list: the manifest validates but its signer is untrusted.
    assert {s.extra["manifest"] for s in c.signals} == {"untrusted"}

    # Tampered pixels after signing: the hash no longer matches, the manifest is reported invalid.
    img = Image.open(io.BytesIO(data))
    bad = bytearray(data)
    sos = bad.rfind(b"\xff\xda")
    bad[sos + 40 : sos + 80] = bytes(40)
    c_bad = read_file_consent(bytes(bad), "image/jpeg")
    assert img.size == (160, 120)
    assert {s.extra.get("manifest") for s in c_bad.signals if s.source in ("c2pa", "cawg")} == {"invalid"}


def test_c2pa_and_xmp_disagree_most_restrictive_wins(photo, signer_pems):  # noqa: F811
    manifest = {"claim_generator_info": [{"name": "t"}], "title": "t.jpg", "assertions": [
        CREATED, {"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "allowed"}}}}]}  # fmt: skip
    jpeg = _save(photo, "JPEG", xmp=_attr_xmp("DMI-PROHIBITED"))
    c = read_file_consent(_sign(jpeg, "image/jpeg", manifest, signer_pems), "image/jpeg")
    assert c.training == "not_allowed"
    assert sorted((s.source, s.training) for s in c.signals) == [("c2pa", "allowed"), ("iptc-plus", "not_allowed")]


def test_malformed_xmp_gives_unknown_signal(photo):
    broken = _xmp(f"<plus:DataMining>{VOCAB}DMI-PROHIBITED</plus:DataMining>").replace(b"</rdf:Description>", b"")
    c = read_file_consent(_save(photo, "JPEG", xmp=broken))
    assert c.training == "unknown"
    (s,) = c.signals
    assert (s.source, s.value) == ("xmp", "malformed") and "not parsed" in s.detail


def test_xmp_entity_expansion_is_refused_fast(photo):
    lol = (
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + "".join(
            f'<!ENTITY lol{i} "{"&lol" + (str(i - 1) if i > 1 else "") + ";" * 1}' * 10 + '">' for i in range(1, 10)
        )
        + "]>"
    )
    packet = lol.encode() + _attr_xmp("DMI-ALLOWED").replace(b"DMI-ALLOWED", b"&lol9;")
    start = time.perf_counter()
    c = read_file_consent(_save(photo, "JPEG", xmp=packet))
    assert time.perf_counter() - start < 1.0
    # Packet scanning starts at <x:xmpmeta, so the DTD is never read and the entity stays undefined.
    assert c.training == "unknown" and c.signals[0].value == "malformed" and "entity" in c.signals[0].detail
    with pytest.raises(ValueError, match="DTD"):
        parse_plus_xmp(packet[packet.find(b"<?xml") :])


def test_oversized_xmp_packet_is_not_parsed(photo):
    padding = "<!-- " + "x" * (MAX_XMP_BYTES + 10) + " -->"
    big = _xmp(f"{padding}<plus:DataMining>{VOCAB}DMI-PROHIBITED</plus:DataMining>")
    c = read_file_consent(_png_with_xmp(photo, big, compressed=False))
    assert c.training == "unknown" and "limit" in c.signals[0].detail
    # Compressed, the same packet is a zip bomb in miniature: inflation stops at the limit.
    c = read_file_consent(_png_with_xmp(photo, big, compressed=True))
    assert c.training == "unknown" and "limit" in c.signals[0].detail
    assert len(zlib.compress(big)) < MAX_XMP_BYTES // 100


def test_malformed_c2pa_gives_unknown_signal(photo, signer_pems):  # noqa: F811
    manifest = {"claim_generator_info": [{"name": "t"}], "title": "t.jpg", "assertions": [
        CREATED, {"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "notAllowed"}}}}]}  # fmt: skip
    bad = bytearray(_sign(_save(photo, "JPEG"), "image/jpeg", manifest, signer_pems))
    i = bad.find(b"jumb")
    bad[i + 200 : i + 260] = b"\x00" * 60
    c = read_file_consent(bytes(bad), "image/jpeg")
    assert c.training == "unknown"
    assert [(s.source, s.value) for s in c.signals] == [("c2pa", "malformed")] and "C2PA" in c.signals[0].detail


def test_combine_order_and_round_trip():
    sig = [ConsentSignal("a", "x", "allowed"), ConsentSignal("b", "y", "constrained"),
           ConsentSignal("c", "z", None, "crawl rule"), ConsentSignal("d", "w", "not_allowed", overridden_by="a")]  # fmt: skip
    assert combine(sig) == "constrained"
    assert combine([*sig, ConsentSignal("e", "v", "not_allowed")]) == "not_allowed"
    assert combine([]) == "unknown"
    c = Consent.of(sig)
    again = Consent.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c
    # A file's answer and its URL's answer merge into one, every signal kept.
    url = Consent.of([ConsentSignal("robots.txt", "disallow", "not_allowed", extra={"agents": ["GPTBot"]})])
    both = c.merged(url)
    assert both.training == "not_allowed" and both.signals == c.signals + url.signals


def test_cli_consent_file(photo, tmp_path):
    from provenance.cli import app

    (tmp_path / "a.jpg").write_bytes(_save(photo, "JPEG", xmp=_attr_xmp("DMI-PROHIBITED")))
    (tmp_path / "b.png").write_bytes(_save(photo, "PNG"))
    res = CliRunner().invoke(app, ["consent", "file", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"),
                                   str(tmp_path / "missing.jpg"), "--json"])  # fmt: skip
    assert res.exit_code == 3, res.output
    rows = json.loads(res.stdout)
    assert rows[0]["consent"]["training"] == "not_allowed"
    assert rows[1]["consent"] == {"training": "unknown", "signals": []}
    assert "not found" in rows[2]["error"]


def test_every_scan_record_carries_the_files_consent(photo, coco_dir, tmp_path, signer_pems):  # noqa: F811
    from provenance.indexer import BuildOptions, build
    from provenance.scan import Scanner, ScanOptions

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in sorted(coco_dir.glob("*.jpg"))[:3]:
        (corpus / p.name).write_bytes(p.read_bytes())
    build(str(corpus), tmp_path / "idx", BuildOptions(descriptors=["sscd", "pdq"]))
    manifest = {"claim_generator_info": [{"name": "t"}], "title": "t.jpg", "assertions": [
        CREATED, {"label": "c2pa.training-mining", "data": {"entries": {"c2pa.ai_training": {"use": "allowed"}}}}]}  # fmt: skip
    signed = _sign(_save(photo, "JPEG", xmp=_attr_xmp("DMI-PROHIBITED-SEECONSTRAINT")), "image/jpeg", manifest,
                   signer_pems)  # fmt: skip
    scanner = Scanner.open(tmp_path / "idx", ScanOptions(k=3, visible=False, invisible=False))
    reserved, plain = scanner.scan_many_bytes([("reserved.jpg", signed), ("plain.jpg", _save(photo, "PNG"))])
    assert reserved.consent["training"] == "constrained"
    assert sorted((s["source"], s["training"]) for s in reserved.consent["signals"]) == [
        ("c2pa", "allowed"), ("iptc-plus", "constrained")]  # fmt: skip
    assert reserved.to_dict()["consent"] == reserved.consent and json.dumps(reserved.to_dict())
    assert plain.consent == {"training": "unknown", "signals": []}
    assert scanner.scan_bytes(b"not an image").consent is None
