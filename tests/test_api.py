"""The HTTP API through FastAPI's TestClient: every route, its errors, limits, keys and the micro-batcher."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from asgi_helpers import asgi_post
from fastapi.testclient import TestClient
from PIL import Image

from provenance.api import ServerConfig, create_app
from provenance.api.batcher import ScanBatcher
from provenance.indexer import THUMBNAIL_SIZE, BuildOptions, build
from provenance.models import ModelOptions
from provenance.options import ScanOptions
from provenance.types import SCAN_SCHEMA_VERSION, ScanRecord

N_PHOTOS = 10
NESTED = "sub/dir"  # two photos live here, so their ids contain "/"


@pytest.fixture(scope="module")
def corpus(coco_subset, tmp_path_factory) -> Path:
    """10 COCO photos with their captions, two of them in a nested folder."""
    return coco_subset(tmp_path_factory.mktemp("api-corpus"), N_PHOTOS, NESTED, nested=range(N_PHOTOS - 2, N_PHOTOS))


@pytest.fixture(scope="module")
def index_dir(corpus, tmp_path_factory) -> Path:
    """sscd + pdq + a tiny random OpenCLIP (so text search runs offline)."""
    from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("api-index")
    ckpt = make_tiny_checkpoint(tmp / "tiny-clip.pt")
    models = ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(ckpt))
    build(str(corpus), tmp / "idx", BuildOptions(descriptors=["sscd", "pdq", "clip"], models=models, batch_size=16))
    return tmp / "idx"


@pytest.fixture(scope="module")
def pdq_only_index(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("api-pdq") / "idx"
    build(str(corpus), out, BuildOptions(descriptors=["pdq"], limit=3))
    return out


def _client(config: ServerConfig) -> TestClient:
    """A started client whose index and models have finished loading."""
    client = TestClient(create_app(config))
    client.__enter__()
    assert client.app.state.service.wait(120), "loading did not finish"
    return client


@pytest.fixture(scope="module")
def client(index_dir):
    c = _client(ServerConfig(index_dir=index_dir))
    yield c
    c.__exit__(None, None, None)


@pytest.fixture(scope="module")
def photos(corpus) -> dict[str, bytes]:
    """id -> file bytes of every corpus photo."""
    return {p.relative_to(corpus).as_posix(): p.read_bytes() for p in sorted(corpus.rglob("*.jpg"))}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _edited(data: bytes) -> bytes:
    """A re-encoded, cropped, downscaled copy: different bytes and pixels, same photo."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    im = im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((w * 3 // 4, h * 3 // 4))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


# --------------------------------------------------------------------------------- health / index


