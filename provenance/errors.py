"""The exceptions the library raises: one per failure kind, each naming the bad value and what to do."""

from __future__ import annotations


class ProvenanceError(Exception):
    """Base class of every error this library raises on purpose."""

    code = "provenance_error"


class UnreadableImageError(ProvenanceError):
    """A file or byte string is not an image we can decode (corrupt, truncated, empty, not an image)."""

    code = "not_an_image"


class FileUnreadableError(UnreadableImageError):
    """A path that cannot be read at all (missing, a directory, no permission): the bytes never arrived."""

    code = "unreadable"
    reason_kind: str  # set by provenance.images where it knows why (the skip reason a corpus reader reports)


class UploadTooLargeError(UnreadableImageError):
    """An upload over the server's byte limit, refused before it was decoded."""

    code = "too_large"


class DecompressionBombError(UnreadableImageError):
    """An image whose pixel count exceeds the configured limit (a decompression bomb)."""

    code = "too_many_pixels"


class CorpusError(ProvenanceError):
    """A corpus source cannot be read at all (missing folder, no shards, unsupported column...)."""

    code = "corpus_error"


class IndexNotFoundError(ProvenanceError):
    """No built index at the given directory."""

    code = "index_not_found"


class IndexFormatError(ProvenanceError):
    """An index directory exists but its manifest or files are unreadable or of another format version."""

    code = "index_format"


class IndexMismatchError(ProvenanceError):
    """A query or an append uses a different model/descriptor than the one the index was built with."""

    code = "index_mismatch"


class DescriptorUnavailableError(ProvenanceError):
    """A search asks for a descriptor the index was not built with (e.g. text search without `clip`)."""

    code = "descriptor_unavailable"


class ModelLoadError(ProvenanceError):
    """A model checkpoint or hub id cannot be loaded."""

    code = "model_load_failed"


class ItemNotFoundError(ProvenanceError):
    """A corpus item id that the index does not hold."""

    code = "item_not_found"


class GenerationError(ProvenanceError):
    """Image generation cannot start or continue (bad model id, unwritable output folder...)."""

    code = "generation_failed"


class InvalidOptionsError(ProvenanceError, ValueError):
    """Scan options that break a rule of `provenance.options.ScanOptions` (a range, or two that cannot go together)."""

    code = "invalid_options"


class MissingExtraError(ProvenanceError, ImportError):
    """A feature needs an optional part that is not installed (e.g. `pip install 'provenance[clip]'`)."""

    code = "missing_extra"


class QueryTooLongError(ProvenanceError, ValueError):
    """A search query over the server's limits (too many words, or too many characters)."""

    code = "query_too_long"


class QueryTimeoutError(ProvenanceError):
    """A search query that ran past its time budget and was stopped."""

    code = "query_timeout"


class ConsentCacheError(ProvenanceError):
    """The consent signals cache (SQLite) cannot be opened or written (unwritable folder, not a database...)."""

    code = "consent_cache_unavailable"


def error_from_code(code: str | None, message: str) -> ProvenanceError:
    """The exception of the class whose `code` is `code` (e.g. a scan record's `error_code`), carrying `message`;
    a plain ProvenanceError for an unknown code. Lets a surface raise a record's error without re-running it."""
    todo: list[type[ProvenanceError]] = [ProvenanceError]
    while todo:
        cls = todo.pop()
        if cls.code == code:
            return cls(message)
        todo.extend(cls.__subclasses__())
    return ProvenanceError(message)


class IndexLockedError(ProvenanceError):
    """Another process is writing the index (build, append, remove, compact): one writer at a time."""

    code = "index_locked"


class RegistryError(ProvenanceError):
    """The opt-out registry (SQLite) cannot be opened or written."""

    code = "registry_unavailable"


class InvalidOptoutError(ProvenanceError, ValueError):
    """An opt-out or a consent query with a bad value: not an http(s) URL, not a domain, not a sha256, too many."""

    code = "invalid_optout"


class OptoutNotFoundError(ProvenanceError):
    """An opt-out id the registry does not hold."""

    code = "optout_not_found"


class OptoutForbiddenError(ProvenanceError):
    """Removing an opt-out made by another key (only that key or an admin key may)."""

    code = "forbidden"


class DomainProofError(ProvenanceError):
    """A domain's ownership proof failed: /.well-known/provenance-optout.txt unreachable or without the token."""

    code = "domain_proof_failed"
