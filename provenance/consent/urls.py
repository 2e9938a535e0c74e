"""Consent signals for a URL: TDMRep (well-known file, headers, HTML meta), X-Robots-Tag, ai.txt and robots.txt."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import SplitResult, urlsplit

from provenance.consent.fetch import Fetcher, FetchRequest, FetchResult
from provenance.consent.robots import Rule, ai_crawlers, compile_pattern, decide, parse_robots
from provenance.consent.types import Consent, ConsentSignal, TrainingUse

logger = logging.getLogger(__name__)

# Byte caps per fetched file. RFC 9309 asks crawlers to read at least 500 KiB of a robots.txt;
# ai.txt has the same syntax; TDMRep files and an HTML head are small.
ROBOTS_MAX_BYTES = 512 * 1024
TDMREP_MAX_BYTES = 256 * 1024
PAGE_MAX_BYTES = 256 * 1024  # of an HTML page: the meta tags are in its head
MAX_URL_CHARS = 8192
SITE_FILES = {"tdmrep.json": "/.well-known/tdmrep.json", "ai.txt": "/ai.txt", "robots.txt": "/robots.txt"}
_NOAI = re.compile(r"\b(noimageai|noai)\b", re.IGNORECASE)


def url_consent(urls: Iterable[str], fetcher: Fetcher, *, crawlers: Iterable[str] | None = None) -> dict[str, Consent]:
    """{url: Consent} for every URL, batched: each site's files are fetched (or read from the cache) once.

    Per URL: the URL's own response (TDMRep and X-Robots-Tag headers; TDMRep and robots meta tags
    when it is an HTML page), and its origin's /.well-known/tdmrep.json, /ai.txt and /robots.txt.
    `crawlers` are the AI-training user agents robots.txt is read for (default: the shipped list).
    Never raises for one bad URL: it gets an `unknown` signal saying why.
    """
    agents = tuple(crawlers) if crawlers is not None else ai_crawlers()
    out: dict[str, Consent] = {}
    valid: dict[str, tuple[str, str]] = {}  # url -> (origin, path with query)
    urls = list(urls)
    for url in dict.fromkeys(urls):
        p, problem = _parse_url(url)
        if p is None:
            out[url] = Consent.of([ConsentSignal("url", "invalid", "unknown", problem)])
        else:
            origin = f"{p.scheme}://{p.netloc.rsplit('@', 1)[-1].lower()}"  # no userinfo; host names are case-blind
            valid[url] = (origin, (p.path or "/") + (f"?{p.query}" if p.query else ""))
    origins = {origin for origin, _ in valid.values()}
    pages = {u: FetchRequest(u, PAGE_MAX_BYTES, "html") for u in valid}
    site_requests = {(o, name): _site_request(o, name) for o in origins for name in SITE_FILES}
    results = fetcher.fetch_many([*pages.values(), *site_requests.values()])

    sites: dict[str, SiteRules] = {}
    for origin in origins:
        files = {name: results[site_requests[origin, name].key] for name in SITE_FILES}
        sites[origin] = SiteRules.from_results(files, agents)
    for url, (origin, path) in valid.items():
        out[url] = Consent.of(url_signals(path, results[pages[url].key], sites[origin]))
    return {url: out[url] for url in dict.fromkeys(urls)}  # in the caller's order


def _site_request(origin: str, name: str) -> FetchRequest:
    return FetchRequest(origin + SITE_FILES[name], TDMREP_MAX_BYTES if name == "tdmrep.json" else ROBOTS_MAX_BYTES)


def _parse_url(url: Any) -> tuple[SplitResult | None, str | None]:
    """(the parsed URL, None), or (None, what is wrong with it)."""
    if not isinstance(url, str) or not url:
        return None, "empty URL"
    if len(url) > MAX_URL_CHARS:
        return None, f"URL longer than {MAX_URL_CHARS} characters"
    try:
        p = urlsplit(url)
        p.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        return None, f"not a URL ({e})"
    if p.scheme not in ("http", "https"):
        return None, f"only http and https URLs are checked, not {p.scheme or 'a scheme-less'!s} URLs"
    if not p.hostname:
        return None, "URL has no host"
    return p, None


# ------------------------------------------------------------------------------------- site files


@dataclass
class SiteRules:
    """One origin's parsed files, ready to answer for any path: made once per origin per batch."""

    tdmrep: list[TdmRule] | None = None
    ai_txt: list[Rule] | None = None  # the rules ai.txt applies to AI users (`*` and named crawlers)
    robots_named: dict[str, list[Rule]] = field(default_factory=dict)  # AI crawler -> its own rules
    robots_star: list[Rule] = field(default_factory=list)
    truncated: dict[str, bool] = field(default_factory=dict)
    problems: list[ConsentSignal] = field(default_factory=list)  # unreadable files: the same for every path
    # The signal(s) each decision gives, made once: most URLs of a site fall under the same few rules.
    # Shared between answers, so treat signals as read-only (they are frozen; leave `extra` alone too).
    memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @classmethod
    def from_results(cls, files: dict[str, FetchResult], agents: tuple[str, ...]) -> SiteRules:
        site = cls()
        for name, r in files.items():
            text = _site_file_text(name, r, site.problems)
            if text is None:
                continue
            site.truncated[name] = r.truncated
            if name == "tdmrep.json":
                site.tdmrep = _parse_tdmrep(text, r.truncated, site.problems)
            elif name == "ai.txt":
                rf = parse_robots(text, r.truncated)
                site.ai_txt = [rule for g in rf.groups if "*" in g.agents or any(a.lower() in g.agents for a in agents)
                               for rule in g.rules]  # fmt: skip
            else:
                rf = parse_robots(text, r.truncated)
                site.robots_named = {a: rf.rules_for(a) or [] for a in agents if rf.names(a)}
                site.robots_star = [rule for g in rf.groups if "*" in g.agents for rule in g.rules]
        return site


