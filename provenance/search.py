"""Searching an index by image, by text (OpenCLIP) or by caption words, with the index's own models."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from provenance.descriptors.pdq import PDQ_MATCH_THRESHOLD
from provenance.errors import DescriptorUnavailableError
from provenance.models import ModelOptions, check_same_model, load_descriptor
from provenance.store import ProvenanceIndex
from provenance.types import CaptionHit, Match

logger = logging.getLogger(__name__)

IMAGE_DESCRIPTORS = ("sscd", "pdq", "clip")


class Searcher:
    """An index plus the models it was built with, loaded once and checked against the manifest."""

    def __init__(self, index: ProvenanceIndex, models: ModelOptions | None = None):
        self.index = index
        self._options = models
        self._models: dict[str, Any] = {}

    @classmethod
    def open(
        cls, index_dir: str | os.PathLike[str], models: ModelOptions | None = None, use_gpu: bool | None = None
    ) -> Searcher:
        return cls(ProvenanceIndex.open(index_dir, use_gpu=use_gpu), models)

    @property
    def image_descriptors(self) -> list[str]:
        return [n for n in IMAGE_DESCRIPTORS if n in self.index.specs]

    def model(self, name: str) -> Any:
        """The descriptor model for `name`: as the manifest recorded it, or as the caller's options say
        (then refused with IndexMismatchError unless it is the same model)."""
        if name not in self._models:
            if name not in self.index.specs:
                raise DescriptorUnavailableError(
                    f"the index at {self.index.dir} was built without {name!r} (it has "
                    f"{', '.join(self.index.specs)}); rebuild it with --descriptors ...,{name}"
                )
            args = self.index.load_args(name)
            if self._options is not None:
                user_args = {k: v for k, v in self._options.load_args(name).items()}
                if name == "sscd" and self._options.sscd_model is None:
                    user_args = {}
                if name == "clip" and self._options.clip_model is None and self._options.clip_pretrained is None:
                    user_args = {}
                args = user_args or args
            model = load_descriptor(name, args, self._options.device if self._options else None)
            check_same_model(self.index.specs[name], model.spec)
            self._models[name] = model
        return self._models[name]

    def embed_images(self, images: list[Image.Image], descriptors: list[str] | None = None) -> dict[str, np.ndarray]:
        names = descriptors or self.image_descriptors
        return {n: self.model(n).embed(images) for n in names}

    def search_vectors(self, vectors: dict[str, np.ndarray], k: int = 10) -> list[dict[str, list[Match]]]:
        """Per query image, the matches of each descriptor (best first)."""
        per_name = {n: self.index.search_vectors(n, x, k) for n, x in vectors.items()}
        n_queries = len(next(iter(vectors.values()))) if vectors else 0
        return [{n: per_name[n][i] for n in per_name} for i in range(n_queries)]

    def search_image(
        self, image: Image.Image, k: int = 10, descriptors: list[str] | None = None
    ) -> dict[str, list[Match]]:
        return self.search_vectors(self.embed_images([image], descriptors), k)[0]

    def search_text(self, text: str, k: int = 10) -> list[Match]:
        """Corpus images whose OpenCLIP image embedding is closest to the text's embedding."""
        q = self.model("clip").embed_text([text])
        return self.index.search_vectors("clip", q, k)[0]

    def search_caption(self, words: str, k: int = 10) -> list[CaptionHit]:
        return self.index.search_caption(words, k)


def drop_far_pdq(per_descriptor: dict[str, list[Match]]) -> dict[str, list[Match]]:
    """The same lists without PDQ neighbours beyond matching range (PDQ_MATCH_THRESHOLD bits): a PDQ hash's
    nearest neighbour always exists, but past ~31 bits it is noise, not evidence of a copy."""
    if "pdq" not in per_descriptor:
        return per_descriptor
    close = [m for m in per_descriptor["pdq"] if (m.distance or 0) <= PDQ_MATCH_THRESHOLD]
    return {**per_descriptor, "pdq": close}


def best_per_item(views: list[list[Match]], k: int) -> list[Match]:
    """One descriptor's matches from several views of the same image: each corpus item once, at its best score
    over the views, best first, at most k."""
    best: dict[str, Match] = {}
    for matches in views:
        for m in matches:
            if m.id not in best or m.score > best[m.id].score:
                best[m.id] = m
    return sorted(best.values(), key=lambda m: -m.score)[:k]


def merge_matches(per_descriptor: dict[str, list[Match]], k: int) -> list[Match]:
    """One best-first list across descriptors: sscd, then pdq, then clip, each by score, ids de-duplicated
    (copy-detection evidence ranks above semantic similarity)."""
    order = {"pdq": 0, "sscd": 1, "clip": 2}
    merged: list[Match] = []
    seen: set[str] = set()
    for name in sorted(per_descriptor, key=lambda n: order.get(n, 9)):
        for m in per_descriptor[name]:
            if m.id not in seen:
                merged.append(m)
                seen.add(m.id)
    return merged[:k]
