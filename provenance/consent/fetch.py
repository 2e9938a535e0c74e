"""The polite, SSRF-guarded fetcher of consent files and headers, with its SQLite TTL cache.

Polite: per-host concurrency and a per-host rate limit, timeouts, a byte cap on every body, and a
cache (robots.txt is meant to be cached for up to a day, RFC 9309). Guarded: http(s) only; the host
is resolved here and the connection goes to the address that was checked (no second lookup a
DNS-rebinding server could answer differently); private, loopback, link-local, multicast and
reserved addresses are refused unless `allow_private_addresses`; every redirect hop is checked the
same way; no proxy or netrc from the environment is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import SplitResult, quote, urljoin, urlsplit

from provenance.errors import ConsentCacheError

if TYPE_CHECKING:
    import httpx  # imported when the first request is sent: a run answered from the cache never needs it

logger = logging.getLogger(__name__)

BodyMode = Literal["always", "html"]  # "html": read the body only when the response is an HTML page
# Response headers the consent readers use; nothing else is kept in the cache.
KEPT_HEADERS = ("content-type", "tdm-reservation", "tdm-policy", "x-robots-tag")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CACHE_SCHEMA = 1  # bump (and rename the table) when the row layout changes


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/provenance/consent.sqlite (~/.cache/... when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "provenance" / "consent.sqlite"


@dataclass(frozen=True)
class FetchOptions:
    """How consent files are fetched; validated once here (the CLI flags mirror these fields)."""

    timeout_s: float = 10.0  # connect, each read, and the whole of one hop
    max_per_host: int = 2  # concurrent requests to one host
    per_host_rate: float = 2.0  # request starts per second to one host; 0 = no limit
    workers: int = 8  # concurrent requests in all
    max_redirects: int = 5  # RFC 9309 asks crawlers to follow at least five
    allow_private_addresses: bool = False  # SSRF guard off: for tests and intranet corpora only
    cache_path: Path | None = None  # None: default_cache_path()
    use_cache: bool = True
    ttl_s: float = 24 * 3600.0  # RFC 9309: a robots.txt may be cached for up to 24 hours
    error_ttl_s: float = 3600.0  # unreachable hosts are retried sooner
    offline: bool = False  # answer from the cache only; a miss is an `unknown` signal
    user_agent: str = "provenance-consent/0.1 (+https://github.com/provenance; reads AI-training reservations)"

    def __post_init__(self) -> None:
        for name in ("timeout_s", "ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_per_host", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.per_host_rate < 0 or self.error_ttl_s < 0 or self.max_redirects < 0:
            raise ValueError("per_host_rate, error_ttl_s and max_redirects must be >= 0")


@dataclass(frozen=True)
class FetchRequest:
    """One GET to make: its URL, the body's byte cap, and whether to read the body at all."""

    url: str
    max_bytes: int
    body: BodyMode = "always"

    @functools.cached_property
    def key(self) -> str:
        return f"{self.body}:{self.max_bytes}:{self.url}"


@dataclass(frozen=True)
class FetchResult:
    """What one GET gave: status and kept headers, the body up to its cap, or an error message."""

    url: str
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names, KEPT_HEADERS only
    body: bytes | None = None
    truncated: bool = False  # the body was longer than the cap; `body` is its first max_bytes
    final_url: str | None = None  # after redirects
    error: str | None = None  # network failure, refusal, too many redirects...
    from_cache: bool = False
    private: bool = False  # some hop went to a non-public address (allowed by allow_private_addresses)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    def text(self) -> str:
        """The body as text; a truncated body loses its last, partial line."""
        t = (self.body or b"").decode("utf-8", errors="replace")
        if self.truncated and "\n" in t:
            t = t.rsplit("\n", 1)[0]
        return t


class RefusedURLError(Exception):
    """A URL (or a redirect hop) the guard refuses: not http(s), no host, or a private address."""


class _UnresolvableHostError(Exception):
    """A host name the resolver cannot resolve: an unreachable site, not a refusal."""