def _site_file_text(name: str, r: FetchResult, problems: list[ConsentSignal]) -> str | None:
    """The file's text, or None when there is none; an unreadable file adds an `unknown` signal."""
    if r.error:
        problems.append(ConsentSignal(name, "unreachable", "unknown", f"{name} not read: {r.error}"))
        return None
    status = r.status or 0
    if 400 <= status < 500:
        return None  # no file: no statement (RFC 9309 reads a 4xx robots.txt as "no rules")
    if status >= 500 or status < 200 or status >= 300:
        problems.append(ConsentSignal(name, f"HTTP {status}", "unknown", f"{name} answered HTTP {status}"))
        return None
    if "html" in r.headers.get("content-type", "").lower():
        return None  # a site's "not found" page served with 200: not the file
    return r.text()


def _parse_tdmrep(text: str, truncated: bool, problems: list[ConsentSignal]) -> list[TdmRule] | None:
    if truncated:
        problems.append(ConsentSignal("tdmrep.json", "too large", "unknown",
                                      f"tdmrep.json is larger than {TDMREP_MAX_BYTES} bytes; not read"))  # fmt: skip
        return None
    try:
        doc = json.loads(text)
    except RecursionError:
        problems.append(ConsentSignal("tdmrep.json", "malformed", "unknown", "tdmrep.json nests too deeply"))
        return None
    except ValueError as e:
        problems.append(ConsentSignal("tdmrep.json", "malformed", "unknown", f"tdmrep.json is not JSON: {e}"))
        return None
    if not isinstance(doc, list):
        problems.append(
            ConsentSignal("tdmrep.json", "malformed", "unknown", "tdmrep.json is not a JSON array of rules")
        )
        return None
    return compile_tdmrep([rule for rule in doc if isinstance(rule, dict) and isinstance(rule.get("location"), str)])


# ----------------------------------------------------------------------------------------- per URL


