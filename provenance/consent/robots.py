"""Parsing robots.txt and ai.txt (RFC 9309 syntax) and matching URL paths against their rules."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

# Lines past this many are ignored: a robots.txt is a few hundred lines; the byte cap on the fetch
# bounds the rest.
MAX_LINES = 100_000
MAX_PATTERN_CHARS = 2048


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str  # as written, e.g. "/images/*.jpg$"

    @functools.cached_property
    def matches(self) -> Callable[[str], bool]:
        """`matches(path)`: the pattern compiled once (a rule is matched against every path of a site)."""
        return compile_pattern(self.pattern)


@dataclass
class Group:
    agents: list[str]  # lower-cased product tokens, "*" for all
    rules: list[Rule] = field(default_factory=list)


@dataclass
class RobotsFile:
    """A parsed robots.txt or ai.txt: its groups in file order."""

    groups: list[Group]
    truncated: bool = False  # the fetch hit its size cap; the rules read are those before the cut

    def rules_for(self, agent: str, *, fallback_to_star: bool = True) -> list[Rule] | None:
        """The rules of every group naming `agent` (merged, as RFC 9309 says), else of `*` groups, else None."""
        agent = agent.lower()
        named = [r for g in self.groups if agent in g.agents for r in g.rules]
        if named or any(agent in g.agents for g in self.groups):
            return named
        if not fallback_to_star:
            return None
        if any("*" in g.agents for g in self.groups):
            return [r for g in self.groups if "*" in g.agents for r in g.rules]
        return None

    def names(self, agent: str) -> bool:
        return any(agent.lower() in g.agents for g in self.groups)


def parse_robots(text: str, truncated: bool = False) -> RobotsFile:
    """Parse robots.txt syntax leniently (unknown lines are skipped, as every crawler does)."""
    groups: list[Group] = []
    current: Group | None = None
    last_was_agent = False
    for i, raw in enumerate(text.removeprefix("\ufeff").splitlines()):
        if i >= MAX_LINES:
            truncated = True
            break
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (p.strip() for p in line.split(":", 1))
        key = key.lower()
        if key in ("user-agent", "useragent"):
            # Consecutive User-agent lines share one group; one after rules starts a new group.
            if current is None or not last_was_agent:
                current = Group(agents=[])
                groups.append(current)
            current.agents.append(value.lower())
            last_was_agent = True
        elif key in ("allow", "disallow") and current is not None:
            last_was_agent = False
            if value == "":
                continue  # "Disallow:" with no path allows everything: no rule
            current.rules.append(Rule(key == "allow", value[:MAX_PATTERN_CHARS]))
    return RobotsFile(groups, truncated)


def decide(rules: list[Rule], path: str) -> Rule | None:
    """The rule that decides `path` (RFC 9309: the longest matching pattern; Allow wins a tie), or None."""
    best: Rule | None = None
    for r in rules:
        if r.matches(path) and (
            best is None
            or len(r.pattern) > len(best.pattern)
            or (len(r.pattern) == len(best.pattern) and r.allow and not best.allow)
        ):
            best = r
    return best


def path_matches(pattern: str, path: str) -> bool:
    """robots.txt path matching: a prefix match where `*` is any run of characters and a final `$` anchors."""
    return compile_pattern(pattern)(path)


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A matcher for one robots.txt path pattern (see path_matches).

    For a pattern of literal segments joined by `*`, taking each segment's leftmost occurrence is
    optimal, so the match is one str.find per segment: linear, with no regex backtracking for a
    hostile pattern such as `/*a*a*a*a*a*b` to exploit. Patterns without `*` (most of them) are one
    startswith or equality test.
    """
    anchored = pattern.endswith("$")
    if anchored:
        pattern = pattern[:-1]
    if "*" not in pattern:
        return pattern.__eq__ if anchored else lambda path: path.startswith(pattern)
    first, *parts, last = pattern.split("*")
    middle = [seg for seg in parts if seg]

    def match(path: str) -> bool:
        if not path.startswith(first):
            return False
        pos = len(first)
        for seg in middle:
            i = path.find(seg, pos)
            if i < 0:
                return False
            pos = i + len(seg)
        if anchored:
            return len(path) - len(last) >= pos and path.endswith(last)
        return not last or path.find(last, pos) >= 0

    return match


@functools.cache
def ai_crawlers() -> tuple[str, ...]:
    """The AI-training crawler tokens shipped in data/ai_crawlers.txt (see its header for the source)."""
    text = resources.files("provenance.consent").joinpath("data/ai_crawlers.txt").read_text("utf-8")
    return tuple(t for line in text.splitlines() if (t := line.split("#", 1)[0].strip()))
