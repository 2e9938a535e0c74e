"""Consent signals recorded at index time: those inside each file always, each URL source's with
--read-url-signals; a scan's and a search's matches carry them."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from provenance.consent import FetchOptions
from provenance.indexer import BuildOptions, build
from provenance.scan import Scanner
from provenance.store import ProvenanceIndex

PROHIBITED = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" '
    b'plus:DataMining="http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING"/>'
    b'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)


def _jpeg(path, xmp: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "JPEG", quality=92, **({"xmp": xmp} if xmp else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(coco_dir):
    return sorted(coco_dir.glob("*.jpg"))[:6]


def test_file_signals_are_stored_and_carried_by_matches(photos, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, p in enumerate(photos):
        (corpus / p.name).write_bytes(_jpeg(p, PROHIBITED if i == 0 else None))
    index_dir = tmp_path / "idx"
    build(str(corpus), index_dir, BuildOptions(descriptors=["sscd", "pdq"]))

    reserved = photos[0].stem
    assert len(ProvenanceIndex.open(index_dir)) == len(photos)
    scanner = Scanner.open(index_dir)
    # a clean copy of the reserved photo (no XMP of its own) matches the item, which carries the reservation
    (rec,) = scanner.scan_paths([photos[0]])
    top = rec.matches[0]
    assert top.id.endswith(reserved) or reserved in top.id
    assert top.consent is not None and top.consent["training"] == "not_allowed"
    assert top.to_dict()["consent"]["signals"][0]["source"].startswith("iptc")
    # the file scanned had no signal of its own, and an unreserved photo's match carries none
    assert rec.consent is None or rec.consent["training"] == "unknown"
    (other,) = scanner.scan_paths([photos[1]])
    assert other.matches[0].consent is None and "consent" not in other.matches[0].to_dict()


class _Site(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[str] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Site

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        headers = {"Content-Type": "image/jpeg"}
        if self.path == "/reserved.jpg":
            headers["X-Robots-Tag"] = "noai, noimageai"
        status, body = (
            (404, b"") if self.path in ("/robots.txt", "/ai.txt", "/.well-known/tdmrep.json") else (200, b"x")
        )
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_read_url_signals_records_each_source_urls_reservation(photos, tmp_path):
    site = _Site()
    threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        origin = f"http://127.0.0.1:{site.server_address[1]}"
        shard = tmp_path / "00000.tar"
        with tarfile.open(shard, "w") as tar:
            for i, p in enumerate(photos[:3]):
                key = f"{i:05d}"
                url = f"{origin}/{'reserved' if i == 0 else f'open{i}'}.jpg"
                for name, data in (
                    (f"{key}.jpg", _jpeg(p)),
                    (f"{key}.txt", b"a photo"),
                    (f"{key}.json", json.dumps({"key": key, "url": url, "caption": "a photo"}).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        index_dir = tmp_path / "idx"
        fetch = FetchOptions(cache_path=tmp_path / "cache.sqlite", allow_private_addresses=True, per_host_rate=0.0)
        build(str(shard), index_dir, BuildOptions(descriptors=["sscd", "pdq"], read_url_signals=True, url_fetch=fetch))
        assert any(r == "/reserved.jpg" for r in site.requests)

        scanner = Scanner.open(index_dir)
        (rec,) = scanner.scan_paths([photos[0]])
        top = rec.matches[0]
        assert top.source == f"{origin}/reserved.jpg"
        assert top.consent["training"] == "not_allowed"
        assert any(s["source"] == "x-robots-tag" or "robots" in s["source"] for s in top.consent["signals"])
        (rec1,) = scanner.scan_paths([photos[1]])
        assert rec1.matches[0].consent is None or rec1.matches[0].consent["training"] != "not_allowed"
    finally:
        site.shutdown()
        site.server_close()


def test_without_the_flag_no_url_is_fetched(photos, tmp_path):
    site = _Site()
    threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        shard = tmp_path / "00000.tar"
        with tarfile.open(shard, "w") as tar:
            data = _jpeg(photos[0])
            meta = json.dumps({"key": "00000", "url": f"http://127.0.0.1:{site.server_address[1]}/a.jpg"}).encode()
            for name, blob in (("00000.jpg", data), ("00000.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        build(str(shard), tmp_path / "idx", BuildOptions(descriptors=["pdq"]))
        assert site.requests == []
    finally:
        site.shutdown()
        site.server_close()