def url_signals(path: str, page: FetchResult, site: SiteRules) -> list[ConsentSignal]:
    """Every signal for one URL (`path`: its path and query) from its own response and its site's parsed files."""
    signals: list[ConsentSignal] = list(site.problems)

    # 1. TDMRep, in precedence order: response header > HTML meta > the well-known file.
    tdm: list[ConsentSignal] = []
    if page.error:
        signals.append(ConsentSignal("fetch", "unreachable", "unknown", f"URL not read: {page.error}"))
    elif page.status is not None and page.status >= 400:
        signals.append(ConsentSignal("fetch", f"HTTP {page.status}", "unknown", f"URL answered HTTP {page.status}"))
    header = _tdm_signal("tdm-header", page.headers.get("tdm-reservation"), page.headers.get("tdm-policy"))
    meta = _html_meta(page)
    if header:
        tdm.append(header)
    meta_tdm = _tdm_signal("html-meta", meta.get("tdm-reservation"), meta.get("tdm-policy"))
    if meta_tdm:
        tdm.append(meta_tdm)
    if site.tdmrep is not None:
        file_signal = tdmrep_file_signal(site.tdmrep, path, site.memo)
        if file_signal:
            tdm.append(file_signal)
    signals += _apply_precedence(tdm)

    # 2. X-Robots-Tag and <meta name="robots"> noai / noimageai.
    for source, value in (("x-robots-tag", page.headers.get("x-robots-tag")), ("html-meta", meta.get("robots"))):
        if not value:
            continue
        for token in dict.fromkeys(t.lower() for t in _NOAI.findall(value)):
            what = "AI use of this content" if token == "noai" else "AI use of images"
            signals.append(ConsentSignal(source, token, "not_allowed", f"{source} {token}: the site reserves {what}"))

    # 3. ai.txt and robots.txt.
    if site.ai_txt is not None:
        signals.append(_ai_txt_signal(site, path))
    signals += robots_signals(site, path)
    return signals


def _tdm_signal(source: str, reservation: str | None, policy: str | None) -> ConsentSignal | None:
    if reservation is None and policy is None:
        return None
    extra = {"tdm_policy": policy[:2000]} if policy else {}
    value = (reservation or "").strip()
    if value == "1":
        detail = "text and data mining rights reserved" + (" (licence terms in tdm-policy)" if policy else "")
        return ConsentSignal(source, "tdm-reservation=1", "not_allowed", detail, extra=extra)
    if value == "0":
        return ConsentSignal(
            source, "tdm-reservation=0", "allowed", "text and data mining rights not reserved", extra=extra
        )
    detail = "tdm-reservation must be 0 or 1" if value else "tdm-policy without tdm-reservation"
    return ConsentSignal(source, f"tdm-reservation={value[:50]}", "unknown", detail, extra=extra)


TdmRule = tuple[int, Callable[[str], bool], dict[str, Any]]  # (location length, matcher, the rule as written)


def compile_tdmrep(rules: list[dict[str, Any]]) -> list[TdmRule]:
    """tdmrep.json rules with their `location` patterns compiled (once per site, not per URL)."""
    out = []
    for rule in rules:
        loc = rule["location"]
        if loc.startswith(("http://", "https://")):
            loc = urlsplit(loc).path or "/"
        elif not loc.startswith(("/", "*")):
            loc = "/" + loc
        out.append((len(loc), compile_pattern(loc), rule))
    return out


def tdmrep_file_signal(rules: list[TdmRule], path: str, memo: dict[Any, Any] | None = None) -> ConsentSignal | None:
    """The /.well-known/tdmrep.json rule for `path`: the matching rule with the most specific (longest) location."""
    best: TdmRule | None = None
    for r in rules:
        if (best is None or r[0] > best[0]) and r[1](path):
            best = r
    if best is None:
        return None
    if memo is None:
        return _tdmrep_rule_signal(best[2])
    key = ("tdmrep.json", id(best))
    if key not in memo:
        memo[key] = _tdmrep_rule_signal(best[2])
    signal: ConsentSignal | None = memo[key]
    return signal


def _tdmrep_rule_signal(rule: dict[str, Any]) -> ConsentSignal | None:
    reservation = rule.get("tdm-reservation")
    policy = rule.get("tdm-policy")
    s = _tdm_signal(
        "tdmrep.json", None if reservation is None else str(reservation), policy if isinstance(policy, str) else None
    )
    if s is None:
        return None
    return ConsentSignal(s.source, s.value, s.training, s.detail, extra={**s.extra, "location": rule["location"][:500]})


