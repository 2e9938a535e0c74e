"""Tests of provenance.consent.urls and .fetch against a real HTTP server on loopback."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from provenance.consent import Fetcher, FetchOptions, url_consent
from provenance.consent import fetch as fetch_mod
from provenance.consent.fetch import FetchRequest, address_refusal
from provenance.consent.urls import ROBOTS_MAX_BYTES


class _Site(ThreadingHTTPServer):
    """A loopback web site: routes[path] = (status, headers, body); it logs every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.log: list[tuple[float, str]] = []
        self.hosts: list[str | None] = []
        self.delay = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


IMG = {"Content-Type": "image/jpeg"}
TEXT = {"Content-Type": "text/plain"}
_SITE_FILES = {"/robots.txt", "/ai.txt", "/.well-known/tdmrep.json"}


class _Handler(BaseHTTPRequestHandler):
    server: _Site

    def do_GET(self) -> None:
        s = self.server
        with s.lock:
            s.log.append((time.monotonic(), self.path))
            s.hosts.append(self.headers.get("Host"))
            s.in_flight += 1
            s.max_in_flight = max(s.max_in_flight, s.in_flight)
        try:
            time.sleep(s.delay)
            default = (
                (404, {"Content-Type": "text/plain"}, b"not found") if self.path in _SITE_FILES else (200, IMG, b"x")
            )
            status, headers, body = s.routes.get(self.path, default)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client stopped at its size cap
                self.wfile.write(body)
        finally:
            with s.lock:
                s.in_flight -= 1

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def site():
    s = _Site()
    t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield s
    s.shutdown()
    s.server_close()


def _fetcher(tmp_path, **kw) -> Fetcher:
    kw = {"allow_private_addresses": True, "cache_path": tmp_path / "cache.sqlite", "per_host_rate": 0.0,
          "timeout_s": 5.0, **kw}  # fmt: skip
    return Fetcher(FetchOptions(**kw))


def _check(site, tmp_path, *paths, **kw):
    with _fetcher(tmp_path, **kw) as f:
        answers = url_consent([site.origin + p for p in paths], f)
    return [answers[site.origin + p] for p in paths]


def _by_source(c):
    return {s.source: s for s in c.signals}


def test_tdmrep_file_most_specific_location_wins(site, tmp_path):
    site.routes["/.well-known/tdmrep.json"] = (200, {"Content-Type": "application/json"}, json.dumps([
        {"location": "/", "tdm-reservation": 0},
        {"location": "/images/*", "tdm-reservation": 1, "tdm-policy": "https://example.org/policy.json"},
    ]).encode())  # fmt: skip
    site.routes["/images/a.jpg"] = (200, IMG, b"\xff\xd8")
    site.routes["/docs/b.jpg"] = (200, IMG, b"\xff\xd8")
    reserved, open_ = _check(site, tmp_path, "/images/a.jpg", "/docs/b.jpg")
    assert reserved.training == "not_allowed"
    s = _by_source(reserved)["tdmrep.json"]
    assert s.value == "tdm-reservation=1" and s.extra["location"] == "/images/*"
    assert s.extra["tdm_policy"] == "https://example.org/policy.json"
    assert open_.training == "allowed" and _by_source(open_)["tdmrep.json"].extra["location"] == "/"


def test_tdm_headers_override_the_file(site, tmp_path):
    site.routes["/.well-known/tdmrep.json"] = (200, {"Content-Type": "application/json"},
                                               b'[{"location": "/", "tdm-reservation": 1}]')  # fmt: skip
    site.routes["/free.jpg"] = (200, {**IMG, "tdm-reservation": "0"}, b"x")
    site.routes["/bad.jpg"] = (200, {**IMG, "tdm-reservation": "maybe"}, b"x")
    free, bad = _check(site, tmp_path, "/free.jpg", "/bad.jpg")
    assert free.training == "allowed"
    header, file_ = free.signals
    assert (header.source, header.value) == ("tdm-header", "tdm-reservation=0")
    assert (file_.source, file_.training, file_.overridden_by) == ("tdmrep.json", "not_allowed", "tdm-header")
    assert bad.training == "unknown" and "0 or 1" in bad.signals[0].detail


