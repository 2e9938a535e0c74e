"""Tests of provenance.watermarks.c2pa: real manifests signed with c2pa-python over a throwaway CA."""

from __future__ import annotations

import datetime
import io
import json

import c2pa
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from PIL import Image

from provenance.watermarks.c2pa import read_c2pa, summarize_manifest_store

AI_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
CAPTURE = "http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Provenance Tests")]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=ca, crl_sign=ca, encipher_only=False, decipher_only=False,
    )  # fmt: skip


@pytest.fixture(scope="session")
def signer_pems() -> tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM): an ES256 end-entity cert under a test root CA.

    Generated per run rather than shipped, so it never expires. c2pa-rs rejects self-signed signing
    certs and wants digitalSignature usage plus a C2PA-acceptable EKU (emailProtection is one).
    """
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("Test Root CA"))
        .issuer_name(_name("Test Root CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ee_key = ec.generate_private_key(ec.SECP256R1())
    ee = (
        x509.CertificateBuilder()
        .subject_name(_name("Test Signer"))
        .issuer_name(ca.subject)
        .public_key(ee_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ee_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = ee.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM)
    key = ee_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key


def _sign(data: bytes, mime: str, manifest: dict, pems: tuple[bytes, bytes]) -> bytes:
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, pems[0], pems[1], None))
    out = io.BytesIO()
    with c2pa.Builder(manifest) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def _ai_manifest(title: str) -> dict:
    return {
        "claim_generator_info": [{"name": "provenance-generator", "version": "0.1"}],
        "title": title,
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": AI_MEDIA}]},
            },
            {
                "label": "c2pa.training-mining",
                "data": {
                    "entries": {
                        "c2pa.ai_generative_training": {"use": "notAllowed"},
                        "c2pa.ai_training": {"use": "notAllowed"},
                        "c2pa.data_mining": {"use": "constrained", "constraint_info": "ask first"},
                    }
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def photo(coco_dir) -> bytes:
    return (coco_dir / "000000397133.jpg").read_bytes()


@pytest.fixture(scope="module")
def signed_jpeg(photo, signer_pems) -> bytes:
    return _sign(photo, "image/jpeg", _ai_manifest("generated.jpg"), signer_pems)


def test_signed_coco_photo_reports_ai_generation_and_training_opt_out(signed_jpeg):
    s = read_c2pa(signed_jpeg, "image/jpeg")
    assert s is not None and "error" not in s
    assert s["claim_generator"] == "provenance-generator/0.1"
    assert s["claim_generator_info"][0]["name"] == "provenance-generator"
    assert s["title"] == "generated.jpg"
    assert s["ai_generated"] is True
    assert s["digital_source_type"] == AI_MEDIA
    assert s["training_mining"]["c2pa.ai_training"] == "notAllowed"
    assert s["training_mining"]["c2pa.ai_generative_training"] == "notAllowed"
    assert s["training_mining"]["c2pa.data_mining"] == "constrained"
    assert s["training_opt_out"] is True
    assert s["signature_issuer"] == "Provenance Tests"
    assert s["signature_common_name"] == "Test Signer"
    assert s["manifest_count"] == 1
    # Our test CA is in no trust list: the signature verifies but the signer is untrusted.
    assert s["validation_state"] == "Valid"
    assert "signingCredential.untrusted" in s["validation_status"]
    json.dumps(s)  # the summary goes straight into JSON reports


def test_format_is_detected_without_or_with_a_wrong_mime_type(signed_jpeg):
    assert read_c2pa(signed_jpeg)["ai_generated"] is True
    assert read_c2pa(signed_jpeg, "image/png")["ai_generated"] is True


def test_plain_photo_and_non_c2pa_formats_give_none(photo):
    assert read_c2pa(photo, "image/jpeg") is None
    assert read_c2pa(photo) is None
    bmp = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((64, 48)).save(bmp, "BMP")
    assert read_c2pa(bmp.getvalue()) is None  # BMP cannot carry a manifest
    assert read_c2pa(b"") is None
    assert read_c2pa(b"not an image at all") is None
    assert read_c2pa(photo[: len(photo) // 3], "image/jpeg") is None  # truncated, but no manifest


def test_camera_capture_png_is_not_ai_and_has_no_opt_out(photo, signer_pems):
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).resize((160, 120)).save(png, "PNG")
    manifest = {
        "claim_generator_info": [{"name": "camera-app"}],
        "title": "capture.png",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": CAPTURE}]}}
        ],
    }
    s = read_c2pa(_sign(png.getvalue(), "image/png", manifest, signer_pems), "image/png")
    assert s["ai_generated"] is False
    assert s["digital_source_type"] == CAPTURE
    assert s["claim_generator"] == "camera-app"
    assert s["training_mining"] == {} and s["training_opt_out"] is False


def test_malformed_manifest_gives_an_error_summary(signed_jpeg):
    bad = bytearray(signed_jpeg)
    i = bad.find(b"jumb")
    bad[i + 200 : i + 260] = b"\x00" * 60  # zero the middle of the manifest store
    s = read_c2pa(bytes(bad), "image/jpeg")
    assert set(s) == {"error"} and "C2PA" in s["error"]


def test_edited_ai_image_counts_its_ingredient_manifests():
    # Shape of c2pa's Reader.json(): the active manifest is an edit of an AI-generated parent.
    store = {
        "active_manifest": "urn:edit",
        "manifests": {
            "urn:edit": {
                "claim_generator": "Editor/2.0",
                "ingredients": [{"title": "parent.png"}],
                "assertions": [{"label": "c2pa.actions.v2", "data": {"actions": [{"action": "c2pa.edited"}]}}],
            },
            "urn:parent": {
                "assertions": [
                    {
                        "label": "c2pa.actions",
                        "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": AI_MEDIA}]},
                    },
                    {"label": "cawg.training-mining", "data": {"entries": {"cawg.ai_training": {"use": "notAllowed"}}}},
                ]
            },
        },
        "validation_state": "Invalid",
        "validation_status": [{"code": "assertion.dataHash.mismatch"}],
    }
    s = summarize_manifest_store(store)
    assert s["claim_generator"] == "Editor/2.0"
    assert s["ai_generated"] is True and s["digital_source_type"] == AI_MEDIA
    assert s["training_opt_out"] is True
    assert s["ingredients"] == ["parent.png"]
    assert s["manifest_count"] == 2
    assert s["validation_status"] == ["assertion.dataHash.mismatch"]


def test_rejects_non_bytes():
    with pytest.raises(TypeError, match="bytes"):
        read_c2pa("/path/to/file.jpg")  # type: ignore[arg-type]
