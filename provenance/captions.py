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


@dataclass(frozen=True)
class CaptionTerm:
    """One term of a caption query."""

    text: str  # its words as typed (a phrase's joined by spaces)
    prefix: bool  # `word*`: every word that starts with it
    fts: str  # its safe FTS5 form: "word", "word"*, "two words"


def caption_terms(text: str, max_terms: int = 16, max_chars: int = 256) -> list[CaptionTerm]:
    """User words as FTS5 terms: every word and "phrase" quoted (punctuation cannot inject syntax), repeats
    removed, `word*` a prefix only with 2+ letters. Raises QueryTooLongError over the limits."""
    if len(text) > max_chars:
        raise QueryTooLongError(f"caption query of {len(text)} characters: the limit is {max_chars}")
    terms: dict[str, CaptionTerm] = {}  # by FTS form, in order: "a a a" is one term
    for phrase in re.findall(r'"([^"]+)"', text):
        words = " ".join(re.findall(r"\w+", phrase, flags=re.UNICODE))
        if words:
            terms.setdefault(f'"{words}"', CaptionTerm(words, False, f'"{words}"'))
    for w in re.findall(r"\w+\*?", re.sub(r'"[^"]*"', " ", text), flags=re.UNICODE):
        word, prefix = w.rstrip("*"), w.endswith("*") and len(w) > 2
        fts = f'"{word}"*' if prefix else f'"{word}"'
        terms.setdefault(fts, CaptionTerm(word, prefix, fts))
    if len(terms) > max_terms:
        raise QueryTooLongError(f"caption query of {len(terms)} different words or phrases: the limit is {max_terms}")
    return list(terms.values())


def sanitize_caption_query(text: str, max_terms: int = 16, max_chars: int = 256) -> str:
    """The FTS5 query of `caption_terms` (an empty string when there are none)."""
    return " ".join(t.fts for t in caption_terms(text, max_terms, max_chars))


@contextmanager
def sqlite_time_budget(conn: sqlite3.Connection, seconds: float, started: float | None = None) -> Iterator[None]:
    """Stop any statement run on `conn` inside the block once `seconds` have passed since `started` (a
    time.monotonic() value; default now: one budget can span queries on several connections), raising
    QueryTimeoutError. SQLite's progress handler aborts the statement from within."""
    deadline = (time.monotonic() if started is None else started) + seconds
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
            raise QueryTimeoutError(
                f"the caption query ran past its time budget of {seconds:g} s and was stopped: use fewer or rarer words"
            ) from None
        raise
    finally:
        conn.set_progress_handler(None, 0)