def test_html_meta_tags(site, tmp_path):
    page = (b'<!doctype html><html><head><meta name="tdm-reservation" content="1">'
            b'<meta name="tdm-policy" content="https://example.org/p"><meta name="robots" content="noimageai">'
            b"</head><body>hello</body></html>")  # fmt: skip
    site.routes["/gallery.html"] = (200, {"Content-Type": "text/html; charset=utf-8"}, page)
    (c,) = _check(site, tmp_path, "/gallery.html")
    assert c.training == "not_allowed"
    assert [(s.source, s.value) for s in c.signals] == [("html-meta", "tdm-reservation=1"), ("html-meta", "noimageai")]
    assert c.signals[0].extra["tdm_policy"] == "https://example.org/p"


def test_x_robots_tag_noai(site, tmp_path):
    site.routes["/a.png"] = (200, {"Content-Type": "image/png", "X-Robots-Tag": "noindex, noai, NoImageAI"}, b"x")
    site.routes["/b.png"] = (200, {"Content-Type": "image/png", "X-Robots-Tag": "noindex"}, b"x")
    a, b = _check(site, tmp_path, "/a.png", "/b.png")
    assert a.training == "not_allowed" and [s.value for s in a.signals] == ["noai", "noimageai"]
    assert b.training == "unknown" and b.signals == ()


def test_ai_txt(site, tmp_path):
    site.routes["/ai.txt"] = (200, TEXT, b"# Spawning ai.txt\nUser-Agent: *\nDisallow: *.jpg\nAllow: *.txt\n")
    jpg, txt, gif = _check(site, tmp_path, "/p/a.jpg", "/notes.txt", "/x.gif")
    assert jpg.training == "not_allowed" and jpg.signals[0].value == "Disallow: *.jpg"
    assert txt.training == "allowed" and txt.signals[0].value == "Allow: *.txt"
    assert gif.training == "allowed" and gif.signals[0].value == "no-match"


def test_robots_txt_ai_crawlers_versus_star(site, tmp_path):
    site.routes["/robots.txt"] = (200, TEXT, (
        b"User-agent: GPTBot\nUser-agent: ClaudeBot\nDisallow: /\n\n"
        b"User-agent: CCBot\nAllow: /\nDisallow: /private/\n\n"
        b"User-agent: *\nDisallow: /private/\n"
    ))  # fmt: skip
    public, private = _check(site, tmp_path, "/pub/a.jpg", "/private/b.jpg")
    assert public.training == "not_allowed"
    dis, allow = public.signals
    assert dis.value == "disallow" and dis.extra["agents"] == ["GPTBot", "ClaudeBot"]
    assert allow.value == "allow" and allow.extra["agents"] == ["CCBot"]
    crawl = [s for s in private.signals if s.value == "crawl-disallow"]
    assert len(crawl) == 1 and crawl[0].training is None and "not a training reservation" in crawl[0].detail
    (dis,) = [s for s in private.signals if s.value == "disallow"]
    assert dis.extra["agents"] == ["GPTBot", "ClaudeBot", "CCBot"] and "Disallow: /private/" in dis.extra["rules"]


def test_star_disallow_is_a_crawl_rule_not_a_reservation(site, tmp_path):
    site.routes["/robots.txt"] = (200, TEXT, b"User-agent: *\nDisallow: /\n")
    (c,) = _check(site, tmp_path, "/a.jpg")
    assert c.training == "unknown"
    assert [(s.source, s.value, s.training) for s in c.signals] == [("robots.txt", "crawl-disallow", None)]


