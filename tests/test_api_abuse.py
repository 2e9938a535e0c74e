"""The server probed as an attacker would (issue 21): each limit checked with small settings, through the real app
(TestClient, or a direct ASGI call that counts what was read) and, for slow clients, a real uvicorn server on
127.0.0.1 driven by a raw socket."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from asgi_helpers import asgi_post
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from provenance.api import ServerConfig, create_app
from provenance.indexer import BuildOptions, build

N_PHOTOS = 6


@pytest.fixture(scope="module")
def corpus(coco_subset, tmp_path_factory) -> Path:
    """6 COCO photos with their captions, one in a sub-folder."""
    return coco_subset(tmp_path_factory.mktemp("abuse-corpus"), N_PHOTOS, "sub", nested={0})


@pytest.fixture(scope="module")
def index_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("abuse-index") / "idx"
    build(str(corpus), out, BuildOptions(descriptors=["sscd", "pdq"], batch_size=8))
    return out


@pytest.fixture(scope="module")
def photos(corpus) -> dict[str, bytes]:
    return {p.relative_to(corpus).as_posix(): p.read_bytes() for p in sorted(corpus.rglob("*.jpg"))}


# The checks a test does not exercise are off, so each client loads in about a second.
LIGHT = {"scan": {"visible": False, "invisible": False, "c2pa": False}}


def _client(index_dir: Path, **settings) -> TestClient:
    client = TestClient(create_app(ServerConfig(index_dir=index_dir, **{**LIGHT, **settings})))
    client.__enter__()
    assert client.app.state.service.wait(120), "loading did not finish"
    return client


@pytest.fixture(scope="module")
def client(index_dir):
    c = _client(index_dir)
    yield c
    c.__exit__(None, None, None)


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _bilevel_png(w: int, h: int, text: dict[str, str] | None = None) -> bytes:
    """A 1-bit PNG of w x h: a few kB on disk, w*h pixels once decoded (the issue's 7900x7900 bomb)."""
    raw = zlib.compress(b"\x00" * ((w + 7) // 8 + 1) * h, 9)  # a filter byte + ceil(w/8) bytes per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + b"".join(chunk(b"tEXt", k.encode() + b"\0" + v.encode()) for k, v in (text or {}).items())
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def _multipart(parts: list[tuple[str, str, bytes]], boundary: str = "zzz") -> list[bytes]:
    """One body piece per part (field, filename, data), then the closing boundary."""
    pieces = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for field, name, data in parts
    ]
    return [*pieces, f"--{boundary}--\r\n".encode()]


def _asgi_post(app, path: str, pieces: list[bytes], boundary: str = "zzz") -> tuple[int, dict, int]:
    """POST `pieces` to the app one receive() at a time: (status, JSON body, pieces the app asked for)."""
    r = asgi_post(app, path, lambda i: (pieces[i - 1], i < len(pieces)), boundary=boundary)
    return r.status, json.loads(r.body), r.consumed


# ----------------------------------------------------------------------------- a real server, raw sockets


class _Server:
    """uvicorn on 127.0.0.1:<free port> in a thread, with provenance serve's header-deadline protocol."""

    def __init__(self, index_dir: Path, **settings):
        import uvicorn

        from provenance.api.protocol import HeaderTimeoutH11Protocol

        config = ServerConfig(index_dir=index_dir, **{**LIGHT, **settings})
        protocol = type("Proto", (HeaderTimeoutH11Protocol,), {"timeout_s": config.header_timeout_s})
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=0, http=protocol, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.app.state.service.wait(0.05)):
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response (the server closes the connection after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"connection closed without a response: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(lines[0].split()[1]), headers, body


def _post_head(path: str, length: int, boundary: str = "zzz") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()


@pytest.fixture(scope="module")
def slow_server(index_dir):
    """Short read deadlines: 0.3 s between body pieces, 1 s for a whole body, 0.3 s for headers."""
    s = _Server(index_dir, body_idle_timeout_s=0.3, body_timeout_s=1.0, header_timeout_s=0.3)
    yield s
    s.close()


# ============================================================ 1. caption search is bounded (issue row 1)


def test_caption_query_repeats_count_once_and_words_and_length_are_capped(index_dir):
    c = _client(index_dir, caption_max_terms=3, caption_max_chars=60)
    try:
        # 250 x "a": one term once repeats are removed (it took seconds before)
        assert c.get("/v1/search/caption", params={"q": " ".join(["a"] * 20)}).status_code == 200
        msg = _error(c.get("/v1/search/caption", params={"q": "dog cat man tree"}), 400, "query_too_long")
        assert "4 different words" in msg and "limit is 3" in msg
        msg = _error(c.get("/v1/search/caption", params={"q": "x" * 61}), 400, "query_too_long")
        assert "61 characters" in msg and "60" in msg
    finally:
        c.__exit__(None, None, None)


def test_caption_query_past_its_time_budget_is_stopped_inside_sqlite(index_dir):
    c = _client(index_dir, caption_time_budget_s=1e-9)  # every query is over budget at SQLite's first check
    try:
        response = c.get("/v1/search/caption", params={"q": "a"})
        assert "time budget" in _error(response, 503, "query_timeout")
    finally:
        c.__exit__(None, None, None)


def test_sanitize_caption_query_and_time_budget_units(tmp_path):
    import sqlite3

    from provenance.captions import sanitize_caption_query, sqlite_time_budget
    from provenance.errors import QueryTimeoutError

    assert sanitize_caption_query("a a A a") == '"a" "A"'  # FTS5 folds case itself; dedup is by spelling
    assert sanitize_caption_query('dog "red ball" dog*  d* x"; DROP') == '"red ball" "dog" "dog"* "d" "x" "DROP"'
    con = sqlite3.connect(":memory:")
    heavy = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n"
    with pytest.raises(QueryTimeoutError), sqlite_time_budget(con, 0.05):
        con.execute(heavy).fetchall()  # never ends without the budget
    with sqlite_time_budget(con, 5):
        assert con.execute("SELECT 1").fetchone() == (1,)  # the handler is gone afterwards
    assert con.execute("SELECT 2").fetchone() == (2,)


# ============================================================ 2. a batch's cost is bounded while it is read (row 2)


def test_batch_over_its_file_count_is_refused_at_the_first_extra_part_header(index_dir):
    c = _client(index_dir, max_batch_files=3)
    try:
        # 500 small files offered; the app asks for the 4th part, sees its header, and answers
        pieces = _multipart([("files", f"{i}.jpg", b"x" * 100) for i in range(500)])
        status, body, consumed = _asgi_post(c.app, "/v1/scan/batch", pieces)
        assert status == 400 and body["error"]["code"] == "bad_batch", body
        assert consumed == 4
    finally:
        c.__exit__(None, None, None)


def test_batch_byte_budget(index_dir, photos):
    sizes = sorted(len(d) for d in photos.values())
    c = _client(index_dir, max_batch_bytes=sizes[0] + sizes[1] - 1, max_upload_bytes=sizes[-1])
    try:
        files = [("files", (name, data, "image/jpeg")) for name, data in list(photos.items())[:2]]
        assert "exceeds the limit" in _error(c.post("/v1/scan/batch", files=files), 413, "too_large")
        assert c.post("/v1/scan/batch", files=files[:1]).status_code == 200
    finally:
        c.__exit__(None, None, None)


def test_batch_pixel_budget_counts_image_headers_as_they_arrive(index_dir, photos, monkeypatch):
    import provenance.scan

    decodes = []
    decode = provenance.scan.decode_image
    monkeypatch.setattr(provenance.scan, "decode_image", lambda *a, **kw: decodes.append(a[1]) or decode(*a, **kw))
    c = _client(index_dir, max_batch_pixels=200_000_000)
    try:
        # the bomb: 7900 x 7900 1-bit PNGs of a few kB each, 62.4 MP apiece once decoded
        bomb = _bilevel_png(7900, 7900)
        assert len(bomb) < 20_000
        status, body, consumed = _asgi_post(
            c.app, "/v1/scan/batch", _multipart([("files", f"b{i}.png", bomb) for i in range(32)])
        )
        assert status == 413 and body["error"]["code"] == "too_many_pixels", body
        assert "200,000,000 pixels" in body["error"]["message"]
        assert consumed == 4 and decodes == []  # refused at the 4th header: nothing was decoded
        files = [("files", (n, d, "image/jpeg")) for n, d in photos.items()]
        assert c.post("/v1/scan/batch", files=files).status_code == 200  # ordinary photos are well within it
        # images over the per-image limit are refused without decoding: they take nothing from the budget
        huge = _bilevel_png(14000, 14000)  # 196 MP each, 3 x 196 MP > 200 MP
        records = c.post("/v1/scan/batch", files=[("files", (f"h{i}.png", huge, "image/png")) for i in range(3)])
        assert [r["error_code"] for r in records.json()] == ["too_many_pixels"] * 3
    finally:
        c.__exit__(None, None, None)


def test_batch_is_scanned_a_few_files_at_a_time_from_spooled_uploads(client, photos, monkeypatch):
    from provenance.api.routes.scan import BATCH_GROUP

    state = client.app.state.service
    seen: list[int] = []
    scan = state.scan

    async def counting_scan(items, options=None):
        seen.append(len(items))
        return await scan(items, options)

    monkeypatch.setattr(state, "scan", counting_scan)
    files = [
        ("files", (f"{i}-{n.replace('/', '_')}", d, "image/jpeg")) for i in range(2) for n, d in photos.items()
    ]  # 12 files
    records = client.post("/v1/scan/batch", files=files).json()
    assert [r["path"] for r in records] == [f[1][0] for f in files]
    assert max(seen) <= BATCH_GROUP < len(files) and sum(seen) == len(files)


def test_scans_in_progress_are_bounded_with_503_and_retry_after(index_dir, photos):
    server = _Server(index_dir, max_active_scans=1, retry_after_s=7)
    try:
        held = server.connect()
        held.sendall(_post_head("/v1/scan", 100_000) + b"--zzz\r\n")  # a scan whose body is still arriving
        deadline = time.monotonic() + 10
        slots = _find(server.app, "ScanSlotsMiddleware")
        while slots.active < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        import httpx

        r = httpx.post(
            f"http://127.0.0.1:{server.port}/v1/scan",
            files={"file": ("a.jpg", next(iter(photos.values())), "image/jpeg")},
            timeout=10,
        )
        assert _error(r, 503, "busy") and r.headers["retry-after"] == "7"
        assert httpx.get(f"http://127.0.0.1:{server.port}/v1/index", timeout=10).status_code == 200  # not a scan
        held.close()
    finally:
        server.close()


def _find(app, name: str):
    """The instance of middleware class `name` in the app's built stack."""
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    layer = app.middleware_stack
    while layer is not None:
        if type(layer).__name__ == name:
            return layer
        layer = getattr(layer, "app", None)
    raise AssertionError(f"no {name}")


def test_rate_limits_per_client_and_per_key(index_dir):
    c = _client(index_dir, client_burst=3, client_rate_per_minute=1)
    try:
        assert [c.get("/v1/index").status_code for _ in range(3)] == [200, 200, 200]
        r = c.get("/v1/index")
        assert "this client" in _error(r, 429, "rate_limited") and int(r.headers["retry-after"]) >= 1
        assert c.get("/healthz").status_code == 200  # only /v1 is limited
    finally:
        c.__exit__(None, None, None)
    c = _client(index_dir, api_keys="k-one,k-two", key_burst=2, key_rate_per_minute=1, client_rate_per_minute=0)
    try:
        one, two = {"X-API-Key": "k-one"}, {"Authorization": "Bearer k-two"}
        assert [c.get("/v1/index", headers=one).status_code for _ in range(2)] == [200, 200]
        assert "API key" in _error(c.get("/v1/index", headers=one), 429, "rate_limited")
        assert c.get("/v1/index", headers=two).status_code == 200  # another key has its own bucket
        assert c.get("/v1/index", headers={"X-API-Key": "wrong"}).status_code == 401  # no bucket for bad keys
    finally:
        c.__exit__(None, None, None)


# ============================================================ 3. slow clients are let go (row 3)


def test_a_body_that_stops_arriving_is_a_408(slow_server):
    sock = slow_server.connect()
    sock.sendall(_post_head("/v1/scan", 10_000) + b"--zzz\r\n")  # then nothing
    status, headers, body = _read_response(sock)
    assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert headers.get("connection") == "close"


def test_a_body_trickling_past_its_total_deadline_is_a_408(slow_server):
    sock = slow_server.connect()
    sock.sendall(_post_head("/v1/scan", 100_000) + _multipart([("file", "a.jpg", b"")])[0][:-2])
    sock.settimeout(0.15)
    status = None
    for _ in range(100):  # a byte every 0.15 s: never idle for 0.3 s, but 1 s in all is the limit
        sock.sendall(b"x")
        try:
            status, _, body = _read_response(sock)
            break
        except TimeoutError:
            continue
    assert status == 408 and "within 1 s" in json.loads(body)["error"]["message"]


def test_incomplete_request_headers_close_the_connection(slow_server):
    sock = slow_server.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")  # no blank line: headers never end
    status, _, _ = _read_response(sock)
    assert status == 408
    assert sock.recv(10) == b""  # closed
    ok = slow_server.connect()  # a client that sends its request gets its answer as before
    ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    assert _read_response(ok)[0] == 200


# ============================================================ 4. no server paths in answers (row 4)


def test_sources_are_relative_to_the_corpus_folder(client, photos, corpus):
    item = client.get("/v1/items/sub/" + min(p.name for p in corpus.glob("sub/*.jpg"))).json()
    assert item["source"].startswith("sub/") and str(corpus) not in json.dumps(item)
    name, data = next(iter(photos.items()))
    record = client.post("/v1/scan", files={"file": ("q.jpg", data, "image/jpeg")}).json()
    assert record["matches"][0]["source"] == name
    hits = client.get("/v1/search/caption", params={"q": "a"}).json()["hits"]
    assert hits and all(not h["source"].startswith("/") for h in hits)


def test_an_old_index_with_absolute_sources_answers_without_them(client, corpus, monkeypatch):
    from dataclasses import replace

    index = client.app.state.service.index
    search = index.search_caption  # as an index built before this release answers: absolute file paths

    def absolute_sources(*args, **kwargs):
        return [replace(h, source=f"{corpus}/{h.source}") for h in search(*args, **kwargs)]

    monkeypatch.setattr(index, "search_caption", absolute_sources)
    hits = client.get("/v1/search/caption", params={"q": "a"}).json()["hits"]
    assert hits and all(str(corpus) not in h["source"] and not h["source"].startswith("/") for h in hits)

    from provenance.api.privacy import PathRedactor

    r = PathRedactor(
        Path("/srv/idx"), {"source": {"location": "/data/corpus"}, "builds": [{"source": {"location": "/data/more"}}]}
    )
    assert r.source("/data/corpus/a/b.jpg") == "a/b.jpg" and r.source("/data/more/c.jpg") == "c.jpg"
    assert r.source("/elsewhere/x/y.jpg") == "y.jpg" and r.source("C:\\corpus\\z.jpg") == "z.jpg"
    assert r.source("https://example.com/a/b.jpg") == "https://example.com/a/b.jpg"
    assert r.source("00001.tar:key") == "00001.tar:key"
    assert (
        r.text("no item 'x' in the index at /srv/idx; see https://a.b/c")
        == "no item 'x' in the index at idx; see https://a.b/c"
    )
    assert (
        r.text("cannot read /home/me/corpus/a.jpg: use caption search (/v1/search/caption)")
        == "cannot read a.jpg: use caption search (/v1/search/caption)"
    )


def test_404_and_health_never_echo_the_index_folder(client, index_dir, tmp_path):
    msg = _error(client.get("/v1/items/no-such-item"), 404, "item_not_found")
    assert str(index_dir) not in msg and str(index_dir.parent) not in msg and "no-such-item" in msg
    missing = TestClient(
        create_app(ServerConfig(index_dir=tmp_path / "secret-place" / "idx", load_in_background=False))
    )
    with missing:
        body = missing.get("/healthz").json()
        assert body["status"] == "error" and str(tmp_path) not in body["error"]


def test_index_manifest_shows_paths_and_builds_only_with_the_operator_flag(client, index_dir, corpus):
    manifest = client.get("/v1/index").json()
    assert "builds" not in manifest and str(corpus) not in json.dumps(manifest)
    assert manifest["source"]["location"] == corpus.name and manifest["descriptors"]
    c = _client(index_dir, expose_index_paths=True)
    try:
        manifest = c.get("/v1/index").json()
        assert manifest["builds"] and manifest["source"]["location"] == str(corpus)
    finally:
        c.__exit__(None, None, None)


def test_logs_never_carry_api_keys(index_dir):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    # handlers as `provenance serve` has them: one on uvicorn's access logger, one where the library's records go
    loggers = [logging.getLogger("uvicorn.access"), logging.getLogger("provenance")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        c = _client(index_dir, api_keys="sekrit-key-123")
        try:
            logging.getLogger("uvicorn.access").warning(
                '%s - "%s %s"', "1.2.3.4", "GET", "/v1/index?api_key=sekrit-key-123"
            )
            logging.getLogger("provenance.api.test").warning("headers: Authorization: Bearer sekrit-key-123")
            logging.getLogger("provenance.api.test").warning("given %s", "sekrit-key-123")
        finally:
            c.__exit__(None, None, None)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    out = stream.getvalue()
    assert "sekrit" not in out and out.count("[redacted]") == 3, out


# ============================================================ 5. HTTP: HEAD, OPTIONS, one file per field (row 5)


def test_head_and_options_wherever_get_works(client, corpus):
    item_id = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.jpg"))[1]
    for path in (
        "/",
        "/healthz",
        "/v1/index",
        f"/v1/items/{item_id}",
        f"/v1/items/{item_id}/thumbnail",
        "/static/app.css",
    ):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers.get("content-length") == str(len(get.content)), path
        options = client.options(path)
        assert options.status_code == 204 and {"GET", "HEAD", "OPTIONS"} <= set(options.headers["allow"].split(", ")), (
            path
        )
    assert client.options("/v1/scan").headers["allow"] == "OPTIONS, POST"
    assert client.head("/v1/scan").status_code == 405
    assert client.options("/no/such/path").status_code == 404


def test_two_file_fields_on_a_single_scan_are_a_400(client, photos):
    a, b = list(photos.values())[:2]
    files = [("file", ("a.jpg", a, "image/jpeg")), ("file", ("b.jpg", b, "image/jpeg"))]
    assert "one file" in _error(client.post("/v1/scan", files=files), 400, "repeated_field")
    assert "one file" in _error(client.post("/v1/search/image", files=files), 400, "repeated_field")


# ============================================================ 6. image errors quote our limits (row 6)


def test_pixel_limit_is_ours_and_can_exceed_pillows(index_dir):
    from provenance.images import decode_image

    # between Pillow's 89,478,485 and twice it: the message quotes the configured limit
    c = _client(index_dir, scan={**LIGHT["scan"], "max_pixels": 90_000_000})
    try:
        bomb = _bilevel_png(9500, 9500)  # 90.25 MP
        msg = _error(c.post("/v1/scan", files={"file": ("b.png", bomb, "image/png")}), 413, "too_many_pixels")
        assert "90,000,000" in msg and "89478485" not in msg and "89,478,485" not in msg
        msg = _error(
            c.post("/v1/scan", files={"file": ("b.png", _bilevel_png(14000, 14000), "image/png")}),
            413,
            "too_many_pixels",
        )  # past twice Pillow's limit too
        assert "90,000,000" in msg and "196,000,000 pixels" in msg
    finally:
        c.__exit__(None, None, None)
    # above Pillow's limit, when ours allows it: decoded
    assert decode_image(_bilevel_png(9472, 9472), "big.png", max_pixels=100_000_000).width == 9472


def test_png_with_an_oversized_text_chunk_is_scanned_and_the_metadata_failure_reported(client):
    im = Image.new("RGB", (320, 240), (30, 120, 200))
    info = PngImagePlugin.PngInfo()
    info.add_text("workflow", json.dumps({"nodes": ["x" * 100] * 20_000}), zip=True)  # ~2 MB inflated
    info.add_text("parameters", "a photo of a lake\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1")
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    r = client.post("/v1/scan", files={"file": ("comfy.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    record = r.json()
    assert record["verdict"] != "error" and record["width"] == 320
    metadata = record["watermarks"]["metadata"]
    assert "MAX_TEXT_CHUNK" in metadata["error"]
    assert metadata["parameters"]["steps"] == 20  # the chunks within the limit are still read


def test_healthz_tells_clients_the_limits(index_dir):
    c = _client(index_dir, max_batch_files=5, caption_max_terms=7)
    try:
        limits = c.get("/healthz").json()["limits"]
        assert limits["max_batch_files"] == 5 and limits["caption_max_terms"] == 7
        assert limits["max_pixels"] == 64_000_000 and limits["max_batch_pixels"] == 256_000_000
    finally:
        c.__exit__(None, None, None)
