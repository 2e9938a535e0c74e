"""Consent signals: machine-readable AI-training reservations read from image files and from websites.

`read_file_consent(data, mime)` reads a file's C2PA/CAWG training-mining assertions and IPTC/PLUS
XMP; `url_consent(urls, fetcher)` reads a URL's TDMRep, X-Robots-Tag, ai.txt and robots.txt through
a polite, SSRF-guarded, cached `Fetcher`. Both answer with a `Consent`: the most restrictive training
use among the signals, and every signal found.
"""

from provenance.consent.fetch import Fetcher, FetchOptions, default_cache_path
from provenance.consent.files import read_file_consent
from provenance.consent.types import TRAINING_ORDER, Consent, ConsentSignal, TrainingUse, combine
from provenance.consent.urls import url_consent

__all__ = [
    "TRAINING_ORDER",
    "Consent",
    "ConsentSignal",
    "FetchOptions",
    "Fetcher",
    "TrainingUse",
    "combine",
    "default_cache_path",
    "read_file_consent",
    "url_consent",
]  # fmt: skip