def address_refusal(ip: str) -> str | None:
    """Why `ip` may not be fetched by default (private, loopback...), or None for a public address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    # Most specific first: 169.254/16 is also "private" to ipaddress, but "link-local" says more.
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(addr, f"is_{kind}"):
            return f"{addr} is a {kind.replace('_', '-')} address"
    if not addr.is_global:
        return f"{addr} is not a public address"
    return None


class ConsentCache:
    """SQLite cache of FetchResults by request key, each with an expiry time. Thread-safe (one lock)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._written = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._init_schema()
        except (OSError, sqlite3.Error) as e:
            raise ConsentCacheError(
                f"{self.path}: cannot open the consent cache ({e}); pass another --cache path"
            ) from None

    def _init_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS fetches (key TEXT PRIMARY KEY, expires_at REAL NOT NULL, "
            "fetched_at REAL NOT NULL, url TEXT NOT NULL, status INTEGER, headers TEXT, body BLOB, "
            "truncated INTEGER NOT NULL, final_url TEXT, error TEXT, private INTEGER NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(_CACHE_SCHEMA),))

    def get_many(
        self, keys: Sequence[str], now: float | None = None, *, private: bool = False
    ) -> dict[str, FetchResult]:
        """The unexpired entries among `keys` (read in chunks of 500: SQLite's bound-parameter limit).

        Entries fetched from private addresses are returned only with `private=True`: a run without
        --allow-private-addresses must not be answered with what an earlier run fetched from an intranet.
        """
        now = time.time() if now is None else now
        out: dict[str, FetchResult] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                rows = self._db.execute(
                    "SELECT key, url, status, headers, body, truncated, final_url, error FROM fetches "
                    f"WHERE expires_at > ? AND private <= ? AND key IN ({','.join('?' * len(chunk))})",
                    [now, int(private), *chunk],
                )
                for key, url, status, headers, body, truncated, final_url, error in rows:
                    hdrs = json.loads(headers) if headers else {}
                    out[key] = FetchResult(
                        url, status, hdrs, body, bool(truncated), final_url, error, from_cache=True, private=private
                    )
        return out

    def put(self, key: str, r: FetchResult, ttl_s: float) -> None:
        now = time.time()
        with self._lock:
            self._written = True
            self._db.execute(
                "INSERT OR REPLACE INTO fetches VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (key, now + ttl_s, now, r.url, r.status, json.dumps(r.headers), r.body, int(r.truncated),
                 r.final_url, r.error, int(r.private)),
            )  # fmt: skip

    def close(self) -> None:
        """Close, first dropping expired entries if this session wrote any (so the file does not only grow)."""
        with self._lock:
            if self._written:
                self._db.execute("DELETE FROM fetches WHERE expires_at < ?", (time.time(),))
            self._db.close()


class _HostGate:
    """At most `concurrency` requests in flight to one host, and request starts spaced 1/rate s apart."""

    def __init__(self, concurrency: int, rate: float) -> None:
        self._sem = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self._next = 0.0
        self._interval = 1.0 / rate if rate > 0 else 0.0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        with self._sem:
            with self._lock:
                now = time.monotonic()
                wait = self._next - now
                self._next = max(now, self._next) + self._interval
            if wait > 0:
                time.sleep(wait)
            yield


Resolver = Callable[[str, int], list[str]]


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _httpx() -> Any:
    from provenance.extras import require

    return require("httpx", "fetching consent signals for URLs")


