"""Caption queries kept cheap: user words turned into a safe, bounded FTS5 query, and a time budget per query."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from provenance.errors import QueryTimeoutError, QueryTooLongError

# SQLite calls the progress handler every this many virtual-machine instructions (a few per matching row): often
# enough that a query stops soon after its budget, rarely enough to cost little.
_PROGRESS_STEPS = 100


@dataclass(frozen=True)
class CaptionLimits:
    """What one caption query may cost. FTS5's work grows with matching rows x terms, and a prefix term of one
    letter expands to every word that starts with it: so terms are capped and de-duplicated, prefixes need two
    letters, and SQLite stops the query at its time budget."""

    max_terms: int = 16
    max_chars: int = 256
    time_budget_s: float = 0.5


def sanitize_caption_query(text: str, max_terms: int = 16, max_chars: int = 256) -> str:
    """User words as a safe FTS5 query: every word and "phrase" quoted (punctuation cannot inject syntax),
    repeats removed, `word*` kept as a prefix only with 2+ letters. Raises QueryTooLongError over the limits."""
    if len(text) > max_chars:
        raise QueryTooLongError(f"caption query of {len(text)} characters: the limit is {max_chars}")
    phrases = [p.strip() for p in re.findall(r'"([^"]+)"', text)]
    rest = re.sub(r'"[^"]*"', " ", text)
    terms: dict[str, None] = {}  # ordered set: "a a a" is one term
    for p in phrases:
        words = re.findall(r"\w+", p, flags=re.UNICODE)
        if words:
            terms.setdefault('"' + " ".join(words) + '"')
    for w in re.findall(r"\w+\*?", rest, flags=re.UNICODE):
        if w.endswith("*") and len(w) > 2:
            terms.setdefault(f'"{w[:-1]}"*')
        else:
            terms.setdefault(f'"{w.rstrip("*")}"')
    if len(terms) > max_terms:
        raise QueryTooLongError(f"caption query of {len(terms)} different words or phrases: the limit is {max_terms}")
    return " ".join(terms)


@contextmanager
def sqlite_time_budget(conn: sqlite3.Connection, seconds: float) -> Iterator[None]:
    """Stop any statement run on `conn` inside the block once `seconds` have passed (SQLite's progress handler
    aborts it from within), raising QueryTimeoutError."""
    deadline = time.monotonic() + seconds
    stopped = False

    def check() -> int:
        nonlocal stopped
        stopped = time.monotonic() > deadline
        return 1 if stopped else 0  # non-zero interrupts the statement

    conn.set_progress_handler(check, _PROGRESS_STEPS)
    try:
        yield
    except sqlite3.OperationalError:
        if stopped:
            raise QueryTimeoutError(f"the caption query ran past its time budget of {seconds:g} s and was "
                                    "stopped: use fewer or rarer words") from None
        raise
    finally:
        conn.set_progress_handler(None, 0)
