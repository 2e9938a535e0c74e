"""Writing visible-watermark checkpoints in the format provenance.watermarks.visible loads (the trainers' output)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from provenance.watermarks.visible import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TapHead,
    WatermarkNet,
)


def save_checkpoint(
    path: str | Path,
    model: WatermarkNet | TapHead,
    input_size: int = 0,
    card: dict | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    backbone=None,
) -> None:
    """Write a WatermarkNet (pixels in, `input_size`) or a TapHead (on the SSCD model whose DescriptorSpec is
    `backbone`) in the provenance checkpoint format: float32 state dict + architecture + card."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_id": CHECKPOINT_FORMAT,
        "arch": asdict(model.config),
        "state_dict": {k: v.detach().cpu().float().clone() for k, v in model.state_dict().items()},
        "card": card or {},
    }
    if isinstance(model, TapHead):
        if backbone is None:
            raise ValueError("a TapHead checkpoint needs the DescriptorSpec of the SSCD model it was trained on")
        ckpt["kind"] = "sscd-taps"
        ckpt["model_id"] = f"{CHECKPOINT_FORMAT}/sscd-head"
        ckpt["backbone"] = {"model_id": backbone.model_id, "checksum": backbone.checksum}
    else:
        ckpt["preprocess"] = {"input_size": int(input_size), "mean": list(mean), "std": list(std)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
