"""Invisible watermarks of the dwtDct kind: reading Stable Diffusion's marks and writing/reading our own run-id mark.

How dwtDct works (invisible-watermark's `EmbedMaxDct`, the method every scheme here uses): take one
channel of the image, its one-level Haar approximation band LL (half size, LL = 2 x the 2x2 pixel
mean), cut LL into 4x4 blocks in raster order; block number `k` carries payload bit `k % length`.
In each block the coefficient with the largest magnitude (the first one excluded) is quantised to
`sign * (floor(|v| / step) + 0.25 + 0.5 * bit) * step`, so its remainder modulo `step` sits at a
quarter step for a 0 and three quarters for a 1. A payload repeats over the whole image (a 512x512
image has 4,096 blocks: 30 copies of a 136-bit payload).

Reading (the same for every scheme, which are data in `SCHEMES`):
  * soft decisions: each block gives `-sin(2 pi v / step)` (+1 on the bit-1 lattice, -1 on the
    bit-0 one, 0 on the decision boundary) instead of a hard bit, and the repeats of each bit are
    summed, so a block that sits far from the lattice barely votes;
  * two read-outs of each block: (a) the block's largest coefficient, as the encoder chose it; (b)
    the coefficient nearest the lattice among those within 0.75 step of the largest, because the
    encoder may have lowered the marked one by up to 0.75 step below another (a) then misses; this
    fixes most errors on untouched images but picks noise once JPEG has blurred the lattice, where
    (a) is better. Neither favours bit 0 or 1, so clean images still give fair coin flips;
  * hypotheses about what happened to the image since it was marked: as is; (chroma schemes only)
    decoded from a 4:2:0 JPEG, whose chroma upsampling we invert; and resized back to a standard
    generator size of the same aspect ratio when the image is up to 4x larger than one (optional:
    `try_resized`); and, for SDXL, the encoder's colour domain (float or 8-bit). Each scheme's p-value
    is the exact binomial tail of its agreeing fixed bits times the number of (hypothesis, domain,
    read-out) triples tried (Bonferroni), so a clean image passes
    `DETECTION_P_VALUE` = 1e-6 with probability <= 1e-6 per scheme;
  * optionally (`try_cropped`), the image as a crop of a marked one: every block-grid offset, the
    original's width and the payload's phase (`_crop_search`), with those tests in its own
    Bonferroni factor and the two searches' best p doubled.

Schemes:
  * ``sd-v1``: b"StableDiffusionV1" (136 bits) in the U channel of an 8-bit image, step 36 (the
    CompVis / Stability txt2img scripts: `WatermarkEncoder().set_watermark('bytes', ...)` then
    `encode(bgr_uint8, 'dwtDct')`); ``sd-v2``: the same with b"SDV2" (32 bits).
  * ``sdxl``: the 48 bits 101100111110110010010000011110111011000110011110 in U, step 36, written
    by diffusers' `StableDiffusionXLWatermarker` (and generative-models') on a float image in 0..255,
    for which OpenCV puts U around 0.5 instead of 128, and by other tools on the 8-bit image, where
    U is around 128. Read in the other domain than it was written in, the lattice moves by
    256 mod 36 = 4, coefficients below U's centre fold the other way under |v|, and the largest |v|
    is often another coefficient: enough wrong votes that a 256-384 px image (21-48 copies) falls
    under the 42 right bits of 48 that p <= 1e-6 needs (issue 31). So we read it in both (`offsets`).
  * ``provenance`` (ours, written by `embed_provenance_mark`): 112 bits in the luma channel Y,
    step 20, PSNR about 51 dB (of the steps 16-32 we tried, 20 survived JPEG q60-q90 best):
      bits   0..63   magic  bc0619ab9e8e0f07 (sha256(b"provenance-mark-v1")[:8]); detection is the
                     binomial test on these 64 bits;
      bits  64..95   run id (uint32, big-endian)       } XOR-ed with the whitening mask 8b6b065e955f
      bits  96..111  CRC-16 of the run id, polynomial } (sha256(...)[8:14]) so no run id is flat.
                     0x3D65 (DNP), MSB first, init 0: minimum Hamming distance 6 on these 48 bits.
    The run id is reported (8 hex digits) only when its CRC checks, after trying to flip up to two
    of the 12 least reliable of its 48 bits (soft-decision "Chase" decoding); with distance 6 that
    can only land on a wrong run id when >= 4 of the 48 bits are wrong, and then with a chance of
    about 79 / 65536. Otherwise the mark is reported with payload None.
    Luma, not chroma, because a 4:2:0 JPEG halves chroma resolution, which erases chroma marks at
    any quality that matters. We embed with our own numpy version of `EmbedMaxDct`: invisible-
    watermark's `encode()` swaps the horizontal and vertical detail bands when it rebuilds the
    channel (harmless in chroma, about 30 dB PSNR in luma); and we move the marked coefficient to
    the nearest point of its bit's lattice (change within +-step/2, mean 0) instead of rounding down
    first (-3/4..+1/4 step), which gains 2.4 dB, leaves no dark dots, and makes q60 JPEGs readable.
    It is the same lattice, so stock invisible-watermark reads it:
    `WatermarkDecoder('bits', 112).decode(bgr, 'dwtDct', scales=[20, 0, 0])`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
from PIL import Image

from provenance.types import InvisibleMark

logger = logging.getLogger(__name__)

DETECTION_P_VALUE = 1e-6
# invisible-watermark refuses to embed in images below 256x256 pixels; we keep its rule for our mark.
MIN_EMBED_PIXELS = 256 * 256
# Decode at most this many 4x4 LL blocks (a centred band of block rows) per hypothesis: a 1024x1024
# image's worth, which holds >= 120 copies of any payload here, so huge photos cost no more.
MAX_BLOCKS = 8192
# Sizes diffusion pipelines write (SD 1.x/2.x squares and portraits, SDXL buckets): an image larger
# than one of these with the same aspect ratio may be an upscaled generation.
GENERATOR_SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (512, 768),
    (768, 512),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)

# OpenCV's BT.601 YUV (COLOR_BGR2YUV) rows, in RGB order: U = 0.492 (B - Y). Both rows are what the
# encoders used; Y's coefficients sum to 1 and U's to 0, which embed_provenance_mark relies on.
_Y_RGB = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_U_RGB = np.array([-0.492 * 0.299, -0.492 * 0.587, 0.492 * (1 - 0.114)], dtype=np.float32)


def _bytes_bits(data: bytes) -> tuple[int, ...]:
    return tuple(int(b) for b in np.unpackbits(np.frombuffer(data, dtype=np.uint8)))


_PROVENANCE_SEED = hashlib.sha256(b"provenance-mark-v1").digest()
PROVENANCE_MAGIC = _PROVENANCE_SEED[:8]  # bc0619ab9e8e0f07: 31 ones in 64 bits
_PROVENANCE_MASK = np.unpackbits(np.frombuffer(_PROVENANCE_SEED[8:14], dtype=np.uint8))  # (48,) uint8
PROVENANCE_STEP = 20.0
_CHASE_BITS = 12  # flip up to two of this many least reliable run-id/CRC bits before giving up
# Two ways to read each block (see _block_soft): the coefficient nearest the lattice among those
# that may have been the marked maximum (best on untouched images), and simply the maximum (best
# after JPEG, whose noise makes "nearest the lattice" pick at random).
_READOUTS = ("nearest", "largest")


@dataclass(frozen=True)
class MarkScheme:
    """One dwtDct watermark: where it lives, how it is quantised, which bits every copy carries."""

    name: str
    fixed_bits: tuple[int, ...]  # bits every mark carries at payload positions 0..n-1 (what detection tests)
    length: int  # payload length in bits; LL block k carries bit k % length
    channel: Literal["Y", "U"]
    # Added to LL coefficients before reading: 2 x the colour offset the encoder's channel had
    # (LL = 2 x the 2x2 mean), e.g. U = 128 for an 8-bit encode, 0.5 for a float one. One entry per
    # way the scheme's encoder is run in practice; each is a hypothesis, in the Bonferroni factor.
    offsets: tuple[float, ...]
    step: float  # the quantisation step (invisible-watermark's `scales` entry for the channel)
    # Turns the soft sums of the payload bits after the fixed ones, (length - n,) float, into the
    # reported payload string, or None when they do not decode reliably.
    read_payload: Callable[[np.ndarray], str | None] | None = None

    @property
    def n_fixed(self) -> int:
        return len(self.fixed_bits)


def _crc16(value: int) -> int:
    """CRC-16 of a 32-bit value with the DNP polynomial 0x3D65 (MSB first, init 0, no final XOR).

    Chosen over CCITT's 0x1021 because on 32 data bits it keeps codewords >= 6 bits apart (0x1021: 4),
    which is what makes correcting two bits safe.
    """
    reg = 0
    for i in range(31, -1, -1):
        feedback = ((reg >> 15) ^ (value >> i)) & 1
        reg = (reg << 1) & 0xFFFF
        if feedback:
            reg ^= 0x3D65
    return reg


def _read_provenance_run_id(soft: np.ndarray) -> str | None:
    """Soft sums of bits 64..111 -> the run id as 8 hex digits when the CRC checks (flipping <= 2 weak bits)."""
    hard = (soft > 0).astype(np.uint8)
    weak = np.argsort(np.abs(soft), kind="stable")[:_CHASE_BITS]
    flips: list[tuple[int, ...]] = [()] + [(int(i),) for i in weak]
    flips += [(int(i), int(j)) for i, j in combinations(weak, 2)]
    # Cheapest explanation first: the flips whose soft sums were closest to zero.
    flips.sort(key=lambda f: float(np.abs(soft[list(f)]).sum()) if f else 0.0)
    for f in flips:
        bits = hard.copy()
        bits[list(f)] ^= 1
        data = np.packbits(bits ^ _PROVENANCE_MASK).tobytes()  # 4 bytes run id + 2 bytes CRC
        if _crc16(int.from_bytes(data[:4], "big")) == int.from_bytes(data[4:6], "big"):
            return data[:4].hex()
    return None


# LL offsets of U: an 8-bit encode (U = 128 + ..., and imwatermark writes the float channel back into
# a uint8 array, truncating each pixel by 0.5 on average, i.e. LL by 1) and a float one (U = 0.5 + ...).
_U8_OFFSET = 256.0 + 1.0
_FLOAT_OFFSET = 1.0

SCHEMES: tuple[MarkScheme, ...] = (
    MarkScheme("sd-v1", _bytes_bits(b"StableDiffusionV1"), 136, "U", (_U8_OFFSET,), 36.0),
    MarkScheme("sd-v2", _bytes_bits(b"SDV2"), 32, "U", (_U8_OFFSET,), 36.0),
    # SDXL's bits are written both ways: diffusers and Stability's generative-models encode the float
    # image; tools that mark a saved 8-bit image (the CompVis-script way) encode uint8. Both are tried
    # (see the module docstring).
    MarkScheme(
        "sdxl",
        tuple(int(c) for c in "101100111110110010010000011110111011000110011110"),
        48,
        "U",
        (_FLOAT_OFFSET, _U8_OFFSET),
        36.0,
    ),
    MarkScheme("provenance", _bytes_bits(PROVENANCE_MAGIC), 112, "Y", (0.0,), PROVENANCE_STEP, _read_provenance_run_id),
)


def binomial_p_value(agree: int, n: int) -> float:
    """P(X >= agree) for X ~ Binomial(n, 1/2): the chance that random bits agree this well, computed exactly."""
    if n < 0 or not 0 <= agree <= max(n, 0):
        raise ValueError(f"need 0 <= agree <= n, got agree={agree}, n={n}")
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(agree, n + 1)) / (1 << n)  # 1 << n: 2**n as an int


def provenance_payload_bits(run_id: int) -> np.ndarray:
    """The 112 bits our mark carries for `run_id`: (112,) uint8, magic then whitened run id and CRC."""
    if isinstance(run_id, bool) or not isinstance(run_id, (int, np.integer)) or not 0 <= int(run_id) < 2**32:
        raise ValueError(f"run_id must be an integer in [0, 2**32), got {run_id!r}")
    word = int(run_id).to_bytes(4, "big") + _crc16(int(run_id)).to_bytes(2, "big")
    tail = np.unpackbits(np.frombuffer(word, dtype=np.uint8))
    return np.concatenate([np.array(_bytes_bits(PROVENANCE_MAGIC), dtype=np.uint8), tail ^ _PROVENANCE_MASK])


def embed_provenance_mark(image: Image.Image, run_id: int) -> Image.Image:
    """Return a copy of RGB `image` (same size) carrying our invisible mark with `run_id` (uint32).

    Raises TypeError for a non-image, ValueError for a non-RGB image, one under 256x256 pixels, or
    a run id outside [0, 2**32).
    """
    # 1. Check inputs
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image must be RGB, got mode {image.mode!r}; convert it with image.convert('RGB')")
    if image.width * image.height < MIN_EMBED_PIXELS:
        raise ValueError(f"image {image.width}x{image.height} is too small for the mark (needs >= 256x256 pixels)")
    bits = provenance_payload_bits(run_id)

    # 2. Quantise the largest coefficient of each 4x4 block of luma's LL band
    rgb = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    ll = _ll(rgb @ _Y_RGB)  # (H//4*2, W//4*2)
    nbr, nbc = ll.shape[0] // 4, ll.shape[1] // 4
    blocks = ll[: nbr * 4, : nbc * 4].reshape(nbr, 4, nbc, 4).transpose(0, 2, 1, 3).reshape(nbr * nbc, 16)
    rows = np.arange(nbr * nbc)
    pos = np.argmax(np.abs(blocks[:, 1:]), axis=1) + 1
    v = blocks[rows, pos]
    bit = bits[rows % len(bits)]
    # EmbedMaxDct's lattice (|v| mod step at 1/4 step for a 0, 3/4 for a 1), but we move to the
    # nearest point of the bit's lattice (|change| <= step/2, mean 0) where EmbedMaxDct always
    # rounds down first (change -3/4..+1/4 step, mean -1/4 step: visible dark dots, and a marked
    # maximum pushed below its neighbours more often).
    phase = 0.25 + 0.5 * bit  # (n,) in steps
    q = (np.round(np.abs(v) / PROVENANCE_STEP - phase) + phase) * PROVENANCE_STEP
    q = np.where(v >= 0, 1.0, -1.0) * np.maximum(q, phase * PROVENANCE_STEP)  # |v| stays >= 0 on the lattice

    # 3. Back to pixels: an LL change of d is d/2 on each pixel of its 2x2 cell (Haar synthesis), and
    # adding one integer to R, G and B changes Y by exactly that integer and leaves U and V alone. So
    # spread the integer D = round(2 d) over the cell's four pixels: the LL value lands within 0.25
    # of the lattice with no rounding error, even in flat areas where rounding would be coherent.
    d_ll = np.zeros((nbr * nbc, 16), dtype=np.int32)
    d_ll[rows, pos] = np.rint(2.0 * (q - v)).astype(np.int32)
    d_ll = d_ll.reshape(nbr, nbc, 4, 4).transpose(0, 2, 1, 3).reshape(nbr * 4, nbc * 4)
    base, rem = np.divmod(d_ll, 4)  # (nbr*4, nbc*4) each
    d_px = np.zeros(rgb.shape[:2], dtype=np.int32)
    d_px[0 : nbr * 8 : 2, 0 : nbc * 8 : 2] = base + (rem > 0)
    d_px[0 : nbr * 8 : 2, 1 : nbc * 8 : 2] = base + (rem > 1)
    d_px[1 : nbr * 8 : 2, 0 : nbc * 8 : 2] = base + (rem > 2)
    d_px[1 : nbr * 8 : 2, 1 : nbc * 8 : 2] = base
    out = np.clip(np.asarray(image, dtype=np.int32) + d_px[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def detect_invisible_marks(  # noqa: C901 - one pass per scheme, its steps in order
    image: Image.Image, *, include_undetected: bool = False, try_resized: bool = False, try_cropped: bool = False
) -> list[InvisibleMark]:
    """Decode every scheme in `SCHEMES` from `image`: those detected at p <= 1e-6, or all with `include_undetected`.

    Each mark's `p_value` is Bonferroni-corrected for the hypotheses tried; `bit_accuracy` is the
    share of the scheme's fixed bits that agree, under the best hypothesis. Schemes whose payload
    does not fit once in the image come out with bit_accuracy 0 and p_value 1. `try_resized` also
    tries the image Lanczos-resized back to each `GENERATOR_SIZES` entry it may have been upscaled
    (2x-4x) from: it finds upscaled generations saved losslessly, at the cost of one resize each
    (~25 ms of CPU for a 1024x1024 image), so it is off by default. `try_cropped` also searches for a
    mark in an image cropped from a marked one (`_crop_search`: every 8 x 8 grid offset, the original's
    width and the payload's phase), at ~0.2 s of CPU per 512x512 image; the p-values then cover both
    searches (x 2), so a clean image still passes 1e-6 with probability <= 1e-6 per scheme.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    hypotheses = _hypotheses(image, try_resized)
    tried = {
        c: len(_READOUTS) * sum(1 for h in hypotheses if c in h.blocks) for c in ("Y", "U")
    }  # x len(offsets) per scheme
    soft_cache: dict[tuple[str, str, float, float], tuple[np.ndarray, np.ndarray]] = {}
    index_cache: dict[tuple[int, int, int], np.ndarray] = {}
    marks: list[InvisibleMark] = []
    # _crop_search's results, made once when a scheme needs them
    crops: dict[str, tuple[tuple[int, float], np.ndarray, int]] | None = None
    for scheme in SCHEMES:
        best: tuple[tuple[int, float], str, np.ndarray] | None = None  # ((agreeing bits, clarity), hypothesis, sums)
        fixed = np.asarray(scheme.fixed_bits, dtype=bool)
        for h in hypotheses:
            if scheme.channel not in h.blocks:
                continue
            coeffs, first = h.blocks[scheme.channel]
            n_blocks = coeffs.shape[1]
            if n_blocks < scheme.length:
                continue
            ikey = (first, n_blocks, scheme.length)
            if ikey not in index_cache:
                index_cache[ikey] = (first + np.arange(n_blocks)) % scheme.length
            bit_index = index_cache[ikey]
            for offset in scheme.offsets:
                key = (h.name, scheme.channel, offset, scheme.step)
                if key not in soft_cache:  # sd-v1, sd-v2 and sdxl's 8-bit reading share block values
                    soft_cache[key] = _block_soft(coeffs, offset, scheme.step)
                for readout, soft in zip(_READOUTS, soft_cache[key], strict=False):
                    sums = np.bincount(bit_index, weights=soft, minlength=scheme.length)  # (length,)
                    agree = int(np.count_nonzero((sums[: scheme.n_fixed] > 0) == fixed))
                    # Ties (e.g. all fixed bits right under two read-outs) go to the read-out whose fixed
                    # bits are most clearly right, whose payload bits are then the most reliable too.
                    head = sums[: scheme.n_fixed]
                    clarity = float(np.sum(np.where(fixed, head, -head)) / (np.sum(np.abs(head)) + 1e-9))
                    if best is None or (agree, clarity) > best[0]:
                        best = ((agree, clarity), f"{h.name}, offset {offset:g}, {readout}", sums)
        p = 1.0
        if best is not None:
            p = min(1.0, binomial_p_value(best[0][0], scheme.n_fixed) * tried[scheme.channel] * len(scheme.offsets))
        if try_cropped:
            if crops is None:
                crops = _crop_search(image)
            found = crops.get(scheme.name)
            if found is not None:
                (c_agree, _), c_sums, c_tests = found
                c_p = min(1.0, binomial_p_value(c_agree, scheme.n_fixed) * c_tests)
                if best is None or c_p < p:
                    best, p = (found[0], "cropped", c_sums), c_p
            p = min(1.0, 2 * p)  # two searches: a union bound keeps the false-positive rate per scheme
        if best is None:
            if include_undetected:
                marks.append(InvisibleMark(scheme.name, 0.0, 1.0))
            continue
        (agree, _), hyp, sums = best
        detected = p <= DETECTION_P_VALUE
        logger.debug("%s: %d/%d bits agree under %r, p=%.3g", scheme.name, agree, scheme.n_fixed, hyp, p)
        if detected or include_undetected:
            payload = None
            if detected and scheme.read_payload is not None:
                payload = scheme.read_payload(sums[scheme.n_fixed :])
            marks.append(InvisibleMark(scheme.name, agree / scheme.n_fixed, p, payload))
    return marks


def _crop_search(image: Image.Image) -> dict[str, tuple[tuple[int, float], np.ndarray, int]]:
    """Every scheme's best reading of `image` as a crop of a marked image, as {scheme: ((agreeing fixed bits,
    clarity), soft sums in payload order, tests made)}.

    A crop moves three things the plain reading assumes: the 8 x 8 pixel block grid (and the Haar 2x2 pairing
    within it), the payload's phase (block k of the original carries bit k % length), and the row stride of the
    block numbering (the original's width in blocks). So: each of the 64 grid offsets (the image cut by 0-7 pixels
    at the left and top); for each, the crop's own width and every wider GENERATOR_SIZES width as the original's;
    for each, every phase of the payload (one matrix product scores them all). The tests made (grid offsets x widths x
    colour domains x read-outs x phases) are the scheme's Bonferroni factor.
    """
    w, h = image.size
    if w < 8 or h < 8:
        return {}
    best: dict[str, tuple[tuple[int, float], np.ndarray]] = {}
    tests = {sc.name: 0 for sc in SCHEMES}
    # whole block rows around the centre, enough for MAX_BLOCKS blocks at every offset: a large image is cut once
    # here rather than copied for each of the 64 offsets
    keep_rows = min(h // 8, MAX_BLOCKS // (w // 8) + 1)
    y0 = 8 * ((h // 8 - keep_rows) // 2)
    region = image.crop((0, y0, w, min(h, y0 + 8 * keep_rows + 8)))
    for oy in range(8):
        for ox in range(8):
            per_row = (w - ox) // 8
            if per_row == 0 or region.height - oy < 8:
                continue
            band, first = _centre_band(region.crop((ox, oy, w, region.height)))
            ll_y, ll_u = _ll_yu(band)
            blocks = {"Y": _blocks(ll_y), "U": _blocks(ll_u)}
            n = blocks["Y"].shape[1]
            rows, cols = np.divmod(np.arange(n), per_row)
            rows += y0 // 8 + first // per_row  # block rows counted from the top of the image cut at (ox, oy)
            widths = np.array([per_row, *sorted({gw // 8 for gw, _ in GENERATOR_SIZES if gw // 8 > per_row})])
            soft_cache: dict[tuple[str, float, float], tuple[np.ndarray, np.ndarray]] = {}
            for scheme in SCHEMES:
                length = scheme.length
                if n < length:
                    continue
                # every width at once: block j's bit (up to the unknown phase) under width w, in bins w * length + bit
                position = (
                    (rows[None, :] * widths[:, None] + cols[None, :]) % length
                    + length * np.arange(len(widths))[:, None]
                ).ravel()
                phase_index, signs, mask = _phase_tables(scheme)
                for offset in scheme.offsets:
                    key = (scheme.channel, offset, scheme.step)
                    if key not in soft_cache:
                        soft_cache[key] = _block_soft(blocks[scheme.channel], offset, scheme.step)
                softs = [
                    soft for offset in scheme.offsets for soft in soft_cache[(scheme.channel, offset, scheme.step)]
                ]
                for soft in softs:
                    sums: np.ndarray = np.bincount(
                        position, weights=np.tile(soft, len(widths)), minlength=len(widths) * length
                    )
                    sums = sums.reshape(len(widths), length)  # (widths, position)
                    # under phase p, payload bit b sits at position (b - p) % length: the correlators hold, per
                    # phase, each position's fixed bit as +-1 (0 for payload bits), so one product scores all phases
                    agree = (np.where(sums > 0, 1.0, -1.0) @ signs + scheme.n_fixed) / 2  # (widths, phases)
                    clarity = (sums @ signs) / (np.abs(sums) @ mask + 1e-9)
                    order = np.lexsort((clarity.ravel(), np.rint(agree).ravel()))
                    wi, phase = divmod(int(order[-1]), length)
                    tests[scheme.name] += agree.size
                    score = (int(round(agree[wi, phase])), float(clarity[wi, phase]))  # noqa: RUF046 - numpy scalar
                    if scheme.name not in best or score > best[scheme.name][0]:
                        best[scheme.name] = (score, sums[wi, phase_index[phase]])
    return {name: (score, sums, tests[name]) for name, (score, sums) in best.items()}


@functools.cache
def _phase_tables(scheme: MarkScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three (length, length) tables for the crop search: [phase, payload bit] -> the position that bit sits at
    under that phase; and [position, phase] -> the fixed bit that sits there, as +1 / -1 (0 at the payload's other
    bits), and 1 where a fixed bit sits (the mask)."""
    length, n = scheme.length, scheme.n_fixed
    phase_index = (np.arange(length)[None, :] - np.arange(length)[:, None]) % length
    signs, mask = np.zeros((length, length)), np.zeros((length, length))
    for phase in range(length):
        positions = phase_index[phase, :n]
        signs[positions, phase] = np.where(np.asarray(scheme.fixed_bits, dtype=bool), 1.0, -1.0)
        mask[positions, phase] = 1.0
    return phase_index, signs, mask


@dataclass(frozen=True)
class _Hypothesis:
    """The image as one guess of what it was when marked: per channel, its LL blocks and the first block's number."""

    name: str
    # channel -> ((15, n) float32 coefficients 1..15 of n blocks, the first one's block number)
    blocks: dict[str, tuple[np.ndarray, int]]


def _hypotheses(image: Image.Image, try_resized: bool) -> list[_Hypothesis]:
    band, first = _centre_band(image)
    ll_y, ll_u = _ll_yu(band)
    out = [
        _Hypothesis("as is", {"Y": (_blocks(ll_y), first), "U": (_blocks(ll_u), first)}),
        # A 4:2:0 JPEG keeps one chroma sample per 2x2 pixels, which is the U LL band itself, but
        # libjpeg's "fancy" upsampling blurs it with a [1/8, 3/4, 1/8] kernel on each axis; undo it.
        _Hypothesis("jpeg 4:2:0", {"U": (_blocks(_undo_fancy_upsampling(ll_u)), first)}),
    ]
    w, h = image.size
    for gw, gh in GENERATOR_SIZES if try_resized else ():
        # Upscalers go 2x or 4x; a same-aspect image up to 4x larger may be an upscaled generation.
        if gw < w <= 4 * gw and gh < h <= 4 * gh and abs(w / h - gw / gh) <= 0.01 * gw / gh:
            band, first = _centre_band(image.resize((gw, gh), Image.Resampling.LANCZOS))
            small_y, small_u = _ll_yu(band)
            blocks = {"Y": (_blocks(small_y), first), "U": (_blocks(small_u), first)}
            out.append(_Hypothesis(f"resized to {gw}x{gh}", blocks))
    return out


def _centre_band(image: Image.Image) -> tuple[Image.Image, int]:
    """A centred band of whole 8-pixel block rows holding at most MAX_BLOCKS blocks, and its first block's number.

    A block is 4x4 LL coefficients, i.e. 8x8 pixels; there are W//8 per row and H//8 rows (the
    encoder's 4-aligned crop, halved, cut in fours). Whole rows keep the payload's bit order.
    """
    w, h = image.size
    nbr, nbc = h // 8, w // 8
    if nbr == 0 or nbc == 0:
        return image.crop((0, 0, 0, 0)), 0
    keep = min(nbr, max(1, MAX_BLOCKS // nbc))
    r0 = (nbr - keep) // 2
    if keep == nbr:
        return image, 0  # _ll drops the pixels past the last whole block itself
    return image.crop((0, 8 * r0, 8 * nbc, 8 * (r0 + keep))), r0 * nbc


def _ll(plane: np.ndarray) -> np.ndarray:
    """(H, W[, C]) channel(s) -> the one-level Haar LL band (H//4*2, W//4*2[, C]) that pywt.dwt2(..., 'haar') gives
    on the 4-aligned crop: 2x2 sums / 2."""
    h4, w4 = plane.shape[0] // 4 * 4, plane.shape[1] // 4 * 4
    p = plane[:h4, :w4]
    # pairs of rows first: contiguous halves, then the strided columns. 8-bit input is summed straight
    # into uint16 (sums of four 8-bit values stay exact) without first widening the whole plane.
    rows = np.add(p[0::2], p[1::2], dtype=np.uint16) if p.dtype == np.uint8 else p[0::2] + p[1::2]
    out: np.ndarray = (rows[:, 0::2] + rows[:, 1::2]).astype(np.float32)
    out *= np.float32(0.5)
    return out


def _ll_yu(rgb: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (W x H) -> the LL bands of Y and U, each (H//4*2, W//4*2) float32.

    The colour transform is linear, so it is applied after the 2x2 sums, on a quarter of the pixels.
    The sums run on one colour plane at a time: on interleaved (H, W, 3) pixels numpy's strided column
    pairs become inner loops of 3 values, 2-3x slower. Same values either way.
    """
    if rgb.width == 0 or rgb.height == 0:
        empty = np.zeros((0, 0), dtype=np.float32)
        return empty, empty
    ll = np.stack([_ll(np.asarray(plane)) for plane in rgb.split()], axis=-1)  # (h, w, 3) float32
    return ll @ _Y_RGB, ll @ _U_RGB


def _blocks(ll: np.ndarray) -> np.ndarray:
    """LL band -> (15, n) coefficients 1..15 of its n = (h//4)*(w//4) raster-ordered 4x4 blocks (read row by row).

    Coefficient-major so that the per-block reductions run across 15 rows of n values (fast in numpy)
    rather than along n rows of 15.
    """
    nbr, nbc = ll.shape[0] // 4, ll.shape[1] // 4
    if nbr == 0 or nbc == 0:
        return np.zeros((15, 0), dtype=np.float32)
    b = ll[: nbr * 4, : nbc * 4].reshape(nbr, 4, nbc, 4).transpose(1, 3, 0, 2).reshape(16, nbr * nbc)
    return np.ascontiguousarray(b[1:])


# The inverse of the [1/8, 3/4, 1/8] kernel: h[n] = r^|n| / sqrt(a^2 - b^2) for 1 / (a + b cos w), a = 3/4,
# b = 1/4, r = (sqrt(a^2 - b^2) - a) / b = -0.17; five taps (the next is 0.007).
_R = (math.sqrt(0.5) - 0.75) / 0.25
_INV_FANCY = tuple(_R ** abs(n) / math.sqrt(0.5) for n in range(-2, 3))


def _undo_fancy_upsampling(ll: np.ndarray) -> np.ndarray:
    """Convolve (h, w) with the separable inverse of libjpeg's fancy upsampling, replicating the edges."""
    if ll.size == 0:
        return ll
    half = len(_INV_FANCY) // 2
    p = np.pad(ll, half, mode="edge")
    h, w = ll.shape
    rows: np.ndarray = np.float32(_INV_FANCY[0]) * p[:, :w]  # (h + 2 half, w)
    for i, t in enumerate(_INV_FANCY[1:], 1):
        rows = rows + np.float32(t) * p[:, i : i + w]
    out: np.ndarray = np.float32(_INV_FANCY[0]) * rows[:h]  # (h, w)
    for i, t in enumerate(_INV_FANCY[1:], 1):
        out = out + np.float32(t) * rows[i : i + h]
    return out


def _block_soft(coeffs: np.ndarray, offset: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """(15, n) coefficients 1..15 of n blocks -> two (n,) soft-bit read-outs in [-1, 1], > 0 meaning 1.

    The first is for untouched images, the second for compressed ones (see the module docstring).
    """
    a = coeffs + np.float32(offset)
    np.abs(a, out=a)  # in place here and below: these are (15, n) arrays, one pass each
    k = np.float32(-2 * math.pi / step)  # sin(k v) is +1 on the bit-1 lattice (3/4 step), -1 on bit 0 (1/4 step)
    top = a.max(axis=0)
    largest = np.sin(top * k)
    # The encoder moved the block's largest coefficient by -0.75..+0.25 step, so the marked one is
    # within 0.75 step of the current maximum; of those, take the one nearest the lattice. |s| is the
    # same on both bits' lattices, so on clean images this choice does not favour either bit, and
    # exact ties (flat blocks) are averaged rather than broken towards one sign.
    s = a * k
    np.sin(s, out=s)
    score = np.abs(s)  # in [0, 1]; +2 lifts every candidate above every non-candidate
    near_max = a >= top - np.float32(0.75 * step)
    score += near_max
    score += near_max
    chosen = score == score.max(axis=0)
    nearest = (s * chosen).sum(axis=0) / np.count_nonzero(chosen, axis=0)
    return nearest, largest
