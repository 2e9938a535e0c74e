"""The do-not-train registry: opt-outs by content, corpus id, URL and domain, in one SQLite file.

An opt-out by **content** keeps an image's SSCD vector (float16) and PDQ hash, and covers every corpus item that
`scan` would call `exact` or `replica` against it (the scanner's own `decide_verdict` and `Thresholds`), so an
edited re-upload of an opted-out artwork is covered too. Opt-outs by **id**, **URL** (normalised) and **domain**
(subdomains included) cover what they name. Each records who claimed it, when, through which API key (a key id:
a hash, never the key), and whether ownership was `shown` (a domain owner served our token at
`/.well-known/provenance-optout.txt`) or only `asserted`. Only the key that made an opt-out, or an admin, may
remove it. Every change is appended to an audit log that SQLite triggers keep append-only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from provenance.errors import (
    DomainProofError,
    InvalidOptoutError,
    OptoutForbiddenError,
    OptoutNotFoundError,
    RegistryError,
)
from provenance.options import Thresholds

if TYPE_CHECKING:
    from provenance.search import Searcher
    from provenance.store import ProvenanceIndex
    from provenance.types import Match

logger = logging.getLogger(__name__)

OptoutKind = Literal["content", "id", "url", "domain"]
KINDS: tuple[OptoutKind, ...] = ("content", "id", "url", "domain")
Ownership = Literal["shown", "asserted"]
PROOF_PATH = "/.well-known/provenance-optout.txt"
PROOF_MAX_BYTES = 16 * 1024  # the proof file is one token a line: anything bigger is not ours to read
CLI_KEY_ID = "cli"  # opt-outs made on the command line (whoever can write the registry file is its owner)
MAX_VALUE_CHARS = 2048
# Content coverage: neighbours searched per descriptor (doubling from the first figure while the last one still
# scores as a copy), and the most an opt-out may cover in one index.
CONTENT_K = (100, 1000)
_SCHEMA = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def key_id(key: str) -> str:
    """The id an API key is recorded under: the first 16 hex of its sha256 (the raw key is never stored)."""
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- normalising


def normalise_url(url: str) -> str:
    """http(s) URL with lower-case scheme and host (IDNA), no default port, user info or fragment; path kept."""
    s = str(url).strip()
    if not s or len(s) > MAX_VALUE_CHARS:
        raise InvalidOptoutError(f"URL {s[:80]!r}: empty or longer than {MAX_VALUE_CHARS} characters")
    try:
        p = urlsplit(s)
        port = p.port
    except ValueError as e:
        raise InvalidOptoutError(f"URL {s[:200]!r}: {e}") from None
    scheme = p.scheme.lower()
    if scheme not in ("http", "https") or not p.hostname:
        raise InvalidOptoutError(f"URL {s[:200]!r}: only http(s) URLs with a host can be opted out")
    host = normalise_domain(p.hostname, what="URL host") if not _is_ip(p.hostname) else p.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, p.path or "/", p.query, ""))


def _is_ip(host: str) -> bool:
    import ipaddress

    if ":" not in host and not host.replace(".", "").isdigit():
        return False  # a name (the usual case): no exception raised and caught per URL
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def normalise_domain(domain: str, what: str = "domain") -> str:
    """Lower-case ASCII (IDNA) domain, without a leading `*.` or trailing dot; at least two labels."""
    d = str(domain).strip().lower().rstrip(".")
    d = d.removeprefix("*.")
    if "://" in d or "/" in d:
        raise InvalidOptoutError(f"{what} {domain[:200]!r}: give a bare domain name (example.com), not a URL")
    try:
        if not d.isascii():
            d = d.encode("idna").decode("ascii")
    except UnicodeError:
        raise InvalidOptoutError(f"{what} {domain[:200]!r}: not a valid domain name") from None
    labels = d.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or len(d) > 253:
        raise InvalidOptoutError(f"{what} {domain[:200]!r}: not a valid domain name (e.g. example.com)")
    return d


def domain_suffixes(host: str) -> list[str]:
    """'a.b.example.com' -> ['a.b.example.com', 'b.example.com', 'example.com']: the domains that cover it."""
    labels = host.lower().rstrip(".").split(".")
    return [".".join(labels[i:]) for i in range(len(labels) - 1)]


def url_host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        h = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    return h.lower().rstrip(".") if h else None


def _normalised_host(url: str | None) -> str | None:
    """The host of a `normalise_url` result (canonical: no user info, lower case), without parsing it again;
    None for an IP literal (no domain covers it)."""
    if not url:
        return None
    host = url.split("://", 1)[1].split("/", 1)[0]
    return None if host.startswith("[") else host.split(":", 1)[0]


def check_sha256(value: str) -> str:
    v = str(value).strip().lower()
    if not _SHA256.match(v):
        raise InvalidOptoutError(f"{str(value)[:80]!r} is not a sha256 hash (64 hexadecimal characters)")
    return v


# ------------------------------------------------------------------------------------------ types


@dataclass(frozen=True)
class ContentPrint:
    """What a content opt-out keeps of an image: its file hash, SSCD vector and PDQ hash."""

    sha256: str
    sscd: np.ndarray | None  # (d,) float32, L2-normalised
    pdq: np.ndarray | None  # (32,) uint8, the 256-bit hash packed
    sscd_model: str | None  # "model_id:checksum" of the SSCD model: vectors of another model do not compare


@dataclass(frozen=True)
class NewOptout:
    """An opt-out to register (validated by `Registry.add_many`)."""

    kind: OptoutKind
    value: str = ""  # id, URL, domain; for content the image's sha256 (filled from `content`)
    content: ContentPrint | None = None
    claimant: str | None = None
    prove: bool = False  # domain: fetch the proof file now (ownership `shown`), or fail


@dataclass(frozen=True)
class Optout:
    id: str
    kind: OptoutKind
    value: str
    claimant: str | None
    key_id: str | None
    created_at: str
    ownership: Ownership
    sscd_model: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "value": self.value,
            "claimant": self.claimant,
            "key_id": self.key_id,
            "created_at": self.created_at,
            "ownership": self.ownership,
        }
        if self.sscd_model:
            d["sscd_model"] = self.sscd_model
        if self.detail:
            d["detail"] = self.detail
        return d

    def reason(self, **extra: Any) -> dict[str, Any]:
        """What a match, a skipped item or a consent answer carries: which opt-out covers it, and why."""
        return {
            "optout": self.id,
            "by": self.kind,
            "value": self.value,
            "claimant": self.claimant,
            "ownership": self.ownership,
            **extra,
        }


@dataclass(frozen=True)
class ProofOptions:
    """How a domain proof is fetched: through the consent fetcher and its SSRF guard (no cache: a proof is live)."""

    scheme: str = "https"
    port: int | None = None  # tests: the loopback server's port
    allow_private_addresses: bool = False
    timeout_s: float = 10.0
    resolve: Any = None  # (host, port) -> [ip]; tests map a test domain to loopback


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------- registry


_DDL = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS optouts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('content', 'id', 'url', 'domain')),
    value TEXT NOT NULL,
    claimant TEXT,
    key_id TEXT,
    created_at TEXT NOT NULL,
    ownership TEXT NOT NULL CHECK (ownership IN ('shown', 'asserted')),
    sscd BLOB,          -- (d,) float16 little-endian, content opt-outs only
    pdq BLOB,           -- 32 bytes, content opt-outs only
    sscd_model TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS optouts_value ON optouts (kind, value);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    optout_id TEXT NOT NULL,
    kind TEXT,
    value TEXT,
    key_id TEXT,
    claimant TEXT,
    detail TEXT
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_COLUMNS = "id, kind, value, claimant, key_id, created_at, ownership, sscd_model, detail"


class Registry:
    """One registry file. Thread-safe (one connection behind a lock); several processes may share the file
    (SQLite WAL, each write one transaction)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise RegistryError(f"no opt-out registry at {self.path}: create one with `provenance optout add`")
        self._lock = threading.RLock()
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_DDL)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(_SCHEMA),))
            # the secret domain tokens are derived from: made once per registry, never leaves the file
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('token_secret', ?)", (secrets.token_hex(32),))
            self._secret = self._db.execute("SELECT v FROM meta WHERE k = 'token_secret'").fetchone()[0]
        except (OSError, sqlite3.Error) as e:
            raise RegistryError(f"{self.path}: cannot open the opt-out registry ({e})") from None
        self._content: dict[str | None, tuple[int, ContentMatcher]] = {}

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _version(self) -> int:
        # PRAGMA data_version changes when another connection commits; our own writes bump `_writes`
        return int(self._db.execute("PRAGMA data_version").fetchone()[0]) * 1_000_003 + getattr(self, "_writes", 0)

    # -- writing

    def domain_token(self, domain: str, key: str | None = CLI_KEY_ID) -> str:
        """The token a domain owner serves at https://DOMAIN/.well-known/provenance-optout.txt to show ownership:
        derived from the registry's secret, the domain and the claiming key id, so it is stable and unforgeable."""
        d = normalise_domain(domain)
        mac = hmac.new(self._secret.encode(), f"{d}|{key or ''}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"provenance-optout={mac}"

    def add_many(
        self, entries: Sequence[NewOptout], key: str | None = CLI_KEY_ID, proof: ProofOptions | None = None
    ) -> list[Optout]:
        """Register every entry in one transaction (all or none); an entry already registered (same kind and
        value) is returned as it is, except that a domain proven now is upgraded to ownership `shown`.
        Raises InvalidOptoutError for a bad value, DomainProofError for a proof that fails (nothing written)."""
        # 1. Validate everything (and fetch domain proofs) before writing anything
        rows: list[tuple[NewOptout, str]] = []
        for e in entries:
            if e.kind not in KINDS:
                raise InvalidOptoutError(f"unknown opt-out kind {e.kind!r}: use one of {', '.join(KINDS)}")
            if e.claimant is not None and len(e.claimant) > 500:
                raise InvalidOptoutError("claimant: at most 500 characters")
            if e.kind == "content":
                if e.content is None:
                    raise InvalidOptoutError("a content opt-out needs an image")
                value = e.content.sha256
            elif e.kind == "id":
                value = str(e.value)
                if not value or len(value) > MAX_VALUE_CHARS:
                    raise InvalidOptoutError(f"id {value[:80]!r}: empty or longer than {MAX_VALUE_CHARS} characters")
            elif e.kind == "url":
                value = normalise_url(e.value)
            else:
                value = normalise_domain(e.value)
            rows.append((e, value))
        proven = {value for e, value in rows if e.kind == "domain" and e.prove}
        for d in sorted(proven):
            self.prove_domain(d, key, proof)
        # 2. One transaction: the opt-outs and their audit lines
        out: list[Optout] = []
        now = _now()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for e, value in rows:
                    model = e.content.sscd_model if e.content is not None else None
                    old = self._find(e.kind, value, model)
                    if old is not None:
                        if e.kind == "domain" and value in proven and old.ownership != "shown":
                            self._db.execute("UPDATE optouts SET ownership = 'shown' WHERE id = ?", (old.id,))
                            self._audit(now, "prove", old, key, {"proof": PROOF_PATH})
                            old = replace(old, ownership="shown")
                        out.append(old)
                        continue
                    o = Optout(
                        id=uuid.uuid4().hex,
                        kind=e.kind,
                        value=value,
                        claimant=e.claimant,
                        key_id=key,
                        created_at=now,
                        ownership="shown" if value in proven and e.kind == "domain" else "asserted",
                        sscd_model=model,
                    )
                    c = e.content
                    self._db.execute(
                        f"INSERT INTO optouts ({_COLUMNS}, sscd, pdq) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (
                            o.id,
                            o.kind,
                            o.value,
                            o.claimant,
                            o.key_id,
                            o.created_at,
                            o.ownership,
                            o.sscd_model,
                            None,
                            None if c is None or c.sscd is None else np.asarray(c.sscd, "<f2").tobytes(),
                            None if c is None or c.pdq is None else np.asarray(c.pdq, np.uint8).tobytes(),
                        ),
                    )
                    self._audit(now, "add", o, key, None)
                    out.append(o)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._writes = getattr(self, "_writes", 0) + 1
        return out

    def add(self, entry: NewOptout, key: str | None = CLI_KEY_ID, proof: ProofOptions | None = None) -> Optout:
        return self.add_many([entry], key, proof)[0]

    def remove(self, optout_id: str, key: str | None = CLI_KEY_ID, admin: bool = False) -> Optout:
        """Delete an opt-out: only the key that made it, or an admin, may (OptoutForbiddenError otherwise)."""
        with self._lock:
            o = self.get(optout_id)
            if not admin and o.key_id != key:
                raise OptoutForbiddenError(
                    f"opt-out {optout_id} was made by another key: only that key or an admin key may remove it"
                )
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("DELETE FROM optouts WHERE id = ?", (optout_id,))
                self._audit(_now(), "remove", o, key, {"admin": admin} if admin else None)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._writes = getattr(self, "_writes", 0) + 1
        return o

    def _audit(self, at: str, action: str, o: Optout, key: str | None, detail: dict[str, Any] | None) -> None:
        self._db.execute(
            "INSERT INTO audit (at, action, optout_id, kind, value, key_id, claimant, detail) VALUES (?,?,?,?,?,?,?,?)",
            (at, action, o.id, o.kind, o.value, key, o.claimant, json.dumps(detail) if detail else None),
        )

    def prove_domain(self, domain: str, key: str | None, proof: ProofOptions | None = None) -> None:
        """Fetch https://DOMAIN/.well-known/provenance-optout.txt through the consent fetcher (SSRF guard on) and
        check it holds this key's token; DomainProofError naming what went wrong otherwise."""
        from provenance.consent.fetch import Fetcher, FetchOptions, FetchRequest

        p = proof or ProofOptions()
        d = normalise_domain(domain)
        url = f"{p.scheme}://{d}{'' if p.port is None else f':{p.port}'}{PROOF_PATH}"
        token = self.domain_token(d, key)
        opts = FetchOptions(
            use_cache=False, allow_private_addresses=p.allow_private_addresses, timeout_s=p.timeout_s, max_redirects=2
        )
        with Fetcher(opts, resolve=p.resolve) as fetcher:
            r = fetcher.fetch(FetchRequest(url, PROOF_MAX_BYTES))
        if r.error:
            raise DomainProofError(f"domain {d}: cannot fetch {url} ({r.error})")
        if not r.ok:
            raise DomainProofError(f"domain {d}: {url} answered HTTP {r.status}; serve the token there")
        if token not in {line.strip() for line in r.text().splitlines()}:
            raise DomainProofError(
                f"domain {d}: {url} does not hold this key's token; serve the line "
                f"`{token}` there (from `provenance optout add --domain {d}`)"
            )

    # -- reading

    def _row(self, r: tuple[Any, ...]) -> Optout:
        return Optout(
            id=r[0],
            kind=r[1],
            value=r[2],
            claimant=r[3],
            key_id=r[4],
            created_at=r[5],
            ownership=r[6],
            sscd_model=r[7],
            detail=json.loads(r[8]) if r[8] else {},
        )

    def _find(self, kind: str, value: str, model: str | None = None) -> Optout | None:
        r = self._db.execute(
            f"SELECT {_COLUMNS} FROM optouts WHERE kind = ? AND value = ? AND coalesce(sscd_model, '') = ?",
            (kind, value, model or ""),
        ).fetchone()
        return self._row(r) if r else None

    def find_content(self, content: ContentPrint) -> Optout | None:
        """The content opt-out already registered for this image file (same hash and SSCD model), or None."""
        with self._lock:
            return self._find("content", content.sha256, content.sscd_model)

    def get(self, optout_id: str) -> Optout:
        with self._lock:
            r = self._db.execute(f"SELECT {_COLUMNS} FROM optouts WHERE id = ?", (str(optout_id),)).fetchone()
        if r is None:
            raise OptoutNotFoundError(f"no opt-out {optout_id!r} in the registry")
        return self._row(r)

    def page(self, kind: str | None = None, limit: int | None = None, after: str | None = None) -> list[Optout]:
        """Opt-outs in id order (`after` an id, at most `limit`): pages for export."""
        q = f"SELECT {_COLUMNS} FROM optouts WHERE id > ?"
        args: list[Any] = [after or ""]
        if kind is not None:
            q += " AND kind = ?"
            args.append(kind)
        q += " ORDER BY id" + (" LIMIT ?" if limit else "")
        if limit:
            args.append(limit)
        with self._lock:
            return [self._row(r) for r in self._db.execute(q, args)]

    def iter_all(self, kind: str | None = None, page: int = 10_000) -> Iterator[Optout]:
        after = None
        while True:
            rows = self.page(kind, page, after)
            yield from rows
            if len(rows) < page:
                return
            after = rows[-1].id

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM optouts").fetchone()[0])

    def audit_log(self, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, at, action, optout_id, kind, value, key_id, claimant, detail "
                "FROM audit ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("seq", "at", "action", "optout_id", "kind", "value", "key_id", "claimant", "detail")
        return [dict(zip(keys, (*r[:-1], json.loads(r[-1]) if r[-1] else None), strict=False)) for r in rows]

    # -- matching

    def _lookup(self, kind: str, values: Iterable[str]) -> dict[str, Optout]:
        """{value: its opt-out} for the values registered under `kind` (SQLite IN lists of 500)."""
        vals = list(dict.fromkeys(v for v in values if v))
        out: dict[str, Optout] = {}
        with self._lock:
            for i in range(0, len(vals), 500):
                chunk = vals[i : i + 500]
                for r in self._db.execute(
                    f"SELECT {_COLUMNS} FROM optouts WHERE kind = ? AND value IN "
                    f"({','.join('?' * len(chunk))}) ORDER BY created_at",
                    [kind, *chunk],
                ):
                    out.setdefault(r[2], self._row(r))
        return out

    def match_ids(self, ids: Sequence[str]) -> dict[str, Optout]:
        return self._lookup("id", ids)

    def match_urls(self, urls: Sequence[str | None]) -> list[Optout | None]:
        """Per URL, the opt-out covering it by URL, else by its domain (or a parent domain), else None."""
        norm: list[str | None] = []
        for u in urls:
            try:
                norm.append(normalise_url(u) if u else None)
            except InvalidOptoutError:
                norm.append(None)  # not an http(s) URL: nothing registered can name it
        by_url = self._lookup("url", [u for u in norm if u])
        hosts = [_normalised_host(u) for u in norm]
        by_domain = self._lookup("domain", [s for h in hosts if h for s in domain_suffixes(h)])
        out: list[Optout | None] = []
        for u, h in zip(norm, hosts, strict=False):
            o = by_url.get(u) if u else None
            if o is None and h:
                o = next((by_domain[s] for s in domain_suffixes(h) if s in by_domain), None)
            out.append(o)
        return out

    def match_sha256(self, shas: Sequence[str | None]) -> dict[str, Optout]:
        """Content opt-outs of these exact files (any model)."""
        return self._lookup("content", [s for s in shas if s])

    def content_matcher(self, sscd_model: str | None) -> ContentMatcher:
        """The content opt-outs whose SSCD vectors come from `sscd_model` (and every PDQ hash), as matrices;
        remade when the registry changed."""
        with self._lock:
            version = self._version()
            cached = self._content.get(sscd_model)
            if cached is not None and cached[0] == version:
                return cached[1]
            rows = self._db.execute(f"SELECT {_COLUMNS}, sscd, pdq FROM optouts WHERE kind = 'content'").fetchall()
            matcher = ContentMatcher.from_rows([(self._row(r[:9]), r[9], r[10]) for r in rows], sscd_model)
            self._content[sscd_model] = (version, matcher)
            return matcher

    def reasons(
        self,
        items: Sequence[dict[str, Any]],
        vectors: dict[str, np.ndarray] | None = None,
        sscd_model: str | None = None,
        thresholds: Thresholds | None = None,
    ) -> list[dict[str, Any] | None]:
        """Per corpus item ({"id", "source", "sha256"}), why it is opted out (`Optout.reason`), or None.
        `vectors` ({"sscd": (n, d), "pdq": (n, 32) uint8}, rows as `items`) enable the content check."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        by_id = self.match_ids([str(it.get("id")) for it in items])
        by_url = self.match_urls([it.get("source") for it in items])
        by_sha = self.match_sha256([it.get("sha256") for it in items])
        for i, it in enumerate(items):
            o = by_id.get(str(it.get("id")))
            if o is not None:
                out[i] = o.reason()
            elif (u := by_url[i]) is not None:
                out[i] = u.reason()
            elif it.get("sha256") in by_sha:
                out[i] = by_sha[it["sha256"]].reason(verdict="exact")
        todo = [i for i, r in enumerate(out) if r is None]
        if vectors and todo:
            matcher = self.content_matcher(sscd_model)
            if len(matcher):
                sub = {n: np.asarray(x)[todo] for n, x in vectors.items() if n in ("sscd", "pdq")}
                for i, hit in zip(todo, matcher.covers(sub, thresholds or Thresholds()), strict=False):
                    if hit is not None:
                        out[i] = hit[0].reason(verdict=hit[1], **hit[2])
        return out

    # -- export

    def export_lines(self, fmt: str, index: ProvenanceIndex | None = None) -> Iterator[str]:
        """`urls`: one URL per line (an img2dataset blocklist; with an index, the sources of covered items too);
        `ids`: opted-out ids (with an index, every covered live item id); `sha256`: content opt-outs' file hashes
        (with an index, covered items' hashes too)."""
        if fmt not in ("urls", "ids", "sha256"):
            raise InvalidOptoutError(f"export format {fmt!r}: use urls, ids, sha256 or parquet")
        seen: set[str] = set()

        def once(v: str | None) -> Iterator[str]:
            if v and v not in seen:
                seen.add(v)
                yield v

        kind = {"urls": "url", "ids": "id", "sha256": "content"}[fmt]
        for o in self.iter_all(kind):
            yield from once(o.value)
        if index is not None:
            column = {"urls": "source", "ids": "id", "sha256": "sha256"}[fmt]
            for item, _reason in covered_items(self, index):
                yield from once(item.get(column))

    def export_parquet(self, path: str | os.PathLike[str], index: ProvenanceIndex | None = None) -> int:
        """Every opt-out (and, with an index, every covered item) as one Parquet table; returns its rows."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [
            {
                "optout_id": o.id,
                "kind": o.kind,
                "value": o.value,
                "claimant": o.claimant,
                "key_id": o.key_id,
                "created_at": o.created_at,
                "ownership": o.ownership,
                "item_id": None,
                "url": None,
                "sha256": None,
            }
            for o in self.iter_all()
        ]
        if index is not None:
            for item, reason in covered_items(self, index):
                rows.append(
                    {
                        "optout_id": reason["optout"],
                        "kind": reason["by"],
                        "value": reason["value"],
                        "claimant": reason["claimant"],
                        "key_id": None,
                        "created_at": None,
                        "ownership": reason["ownership"],
                        "item_id": item["id"],
                        "url": item.get("source"),
                        "sha256": item.get("sha256"),
                    }
                )
        schema = pa.schema(
            [
                (k, pa.string())
                for k in (
                    "optout_id",
                    "kind",
                    "value",
                    "claimant",
                    "key_id",
                    "created_at",
                    "ownership",
                    "item_id",
                    "url",
                    "sha256",
                )
            ]
        )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(path))
        return len(rows)


# --------------------------------------------------------------------------------- content matching


@dataclass
class ContentMatcher:
    """The content opt-outs as matrices: SSCD (n, d) float32 of one model, PDQ (n, 32) uint8."""

    optouts: list[Optout]
    sscd: np.ndarray | None  # (n, d) float32; rows of opt-outs without a vector of this model are zero
    pdq: np.ndarray | None  # (n, 32) uint8; rows without a hash are zero, masked by has_pdq
    has_pdq: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.optouts)

    @classmethod
    def from_rows(cls, rows: list[tuple[Optout, bytes | None, bytes | None]], sscd_model: str | None) -> ContentMatcher:
        optouts = [o for o, _, _ in rows]
        vecs = [
            np.frombuffer(s, "<f2").astype(np.float32)
            if s is not None and o.sscd_model == sscd_model and sscd_model is not None
            else None
            for o, s, _ in rows
        ]
        dim = next((len(v) for v in vecs if v is not None), 0)
        sscd = np.zeros((len(rows), dim), np.float32) if dim else None
        if sscd is not None:
            for i, v in enumerate(vecs):
                if v is not None and len(v) == dim:
                    sscd[i] = v
        pdq = np.zeros((len(rows), 32), np.uint8)
        has = np.zeros(len(rows), bool)
        for i, (_, _, p) in enumerate(rows):
            if p is not None and len(p) == 32:
                pdq[i] = np.frombuffer(p, np.uint8)
                has[i] = True
        return cls(optouts, sscd, pdq, has)

    def covers(self, vectors: dict[str, np.ndarray], t: Thresholds) -> list[tuple[Optout, str, dict[str, Any]] | None]:
        """Per query row, the opt-out it is the best copy of, as (opt-out, verdict, scores), when `decide_verdict`
        calls the pair `exact` or `replica`; None otherwise. Only pairs near either threshold are decided."""
        from provenance.scan import decide_verdict

        q_sscd, q_pdq = vectors.get("sscd"), vectors.get("pdq")
        n_q = len(q_sscd) if q_sscd is not None else len(q_pdq) if q_pdq is not None else 0
        out: list[tuple[Optout, str, dict[str, Any]] | None] = [None] * n_q
        if not len(self) or not n_q:
            return out
        S = None
        if q_sscd is not None and self.sscd is not None and q_sscd.shape[1] == self.sscd.shape[1]:
            S = np.asarray(q_sscd, np.float32) @ self.sscd.T  # (n_q, n) cosine
        D = None
        if q_pdq is not None and self.pdq is not None and self.has_pdq.any():
            D = np.full((n_q, len(self)), 256, np.int32)
            cols = np.flatnonzero(self.has_pdq)
            for i in range(n_q):  # (n, 32) xor per query: bounded memory for any registry size
                D[i, cols] = _POPCOUNT[np.bitwise_xor(self.pdq[cols], np.asarray(q_pdq[i], np.uint8))].sum(1)
        rank = {"exact": 0, "replica": 1}
        for i in range(n_q):
            near = np.zeros(len(self), bool)
            if S is not None:
                near |= S[i] >= min(t.replica_sscd, t.exact_sscd)
            if D is not None:
                near |= D[i] <= t.exact_pdq_bits
            best = None
            for j in np.flatnonzero(near):
                scores: dict[str, float | int | None] = {
                    "sscd": round(float(S[i, j]), 4)
                    if S is not None and self.sscd is not None and self.sscd[j].any()
                    else None,
                    "pdq_distance": int(D[i, j]) if D is not None and self.has_pdq[j] else None,
                }
                v = decide_verdict(scores, t)
                if v in rank and (
                    best is None or (rank[v], -(scores["sscd"] or 0)) < (rank[best[1]], -(best[2]["sscd"] or 0))
                ):
                    best = (self.optouts[j], v, scores)
            out[i] = best
        return out


_POPCOUNT = np.array([(i).bit_count() for i in range(256)], np.uint8)


def sscd_model_id(index: ProvenanceIndex) -> str | None:
    spec = index.specs.get("sscd")
    return f"{spec.model_id}:{spec.checksum}" if spec is not None else None


def content_print(data: bytes, searcher: Searcher, name: str = "image", max_pixels: int | None = None) -> ContentPrint:
    """An image's content fingerprint with the index's own models (UnreadableImageError for a non-image)."""
    from provenance.images import DEFAULT_MAX_PIXELS, decode_image

    decoded = decode_image(data, name, max_pixels or DEFAULT_MAX_PIXELS)
    names: list[str] = [n for n in ("sscd", "pdq") if n in searcher.index.specs]
    if not names:
        raise InvalidOptoutError("the index has neither sscd nor pdq descriptors: a content opt-out needs one")
    vecs = searcher.embed_images([decoded.image], list(names))
    sscd = vecs["sscd"][0].astype(np.float32) if "sscd" in vecs else None
    pdq = np.asarray(vecs["pdq"][0], np.uint8) if "pdq" in vecs else None
    return ContentPrint(decoded.sha256, sscd, pdq, sscd_model_id(searcher.index))


# ------------------------------------------------------------------------------------ index helpers


def item_vectors(index: ProvenanceIndex, locs: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """{"sscd": (n, d) float32, "pdq": (n, 32) uint8} of live items at (part, row) locations."""
    out: dict[str, np.ndarray] = {}
    for name in ("sscd", "pdq"):
        if name not in index.specs:
            continue
        rows = [index.parts[pi].row_reader(name).read_rows(np.array([r]))[0] for pi, r in locs]
        dim = index.specs[name].dim // 8 if name == "pdq" else index.specs[name].dim
        x = np.stack(rows) if rows else np.zeros((0, dim))
        out[name] = x.astype(np.uint8 if name == "pdq" else np.float32)
    return out


def item_refs(index: ProvenanceIndex, ids: Sequence[str]) -> tuple[list[dict[str, Any]], list[tuple[int, int] | None]]:
    """({"id", "source", "sha256"} per id, its (part, row) or None when not a live item)."""
    items, locs = [], []
    for i in ids:
        loc = index.find(i)
        locs.append(loc)
        if loc is None:
            items.append({"id": i})
        else:
            p = index.parts[loc[0]]
            items.append(
                {"id": i, "source": p.column_value(loc[1], "source"), "sha256": p.column_value(loc[1], "sha256")}
            )
    return items, locs


def reasons_for_ids(
    registry: Registry, index: ProvenanceIndex, ids: Sequence[str], thresholds: Thresholds | None = None
) -> dict[str, dict[str, Any]]:
    """{id: reason} for the live items among `ids` that an opt-out covers (id, URL, domain, file or content)."""
    ids = list(dict.fromkeys(ids))
    items, locs = item_refs(index, ids)
    live = [j for j, loc in enumerate(locs) if loc is not None]
    return _reasons_at(registry, index, [items[j] for j in live], [locs[j] for j in live], thresholds)  # type: ignore[misc]


def _reasons_at(
    registry: Registry,
    index: ProvenanceIndex,
    items: list[dict[str, Any]],
    locs: list[tuple[int, int]],
    thresholds: Thresholds | None = None,
) -> dict[str, dict[str, Any]]:
    """{id: reason} of the live items at `locs` (items: their {"id", "source", "sha256"}) an opt-out covers."""
    if not items:
        return {}
    model = sscd_model_id(index)
    vectors = item_vectors(index, locs) if len(registry.content_matcher(model)) else None
    reasons = registry.reasons(items, vectors, model, thresholds)
    return {it["id"]: r for it, r in zip(items, reasons, strict=False) if r is not None}


def mark_matches(
    registry: Registry, index: ProvenanceIndex, matches: list[Match], thresholds: Thresholds | None = None
) -> list[Match]:
    """The same matches, each covered one carrying `opted_out` (why)."""
    if not matches:
        return matches
    reasons = reasons_for_ids(registry, index, [m.id for m in matches], thresholds)
    return [replace(m, opted_out=reasons[m.id]) if m.id in reasons else m for m in matches]


def content_coverage(
    index: ProvenanceIndex, content: ContentPrint, thresholds: Thresholds | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(item id, verdict, scores) of every live item `scan` would call exact or replica against `content`:
    SSCD and PDQ neighbours (k growing to CONTENT_K[-1] while the k-th still scores as a copy), plus identical
    files, decided by `decide_verdict` on the pair's own scores."""
    from provenance.scan import decide_verdict

    t = thresholds or Thresholds()
    cand: dict[str, dict[str, Any]] = {}
    if content.sscd is not None and "sscd" in index.specs and content.sscd_model == sscd_model_id(index):
        for k in CONTENT_K:
            ms = index.search_vectors("sscd", content.sscd[None].astype(np.float32), k)[0]
            if len(ms) < k or ms[-1].score < min(t.replica_sscd, t.exact_sscd):
                break
        else:
            logger.warning("content opt-out: more than %d near copies; counting the first %d", k, k)
        for m in ms:
            cand.setdefault(m.id, {})["sscd"] = round(m.score, 4)
    if content.pdq is not None and "pdq" in index.specs:
        for k in CONTENT_K:
            ms = index.search_vectors("pdq", content.pdq[None], k)[0]
            if len(ms) < k or (ms[-1].distance or 0) > t.exact_pdq_bits:
                break
        for m in ms:
            if (m.distance or 0) <= t.exact_pdq_bits:
                cand.setdefault(m.id, {})["pdq_distance"] = m.distance
    same = {index.parts[pi].column_value(r, "id") for pi, r in index.rows_with_sha256(content.sha256)}
    # a PDQ neighbour outside the SSCD top k gets its own SSCD score (decide_verdict needs both to say exact)
    need = [i for i, s in cand.items() if "sscd" not in s and content.sscd is not None and "sscd" in index.specs]
    if need and content.sscd_model == sscd_model_id(index):
        _, locs = item_refs(index, need)
        vecs = item_vectors(index, [loc for loc in locs if loc is not None])
        for i, v in zip(
            [i for i, loc in zip(need, locs, strict=False) if loc is not None], vecs.get("sscd", []), strict=False
        ):
            cand[i]["sscd"] = round(float(v @ content.sscd), 4)
    out: list[tuple[str, str, dict[str, Any]]] = []
    for item_id in list(cand) + [i for i in same if i not in cand]:
        s = cand.get(item_id, {})
        scores = {"sscd": s.get("sscd"), "pdq_distance": s.get("pdq_distance")}
        v = decide_verdict(scores, t, same_bytes=item_id in same)
        if v in ("exact", "replica"):
            out.append((item_id, v, scores))
    return out


def coverage(
    registry: Registry,
    index: ProvenanceIndex,
    optout: Optout,
    content: ContentPrint | None = None,
    full_scan: bool = True,
    thresholds: Thresholds | None = None,
) -> list[str] | None:
    """The live item ids of `index` one opt-out covers. URL and domain opt-outs read every item's source
    (O(n): `full_scan=False`, as the server does, answers None for them)."""
    if optout.kind == "id":
        return [optout.value] if index.find(optout.value) is not None else []
    if optout.kind == "content":
        if content is None:
            raise InvalidOptoutError("content coverage needs the image's fingerprint")
        return [i for i, _, _ in content_coverage(index, content, thresholds)]
    if not full_scan:
        return None
    out = []
    for item in _iter_items(index):
        host = url_host(item.get("source"))
        if optout.kind == "url":
            try:
                if item.get("source") and normalise_url(item["source"]) == optout.value:
                    out.append(item["id"])
            except InvalidOptoutError:
                pass
        elif host and optout.value in domain_suffixes(host):
            out.append(item["id"])
    return out


def _iter_items(index: ProvenanceIndex, vectors: bool = False) -> Iterator[dict[str, Any]]:
    """Every live item's {"id", "source", "sha256"} (and, with `vectors`, "_loc"): O(n), for tools."""
    for pi, part in enumerate(index.parts):
        if not len(part):
            continue
        for start, batch in part.iter_batches():
            ids, srcs, shas = (batch.column(c).to_pylist() for c in ("id", "source", "sha256"))
            keep = index._live_mask(pi, start, len(ids))
            for j in np.flatnonzero(keep):
                item = {"id": ids[j], "source": srcs[j], "sha256": shas[j]}
                if vectors:
                    item["_loc"] = (pi, start + int(j))
                yield item


def covered_items(
    registry: Registry, index: ProvenanceIndex, batch: int = 4096, thresholds: Thresholds | None = None
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(item, reason) for every live item of `index` an opt-out covers: reads the whole index (O(n), batched).
    `provenance index remove --optouts` and the exports use it."""
    model = sscd_model_id(index)
    has_content = len(registry.content_matcher(model)) > 0
    buf: list[dict[str, Any]] = []

    def flush() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        vecs = _batch_vectors(index, [it["_loc"] for it in buf]) if has_content else None
        for it, r in zip(buf, registry.reasons(buf, vecs, model, thresholds), strict=False):
            if r is not None:
                yield {k: v for k, v in it.items() if k != "_loc"}, r

    for item in _iter_items(index, vectors=True):
        buf.append(item)
        if len(buf) >= batch:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def _batch_vectors(index: ProvenanceIndex, locs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Vectors of many items, read per part in row order (one pread each)."""
    out: dict[str, list[np.ndarray]] = {}
    order = sorted(range(len(locs)), key=lambda i: locs[i])
    for name in ("sscd", "pdq"):
        if name not in index.specs:
            continue
        got: list[np.ndarray | None] = [None] * len(locs)
        for i in order:
            pi, r = locs[i]
            got[i] = index.parts[pi].row_reader(name).read_rows(np.array([r]))[0]
        out[name] = got  # type: ignore[assignment]
    return {n: np.stack(v).astype(np.uint8 if n == "pdq" else np.float32) for n, v in out.items() if v}


def covered_ids(registry_path: str | os.PathLike[str], index_dir: str | os.PathLike[str]) -> list[str]:
    """The live item ids of the index at `index_dir` the registry covers (for `index remove --optouts`)."""
    from provenance.store import ProvenanceIndex

    index = ProvenanceIndex.open(index_dir)
    with Registry(registry_path, create=False) as reg:
        return [item["id"] for item, _ in covered_items(reg, index)]


class BuildFilter:
    """What `index build --respect-optouts` asks of the registry, per embedded batch."""

    def __init__(
        self, registry_path: str | os.PathLike[str], sscd_model: str | None, thresholds: Thresholds | None = None
    ):
        self.registry = Registry(registry_path, create=False)
        self.sscd_model = sscd_model
        self.thresholds = thresholds

    def reasons(self, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> list[dict[str, Any] | None]:
        """Per row ({"id", "source", "sha256", "extra"}), why it must be skipped: an opt-out, or the file's own
        consent signals saying training is not allowed (extra["consent"], when the build read them)."""
        vecs = {
            n: np.asarray(x, np.uint8 if n == "pdq" else np.float32) for n, x in vectors.items() if n in ("sscd", "pdq")
        }
        out = self.registry.reasons(rows, vecs, self.sscd_model, self.thresholds)
        for i, row in enumerate(rows):
            consent = (row.get("extra") or {}).get("consent") if isinstance(row.get("extra"), dict) else None
            if out[i] is None and isinstance(consent, dict) and consent.get("training") == "not_allowed":
                out[i] = {
                    "by": "consent_signal",
                    "training": "not_allowed",
                    "sources": sorted(
                        {s.get("source") for s in consent.get("signals") or [] if s.get("training") == "not_allowed"}
                    ),
                }
        return out

    def close(self) -> None:
        self.registry.close()


# --------------------------------------------------------------------------------------- consent check

MAX_CHECK_ITEMS = 10_000  # URLs plus hashes per consent check (as Spawning's API)


def consent_check(
    registry: Registry | None,
    index: ProvenanceIndex | None,
    urls: Sequence[str] = (),
    shas: Sequence[str] = (),
    fetcher: Any = None,
) -> list[dict[str, Any]]:
    """One answer per URL, then per sha256: whether training on it is allowed, from the registry (opt-outs by
    URL, domain, id, file and content), the index's metadata (the items with that file, their stored consent)
    and, for URLs, the consent signals a `provenance.consent.Fetcher` gives (an offline one answers from its
    cache only). `training` is "not_allowed" when an opt-out covers it, else the signals' answer.
    InvalidOptoutError (nothing answered) for a malformed hash or more than MAX_CHECK_ITEMS items."""
    if len(urls) + len(shas) > MAX_CHECK_ITEMS:
        raise InvalidOptoutError(f"{len(urls) + len(shas):,} URLs and hashes: at most {MAX_CHECK_ITEMS:,} a request")
    shas = [check_sha256(s) for s in shas]  # all checked before any work
    for u in urls:
        if not isinstance(u, str) or len(u) > MAX_VALUE_CHARS:
            raise InvalidOptoutError(f"URL {str(u)[:80]!r}: not a string of at most {MAX_VALUE_CHARS} characters")
    out: list[dict[str, Any]] = []
    # 1. URLs: registry by URL and domain; signals from the cache (or live, when the fetcher may)
    by_url = registry.match_urls(list(urls)) if registry is not None else [None] * len(urls)
    signals: dict[str, Any] = {}
    if fetcher is not None and urls:
        from provenance.consent import url_consent

        signals = url_consent(list(urls), fetcher)
    for u, o in zip(urls, by_url, strict=False):
        c = signals.get(u)
        reason = o.reason() if o is not None else None
        out.append(
            {
                "url": u,
                "training": "not_allowed" if reason else (c.training if c is not None else "unknown"),
                "opted_out": reason,
                "consent": c.to_dict() if c is not None else None,
            }
        )
    # 2. Hashes: registry by file; the index's items with that file, covered by id/URL/domain/content
    direct = registry.match_sha256(shas) if registry is not None else {}
    found: list[list[tuple[int, int]]] = [index.rows_with_sha256(s) if index is not None else [] for s in shas]
    items: list[dict[str, Any]] = []
    locs = [loc for f in found for loc in f]
    for pi, r in locs:
        p = index.parts[pi]  # type: ignore[union-attr]
        items.append(
            {
                "id": p.column_value(r, "id"),
                "source": p.column_value(r, "source"),
                "sha256": p.column_value(r, "sha256"),
                "extra": p.column_value(r, "extra"),
            }
        )
    why = _reasons_at(registry, index, items, locs) if registry is not None and items else {}  # type: ignore[arg-type]
    pos = 0
    for s, f in zip(shas, found, strict=False):
        mine, pos = items[pos : pos + len(f)], pos + len(f)
        ids = [it["id"] for it in mine]
        reason = direct[s].reason(verdict="exact") if s in direct else next((why[i] for i in ids if i in why), None)
        stored = _stored_consent(mine[0]["extra"]) if mine else None
        training = "not_allowed" if reason else (stored or {}).get("training", "unknown")
        out.append({"sha256": s, "training": training, "opted_out": reason, "indexed": ids, "consent": stored})
    return out


def _stored_consent(extra: Any) -> dict[str, Any] | None:
    """The consent an index stored in an item's metadata (`extra["consent"]`, when the build read file signals)."""
    if isinstance(extra, str):
        if "consent" not in extra:
            return None
        try:
            extra = json.loads(extra)
        except ValueError:
            return None
    c = extra.get("consent") if isinstance(extra, dict) else None
    return c if isinstance(c, dict) else None
