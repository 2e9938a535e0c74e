"""Memorization signals of a generation run: text-conditional noise magnitude and output self-similarity.

Two signals, both cheap next to the generation itself:

- `noise_norm` (Wen et al., ICLR 2024, "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models"): the L2 norm of eps(x_t, prompt) - eps(x_t, empty prompt), averaged over the first denoiser
  evaluations. Memorized prompts pull the prediction away from the unconditional one far more than
  ordinary prompts, already at the first step. `NoiseNormProbe` reads both halves of the classifier-free
  guidance batch with a forward hook on the UNet, so it costs one subtraction and one norm per step.
- `pairwise_sscd` (Carlini et al., USENIX Security 2023, "Extracting Training Data from Diffusion Models"):
  the mean pairwise SSCD cosine similarity among the images of one prompt. Memorized prompts give
  near-identical images whatever the seed.

The flag rule (`flag_prompts`), per prompt of one run:
- `pairwise_sscd > 0.5` (SSCD's replication anchor: pairs above 0.5 are copies, Pizzi et al. 2022 and
  Somepalli et al. 2023), or
- a robust z-score of `noise_norm` above 3 among the run's prompts, when the run has at least 5 prompts
  with a noise norm. The z-score uses the median and the MAD (scaled by 1.4826 to match a standard
  deviation on normal data) because one memorized prompt inflates the mean and the standard deviation
  and hides itself: with a plain z-score, n prompts can never exceed (n - 1) / sqrt(n).
The noise norm has no absolute threshold here: its scale depends on the model and the latent size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SSCD_REPLICATION_THRESHOLD = 0.5
NOISE_NORM_Z_THRESHOLD = 3.0
MIN_PROMPTS_FOR_Z = 5
MIN_IMAGES_FOR_PAIRWISE = 4
_MAD_TO_STD = 1.4826  # MAD * 1.4826 estimates the standard deviation of normal data

# images -> (n, d) float32 L2-normalised rows (SSCDDescriptor.embed has this shape)
Embedder = Callable[[list[Any]], np.ndarray]


@dataclass
class MemorizationSignals:
    """What one prompt's generation says about memorization; `to_dict()` is the metadata contract."""

    noise_norm: float | None = None  # mean over the prompt's images and the first `noise_norm_steps` steps
    noise_norm_steps: int = 0  # denoiser evaluations averaged (0 when not measured)
    pairwise_sscd: float | None = None  # mean off-diagonal SSCD cosine among the prompt's images (>= 4)
    noise_norm_z: float | None = None  # robust z-score among the run's prompts (None below 5 prompts)
    flag: bool = False
    flag_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "noise_norm": self.noise_norm,
            "noise_norm_steps": self.noise_norm_steps,
            "pairwise_sscd": self.pairwise_sscd,
            "noise_norm_z": self.noise_norm_z,
            "flag": self.flag,
            "flag_reason": self.flag_reason,
        }


class NoiseNormProbe:
    """Records ||eps(x_t, c) - eps(x_t, uncond)|| per sample from the denoiser's CFG forward passes.

    Diffusers' text-to-image pipelines run the UNet once per step on `cat([uncond, cond])` (negative
    prompt embeddings first), so the hook splits the output in two halves. Call `start(batch_size)`
    before each pipeline call; a forward pass whose batch is not `2 * batch_size` means guidance was
    off (guidance_scale <= 1, distilled models) and nothing is recorded for it.
    """

    def __init__(self, denoiser: Any, steps: int):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.steps = steps
        self._batch = 0
        self._calls = 0
        self._norms: list[Any] = []  # per captured step: (batch,) float32 tensors
        self._handle = denoiser.register_forward_hook(self._hook)

    def start(self, batch_size: int) -> None:
        self._batch = batch_size
        self._calls = 0
        self._norms = []

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        if self._calls >= self.steps:
            return
        self._calls += 1
        sample = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if sample.shape[0] != 2 * self._batch:
            return
        uncond, cond = sample.detach().float().chunk(2)  # each (batch, c, h, w)
        self._norms.append((cond - uncond).flatten(1).norm(dim=1).cpu())

    @property
    def steps_captured(self) -> int:
        return len(self._norms)

    def norms(self) -> np.ndarray | None:
        """(batch,) float32: each sample's norm averaged over the captured steps; None if none captured."""
        if not self._norms:
            return None
        import torch

        return torch.stack(self._norms).mean(dim=0).numpy().astype(np.float32)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> NoiseNormProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pairwise_similarity(embeddings: np.ndarray) -> float:
    """Mean cosine similarity over all distinct pairs of rows of `embeddings` ((n, d), L2-normalised, n >= 2)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"embeddings must be an (n >= 2, d) matrix, got shape {x.shape}")
    n = x.shape[0]
    sims = x @ x.T  # (n, n)
    off_diagonal = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(off_diagonal)


def robust_z_scores(values: Sequence[float]) -> np.ndarray:
    """(v - median) / (1.4826 * MAD); falls back to the standard deviation when the MAD is 0, and to 0s."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    med = np.median(v)
    scale = _MAD_TO_STD * np.median(np.abs(v - med))
    if scale <= 1e-12:
        scale = float(v.std())
    if scale <= 1e-12:
        return np.zeros_like(v)
    z: np.ndarray = (v - med) / scale
    return z


def flag_prompts(signals: Sequence[MemorizationSignals]) -> None:
    """Fill `noise_norm_z`, `flag` and `flag_reason` of one run's per-prompt signals (the module's rule)."""
    measured = [i for i, s in enumerate(signals) if s.noise_norm is not None and math.isfinite(s.noise_norm)]
    z = np.full(len(signals), np.nan)
    if len(measured) >= MIN_PROMPTS_FOR_Z:
        z[measured] = robust_z_scores([signals[i].noise_norm for i in measured])  # type: ignore[misc]
    for i, s in enumerate(signals):
        s.noise_norm_z = None if np.isnan(z[i]) else round(float(z[i]), 4)
        reasons = []
        if s.pairwise_sscd is not None and s.pairwise_sscd > SSCD_REPLICATION_THRESHOLD:
            reasons.append(
                f"pairwise SSCD {s.pairwise_sscd:.3f} > {SSCD_REPLICATION_THRESHOLD} (outputs near-identical)"
            )
        if s.noise_norm_z is not None and s.noise_norm_z > NOISE_NORM_Z_THRESHOLD:
            reasons.append(
                f"noise-norm robust z-score {s.noise_norm_z:.2f} > {NOISE_NORM_Z_THRESHOLD} among the run's prompts"
            )
        s.flag = bool(reasons)
        s.flag_reason = "; ".join(reasons) if reasons else None


def prompt_pairwise_sscd(images: list[Any], embedder: Embedder) -> float | None:
    """Mean pairwise SSCD similarity of one prompt's images, or None below `MIN_IMAGES_FOR_PAIRWISE`."""
    if len(images) < MIN_IMAGES_FOR_PAIRWISE:
        return None
    emb = np.asarray(embedder(images), dtype=np.float32)  # (n, 512) L2-normalised
    return round(pairwise_similarity(emb), 6)
