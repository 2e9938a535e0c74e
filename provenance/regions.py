"""Region proposals: the parts of an image worth searching on their own (insets, grid tiles, pasted cut-outs).

A copy that fills only part of an image (a photo pasted into another, one tile of a contact sheet, a screenshot)
scores low as a whole image: SSCD describes the whole frame. Those layouts have straight, axis-aligned edges, and
finding them is cheap: `find_rectangles` looks for long horizontal and vertical step edges and keeps the boxes
whose four sides they cover. `propose_regions` adds a few fixed overlapping crops (corners at 0.6 of each side)
so that a copy without visible edges still gets a closer view, and caps the count (each region costs one SSCD
view). Boxes are relative (x0, y0, x1, y1) in 0..1, the shape scan records carry.

Pure numpy over a small greyscale copy of the image; figures in BENCHMARKS.md ("Copy detection: partial copies").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]  # relative x0, y0, x1, y1 in 0..1

# fixed crops, searched when few rectangles are found: the four corners at 0.6 of each side (with the scanner's
# centre view they tile the image with overlap, so a copy at a third of the width lies mostly inside one of them)
# credit for a box side on the image's border (a detected line scores its covered share, 0..1)
BORDER_CREDIT = 0.75
# a contact sheet's cut at i/n: a line within GRID_BAND of the side, across at least GRID_MIN_LINE of the image
GRID_BAND = 0.03
GRID_MIN_LINE = 0.6
MAX_LINES = 20  # horizontal (and vertical) lines combined into boxes, longest first: boxes grow as its 4th power
MAX_CANDIDATES = 200  # boxes passed to overlap removal, best first (bounds its quadratic loop)
CORNER_CROPS: tuple[Box, ...] = ((0.0, 0.0, 0.6, 0.6), (0.4, 0.0, 1.0, 0.6), (0.0, 0.4, 0.6, 1.0), (0.4, 0.4, 1.0, 1.0))


@dataclass(frozen=True)
class RegionOptions:
    """How regions are proposed.

    max_regions and max_cells bound the cost: each region is one more SSCD view (at `view_side` px)."""

    max_regions: int = 5
    max_cells: int = 9  # a contact sheet's cells, searched instead of the other regions (a 3x3 sheet has 9)
    work_side: int = 256  # long side of the greyscale copy the edges are found on
    edge_step: float = 14.0  # a step edge: grey levels (0-255) between two neighbouring rows or columns
    min_run: float = 0.12  # a line: a run of step edges at least this share of the image's side
    min_side: float = 0.18  # a box: each side at least this share of the image's side
    max_area: float = 0.8  # and at most this share of the image's area (the whole image is searched anyway)
    min_cover: float = 0.6  # each side of a box: at least this share on a detected line (see BORDER_CREDIT)
    corners: bool = True  # add CORNER_CROPS after the rectangles, up to max_regions
    view_side: int = 160  # each region is embedded as a view_side x view_side square

    def __post_init__(self) -> None:
        if self.max_regions < 0:
            raise ValueError(f"max_regions must be >= 0, got {self.max_regions}")
        if not 0 < self.min_side < 1 or not 0 < self.max_area <= 1:
            raise ValueError(f"need 0 < min_side < 1 and 0 < max_area <= 1, got {self.min_side}, {self.max_area}")
        if self.view_side < 32:
            raise ValueError(f"view_side must be >= 32 px, got {self.view_side}")


def _grey(image: Image.Image, side: int) -> np.ndarray:
    """(h, w) float32 grey levels 0-255, the long side at most `side`."""
    im = image if image.mode == "L" else image.convert("L")
    scale = side / max(im.size)
    if scale < 1:
        im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32)


def _line_mask(g: np.ndarray, o: RegionOptions) -> np.ndarray:
    """(h + 1, w) bool: boundary row b (between pixel rows b-1 and b) is part of a long horizontal step edge at x.

    Rows 0 and h (the image's own borders) are False; callers give them their own credit."""
    h, w = g.shape
    d = np.abs(g[1:] - g[:-1])  # (h-1, w): step between rows y and y+1
    # a step, not a ramp: at least as strong as the steps just above and below (one row per edge after blur)
    pad = np.pad(d, ((1, 1), (0, 0)))
    strong = (d >= o.edge_step) & (d >= pad[:-2]) & (d >= pad[2:])
    # a resampled or JPEG-coded edge may split between two neighbouring rows along its length: take either
    strong = strong | np.pad(strong[1:], ((0, 1), (0, 0))) | np.pad(strong[:-1], ((1, 0), (0, 0)))
    # a run allows small breaks (where both sides happen to have the same grey): density over a 9 px window
    half = 4
    cs = np.pad(np.cumsum(strong, axis=1, dtype=np.int32), ((0, 0), (1, 0)))
    lo = np.clip(np.arange(w) - half, 0, w)
    hi = np.clip(np.arange(w) + half + 1, 0, w)
    on = (cs[:, hi] - cs[:, lo]) / (hi - lo) >= 0.6  # (h-1, w)
    min_len = max(4, int(o.min_run * w))
    # runs of `on` along each row, all rows at once: starts and ends pair up in row-major order
    step = np.diff(np.pad(on.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # (h-1, w+1): +1 start, -1 end
    sy, sx = np.nonzero(step == 1)
    _, ex = np.nonzero(step == -1)
    long = (ex - sx) >= min_len
    marks = np.zeros((h - 1, w + 1), dtype=np.int32)
    np.add.at(marks, (sy[long], sx[long]), 1)
    np.add.at(marks, (sy[long], ex[long]), -1)
    runs = np.cumsum(marks, axis=1)[:, :w] > 0  # (h-1, w)
    # one row per edge: the widening above makes each line three rows thick; keep the row with the longest run
    length = runs.sum(axis=1)
    padded = np.pad(length, 2)
    local_max = np.all([length >= padded[2 + k : len(padded) - 2 + k] for k in (-2, -1, 1, 2)], axis=0)
    # ties (a flat top) keep the first row only
    first = np.concatenate(([True], length[1:] != length[:-1]))
    keep = local_max & first & (length > 0)
    out = np.zeros((h + 1, w), dtype=bool)
    out[1:h][keep] = runs[keep]
    return out


def _candidates(mask: np.ndarray, n: int, limit: int) -> np.ndarray:
    """Up to `limit` boundary positions with the longest lines, plus the two borders (0 and n)."""
    length = mask.sum(axis=1)
    rows = np.flatnonzero(length)
    rows = rows[np.argsort(-length[rows], kind="stable")][:limit]
    return np.unique(np.concatenate(([0, n], rows)))


@dataclass(frozen=True)
class Lines:
    """The long straight step edges of an image, on its small greyscale copy of (h, w) pixels."""

    h: int
    w: int
    horizontal: np.ndarray  # (h + 1, w) bool, see _line_mask
    vertical: np.ndarray  # (w + 1, h) bool, the same on the transposed image


def find_lines(image: Image.Image, options: RegionOptions | None = None) -> Lines:
    o = options or RegionOptions()
    g = _grey(image, o.work_side)
    return Lines(g.shape[0], g.shape[1], _line_mask(g, o), _line_mask(g.T, o))


def find_rectangles(
    image: Image.Image, options: RegionOptions | None = None, lines: Lines | None = None
) -> list[tuple[Box, float]]:
    """Axis-aligned boxes whose sides lie on long straight edges: [(box, cover)], best first, overlaps removed.

    cover is the mean over the four sides of the share on detected lines (a side on the border: BORDER_CREDIT)."""
    o = options or RegionOptions()
    lines = lines or find_lines(image, o)
    h, w, hmask, vmask = lines.h, lines.w, lines.horizontal, lines.vertical
    ys = _candidates(hmask, h, MAX_LINES)
    xs = _candidates(vmask, w, MAX_LINES)
    # prefix sums along each line, so the covered length of any side is two lookups
    hc = np.pad(np.cumsum(hmask, axis=1, dtype=np.int32), ((0, 0), (1, 0)))[ys][:, xs]  # (ny, nx)
    vc = np.pad(np.cumsum(vmask, axis=1, dtype=np.int32), ((0, 0), (1, 0)))[xs][:, ys]  # (nx, ny)
    ny, nx = len(ys), len(xs)
    # covered length of the horizontal side at ys[i] between xs[a] and xs[b]: (ny, nx, nx)
    top = (hc[:, None, :] - hc[:, :, None]).astype(np.float32)
    side = (vc[:, None, :] - vc[:, :, None]).astype(np.float32)  # (nx, ny, ny)
    width = (xs[None, :] - xs[:, None]).astype(np.float32)  # (nx, nx)
    height = (ys[None, :] - ys[:, None]).astype(np.float32)  # (ny, ny)
    # the candidate sides: pairs of lines, first before second, far enough apart (lexicographic order, so that
    # ties below keep the order of the full (i0, i1, a0, a1) grid)
    i0, i1 = np.triu_indices(ny, 1)
    tall = height[i0, i1] >= o.min_side * h
    i0, i1 = i0[tall], i1[tall]
    a0, a1 = np.triu_indices(nx, 1)
    wide = width[a0, a1] >= o.min_side * w
    a0, a1 = a0[wide], a1[wide]
    # every box: (n_y_pairs, n_x_pairs)
    i0, i1, a0, a1 = i0[:, None], i1[:, None], a0[None, :], a1[None, :]
    bw, bh = width[a0, a1], height[i0, i1]
    ok = bw * bh <= o.max_area * w * h
    # each side's covered share; a side on the image border bounds the box but says nothing of a paste: BORDER
    sides = []
    for cov, length, border in (
        (top[i0, a0, a1], bw, i0 == 0),
        (top[i1, a0, a1], bw, i1 == ny - 1),
        (side[a0, i0, i1], bh, a0 == 0),
        (side[a1, i0, i1], bh, a1 == nx - 1),
    ):
        sides.append(np.broadcast_to(np.where(border, BORDER_CREDIT, cov / np.maximum(length, 1)), ok.shape))
    sides_arr = np.stack(sides)  # (4, n_y_pairs, n_x_pairs)
    cover = np.where(ok & (sides_arr.min(axis=0) >= o.min_cover), sides_arr.mean(axis=0), 0.0).ravel()
    keep = np.flatnonzero(cover > 0)
    # most evidence first: the length of line under the box's sides, image borders not counted (a pasted photo
    # has four long, covered sides; a texture's boxes are small; a box on the borders has little of its own)
    inner = np.stack(
        [
            np.broadcast_to(v, ok.shape)
            for v in (
                (i0 > 0) & (i0 < ny - 1),
                (i1 > 0) & (i1 < ny - 1),
                (a0 > 0) & (a0 < nx - 1),
                (a1 > 0) & (a1 < nx - 1),
            )
        ]
    )
    lengths = np.stack([np.broadcast_to(v, ok.shape) for v in (bw, bw, bh, bh)])
    # a side's line length counts for it, its uncovered length against it (a box that overshoots the paste
    # along a longer line of the background loses to the paste's own box)
    evidence = ((2 * sides_arr - 1) * lengths * inner).sum(axis=0).ravel()[keep]
    keep = keep[np.argsort(-evidence, kind="stable")][:MAX_CANDIDATES]
    yi0, yi1, xa0, xa1 = (np.broadcast_to(v, ok.shape).ravel() for v in (i0, i1, a0, a1))
    out: list[tuple[Box, float]] = []
    for flat in keep:
        a, b, c, d = yi0[flat], yi1[flat], xa0[flat], xa1[flat]
        x0, y0, x1, y1 = (round(float(v), 4) for v in (xs[c] / w, ys[a] / h, xs[d] / w, ys[b] / h))
        box = (x0, y0, x1, y1)
        if all(_iou(box, kept) < 0.5 for kept, _ in out):
            out.append((box, round(float(cover[flat]), 3)))
    return out


def find_grid(image: Image.Image, options: RegionOptions | None = None, lines: Lines | None = None) -> list[Box]:
    """The cells of a contact sheet (2-4 rows by 2-4 columns of equal cells), or [] when the image is not one.

    A sheet has straight lines right across it at equal spacing (tile edges or the gaps between tiles)."""
    o = options or RegionOptions()
    lines = lines or find_lines(image, o)
    counts = []
    for mask, n_px in ((lines.horizontal, lines.h), (lines.vertical, lines.w)):
        share = mask.sum(axis=1) / mask.shape[1]  # (n_px + 1,) share of the side on a line, per boundary
        best_n, best = 1, 0.0
        for n in (2, 3, 4):
            band = max(2, round(GRID_BAND * n_px))
            # each inner cut i/n: its best line within the band (a gap between tiles has two edges: take the max)
            cuts = [
                share[max(0, round(i * n_px / n) - band) : round(i * n_px / n) + band + 1].max() for i in range(1, n)
            ]
            score = float(np.mean(cuts))
            if score >= GRID_MIN_LINE and score > best + 0.05:
                best_n, best = n, score
        counts.append(best_n)
    rows, cols = counts
    if rows == 1 and cols == 1:
        return []
    return [
        (round(c / cols, 4), round(r / rows, 4), round((c + 1) / cols, 4), round((r + 1) / rows, 4))
        for r in range(rows)
        for c in range(cols)
    ]


def propose_regions(image: Image.Image, options: RegionOptions | None = None) -> list[Box]:
    """The boxes to search: a contact sheet's cells (at most max_cells), or else at most max_regions of the
    rectangles found in the image, then the corner crops."""
    o = options or RegionOptions()
    lines = find_lines(image, o)
    cells = find_grid(image, o, lines)
    if len(cells) > 2:  # a sheet of 2 cells is as likely a photo with one straight line across (a horizon)
        return cells[: o.max_cells]
    boxes = cells
    for box, _ in find_rectangles(image, o, lines):
        if len(boxes) >= o.max_regions:
            break
        if all(_iou(box, b) < 0.5 for b in boxes):
            boxes.append(box)
    if o.corners:
        for box in CORNER_CROPS:
            if len(boxes) >= o.max_regions:
                break
            if all(_iou(box, b) < 0.6 for b in boxes):
                boxes.append(box)
    return boxes


def crop_box(image: Image.Image, box: Box) -> Image.Image:
    """The region of `image` at relative `box`."""
    w, h = image.size
    x0, y0, x1, y1 = box
    px = (round(x0 * w), round(y0 * h), max(round(x0 * w) + 1, round(x1 * w)), max(round(y0 * h) + 1, round(y1 * h)))
    return image.crop(px)


def region_views(image: Image.Image, boxes: list[Box], side: int) -> list[np.ndarray]:
    """Each region as a (side, side, 3) uint8 square, SSCD's input layout: one shape, so one model call for all."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return [
        np.asarray(crop_box(rgb, b).resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.uint8)
        for b in boxes
    ]


def _iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