def _apply_precedence(tdm: list[ConsentSignal]) -> list[ConsentSignal]:
    """TDMRep: the first (highest-precedence) statement wins; the others are listed as overridden by it."""
    if len(tdm) < 2:
        return tdm
    winner = tdm[0]
    return [winner] + [
        ConsentSignal(s.source, s.value, s.training, s.detail, overridden_by=winner.source, extra=s.extra)
        for s in tdm[1:]
    ]


def _ai_txt_signal(site: SiteRules, path: str) -> ConsentSignal:
    rule = decide(site.ai_txt or [], path)
    key = ("ai.txt", id(rule))
    if key not in site.memo:
        site.memo[key] = _ai_txt_rule_signal(rule, site.truncated.get("ai.txt", False))
    signal: ConsentSignal = site.memo[key]
    return signal


def _ai_txt_rule_signal(rule: Rule | None, truncated: bool) -> ConsentSignal:
    extra: dict[str, Any] = {"truncated": True} if truncated else {}
    if rule is None:
        return ConsentSignal("ai.txt", "no-match", "allowed", "ai.txt has no rule for this path", extra=extra)
    line = f"{'Allow' if rule.allow else 'Disallow'}: {rule.pattern}"
    use: TrainingUse = "allowed" if rule.allow else "not_allowed"
    return ConsentSignal("ai.txt", line, use, f"ai.txt {line} matches this path", extra=extra)


def robots_signals(site: SiteRules, path: str) -> list[ConsentSignal]:
    """robots.txt groups naming AI-training crawlers are training rules; `User-agent: *` is a crawl rule only."""
    decisions = [decide(rules, path) for rules in site.robots_named.values()]
    star = decide(site.robots_star, path)
    key = ("robots.txt", id(star), *map(id, decisions))
    if key not in site.memo:
        site.memo[key] = _robots_rule_signals(site, decisions, star)
    signals: list[ConsentSignal] = site.memo[key]
    return signals


def _robots_rule_signals(site: SiteRules, decisions: list[Rule | None], star: Rule | None) -> list[ConsentSignal]:
    extra: dict[str, Any] = {"truncated": True} if site.truncated.get("robots.txt") else {}
    disallowed: dict[str, str] = {}
    allowed: list[str] = []
    for agent, rule in zip(site.robots_named, decisions, strict=False):
        if rule is not None and not rule.allow:
            disallowed[agent] = f"Disallow: {rule.pattern}"
        else:
            allowed.append(agent)
    out = []
    if disallowed:
        detail = f"robots.txt disallows this path for AI-training crawlers: {', '.join(disallowed)}"
        rules = sorted(set(disallowed.values()))
        out.append(ConsentSignal("robots.txt", "disallow", "not_allowed", detail,
                                 extra={**extra, "agents": list(disallowed), "rules": rules}))  # fmt: skip
    if allowed:
        out.append(ConsentSignal("robots.txt", "allow", "allowed",
                                 f"robots.txt names and allows these AI-training crawlers here: {', '.join(allowed)}",
                                 extra={**extra, "agents": allowed}))  # fmt: skip
    if star is not None and not star.allow:
        out.append(ConsentSignal("robots.txt", "crawl-disallow", None,
                                 f"User-agent: * Disallow: {star.pattern} is a crawl rule for every crawler, "
                                 "not a training reservation", extra=dict(extra)))  # fmt: skip
    return out


class _MetaReader(HTMLParser):
    NAMES = ("tdm-reservation", "tdm-policy", "robots")

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "meta":
            return
        a = {k.lower(): v or "" for k, v in attrs}
        name = a.get("name", "").strip().lower()
        if name in self.NAMES:
            content = a.get("content", "")
            if name == "robots" and name in self.found:
                self.found[name] += ", " + content  # several robots metas combine
            else:
                self.found.setdefault(name, content)  # a TDMRep name keeps its first value


def _html_meta(page: FetchResult) -> dict[str, str]:
    if not page.body or "html" not in page.headers.get("content-type", "").lower():
        return {}
    reader = _MetaReader()
    try:
        reader.feed(page.body.decode("utf-8", errors="replace"))
        reader.close()
    except Exception as e:
        logger.info("html meta of %s not parsed: %s", page.url, e)
    return reader.found