def test_malformed_site_files_give_unknown_signals(site, tmp_path):
    site.routes["/.well-known/tdmrep.json"] = (200, {"Content-Type": "application/json"}, b"[" * 100_000)
    site.routes["/ai.txt"] = (500, TEXT, b"oops")
    site.routes["/robots.txt"] = (200, TEXT, "\ufeffUser-agent: GPTBot\nDisallow: /\n".encode())  # with a BOM
    (c,) = _check(site, tmp_path, "/a.jpg")
    s = _by_source(c)
    assert s["tdmrep.json"].value == "malformed" and s["ai.txt"].value == "HTTP 500"
    assert c.training == "not_allowed" and s["robots.txt"].extra["agents"] == ["GPTBot"]
    site.routes["/.well-known/tdmrep.json"] = (200, {"Content-Type": "application/json"}, b'{"location": "/"}')
    (c,) = _check(site, tmp_path, "/b.jpg", use_cache=False)
    assert "not a JSON array" in _by_source(c)["tdmrep.json"].detail


def test_html_soft_404_for_site_files_is_ignored(site, tmp_path):
    soft = (200, {"Content-Type": "text/html"}, b"<html><body>Page not found</body></html>")
    for p in ("/robots.txt", "/ai.txt", "/.well-known/tdmrep.json"):
        site.routes[p] = soft
    site.routes["/a.jpg"] = (200, IMG, b"x")
    (c,) = _check(site, tmp_path, "/a.jpg")
    assert c == c.__class__("unknown", ())


