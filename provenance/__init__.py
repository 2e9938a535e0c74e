"""provenance: was this image in a training set, does a generated image copy one, what marks does it carry."""

from __future__ import annotations

__version__ = "0.1.0"
