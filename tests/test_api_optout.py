"""The opt-out API: scoped keys on every write route, image and JSON opt-outs in one transaction, domain proofs
through a loopback server, the export, and /v1/consent/check's limits and answers."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from provenance.api import create_app
from provenance.api.config import ServerConfig, parse_api_key
from provenance.indexer import BuildOptions, build
from provenance.registry import Registry, key_id

KEYS = ("r1:read", "w1:optout:write", "w2:read+optout:write", "a1:admin", "plain")


def _edited(data: bytes) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    im = im.crop((w // 12, h // 12, w - w // 12, h - h // 12)).resize((w * 2 // 3, h * 2 // 3))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=65)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[Path]:
    return sorted(coco_dir.glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def index_dir(photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api-optout")
    (root / "c").mkdir()
    for p in photos:
        shutil.copy(p, root / "c" / p.name)
    build(str(root / "c"), root / "idx", BuildOptions(descriptors=["sscd", "pdq"], thumbnails=False))
    return root / "idx"


def _client(tmp_path: Path, index_dir: Path, **kw) -> TestClient:
    config = ServerConfig(
        index_dir=index_dir, registry=tmp_path / "reg.sqlite", consent_cache=tmp_path / "c.sqlite", **kw
    )
    c = TestClient(create_app(config))
    c.__enter__()
    assert c.app.state.service.wait(120)
    return c


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _err(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.json()
    return r.json()["error"]["message"]


def test_key_format():
    assert parse_api_key("plain") == ("plain", frozenset({"read"}))
    assert parse_api_key("k:optout:write")[1] == {"read", "optout:write"}
    assert parse_api_key("k:admin")[1] == {"read", "optout:write", "admin"}
    with pytest.raises(ValueError, match="unknown scope"):
        parse_api_key("k:read+optout:wirte")
    with pytest.raises(ValueError):
        ServerConfig(index_dir=".", api_keys=("k:sudo",))


def test_authorization_on_every_write_route(tmp_path, index_dir, photos):
    c = _client(tmp_path, index_dir, api_keys=KEYS)
    body = {"urls": ["https://example.com/a.jpg"]}
    img = {"file": ("p.jpg", photos[0].read_bytes(), "image/jpeg")}
    for send in (
        lambda h: c.post("/v1/optout", json=body, headers=h),
        lambda h: c.post("/v1/optout", files=img, headers=h),
        lambda h: c.delete("/v1/optout/0123", headers=h),
    ):
        _err(send({}), 401, "unauthorized")
        _err(send(_h("wrong")), 401, "unauthorized")
        _err(send(_h("r1")), 403, "forbidden")
        _err(send(_h("plain")), 403, "forbidden")  # a key of the old format reads only
    r = c.post("/v1/optout", json=body, headers=_h("w1"))
    assert r.status_code == 201, r.text
    oid = r.json()["optouts"][0]["id"]
    assert r.json()["optouts"][0]["key_id"] == key_id("w1")  # a hash of the key, never the key
    assert "w1" not in (tmp_path / "reg.sqlite").read_bytes().decode("latin-1")
    _err(c.delete(f"/v1/optout/{oid}", headers=_h("w2")), 403, "forbidden")  # another writer
    assert c.delete(f"/v1/optout/{oid}", headers=_h("a1")).status_code == 200  # an admin
    r = c.post("/v1/optout", json={"ids": ["x"]}, headers=_h("w2"))
    oid = r.json()["optouts"][0]["id"]
    assert c.delete(f"/v1/optout/{oid}", headers=_h("w2")).json()["removed"]["id"] == oid  # its own
    _err(c.delete(f"/v1/optout/{oid}", headers=_h("w2")), 404, "optout_not_found")
    # reads: every valid key
    assert c.get("/v1/optout/export", headers=_h("plain")).status_code == 200
    _err(c.get("/v1/optout/export"), 401, "unauthorized")
    c.__exit__(None, None, None)


def test_no_keys_refuses_writes_unless_allowed(tmp_path, index_dir):
    c = _client(tmp_path, index_dir)
    _err(c.post("/v1/optout", json={"ids": ["a"]}), 403, "writes_disabled")
    assert c.post("/v1/consent/check", json={"urls": ["https://example.com/a.jpg"]}).status_code == 200
    c.__exit__(None, None, None)
    c = _client(tmp_path, index_dir, allow_anonymous_writes=True)
    r = c.post("/v1/optout", json={"ids": ["a"]})
    assert r.status_code == 201 and r.json()["optouts"][0]["key_id"] == "anonymous"
    c.__exit__(None, None, None)


def test_image_optout_covers_an_edited_copy_and_consent_check(tmp_path, index_dir, photos):
    c = _client(tmp_path, index_dir, api_keys=KEYS)
    data = _edited(photos[2].read_bytes())
    r = c.post(
        "/v1/optout", files={"file": ("mine.jpg", data, "image/jpeg")}, data={"claimant": "Jo"}, headers=_h("w1")
    )
    assert r.status_code == 201, r.text
    o = r.json()["optouts"][0]
    assert o["kind"] == "content" and o["claimant"] == "Jo" and r.json()["covered"] == {o["id"]: 1}
    # the indexed original, by its file hash: covered by the content opt-out
    import hashlib

    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in photos[2:4]]
    c.post("/v1/optout", json={"domains": ["Example.com"], "urls": ["https://other.org/x.jpg"]}, headers=_h("w1"))
    r = c.post(
        "/v1/consent/check",
        headers=_h("r1"),
        json={
            "sha256": shas,
            "urls": ["https://img.example.com/a.jpg", "https://other.org/x.jpg", "https://fine.net/y"],
        },
    )
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["training"] for x in res] == ["not_allowed", "not_allowed", "unknown", "not_allowed", "unknown"]
    assert [x["opted_out"]["by"] for x in res[:2]] == ["domain", "url"]
    assert res[3]["opted_out"]["by"] == "content" and res[3]["indexed"] == [photos[2].name]
    assert res[4]["indexed"] == [photos[3].name] and res[4]["opted_out"] is None
    # export: a blocklist of URLs, one a line
    assert c.get("/v1/optout/export?format=urls", headers=_h("r1")).text == "https://other.org/x.jpg\n"
    assert c.get("/v1/optout/export?format=sha256", headers=_h("r1")).text.strip() == hashlib.sha256(data).hexdigest()
    c.__exit__(None, None, None)


def test_bad_input_is_a_clear_4xx_and_writes_nothing(tmp_path, index_dir):
    c = _client(tmp_path, index_dir, api_keys=KEYS)
    r = c.post("/v1/consent/check", json={"urls": [f"https://e.com/{i}" for i in range(10_001)]}, headers=_h("r1"))
    assert r.status_code == 400 and "10000" in r.text.replace(",", "")
    r = c.post(
        "/v1/consent/check", json={"urls": ["https://e.com/1"] * 5000, "sha256": ["0" * 64] * 5001}, headers=_h("r1")
    )
    _err(r, 400, "invalid_optout")
    msg = _err(c.post("/v1/consent/check", json={"sha256": ["0" * 64, "abc"]}, headers=_h("r1")), 400, "invalid_optout")
    assert "'abc'" in msg and "sha256" in msg
    _err(
        c.post("/v1/consent/check", json={"urls": ["https://e.com/"], "live": True}, headers=_h("r1")),
        400,
        "live_fetch_disabled",
    )
    # an image that decodes to nothing
    _err(
        c.post("/v1/optout", files={"file": ("x.jpg", b"not an image at all", "image/jpeg")}, headers=_h("w1")),
        415,
        "not_an_image",
    )
    # one bad value in a batch: nothing written
    r = c.post("/v1/optout", json={"urls": ["https://ok.com/a.jpg"], "domains": ["not a domain"]}, headers=_h("w1"))
    _err(r, 400, "invalid_optout")
    r = c.post(
        "/v1/optout",
        json={"urls": ["https://ok.com/a.jpg"], "domains": ["unreachable.invalid"], "prove": True},
        headers=_h("w1"),
    )
    _err(r, 422, "domain_proof_failed")
    assert Registry(tmp_path / "reg.sqlite").count() == 0
    _err(
        c.post("/v1/optout", content=b"x", headers={**_h("w1"), "Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    c.__exit__(None, None, None)


class _ProofHandler(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        if self.path == "/.well-known/provenance-optout.txt":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(type(self).body)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *a):
        pass


def test_domain_proof_through_a_loopback_server(tmp_path):
    pytest.importorskip("httpx")
    from provenance.errors import DomainProofError
    from provenance.registry import NewOptout, ProofOptions

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProofHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proof = ProofOptions(
        scheme="http",
        port=server.server_address[1],
        allow_private_addresses=True,
        resolve=lambda host, port: ["127.0.0.1"],
        timeout_s=5,
    )
    reg = Registry(tmp_path / "reg.sqlite")
    try:
        first = reg.add(NewOptout("domain", "artist.test"), key="k_me")
        assert first.ownership == "asserted"
        token = reg.domain_token("artist.test", "k_me")
        _ProofHandler.body = b"someone-else\n"
        with pytest.raises(DomainProofError, match="does not hold this key's token"):
            reg.add(NewOptout("domain", "artist.test", prove=True), key="k_me", proof=proof)
        _ProofHandler.body = f"# provenance\n{token}\n".encode()
        with pytest.raises(DomainProofError):  # another key's token is not this one's
            reg.add(NewOptout("domain", "artist.test", prove=True), key="k_other", proof=proof)
        shown = reg.add(NewOptout("domain", "artist.test", prove=True), key="k_me", proof=proof)
        assert shown.id == first.id and shown.ownership == "shown"
        assert [e["action"] for e in reg.audit_log()] == ["prove", "add"]
        # the SSRF guard: without the flag, a loopback address is refused
        with pytest.raises(DomainProofError, match="refused"):
            reg.add(
                NewOptout("domain", "other.test", prove=True),
                key="k_me",
                proof=ProofOptions(
                    scheme="http", port=server.server_address[1], resolve=lambda host, port: ["127.0.0.1"]
                ),
            )
        assert reg.count() == 1
    finally:
        server.shutdown()


def test_scan_matches_carry_opted_out(tmp_path, index_dir, photos):
    c = _client(tmp_path, index_dir, api_keys=KEYS)
    c.post("/v1/optout", json={"ids": [photos[4].name]}, headers=_h("w1"))
    r = c.post("/v1/scan", files={"file": ("q.jpg", _edited(photos[4].read_bytes()), "image/jpeg")}, headers=_h("r1"))
    assert r.status_code == 200, r.text
    top = r.json()["matches"][0]
    assert top["id"] == photos[4].name and top["opted_out"]["by"] == "id"
    assert all("opted_out" not in m for m in r.json()["matches"] if m["id"] != photos[4].name)
    c.__exit__(None, None, None)


def test_scoped_keys_are_redacted_from_logs(tmp_path, index_dir):
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    access = logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    try:
        c = _client(tmp_path, index_dir, api_keys=("s3cr3t-w:optout:write",))
        access.warning("client sent %s", "s3cr3t-w")
        c.__exit__(None, None, None)
    finally:
        access.removeHandler(handler)
    assert "s3cr3t" not in stream.getvalue() and "[redacted]" in stream.getvalue()


def test_preview_says_what_an_image_optout_covers_and_writes_nothing(tmp_path, index_dir, photos):
    """The page's confirmation step: the index's name and its copies of the image, before anything is written."""
    c = _client(tmp_path, index_dir, api_keys=KEYS, contact="optouts@example.org")
    data = _edited(photos[2].read_bytes())
    img = {"file": ("mine.jpg", data, "image/jpeg")}
    _err(c.post("/v1/optout/preview", files=img), 401, "unauthorized")
    r = c.post("/v1/optout/preview", files=img, headers=_h("r1"))  # a read key may preview
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["index"] == index_dir.name and p["covered"] == 1 and p["already"] is None
    assert p["items"] == [{"id": photos[2].name, "verdict": "replica"}]
    assert Registry(tmp_path / "reg.sqlite").count() == 0
    # an image in no corpus covers nothing
    novel = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 140, 200)).save(novel, "JPEG")
    r = c.post("/v1/optout/preview", files={"file": ("n.jpg", novel.getvalue(), "image/jpeg")}, headers=_h("r1"))
    assert r.json()["covered"] == 0 and r.json()["items"] == []
    # once registered, the preview names the opt-out (its claimant, never the key)
    oid = c.post("/v1/optout", files=img, data={"claimant": "Jo"}, headers=_h("w1")).json()["optouts"][0]["id"]
    already = c.post("/v1/optout/preview", files=img, headers=_h("r1")).json()["already"]
    assert already["optout"] == oid and already["claimant"] == "Jo" and "key_id" not in already
    # bad input: a clear 4xx
    _err(
        c.post("/v1/optout/preview", files={"file": ("x.jpg", b"not an image", "image/jpeg")}, headers=_h("r1")),
        415,
        "not_an_image",
    )
    _err(c.post("/v1/optout/preview", json={"ids": ["a"]}, headers=_h("r1")), 415, "unsupported_media_type")
    h = c.get("/healthz").json()
    assert h["registry"] is True and h["auth"] is True and h["anonymous_writes"] is False
    assert h["contact"] == "optouts@example.org"
    c.__exit__(None, None, None)


def test_item_carries_its_optout_state(tmp_path, index_dir, photos):
    c = _client(tmp_path, index_dir, api_keys=KEYS)
    item = c.get(f"/v1/items/{photos[1].name}", headers=_h("r1")).json()
    assert item["opted_out"] is None
    c.post("/v1/optout", json={"ids": [photos[1].name], "claimant": "Ana"}, headers=_h("w1"))
    item = c.get(f"/v1/items/{photos[1].name}", headers=_h("r1")).json()
    assert item["opted_out"]["by"] == "id" and item["opted_out"]["claimant"] == "Ana"
    assert str(index_dir) not in json.dumps(item) and str(index_dir.parent) not in json.dumps(item)
    c.__exit__(None, None, None)
