"""OpenCLIP image and caption-text embeddings, for semantic image search and text-to-image search.

`pretrained` is an open_clip hub tag (e.g. "laion2b_s34b_b79k", fetched when online) or a local
checkpoint path. Offline and in tests a tiny architecture (`provenance-tiny`, shipped as a JSON
config) with random weights is saved to a checkpoint and loaded through the very same path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from provenance.descriptors.base import DescriptorSpec, file_checksum, l2_normalize
from provenance.errors import ModelLoadError
from provenance.extras import require

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
TINY_CLIP_MODEL = "provenance-tiny"
_ASSETS = Path(__file__).resolve().parents[1] / "assets"
_registered = False


def _register_local_configs() -> None:
    """Make open_clip aware of the tiny test architecture shipped in provenance/assets/."""
    global _registered
    if not _registered:
        open_clip = require("open_clip", "the clip descriptor")
        open_clip.add_model_config(_ASSETS / f"{TINY_CLIP_MODEL}.json")
        _registered = True


class CLIPDescriptor:
    """Image embeddings (the `clip` index) and text embeddings (queries, and the `clip_text` caption index)."""

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Any,
        spec: DescriptorSpec,
        device: str,
    ):
        # model: an open_clip CLIP module; tokenizer: open_clip's, texts -> (n, context) int64 tensor
        self.model = model
        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self.spec = spec
        self.device = device

    @classmethod
    def load(
        cls,
        model_name: str = DEFAULT_CLIP_MODEL,
        pretrained: str | os.PathLike[str] | None = DEFAULT_CLIP_PRETRAINED,
        device: str | None = None,
    ) -> CLIPDescriptor:
        import torch

        open_clip = require("open_clip", "the clip descriptor")

        _register_local_configs()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if model_name not in open_clip.list_models():
            raise ModelLoadError(f"unknown OpenCLIP model {model_name!r}; see open_clip.list_models()")
        pretrained_str = str(pretrained) if pretrained else None
        checkpoint = (
            pretrained_str
            if pretrained_str is not None and (os.sep in pretrained_str or Path(pretrained_str).exists())
            else None
        )  # a local file, not a hub tag
        is_path = checkpoint is not None
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise ModelLoadError(f"OpenCLIP checkpoint not found: {pretrained_str}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained_str, device=device
            )
        except Exception as e:  # open_clip raises RuntimeError/ValueError/HF errors
            hint = " (offline? hub weights cannot be fetched; pass a local checkpoint path)" if not is_path else ""
            raise ModelLoadError(f"cannot load OpenCLIP {model_name} / {pretrained_str}: {e}{hint}") from None
        model.eval()
        if checkpoint is not None:
            tag, checksum = Path(checkpoint).name, file_checksum(checkpoint)
        else:
            tag, checksum = (pretrained_str or "random-init"), f"hub:{pretrained_str}"
        dim = (
            int(model.text_projection.shape[1])
            if getattr(model, "text_projection", None) is not None
            else int(model.visual.output_dim)
        )
        spec = DescriptorSpec("clip", f"{model_name}/{tag}", checksum, dim, "cosine")
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), spec, device)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(3, S, S) float32, normalised as the model was trained."""
        x: np.ndarray = self._preprocess(image.convert("RGB")).numpy()
        return x

    def embed_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.stack(batch)).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_image(x)
        return l2_normalize(feats.float().cpu().numpy())

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch([self.preprocess(im) for im in images])

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised; empty or missing captions embed as the empty string."""
        import torch

        tokens = self._tokenizer([t or "" for t in texts]).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_text(tokens)
        return l2_normalize(feats.float().cpu().numpy())


def make_tiny_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a randomly initialised `provenance-tiny` OpenCLIP model as a checkpoint (tests, offline demo)."""
    import torch

    open_clip = require("open_clip", "the clip descriptor")

    _register_local_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_MODEL, pretrained=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path