def test_healthz_reports_ready_index_and_checks(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ready" and body["items"] == N_PHOTOS
    assert body["checks"]["descriptors"] == ["sscd", "pdq", "clip"]
    assert body["text_search"] is True and body["auth"] is False
    assert body["max_upload_bytes"] == 20 * 1024 * 1024


def test_server_runs_models_one_thread_per_call_and_hands_torch_threads_back(index_dir):
    import torch

    def threads_of_a_new_thread() -> int:  # torch reads the setting when a thread first uses it
        out: list[int] = []
        t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
        t.start()
        t.join()
        return out[0]

    before = threads_of_a_new_thread()
    c = _client(ServerConfig(index_dir=index_dir))  # default: torch_threads=1
    try:
        assert threads_of_a_new_thread() == 1  # what the scan and search threads get
        # overlapping SSCD calls (two scan workers) get a one-thread ONNX session of their own
        assert c.app.state.service.searcher.model("sscd")._serial is not None
    finally:
        c.__exit__(None, None, None)
    assert threads_of_a_new_thread() == before


def test_manifest(client):
    m = client.get("/v1/index").json()
    assert m["counts"]["indexed"] == N_PHOTOS and set(m["descriptors"]) == {"sscd", "pdq", "clip", "clip_text"}


def test_docs_page_loads_swagger_ui_from_the_app_not_a_cdn(client):
    html = client.get("/docs").text
    assert "/openapi.json" in html and "/static/swagger/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower(), "the docs page must work offline"
    js = client.get("/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert client.get("/static/swagger/swagger-ui.css").status_code == 200
    assert "/v1/scan" in client.get("/openapi.json").json()["paths"]
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered


def test_503_with_json_while_loading(index_dir):
    # Without entering the client the lifespan never runs: the state stays "loading".
    client = TestClient(create_app(ServerConfig(index_dir=index_dir)))
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    _error(client.get("/v1/index"), 503, "loading")
    assert client.get("/v1/search/caption", params={"q": "x"}).headers["retry-after"] == "2"


def test_missing_index_reports_error(tmp_path):
    c = _client(ServerConfig(index_dir=tmp_path / "none"))
    try:
        r = c.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "error" and "no index" in r.json()["error"]
        assert "no index" in _error(c.get("/v1/index"), 503, "unavailable")
    finally:
        c.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------ scan


def test_scan_corpus_photo_finds_itself(client, photos):
    item_id, data = list(photos.items())[3]
    r = client.post("/v1/scan", files={"file": ("../../etc/passwd.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["verdict"] == "exact" and rec["matches"][0]["id"] == item_id
    assert rec["path"] == "passwd.jpg"  # only the base name, as a label
    assert rec["extra"]["identical_file"] == item_id
    # the JSON is the library's scan record contract, key for key
    expected = ScanRecord(path="x").to_dict().keys() | {"extra", "schema_version"}
    assert set(rec) == expected and "verdict" not in rec["matches"][0]
    assert rec["schema_version"] == SCAN_SCHEMA_VERSION and rec["error_code"] is None
    # the record says which checks ran: the server's defaults, with the index's descriptors
    assert rec["checks"] == {
        "descriptors": ["sscd", "pdq", "clip"],
        "visible": True,
        "visible_thorough": False,
        "invisible": True,
        "invisible_crops": False,
        "c2pa": True,
        "metadata": True,
        "centre_view": False,
        "region_search": False,
    }
    assert set(rec["watermarks"]) == {"visible", "invisible", "c2pa", "metadata"}
    visible = rec["watermarks"]["visible"]  # the shipped weights are installed, so the check ran
    assert set(visible) == {"probability", "flagged", "threshold", "input_sizes"}
    assert visible["flagged"] is (visible["probability"] >= visible["threshold"])


def test_scan_edited_copy_is_a_replica_of_its_source(client, photos):
    item_id, data = list(photos.items())[5]
    r = client.post(
        "/v1/scan", params={"match_verdicts": "true"}, files={"file": ("edited.jpg", _edited(data), "image/jpeg")}
    )
    rec = r.json()
    assert rec["verdict"] in ("exact", "replica") and rec["matches"][0]["id"] == item_id
    assert rec["scores"]["sscd"] > 0.5
    assert rec["matches"][0]["verdict"] in ("exact", "replica")
    assert rec["matches"][-1]["verdict"] == "novel"  # the other photos are not copies


def test_scan_rejects_text_and_empty_files(client):
    assert "not an image" in _error(
        client.post("/v1/scan", files={"file": ("notes.txt", b"hello", "text/plain")}), 415, "not_an_image"
    )
    assert "empty" in _error(client.post("/v1/scan", files={"file": ("e.jpg", b"", "image/jpeg")}), 415, "not_an_image")
    _error(client.post("/v1/scan", files={"wrong_field": ("a.jpg", b"x", "image/jpeg")}), 400, "invalid_parameters")


def _bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A small PNG whose header claims width x height pixels (81 MP: a decompression bomb)."""
    png = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    png[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr : ihdr + 17])))
    return bytes(png)


def test_scan_rejects_decompression_bomb(client, monkeypatch):
    import provenance.api.routes.scan as scan_route
    import provenance.scan

    decodes = []
    decode = provenance.scan.decode_image
    monkeypatch.setattr(provenance.scan, "decode_image", lambda *a, **kw: decodes.append(a[1]) or decode(*a, **kw))
    bomb = _bomb_png()
    assert Image.open(io.BytesIO(bomb)).size == (9000, 9000) and len(bomb) < 1000
    msg = _error(client.post("/v1/scan", files={"file": ("bomb.png", bomb, "image/png")}), 413, "too_many_pixels")
    assert "decompression bomb" in msg
    # the status comes from the record's error_code: the upload was decoded once, by the scan
    assert decodes == ["bomb.png"] and not hasattr(scan_route, "decode_image")
    (rec,) = client.post("/v1/scan/batch", files=[("files", ("bomb.png", bomb, "image/png"))]).json()
    assert rec["verdict"] == "error" and rec["error_code"] == "too_many_pixels" and rec["checks"] == {}


def test_scan_batch_keeps_order_and_isolates_bad_files(client, photos):
    (id_a, a), (id_b, b) = list(photos.items())[:2]
    files = [
        ("files", ("a.jpg", a, "image/jpeg")),
        ("files", ("bad.txt", b"nope", "text/plain")),
        ("files", ("b.jpg", b, "image/jpeg")),
    ]
    recs = client.post("/v1/scan/batch", files=files).json()
    assert [r["path"] for r in recs] == ["a.jpg", "bad.txt", "b.jpg"]
    assert recs[0]["matches"][0]["id"] == id_a and recs[2]["matches"][0]["id"] == id_b
    assert recs[1]["verdict"] == "error" and "not an image" in recs[1]["error"]
    assert recs[1]["error_code"] == "not_an_image" and recs[0]["error_code"] is None
    assert all(r["schema_version"] == SCAN_SCHEMA_VERSION for r in recs)


def test_scan_batch_limits(index_dir, photos):
    c = _client(ServerConfig(index_dir=index_dir, max_batch_files=2, max_upload_bytes=300_000))
    try:
        one = next(iter(photos.values()))
        _error(
            c.post("/v1/scan/batch", files=[("files", (f"{i}.jpg", one, "image/jpeg")) for i in range(3)]),
            400,
            "bad_batch",
        )
        big = b"\xff" * 300_001
        recs = c.post(
            "/v1/scan/batch",
            files=[("files", ("big.jpg", big, "image/jpeg")), ("files", ("ok.jpg", one, "image/jpeg"))],
        ).json()
        assert recs[0]["verdict"] == "error" and "upload limit" in recs[0]["error"]
        assert recs[0]["error_code"] == "too_large"
        assert recs[1]["verdict"] == "exact"
    finally:
        c.__exit__(None, None, None)


# -------------------------------------------------------------------------------------- limits


def test_oversized_upload_is_413(index_dir, photos):
    c = _client(ServerConfig(index_dir=index_dir, max_upload_bytes=200_000))
    try:
        msg = _error(c.post("/v1/scan", files={"file": ("big.jpg", b"\0" * 400_000, "image/jpeg")}), 413, "too_large")
        assert "exceeds the limit" in msg
        # Under the request limit (file + multipart slack) but over the per-file limit: caught while reading.
        _error(c.post("/v1/scan", files={"file": ("big.jpg", b"\0" * 210_000, "image/jpeg")}), 413, "too_large")
        _error(c.post("/v1/search/image", files={"file": ("big.jpg", b"\0" * 400_000, "image/jpeg")}), 413, "too_large")
        small = min(photos.values(), key=len)
        assert (
            len(small) < 200_000
            and c.post("/v1/scan", files={"file": ("s.jpg", small, "image/jpeg")}).status_code == 200
        )
    finally:
        c.__exit__(None, None, None)


def test_body_limit_stops_reading_a_stream_without_content_length(client):
    """A chunked upload is cut off once it passes the limit: the rest is never read."""
    app = client.app
    chunk, n_chunks = b"x" * 65536, 1000  # 64 MB offered, limit is 20 MB + slack
    head = (
        b'--zzz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    r = asgi_post(app, "/v1/scan", lambda i: (head + chunk if i == 1 else chunk, i < n_chunks))
    assert r.status == 413 and json.loads(r.body)["error"]["code"] == "too_large"
    assert r.consumed * len(chunk) <= 20 * 1024 * 1024 + 2 * 65536 + len(chunk)


# ------------------------------------------------------------------------------------------ search


def test_search_image_top_match_and_k(client, photos):
    item_id, data = list(photos.items())[7]
    r = client.post("/v1/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
    body = r.json()
    assert body["matches"][0]["id"] == item_id
    assert set(body["by_descriptor"]) == {"sscd", "pdq", "clip"}
    assert all(len(v) == 3 for v in body["by_descriptor"].values())
    assert body["by_descriptor"]["sscd"][0]["score"] > 0.99
    _error(
        client.post("/v1/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "0"}),
        400,
        "invalid_parameters",
    )
    _error(client.post("/v1/search/image", files={"file": ("q.txt", b"text", "text/plain")}), 415, "not_an_image")


def test_search_text(client):
    body = client.post("/v1/search/text", json={"text": "a photo of people", "k": 4}).json()
    assert body["query"] == "a photo of people" and len(body["matches"]) == 4
    assert all(m["descriptor"] == "clip" for m in body["matches"])
    _error(client.post("/v1/search/text", json={"text": ""}), 400, "invalid_parameters")
    _error(client.post("/v1/search/text", json={"text": "x", "k": 1000}), 400, "invalid_parameters")
    _error(
        client.post("/v1/search/text", content=b"not json", headers={"content-type": "application/json"}),
        400,
        "invalid_parameters",
    )


def test_search_text_without_clip_is_409(pdq_only_index):
    c = _client(ServerConfig(index_dir=pdq_only_index))
    try:
        msg = _error(c.post("/v1/search/text", json={"text": "dog"}), 409, "text_search_unavailable")
        assert "caption" in msg
        assert c.get("/healthz").json()["text_search"] is False
    finally:
        c.__exit__(None, None, None)


def test_search_caption(client, photos):
    rows = [client.get(f"/v1/items/{i}").json() for i in photos]
    word = next(w for w in rows[0]["caption"].split() if len(w) > 4).strip(".,").lower()
    body = client.get("/v1/search/caption", params={"q": word, "k": 5}).json()
    assert body["hits"] and len(body["hits"]) <= 5
    assert rows[0]["id"] in {h["id"] for h in body["hits"]}
    assert client.get("/v1/search/caption", params={"q": "zzzxqy"}).json()["hits"] == []
    _error(client.get("/v1/search/caption", params={"q": ""}), 400, "invalid_parameters")
    _error(client.get("/v1/search/caption", params={"q": "a", "k": "-1"}), 400, "invalid_parameters")
    # FTS5 syntax in user input is quoted away, not an error
    assert client.get("/v1/search/caption", params={"q": 'a" OR NEAR(b'}).status_code == 200


# ------------------------------------------------------------------------------------------- items


def test_items_with_slashes_and_thumbnails(client, photos):
    nested = next(i for i in photos if i.startswith(NESTED))
    item = client.get(f"/v1/items/{nested}").json()
    assert item["id"] == nested and item["has_thumbnail"] and item["caption"]
    r = client.get(f"/v1/items/{nested}/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(r.content)).size) == THUMBNAIL_SIZE  # COCO photos are larger than it
    # percent-encoded slashes reach the same item
    assert client.get("/v1/items/" + nested.replace("/", "%2F")).json()["id"] == nested


def test_unknown_items_are_404_and_never_paths(client):
    _error(client.get("/v1/items/nope.jpg"), 404, "item_not_found")
    _error(client.get("/v1/items/nope.jpg/thumbnail"), 404, "item_not_found")
    _error(client.get("/v1/items/..%2F..%2Fmanifest.json"), 404, "item_not_found")
    _error(client.get("/v1/items/%2Fetc%2Fpasswd/thumbnail"), 404, "item_not_found")


# ------------------------------------------------------------------------- keys, CORS, keeping uploads


def test_api_keys_protect_v1_only(index_dir):
    c = _client(ServerConfig(index_dir=index_dir, api_keys=("k-one", "k-two")))
    try:
        _error(c.get("/v1/index"), 401, "unauthorized")
        _error(c.get("/v1/index", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert c.get("/v1/index", headers={"Authorization": "Bearer k-two"}).status_code == 200
        assert c.get("/v1/index", headers={"X-API-Key": "k-one"}).status_code == 200
        assert c.get("/v1/index").headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_request_without_key_is_refused_before_its_upload_is_read(index_dir):
    c = _client(ServerConfig(index_dir=index_dir, api_keys=("k-one",)))
    headers = [(b"content-length", b"10000000"), (b"authorization", b"Bearer wrong")]
    try:
        r = asgi_post(c.app, "/v1/scan", lambda i: (b"x" * 65536, True), headers)
    finally:
        c.__exit__(None, None, None)
    assert r.status == 401 and json.loads(r.body)["error"]["code"] == "unauthorized"
    assert (b"www-authenticate", b"Bearer") in r.headers
    assert r.consumed == 0  # not one byte of the upload was read


def test_cors_origins(index_dir):
    c = _client(ServerConfig(index_dir=index_dir, cors_origins=("https://app.example",)))
    try:
        r = c.get("/v1/index", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.get("/v1/index", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        c.__exit__(None, None, None)


def test_uploads_kept_only_when_configured(index_dir, photos, tmp_path, client):
    data = next(iter(photos.values()))
    keep = tmp_path / "kept"
    c = _client(ServerConfig(index_dir=index_dir, keep_uploads=keep))
    try:
        rec = c.post("/v1/scan", files={"file": ("../../x.jpg", data, "image/jpeg")}).json()
        c.post("/v1/scan", files={"file": ("t.txt", b"text", "text/plain")})
    finally:
        c.__exit__(None, None, None)
    assert sorted(p.name for p in keep.iterdir()) == [f"{rec['sha256']}.jpg", f"{rec['sha256']}.json"]
    assert (keep / f"{rec['sha256']}.jpg").read_bytes() == data
    assert not (tmp_path / "x.jpg").exists()


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    assert 'name="viewport"' in html and "aria-live" in html and "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    assert "https://" not in client.get("/static/app.js").text


# ---------------------------------------------------------------------------------- config, batcher


@pytest.fixture
def clean_env(monkeypatch):
    """No PROVENANCE_* variable from the caller's shell: each test sets its own."""
    for k in [k for k in os.environ if k.startswith("PROVENANCE_")]:
        monkeypatch.delenv(k)
    return monkeypatch


def test_config_from_env(tmp_path, clean_env):
    env = {
        "PROVENANCE_INDEX": str(tmp_path),
        "PROVENANCE_API_KEYS": " a, b ,",
        "PROVENANCE_CORS_ORIGINS": "https://x",
        "PROVENANCE_KEEP_UPLOADS": str(tmp_path / "k"),
        "PROVENANCE_MAX_UPLOAD_BYTES": "1000",
        "PROVENANCE_SCAN__VISIBLE": "false",
        "PROVENANCE_TORCH_THREADS": "0",
    }
    for k, v in env.items():
        clean_env.setenv(k, v)
    cfg = ServerConfig.from_env()
    assert cfg.api_keys == ("a", "b") and cfg.cors_origins == ("https://x",) and cfg.torch_threads == 0
    assert cfg.keep_uploads == tmp_path / "k" and cfg.max_upload_bytes == 1000 and cfg.scan.visible is False
    assert ServerConfig.from_env(max_upload_bytes=5).max_upload_bytes == 5
    # the worker processes' environment rebuilds the same config (the serve flags included)
    given = ServerConfig.from_env(scan={"thorough": True, "k": 7})
    assert given.scan.thorough and given.scan.k == 7 and given.scan.visible is False  # flags merge with the env's
    for k, v in given.to_env().items():
        clean_env.setenv(k, v)
    assert ServerConfig.from_env() == given
    clean_env.setenv("PROVENANCE_MAX_UPLOAD_BYTES", "many")
    with pytest.raises(ValueError, match="max_upload_bytes"):
        ServerConfig.from_env()
    clean_env.delenv("PROVENANCE_INDEX")
    with pytest.raises(ValueError, match="no index"):
        ServerConfig.from_env()


def test_nested_scan_settings_and_deprecated_flat_names(tmp_path, clean_env, caplog):
    clean_env.setenv("PROVENANCE_INDEX", str(tmp_path))
    clean_env.setenv("PROVENANCE_SCAN__CENTRE_VIEW", "true")
    cfg = ServerConfig.from_env()
    assert cfg.scan.centre_view and not cfg.scan.invisible_crops and not caplog.records
    # this release's flat names still work, with a warning naming the new one
    clean_env.setenv("PROVENANCE_INVISIBLE_CROPS", "1")
    clean_env.setenv("PROVENANCE_K", "3")
    with caplog.at_level("WARNING", logger="provenance.api.config"):
        cfg = ServerConfig.from_env()
    assert cfg.scan.centre_view and cfg.scan.invisible_crops and cfg.scan.k == 3
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "PROVENANCE_INVISIBLE_CROPS is deprecated" in warned and "PROVENANCE_SCAN__INVISIBLE_CROPS" in warned
    assert "PROVENANCE_K is deprecated" in warned
    clean_env.setenv("PROVENANCE_SCAN__K", "4")  # the nested name wins over the flat one
    assert ServerConfig.from_env().scan.k == 4
    # a combination the options type refuses is refused here too, naming both options
    clean_env.setenv("PROVENANCE_SCAN__INVISIBLE", "false")
    with pytest.raises(ValueError, match="invisible_crops is a way of running the invisible check"):
        ServerConfig.from_env()


def test_invisible_crops_per_request_finds_our_mark_in_a_cropped_upload(index_dir, photos, client):
    from provenance.watermarks.invisible import embed_provenance_mark

    generated = Image.open(io.BytesIO(list(photos.values())[4])).convert("RGB").resize((512, 512))
    buf = io.BytesIO()
    embed_provenance_mark(generated, 0x0BADCAFE).crop((6, 19, 470, 420)).save(buf, "JPEG", quality=85)
    upload = {"file": ("cropped.jpg", buf.getvalue(), "image/jpeg")}
    assert client.get("/healthz").json()["checks"]["invisible_crops"] is False
    assert client.post("/v1/scan", files=upload).json()["watermarks"]["invisible"] == []
    (mark,) = client.post("/v1/scan?invisible_crops=true", files=upload).json()["watermarks"]["invisible"]
    assert mark["scheme"] == "provenance" and mark["payload"] == "0badcafe"
    batch = client.post(
        "/v1/scan/batch?invisible_crops=true", files=[("files", ("c.jpg", buf.getvalue(), "image/jpeg"))]
    )
    assert batch.json()[0]["watermarks"]["invisible"] == [mark]
    # the one switch: thorough turns on the crop search and the centre view, and the record says they ran
    rec = client.post("/v1/scan?thorough=true", files=upload).json()
    assert rec["watermarks"]["invisible"] == [mark]
    assert rec["checks"]["invisible_crops"] and rec["checks"]["centre_view"] and not rec["checks"]["visible_thorough"]
    options = {o["name"]: o for o in client.get("/healthz").json()["options"]}
    assert next(iter(options)) == "thorough" and options["thorough"]["available"] and not options["thorough"]["default"]
    assert "centre view" in options["thorough"]["description"] and options["invisible_crops"]["title"]
    off = _client(ServerConfig(index_dir=index_dir, scan=ScanOptions(visible=False, invisible=False)))
    try:
        msg = _error(off.post("/v1/scan?invisible_crops=true", files=upload), 400, "invalid_options")
        assert "invisible_crops is a way of running the invisible check" in msg
        assert off.post("/v1/scan", files=upload).json()["watermarks"]["invisible"] == []
    finally:
        off.__exit__(None, None, None)


def test_server_with_centre_view_finds_a_photo_in_a_screenshot(index_dir, photos, client, window_screenshot):
    item_id, data = list(photos.items())[7]
    buf = io.BytesIO()
    window_screenshot(Image.open(io.BytesIO(data)).convert("RGB"), 0.4).save(buf, "JPEG", quality=85)
    upload = {"file": ("shot.jpg", buf.getvalue(), "image/jpeg")}
    centre = _client(ServerConfig(index_dir=index_dir, scan=ScanOptions(centre_view=True, visible=False)))
    try:
        assert centre.get("/healthz").json()["checks"]["centre_view"] is True
        rec = centre.post("/v1/scan", files=upload).json()
        assert rec["verdict"] == "replica" and rec["matches"][0]["id"] == item_id, rec["scores"]
        assert rec["extra"]["sscd_view"] == "centre"
        assert client.get("/healthz").json()["checks"]["centre_view"] is False
        assert client.post("/v1/scan", files=upload).json()["verdict"] not in ("exact", "replica")
        # a request picks the other setting on either server, even one without the visible check (no 409)
        asked = client.post("/v1/scan?centre_view=true", files=upload).json()
        assert asked["verdict"] == "replica" and asked["scores"]["sscd"] == rec["scores"]["sscd"]
        assert asked["watermarks"]["visible"]["input_sizes"] == [288]  # the server's visible check is unchanged
        off = centre.post(
            "/v1/scan/batch?centre_view=false", files=[("files", ("b.jpg", buf.getvalue(), "image/jpeg"))]
        )
        assert off.json()[0]["verdict"] not in ("exact", "replica") and "extra" not in off.json()[0]
    finally:
        centre.__exit__(None, None, None)


def test_server_with_visible_thorough_scans_at_512_px(index_dir, photos, client):
    from provenance.watermarks.visible import THOROUGH_WEIGHTS, load_detector

    thorough = _client(ServerConfig(index_dir=index_dir, scan=ScanOptions(visible_thorough=True)))
    try:
        data = list(photos.values())[2]
        upload = {"file": ("a.jpg", data, "image/jpeg")}
        assert thorough.get("/healthz").json()["checks"]["visible_thorough"] is True
        rec = thorough.post("/v1/scan", files=upload).json()
        assert rec["watermarks"]["visible"]["input_sizes"] == [288, 512]
        assert (
            rec["watermarks"]["visible"]["threshold"] == load_detector(THOROUGH_WEIGHTS).config.flag_threshold
        )  # the gate chosen for the thorough mix
        # a request picks the other head on either server, and gets what that server's default gives
        assert client.get("/healthz").json()["checks"]["visible_thorough"] is False
        asked = client.post("/v1/scan?visible_thorough=true", files=upload).json()["watermarks"]["visible"]
        assert asked == rec["watermarks"]["visible"]
        default = client.post("/v1/scan", files=upload).json()["watermarks"]["visible"]
        assert default["input_sizes"] == [288]
        assert thorough.post("/v1/scan?visible_thorough=false", files=upload).json()["watermarks"]["visible"] == default
        batch = thorough.post("/v1/scan/batch?visible_thorough=false", files=[("files", ("b.jpg", data, "image/jpeg"))])
        assert batch.json()[0]["watermarks"]["visible"] == default
    finally:
        thorough.__exit__(None, None, None)


def test_visible_thorough_on_a_server_without_the_visible_check_is_400(index_dir, photos):
    c = _client(ServerConfig(index_dir=index_dir, scan=ScanOptions(visible=False)))
    try:
        upload = {"file": ("a.jpg", next(iter(photos.values())), "image/jpeg")}
        msg = _error(c.post("/v1/scan?visible_thorough=true", files=upload), 400, "invalid_options")
        assert "visible_thorough is a way of running the visible check" in msg
        (option,) = [o for o in c.get("/healthz").json()["options"] if o["name"] == "visible_thorough"]
        assert option["available"] is False  # so the page does not offer it
        assert c.post("/v1/scan", files=upload).json()["watermarks"]["visible"] is None
    finally:
        c.__exit__(None, None, None)


def test_batcher_groups_concurrent_jobs_and_keeps_order():
    calls: list[list[str]] = []
    gate = threading.Event()

    def scan_many(items):
        calls.append([n for n, _ in items])
        gate.wait(5)  # the first batch blocks until the others have queued up
        return [ScanRecord(path=n) for n, _ in items]

    b = ScanBatcher(scan_many, max_batch=8)
    try:
        first = b.submit([("a", b"")])
        time.sleep(0.05)
        later = [b.submit([(f"x{i}", b""), (f"y{i}", b"")]) for i in range(3)]
        gate.set()
        assert [r.path for r in first.result(5)] == ["a"]
        assert [[r.path for r in f.result(5)] for f in later] == [[f"x{i}", f"y{i}"] for i in range(3)]
        assert calls == [["a"], ["x0", "y0", "x1", "y1", "x2", "y2"]]  # three queued requests, one batch
    finally:
        b.close()


def test_batcher_passes_failures_to_every_waiting_request():
    def boom(items):
        raise RuntimeError("model crashed")

    b = ScanBatcher(boom)
    try:
        with pytest.raises(RuntimeError, match="model crashed"):
            b.submit([("a", b"")]).result(5)
        with pytest.raises(RuntimeError, match="model crashed"):  # the batcher survives for the next request
            b.submit([("b", b"")]).result(5)
    finally:
        b.close()


def test_batcher_workers_scan_side_by_side():
    running, peak = 0, 0
    lock = threading.Lock()

    def scan_many(items):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        with lock:
            running -= 1
        return [ScanRecord(path=n) for n, _ in items]

    b = ScanBatcher(scan_many, max_batch=1, workers=2)
    try:
        futures = [b.submit([(f"i{i}", b"")]) for i in range(6)]
        assert [f.result(5)[0].path for f in futures] == [f"i{i}" for i in range(6)]
        assert peak == 2 and b.batches == 6  # two at a time, never more
    finally:
        b.close()


def test_serve_command_is_registered_and_refuses_a_missing_index(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from provenance.cli import app

    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: started.append((a, kw)))
    runner = CliRunner()
    result = runner.invoke(app, ["serve", "--index", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no index" in result.output and not started
    assert "--workers" in runner.invoke(app, ["serve", "--help"]).output


def test_serve_with_workers_hands_config_to_the_factory(index_dir, monkeypatch):
    from typer.testing import CliRunner

    from provenance.cli import app

    started = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **kw: started.append((a, kw)))
    for k in [k for k in os.environ if k.startswith("PROVENANCE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("PROVENANCE_API_KEYS", "secret")
    try:
        result = CliRunner().invoke(
            app, ["serve", "--index", str(index_dir), "--workers", "3", "--port", "9999", "--max-upload-mb", "5"]
        )
        assert result.exit_code == 0, result.output
        ((args, kwargs),) = started
        assert args == ("provenance.api.app:app_from_env",) and kwargs["factory"] and kwargs["workers"] == 3
        cfg = ServerConfig.from_env()  # what each worker process will build
        assert cfg.index_dir == index_dir and cfg.max_upload_bytes == 5 * 1024 * 1024 and cfg.api_keys == ("secret",)
    finally:
        for k in [k for k in os.environ if k.startswith("PROVENANCE_") and k != "PROVENANCE_API_KEYS"]:
            del os.environ[k]  # set by the command for its workers; monkeypatch restores the rest
