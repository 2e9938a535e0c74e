"""The exceptions the library raises: one per failure kind, each naming the bad value and what to do."""

from __future__ import annotations


class ProvenanceError(Exception):
    """Base class of every error this library raises on purpose."""


class UnreadableImageError(ProvenanceError):
    """A file or byte string is not an image we can decode (corrupt, truncated, empty, not an image)."""


class DecompressionBombError(UnreadableImageError):
    """An image whose pixel count exceeds the configured limit (a decompression bomb)."""


class CorpusError(ProvenanceError):
    """A corpus source cannot be read at all (missing folder, no shards, unsupported column...)."""


class IndexNotFoundError(ProvenanceError):
    """No built index at the given directory."""


class IndexFormatError(ProvenanceError):
    """An index directory exists but its manifest or files are unreadable or of another format version."""


class IndexMismatchError(ProvenanceError):
    """A query or an append uses a different model/descriptor than the one the index was built with."""


class DescriptorUnavailableError(ProvenanceError):
    """A search asks for a descriptor the index was not built with (e.g. text search without `clip`)."""


class ModelLoadError(ProvenanceError):
    """A model checkpoint or hub id cannot be loaded."""


class ItemNotFoundError(ProvenanceError):
    """A corpus item id that the index does not hold."""


class GenerationError(ProvenanceError):
    """Image generation cannot start or continue (bad model id, unwritable output folder...)."""