class Fetcher:
    """Fetches FetchRequests politely and safely, answering from the cache when it can.

    `resolve(host, port) -> [ip, ...]` is injectable (tests map names to loopback); by default the
    system resolver. Use as a context manager, or call close().
    """

    def __init__(self, options: FetchOptions | None = None, *, resolve: Resolver | None = None) -> None:
        self.options = options or FetchOptions()
        self._resolve = resolve or _system_resolve
        o = self.options
        self.cache = ConsentCache(o.cache_path or default_cache_path()) if o.use_cache else None
        self._client_instance: httpx.Client | None = None  # made on the first miss: a warm cache needs none
        self._gates: dict[str, _HostGate] = {}
        self._gates_lock = threading.Lock()

    @property
    def _client(self) -> httpx.Client:
        httpx = _httpx()
        with self._gates_lock:
            if self._client_instance is None:
                o = self.options
                self._client_instance = httpx.Client(
                    follow_redirects=False, trust_env=False, timeout=httpx.Timeout(o.timeout_s),
                    limits=httpx.Limits(max_connections=o.workers, max_keepalive_connections=o.workers),
                )  # fmt: skip
            return self._client_instance

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._client_instance is not None:
            self._client_instance.close()
        if self.cache is not None:
            self.cache.close()

    # ------------------------------------------------------------------------------------ batch

    def fetch_many(self, requests: Sequence[FetchRequest]) -> dict[str, FetchResult]:
        """{request.key: result} for every request: cached ones read in one pass, the rest fetched in parallel."""
        unique = {r.key: r for r in requests}
        private = self.options.allow_private_addresses
        out: dict[str, FetchResult] = self.cache.get_many(list(unique), private=private) if self.cache else {}
        missing = [r for k, r in unique.items() if k not in out]
        if not missing:
            return out
        if self.options.offline:
            for r in missing:
                out[r.key] = FetchResult(r.url, error="not in the consent cache (offline: nothing fetched)")
            return out
        logger.info("consent: fetching %d of %d (the rest from the cache)", len(missing), len(unique))
        self._client  # noqa: B018 - made here, so a missing httpx is one clear error, not one per URL
        with ThreadPoolExecutor(max_workers=min(self.options.workers, len(missing))) as pool:
            for r, result in zip(missing, pool.map(self._fetch_and_store, missing), strict=False):
                out[r.key] = result
        return out

    def fetch(self, request: FetchRequest) -> FetchResult:
        return self.fetch_many([request])[request.key]

    def _fetch_and_store(self, request: FetchRequest) -> FetchResult:
        try:
            result = self._fetch(request)
        except RefusedURLError as e:
            # Not cached: whether a URL is refused depends on this run's options, not on the site.
            return FetchResult(request.url, error=f"refused: {e}")
        except Exception as e:
            logger.exception("consent: fetching %s failed", request.url[:200])
            return FetchResult(request.url, error=f"{type(e).__name__}: {e}")
        if self.cache is not None:
            ttl = self.options.error_ttl_s if result.error or (result.status or 0) >= 500 else self.options.ttl_s
            if ttl > 0:
                self.cache.put(request.key, result, ttl)
        return result

    # ------------------------------------------------------------------------------------- one

    def _fetch(self, request: FetchRequest) -> FetchResult:
        httpx = _httpx()
        url = request.url
        private = False
        for hop in range(self.options.max_redirects + 1):
            parts = urlsplit(url)
            try:
                host, port, ip = self._checked_address(url)
            except RefusedURLError as e:
                if hop == 0:
                    raise
                raise RefusedURLError(f"redirect to {url[:200]}: {e}") from None
            except _UnresolvableHostError as e:
                return FetchResult(request.url, error=str(e) if hop == 0 else f"redirect to {url[:200]}: {e}")
            private = private or (self.options.allow_private_addresses and address_refusal(ip) is not None)
            try:
                with self._gate(host).slot():
                    response = self._send(parts.scheme, host, port, ip, parts)
                    try:
                        if response.status_code in _REDIRECTS and "location" in response.headers:
                            url = urljoin(url, response.headers["location"])
                            continue
                        return dataclasses.replace(self._read(request, url, response), private=private)
                    finally:
                        response.close()
            except httpx.TimeoutException:
                return FetchResult(
                    request.url, error=f"{host}: timed out after {self.options.timeout_s:g} s", private=private
                )
            except (httpx.HTTPError, OSError) as e:
                return FetchResult(request.url, error=f"{host}: {type(e).__name__}: {e}", private=private)
        return FetchResult(request.url, error=f"more than {self.options.max_redirects} redirects (a redirect loop?)",
                           private=private)  # fmt: skip

    def _checked_address(self, url: str) -> tuple[str, int, str]:
        """(host, port, the IP to connect to) for `url`, or RefusedURLError saying why not."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RefusedURLError(f"{url[:200]!r} is not an http(s) URL")
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise RefusedURLError(f"{url[:200]!r} has no host")
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")  # the Host header and SNI are ASCII
            except UnicodeError:
                raise RefusedURLError(f"{url[:200]!r} has an invalid host name") from None
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise RefusedURLError(f"{url[:200]!r} has an invalid port") from None
        try:
            ips = self._resolve(host, port)
        except (OSError, UnicodeError) as e:
            raise _UnresolvableHostError(f"{host} does not resolve ({e})") from None
        if not ips:
            raise _UnresolvableHostError(f"{host} does not resolve")
        if self.options.allow_private_addresses:
            return host, port, ips[0]
        reasons = []
        for ip in ips:
            reason = address_refusal(ip)
            if reason is None:
                return host, port, ip
            reasons.append(reason)
        where = "" if ips == [host] else f"{host}: "
        raise RefusedURLError(f"{where}{reasons[0]} (pass --allow-private-addresses to allow)")

    def _gate(self, host: str) -> _HostGate:
        with self._gates_lock:
            gate = self._gates.get(host)
            if gate is None:
                gate = self._gates[host] = _HostGate(self.options.max_per_host, self.options.per_host_rate)
            return gate

    def _send(self, scheme: str, host: str, port: int, ip: str, parts: SplitResult) -> httpx.Response:
        httpx = _httpx()
        # Connect to the checked IP; Host and (for https) SNI and certificate checks use the name.
        default_port = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal
        host_header = name if port == default_port else f"{name}:{port}"
        raw_path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        raw_path = quote(raw_path, safe="/?%:@!$&'()*+,;=-._~[]")  # non-ASCII (an IRI) percent-encoded; escapes kept
        target = httpx.URL(scheme=scheme, host=ip, port=port, raw_path=raw_path.encode("ascii"))
        headers = {"Host": host_header, "User-Agent": self.options.user_agent, "Accept-Encoding": "identity"}
        extensions = {"sni_hostname": host} if scheme == "https" and host != ip else {}
        request = self._client.build_request("GET", target, headers=headers, extensions=extensions)
        return self._client.send(request, stream=True)

    def _read(self, request: FetchRequest, url: str, response: httpx.Response) -> FetchResult:
        headers = {}
        for name in KEPT_HEADERS:
            values = response.headers.get_list(name)
            if values:
                headers[name] = ", ".join(values)[:4096]
        body, truncated = None, False
        is_html = "html" in headers.get("content-type", "").lower()
        if request.body == "always" or is_html:
            deadline = time.monotonic() + self.options.timeout_s
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if size > request.max_bytes:
                    truncated = True
                    break
                if time.monotonic() > deadline:
                    return FetchResult(request.url, error=f"body not read within {self.options.timeout_s:g} s")
            body = b"".join(chunks)[: request.max_bytes]
        return FetchResult(request.url, response.status_code, headers, body, truncated, url)