def test_huge_robots_txt_is_capped(site, tmp_path):
    head = b"User-agent: GPTBot\nDisallow: /\n"
    body = head + b"# padding\n" * (10_000_000 // 10) + b"User-agent: CCBot\nDisallow: /\n"
    site.routes["/robots.txt"] = (200, TEXT, body)
    start = time.perf_counter()
    with _fetcher(tmp_path) as f:
        r = f.fetch(FetchRequest(site.origin + "/robots.txt", ROBOTS_MAX_BYTES))
        (c,) = url_consent([site.origin + "/a.jpg"], f).values()
    assert time.perf_counter() - start < 10
    assert r.truncated and len(r.body) == ROBOTS_MAX_BYTES
    s = _by_source(c)["robots.txt"]
    assert s.extra["agents"] == ["GPTBot"] and s.extra["truncated"] is True  # CCBot's rule was past the cap


def test_redirect_loop_and_unreachable_host(site, tmp_path):
    site.routes["/robots.txt"] = (302, {"Location": "/robots2.txt"}, b"")
    site.routes["/robots2.txt"] = (302, {"Location": "/robots.txt"}, b"")
    site.routes["/a.jpg"] = (200, IMG, b"x")
    (c,) = _check(site, tmp_path, "/a.jpg")
    s = _by_source(c)["robots.txt"]
    assert (s.value, s.training) == ("unreachable", "unknown") and "redirects" in s.detail
    # A port nobody listens on: every fetch fails, each says so, nothing raises.
    dead = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = dead.server_address[1]
    dead.server_close()
    with _fetcher(tmp_path) as f:
        (c,) = url_consent([f"http://127.0.0.1:{port}/a.jpg"], f).values()
    assert c.training == "unknown" and len(c.signals) == 4
    assert all(s.value == "unreachable" and "Connect" in s.detail for s in c.signals)


def test_unresolvable_host_and_slow_server(site, tmp_path):
    def resolve(host, port):
        raise OSError(-2, "Name or service not known")

    with Fetcher(FetchOptions(cache_path=tmp_path / "c.sqlite"), resolve=resolve) as f:
        (c,) = url_consent(["https://no-such-host.invalid/a.jpg"], f).values()
    assert c.training == "unknown" and len(c.signals) == 4
    assert all("no-such-host.invalid does not resolve" in s.detail and "refused" not in s.detail for s in c.signals)
    site.delay = 1.0
    start = time.perf_counter()
    (c,) = _check(site, tmp_path, "/slow.jpg", timeout_s=0.2, max_per_host=4)
    assert time.perf_counter() - start < 1.0
    assert all("timed out" in s.detail for s in c.signals)


def test_redirects_followed(site, tmp_path):
    site.routes["/.well-known/tdmrep.json"] = (301, {"Location": "/tdm/rules.json"}, b"")
    site.routes["/tdm/rules.json"] = (
        200,
        {"Content-Type": "application/json"},
        b'[{"location": "/", "tdm-reservation": 1}]',
    )
    (c,) = _check(site, tmp_path, "/a.jpg")
    assert c.training == "not_allowed" and c.signals[-1].source == "tdmrep.json"


def test_private_addresses_refused_without_the_flag(site, tmp_path):
    site.routes["/robots.txt"] = (200, TEXT, b"User-agent: GPTBot\nDisallow: /\n")
    with _fetcher(tmp_path, allow_private_addresses=False) as f:
        (c,) = url_consent([site.origin + "/a.jpg"], f).values()
    assert c.training == "unknown" and site.log == []  # nothing was even requested
    assert all("refused" in s.detail and "loopback" in s.detail for s in c.signals)
    for ip, kind in [("10.1.2.3", "private"), ("169.254.169.254", "link-local"), ("::1", "loopback"),
                     ("::ffff:127.0.0.1", "loopback"), ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"),
                     ("100.64.0.1", "public")]:  # fmt: skip
        assert kind in address_refusal(ip), ip
    assert address_refusal("93.184.215.14") is None and address_refusal("2606:4700::1111") is None


def test_every_redirect_hop_is_checked(site, tmp_path, monkeypatch):
    # "site.test" resolves to the test server, which for this test only counts as a public address;
    # its redirects then point at addresses the guard must refuse, checked again at each hop.
    real = fetch_mod.address_refusal
    monkeypatch.setattr(fetch_mod, "address_refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))
    port = site.server_address[1]
    names = {"site.test": ["127.0.0.1"], "intranet.test": ["10.0.0.7"]}
    site.routes["/robots.txt"] = (302, {"Location": f"http://127.0.0.2:{port}/robots.txt"}, b"")
    site.routes["/ai.txt"] = (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    site.routes["/.well-known/tdmrep.json"] = (307, {"Location": f"http://intranet.test:{port}/x"}, b"")
    site.routes["/a.jpg"] = (200, {**IMG, "X-Robots-Tag": "noai"}, b"x")
    opts = FetchOptions(cache_path=tmp_path / "c.sqlite", per_host_rate=0.0, timeout_s=5.0)
    with Fetcher(opts, resolve=lambda host, p: names.get(host, [host])) as f:
        (c,) = url_consent([f"http://site.test:{port}/a.jpg"], f).values()
    s = _by_source(c)
    assert c.training == "not_allowed" and s["x-robots-tag"].value == "noai"  # the first hop itself was fine
    assert "redirect to http://127.0.0.2" in s["robots.txt"].detail and "loopback" in s["robots.txt"].detail
    assert "link-local" in s["ai.txt"].detail
    assert "intranet.test" in s["tdmrep.json"].detail and "private" in s["tdmrep.json"].detail
    assert all(path != "/x" for _, path in site.log)
    assert set(site.hosts) == {f"site.test:{port}"}  # connected to the checked IP, named the host


def test_cache_answers_without_fetching_and_offline_mode(site, tmp_path):
    site.routes["/robots.txt"] = (200, TEXT, b"User-agent: GPTBot\nDisallow: /\n")
    site.routes["/a.jpg"] = (200, IMG, b"x")
    (first,) = _check(site, tmp_path, "/a.jpg")
    n = len(site.log)
    assert n == 4  # the URL, robots.txt, ai.txt and tdmrep.json
    (again,) = _check(site, tmp_path, "/a.jpg", offline=True)
    assert again == first and len(site.log) == n
    (fresh,) = _check(site, tmp_path, "/b.jpg", offline=True)  # the site's files are cached, the URL is not
    assert fresh.training == "not_allowed" and len(site.log) == n
    assert any("not in the consent cache" in s.detail for s in fresh.signals)
    # Expired entries are fetched again.
    with _fetcher(tmp_path, ttl_s=1e-6) as f:
        f.cache.put(FetchRequest(site.origin + "/a.jpg", 1).key, f.fetch(FetchRequest(site.origin + "/a.jpg", 1)), 1e-6)
    assert len(site.log) == n + 1


def test_per_host_concurrency_and_rate(site, tmp_path):
    site.delay = 0.05
    for i in range(8):
        site.routes[f"/{i}.jpg"] = (200, IMG, b"x")
    with _fetcher(tmp_path, use_cache=False, max_per_host=2, per_host_rate=20.0, workers=8) as f:
        url_consent([f"{site.origin}/{i}.jpg" for i in range(8)], f)
    assert len(site.log) == 11 and site.max_in_flight <= 2
    starts = sorted(t for t, _ in site.log)
    assert starts[-1] - starts[0] >= 10 / 20.0 * 0.9  # 11 starts spaced 1/20 s apart


def test_invalid_urls_get_a_signal_not_an_exception(tmp_path):
    with _fetcher(tmp_path) as f:
        out = url_consent(["ftp://example.org/a.jpg", "not a url", "", "http://:80/x", "http://h:99999/"], f)
    assert all(c.training == "unknown" and c.signals[0].value == "invalid" for c in out.values())
    assert "http and https" in out["ftp://example.org/a.jpg"].signals[0].detail


def test_cli_consent_check(site, tmp_path):
    from provenance.cli import app

    site.routes["/robots.txt"] = (200, TEXT, b"User-agent: CCBot\nDisallow: /\n")
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# corpus URLs\n{site.origin}/a.jpg\n\n{site.origin}/b.jpg\nftp://x/y\n")
    cache = str(tmp_path / "cli.sqlite")
    res = CliRunner().invoke(app, ["consent", "check", "--file", str(urls), "--json", "--cache", cache,
                                   "--allow-private-addresses", "--rate", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["consent"]["training"] for r in rows] == ["not_allowed", "not_allowed", "unknown"]
    assert rows[0]["consent"]["signals"][0]["agents"] == ["CCBot"]
    # Without the flag, what the cache holds from the loopback site is not used: the URL is refused.
    res = CliRunner().invoke(app, ["consent", "check", f"{site.origin}/a.jpg", "--cache", cache, "--json"])
    assert res.exit_code == 0
    (row,) = json.loads(res.stdout)
    assert row["consent"]["training"] == "unknown" and "refused" in row["consent"]["signals"][0]["detail"]
    res = CliRunner().invoke(app, ["consent", "check", f"{site.origin}/a.jpg", "--cache", cache,
                                   "--allow-private-addresses", "--offline"])  # fmt: skip
    assert res.exit_code == 0 and "not_allowed" in res.stdout and "robots.txt" in res.stdout
    res = CliRunner().invoke(app, ["consent", "check"])
    assert res.exit_code == 2 and "give URLs" in res.output
    (tmp_path / "not-a-db.sqlite").write_bytes(b"this is not a SQLite file" * 100)
    res = CliRunner().invoke(
        app, ["consent", "check", "http://example.org/", "--cache", str(tmp_path / "not-a-db.sqlite")]
    )
    assert res.exit_code == 2 and "cannot open the consent cache" in res.output


def test_non_ascii_url_path_and_query_reach_the_server(site, tmp_path):
    (c,) = _check(site, tmp_path, "/bilder/größe 1.jpg?q=ü&x=%2F")
    assert c.signals == ()
    assert "/bilder/gr%C3%B6%C3%9Fe%201.jpg?q=%C3%BC&x=%2F" in {path for _, path in site.log}
