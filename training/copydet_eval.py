"""Evaluate copy detection where it is weak: copies that fill only part of a query, and next-frame look-alikes.

    PYTHONPATH=. nice -n 10 python -m training.copydet_eval --index /tmp/copydet/index --per-family 100 \
        --seed 31 --modes default,thorough
    # copies of real-resolution photos (openimages-hires appended to the index), COCO photos as negatives too
    PYTHONPATH=. nice -n 10 python -m training.copydet_eval --index /tmp/copydet/index-hires --sources hires \
        --per-family 70 --seed 31 --families inset,heavy_crop,triple,partial

1. Corpus: the first --corpus-size photos of flickr8k-dev, indexed once (`provenance index build ... --limit N`)
   into --index and reused.
2. Queries: our own versions of six families (inset, grid, heavy crop, triple edit, blend, partial cut-out), made
   from random corpus photos with flickr8k-nonmember photos as backgrounds and fillers; deterministic for --seed.
3. Hard negatives: the non-members (the rest of flickr8k-dev and flickr8k-nonmember) most similar to a corpus
   photo by SSCD, which holds every same-scene frame of a corpus photo in the data, plus random other non-members.
4. Each mode scans every query and negative as JPEG bytes through `Scanner`, and the report gives per family the
   share found with the right id at >= replica and >= similar, false alarms with Wilson intervals, and CPU ms
   per image (process time: every thread counted, so it is the cost on one core).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from provenance.corpus import read_image_folder, read_webdataset
from provenance.images import decode_image

logger = logging.getLogger("copydet_eval")

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (or beside the folder of worktrees), or PROVENANCE_SHARED_DATA
DATA = Path(
    os.environ.get("PROVENANCE_SHARED_DATA")
    or next(
        (p for p in (REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data") if p.exists()),
        REPO.parent / "shared" / "data",
    )
)
FAMILIES = ("inset", "grid", "heavy_crop", "triple", "blend", "partial")
# partial cut-outs count as found at `similar`; every other family needs `replica` (exact counts too)
NEEDS = {f: ("exact", "replica") for f in FAMILIES} | {"partial": ("exact", "replica", "similar")}


@dataclass
class Photo:
    id: str
    image: Image.Image  # RGB


@dataclass
class Query:
    name: str
    family: str  # one of FAMILIES, or "negative"
    image: Image.Image
    target: str | None  # the corpus id it copies; None for a negative
    # where the copy sits, relative 0..1 (x0, y0, x1, y1): in the query and in the corpus photo
    query_box: tuple[float, float, float, float] | None = None
    corpus_box: tuple[float, float, float, float] | None = None
    quality: int = 90
    info: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, "JPEG", quality=self.quality)
        return buf.getvalue()


# ---------------------------------------------------------------------------------------------- data


def load_dev(limit: int | None = None) -> list[Photo]:
    out = []
    for item in read_webdataset(str(DATA / "flickr8k-dev")):
        if item.data is None:
            continue
        out.append(Photo(item.id, decode_image(item.data, item.id).image))
        if limit and len(out) >= limit:
            break
    return out


def load_folder(name: str, prefix: str = "") -> list[Photo]:
    """The photos of an image folder of the shared data at their real resolution (ids as the indexer gives them)."""
    return [
        Photo(prefix + it.id, decode_image(it.data, it.id).image)
        for it in read_image_folder(str(DATA / name))
        if it.data is not None
    ]


def load_nonmembers() -> list[Photo]:
    return [
        Photo("nm:" + Path(it.id).stem, decode_image(it.data, it.id).image)
        for it in read_image_folder(str(DATA / "flickr8k-nonmember"))
        if it.data is not None
    ]


# ------------------------------------------------------------------------------------------ families


def _rel(box: tuple[int, int, int, int], w: int, h: int) -> tuple[float, float, float, float]:
    return (round(box[0] / w, 4), round(box[1] / h, 4), round(box[2] / w, 4), round(box[3] / h, 4))


def _canvas(bg: Image.Image, rng: np.random.Generator) -> Image.Image:
    w = int(rng.integers(560, 721))
    return bg.resize((w, round(w * rng.uniform(0.68, 0.8))), Image.Resampling.BICUBIC)


def inset(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """The photo at 30-45% of the width, pasted into another photo."""
    canvas = _canvas(others[0].image, rng)
    cw, ch = canvas.size
    pw = round(cw * rng.uniform(0.30, 0.45))
    ph = round(pw * rng.uniform(0.75, 1.33) * photo.image.height / photo.image.width)
    ph = min(ph, ch - 4)
    x, y = int(rng.integers(0, cw - pw + 1)), int(rng.integers(0, ch - ph + 1))
    canvas.paste(photo.image.resize((pw, ph), Image.Resampling.BICUBIC), (x, y))
    return Query(
        "",
        "inset",
        canvas,
        photo.id,
        _rel((x, y, x + pw, y + ph), cw, ch),
        (0.0, 0.0, 1.0, 1.0),
        int(rng.integers(75, 93)),
    )


def grid(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """One tile of a 2x2 or 3x3 contact sheet of photos (the others non-members)."""
    n = 2 if rng.random() < 0.5 else 3
    tile = int(rng.integers(180, 241))
    gap = int(rng.choice([0, 0, 4, 8, 12]))
    fill = tuple(int(v) for v in rng.choice([[255, 255, 255], [0, 0, 0], [40, 40, 40]]))
    side = n * tile + (n + 1) * gap
    sheet = Image.new("RGB", (side, side), fill)
    cell = int(rng.integers(0, n * n))
    box = None
    for i in range(n * n):
        src = photo.image if i == cell else others[i].image
        x, y = gap + (i % n) * (tile + gap), gap + (i // n) * (tile + gap)
        sheet.paste(src.resize((tile, tile), Image.Resampling.BICUBIC), (x, y))
        if i == cell:
            box = (x, y, x + tile, y + tile)
    return Query(
        "",
        "grid",
        sheet,
        photo.id,
        _rel(box, side, side),
        (0.0, 0.0, 1.0, 1.0),
        int(rng.integers(75, 93)),
        {"n": n, "gap": gap},
    )


def _crop_box(w: int, h: int, area: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    a = float(rng.uniform(*area))
    r = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, round(w * math.sqrt(a * r))), min(h, round(h * math.sqrt(a / r)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return x, y, x + cw, y + ch


def heavy_crop(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """12-25% of the photo's area, resized (short side 224-400 px)."""
    w, h = photo.image.size
    box = _crop_box(w, h, (0.12, 0.25), rng)
    im = photo.image.crop(box)
    s = rng.uniform(224, 400) / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
    return Query("", "heavy_crop", im, photo.id, (0.0, 0.0, 1.0, 1.0), _rel(box, w, h), int(rng.integers(80, 93)))


def triple(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """Crop to 30-50% of the area, rotate 5-15 degrees, change the colours, JPEG q25-40."""
    w, h = photo.image.size
    box = _crop_box(w, h, (0.30, 0.50), rng)
    im = photo.image.crop(box)
    angle = float(rng.uniform(5, 15)) * (1 if rng.random() < 0.5 else -1)
    im = im.rotate(angle, Image.Resampling.BICUBIC, expand=bool(rng.random() < 0.5))
    im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.4, 1.6)))
    im = ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.75, 1.25)))
    im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.7, 1.3)))
    s = rng.uniform(224, 360) / min(im.size)
    im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.BICUBIC)
    return Query(
        "", "triple", im, photo.id, None, _rel(box, w, h), int(rng.integers(25, 41)), {"angle": round(angle, 1)}
    )


def blend(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """55-70% the photo, the rest another photo (an alpha blend)."""
    alpha = float(rng.uniform(0.55, 0.70))
    size = photo.image.size
    im = Image.blend(others[0].image.resize(size, Image.Resampling.BICUBIC), photo.image, alpha)
    return Query(
        "",
        "blend",
        im,
        photo.id,
        (0.0, 0.0, 1.0, 1.0),
        (0.0, 0.0, 1.0, 1.0),
        int(rng.integers(80, 93)),
        {"alpha": round(alpha, 3)},
    )


def partial(photo: Photo, others: list[Photo], rng: np.random.Generator) -> Query:
    """A rectangular cut-out of 30-45% of the photo's area, scaled 1-1.6x and pasted into another photo."""
    w, h = photo.image.size
    src = _crop_box(w, h, (0.30, 0.45), rng)
    cut = photo.image.crop(src)
    # 1-1.6x the size the cut has in a 224 px photo: a large photo's cut-out is shrunk to the same share of the
    # canvas (a 224 px photo's is not scaled down: the same copies as before for Flickr8k)
    s = float(rng.uniform(1.0, 1.6)) * min(1.0, 224 / max(w, h))
    cut = cut.resize((round(cut.width * s), round(cut.height * s)), Image.Resampling.BICUBIC)
    canvas = _canvas(others[0].image, rng)
    cw, ch = canvas.size
    x, y = int(rng.integers(0, cw - cut.width + 1)), int(rng.integers(0, ch - cut.height + 1))
    canvas.paste(cut, (x, y))
    return Query(
        "",
        "partial",
        canvas,
        photo.id,
        _rel((x, y, x + cut.width, y + cut.height), cw, ch),
        _rel(src, w, h),
        int(rng.integers(75, 93)),
    )


MAKERS: dict[str, Callable[[Photo, list[Photo], np.random.Generator], Query]] = {
    "inset": inset,
    "grid": grid,
    "heavy_crop": heavy_crop,
    "triple": triple,
    "blend": blend,
    "partial": partial,
}


def make_queries(members: list[Photo], fillers: list[Photo], per_family: int, seed: int) -> list[Query]:
    rng = np.random.default_rng(seed)
    out = []
    for family in FAMILIES:
        for i in range(per_family):
            photo = members[int(rng.integers(len(members)))]
            others = [fillers[int(j)] for j in rng.choice(len(fillers), 9, replace=False)]
            q = MAKERS[family](photo, others, rng)
            q.name = f"{family}-{i:03d}-{photo.id}"
            out.append(q)
    return out


# ------------------------------------------------------------------------------------- hard negatives


def sscd_vectors(photos: list[Photo], cache: Path) -> np.ndarray:
    """(n, 512) float32 SSCD of each photo as the scanner embeds it (cached by ids)."""
    from provenance.descriptors.sscd import SSCDDescriptor

    ids = [p.id for p in photos]
    if cache.exists():
        with np.load(cache) as z:
            if list(z["ids"]) == ids:
                return z["x"]
    model = SSCDDescriptor.load()
    x = np.concatenate([model.embed([p.image for p in photos[i : i + 32]]) for i in range(0, len(photos), 32)])
    np.savez(cache, ids=np.array(ids), x=x)
    return x


def mine_negatives(
    members_x: np.ndarray,
    member_ids: list[str],
    pool: list[Photo],
    pool_x: np.ndarray,
    n_hard: int,
    n_random: int,
    duplicate_at: float,
    seed: int,
) -> tuple[list[Query], list[dict[str, Any]]]:
    """The n_hard non-members most similar to a member by SSCD (same-scene frames among them), and n_random others.

    Pairs at or above `duplicate_at` are the same photo twice in the data (not a negative): listed, left out."""
    sims = pool_x @ members_x.T  # (n_pool, n_members)
    best = sims.max(axis=1)
    arg = sims.argmax(axis=1)
    order = np.argsort(-best)
    dupes = [
        dict(nonmember=pool[i].id, member=member_ids[arg[i]], sscd=round(float(best[i]), 3))
        for i in order
        if best[i] >= duplicate_at
    ]
    hard = [i for i in order if best[i] < duplicate_at][:n_hard]
    rest = np.setdiff1d(np.arange(len(pool)), np.array(hard + [i for i in order if best[i] >= duplicate_at]))
    rand = list(np.random.default_rng(seed).choice(rest, min(n_random, len(rest)), replace=False))
    out = []
    for kind, rows in (("hard", hard), ("random", rand)):
        for i in rows:
            out.append(
                Query(
                    f"neg-{kind}-{pool[i].id}",
                    "negative",
                    pool[i].image,
                    None,
                    quality=90,
                    info={"kind": kind, "nearest_member": member_ids[arg[i]], "nearest_sscd": round(float(best[i]), 3)},
                )
            )
    return out, dupes


# ------------------------------------------------------------------------------------------- scanning


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mode_options(mode: str):
    from provenance.scan import ScanOptions

    base = dict(use_clip=False, visible=False, invisible=False, c2pa=False, metadata=False, workers=1, batch_size=8)
    if mode == "default":
        return ScanOptions(**base)
    if mode == "centre":
        return ScanOptions(**base, centre_view=True)
    if mode == "thorough":
        return ScanOptions(**base, thorough=True)
    raise ValueError(f"unknown mode {mode!r}")


def _overrides(text: str) -> dict[str, Any]:
    """'a=1,b=0.2' -> {'a': 1, 'b': 0.2} (JSON values; a bare word stays a string)."""
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def scan_mode(
    index: Path, mode: str, queries: list[Query], verify: str = "", regions: str = ""
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each query's record (as a dict) and the CPU ms per image of the scan: over the copies, over the negatives,
    and of one whole-image SSCD view measured in the same run (the unit that does not drift with the load).

    `verify` and `regions` override VerifyOptions / RegionOptions fields ('min_score=0.2,candidates=3')."""
    from dataclasses import replace

    from provenance.scan import Scanner

    scanner = Scanner.open(index, mode_options(mode))
    if verify and scanner._verifier is not None:
        scanner._verifier.options = replace(scanner._verifier.options, **_overrides(verify))
    if regions:
        scanner.region_options = replace(scanner.region_options, **_overrides(regions))
    items = [(q.name, q.to_bytes()) for q in queries]
    list(scanner.iter_scan(items[:8]))  # warm-up
    records: list[dict[str, Any]] = []
    cpu: dict[str, float] = {}
    for part, keep in (("copies", lambda q: q.family != "negative"), ("negatives", lambda q: q.family == "negative")):
        sel = [it for q, it in zip(queries, items, strict=False) if keep(q)]
        t = time.process_time()
        records += [r.to_dict() for r in scanner.iter_scan(sel)]
        cpu[part] = (time.process_time() - t) * 1000 / max(1, len(sel))
    sscd = scanner.searcher.model("sscd")
    view = [sscd.preprocess(q.image) for q in queries[:32]]
    t = time.process_time()
    for v in view:
        sscd.embed_batch([v])
    cpu["sscd_view"] = (time.process_time() - t) * 1000 / len(view)
    order = {q.name: i for i, q in enumerate(queries)}
    records.sort(key=lambda r: order[r["path"]])
    return records, cpu


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def summarise(queries: list[Query], records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for family in [f for f in FAMILIES if any(q.family == f for q in queries)]:
        rows = [(q, r) for q, r in zip(queries, records, strict=False) if q.family == family]
        right = [bool(r["matches"]) and r["matches"][0]["id"] == q.target for q, r in rows]
        replica = sum(ok and r["verdict"] in ("exact", "replica") for ok, (q, r) in zip(right, rows, strict=False))
        similar = sum(
            ok and r["verdict"] in ("exact", "replica", "similar") for ok, (q, r) in zip(right, rows, strict=False)
        )
        found = sum(ok and r["verdict"] in NEEDS[family] for ok, (q, r) in zip(right, rows, strict=False))
        boxes = [
            iou(q.query_box, r["matches"][0]["region"]["query"])
            for ok, (q, r) in zip(right, rows, strict=False)
            if ok and q.query_box and r["matches"][0].get("region")
        ]
        out[family] = dict(
            n=len(rows),
            replica=replica,
            similar=similar,
            found=found,
            region_reported=len(boxes),
            region_iou=round(float(np.median(boxes)), 3) if boxes else None,
        )
    for kind in ("hard", "random", "realres"):
        rows = [
            (q, r) for q, r in zip(queries, records, strict=False) if q.family == "negative" and q.info["kind"] == kind
        ]
        if not rows:
            continue
        fa = sum(r["verdict"] in ("exact", "replica") for q, r in rows)
        sim = sum(r["verdict"] in ("exact", "replica", "similar") for q, r in rows)
        out[f"neg_{kind}"] = dict(
            n=len(rows),
            replica=fa,
            similar=sim,
            false_alarms=[q.name for q, r in rows if r["verdict"] in ("exact", "replica")],
        )
    return out


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    modes = list(results)
    lines = [
        f"# Copy detection: partial copies and next-frame look-alikes ({meta['date']})",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}. Corpus: the first {meta['corpus_size']} flickr8k-dev photos; "
        f"{meta['per_family']} queries per family (seed {meta['seed']}); negatives: the {meta['n_hard']} "
        f"non-members most similar to a member by SSCD (same-scene frames among them) and {meta['n_random']} "
        "random others. Found = the right id first at >= replica (partial: >= similar).",
        "",
        "| family | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for family in [f for f in FAMILIES if f in results[modes[0]]["summary"]]:
        cells = []
        for m in modes:
            s = results[m]["summary"][family]
            lo, hi = wilson(s["found"], s["n"])
            cells.append(
                f"{s['found']}/{s['n']} ({s['found'] / s['n']:.2f}, {lo:.2f}-{hi:.2f})"
                + (f"; sim {s['similar']}" if family != "partial" else f"; repl {s['replica']}")
            )
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    for kind in [k for k in ("hard", "random", "realres") if f"neg_{k}" in results[modes[0]]["summary"]]:
        cells = []
        for m in modes:
            s = results[m]["summary"][f"neg_{kind}"]
            lo, hi = wilson(s["replica"], s["n"])
            cells.append(f"{s['replica']}/{s['n']} replica ({lo:.3f}-{hi:.3f}); {s['similar']} >= similar")
        lines.append(f"| false alarms, {kind} negatives | " + " | ".join(cells) + " |")
    lines.append(
        "| CPU ms / image, copies; negatives (copy detection only) | "
        + " | ".join(f"{results[m]['cpu_ms']['copies']:.0f}; {results[m]['cpu_ms']['negatives']:.0f}" for m in modes)
        + " |"
    )
    lines.append(
        "| the same in whole-image SSCD views (measured in the same run) | "
        + " | ".join(
            f"{results[m]['cpu_ms']['copies'] / results[m]['cpu_ms']['sscd_view']:.1f}; "
            f"{results[m]['cpu_ms']['negatives'] / results[m]['cpu_ms']['sscd_view']:.1f}"
            for m in modes
        )
        + " |"
    )
    lines.append(
        "| region reported (right id; median IoU with truth) | "
        + " | ".join(
            ", ".join(
                f"{f}: {results[m]['summary'][f]['region_reported']} ({results[m]['summary'][f]['region_iou']})"
                for f in ("inset", "grid", "partial")
                if f in results[m]["summary"]
            )
            for m in modes
        )
        + " |"
    )
    return "\n".join(lines) + "\n"


def normalisation_check(
    index, queries: list[Query], background: np.ndarray, max_fpr: float = 0.01
) -> dict[str, dict[str, Any]]:
    """Does SSCD score normalisation help on these families? For raw top-1 SSCD of the whole image, the corpus
    margin (top-1 minus the mean of neighbours 2-4, no extra data) and background normalisation (minus the mean
    similarity to the 3 nearest of `background`, non-members used nowhere else): the threshold at <= max_fpr
    on the hard and random negatives, and per family the share found with the right id at that threshold."""
    from provenance.descriptors.sscd import SSCDDescriptor
    from training.calibration import corpus_margin, normalize_scores, threshold_at_fpr

    model = SSCDDescriptor.load()
    xq = np.concatenate(
        [
            model.embed([decode_image(q.to_bytes(), q.name).image for q in queries[i : i + 32]])
            for i in range(0, len(queries), 32)
        ]
    )
    found = index.search_vectors("sscd", xq, 10)  # per query, best first
    scores = np.array([[m.score for m in ms] + [0.0] * (10 - len(ms)) for ms in found], dtype=np.float32)
    right = np.array([bool(ms) and ms[0].id == q.target for q, ms in zip(queries, found, strict=False)])
    neg = np.array([q.family == "negative" for q in queries])
    methods = {
        "raw": scores[:, 0],
        "corpus margin 1.0[1,3]": corpus_margin(scores),
        "background 1.0[0,2]": normalize_scores(xq, scores[:, 0], background),
    }
    out: dict[str, dict[str, Any]] = {
        "per_query": {
            q.name: {n: round(float(sc[i]), 4) for n, sc in methods.items()}
            | {"top": found[i][0].id if found[i] else None}
            for i, q in enumerate(queries)
        }
    }
    for name, sc in methods.items():
        t = threshold_at_fpr(sc[neg], max_fpr)
        out[name] = {"threshold": t, "false_alarms": int((sc[neg] >= t).sum()), "negatives": int(neg.sum())} | {
            f: round(float(((sc >= t) & right)[[q.family == f for q in queries]].mean()), 3) for f in FAMILIES
        }
    return out


def thumbnail_check(per_family: int, seed: int) -> dict[str, dict[str, float]]:
    """What the corpus side of verification needs, on real-resolution photos (openimages-hires, most 2048 px):
    the share of copies (heavy crop, inset, triple) verified against the item's thumbnail (JPEG as the indexer
    writes it) at 160 px (what the index stored before), 256 px (what it stores), 320 px, and against the source
    shrunk to 640 px (reading the source when reachable)."""
    from provenance.indexer import THUMBNAIL_QUALITY
    from provenance.verify import extract, verify

    photos = [
        Photo(it.id, decode_image(it.data, it.id).image)
        for it in read_image_folder(str(DATA / "openimages-hires"))
        if it.data is not None
    ]
    fillers = load_nonmembers()
    rng = np.random.default_rng(seed)
    sides = (160, 256, 320, 640)
    out: dict[str, dict[str, float]] = {}
    for family in ("heavy_crop", "inset", "triple"):
        hits = {s: 0 for s in sides}
        for i in range(per_family):
            photo = photos[i % len(photos)]
            others = [fillers[int(j)] for j in rng.choice(len(fillers), 9, replace=False)]
            q = MAKERS[family](photo, others, rng)
            qf = extract(decode_image(q.to_bytes(), q.name).image, 448)
            for side in sides:
                thumb = photo.image.copy()
                thumb.thumbnail((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0)  # as the indexer does
                thumb = Image.open(io.BytesIO(_jpeg(thumb, THUMBNAIL_QUALITY))).convert("RGB")
                hits[side] += verify(qf, extract(thumb, side)).verified
        out[family] = {f"{s} px": round(hits[s] / per_family, 3) for s in sides}
    return out


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--index", type=Path, default=Path("/tmp/copydet/index"))
    ap.add_argument("--corpus-size", type=int, default=1500)
    ap.add_argument("--per-family", type=int, default=50)
    ap.add_argument("--hard", type=int, default=300)
    ap.add_argument("--random", type=int, default=100)
    ap.add_argument(
        "--duplicate-at",
        type=float,
        default=0.85,
        help="SSCD score at which a non-member is the same photo as a member (listed, not a negative)",
    )
    ap.add_argument("--modes", default="default,centre,thorough")
    ap.add_argument("--seed", type=int, default=29)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/copydet"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--thumbnails",
        type=int,
        default=0,
        metavar="N",
        help="also verify N copies per family of real-resolution photos against 160/320/640 px thumbnails",
    )
    ap.add_argument(
        "--normalisation",
        action="store_true",
        help="also compare SSCD score normalisations (corpus margin, non-member background)",
    )
    ap.add_argument(
        "--sources",
        choices=("flickr", "hires"),
        default="flickr",
        help="copy the corpus's flickr8k-dev photos (224 px), or the openimages-hires photos appended to the index",
    )
    ap.add_argument("--verify", default="", help="VerifyOptions overrides for --thorough, e.g. min_score=0.2")
    ap.add_argument("--regions", default="", help="RegionOptions overrides for --thorough, e.g. max_regions=7")
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help="the copy families to make (negatives are always scanned)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    dev = load_dev()
    members, dev_rest = dev[: args.corpus_size], dev[args.corpus_size :]
    nonmembers = load_nonmembers()
    if not (args.index / "manifest.json").exists():
        raise SystemExit(
            f"no index at {args.index}: build it first with `python -m provenance.cli index build "
            f"{DATA / 'flickr8k-dev'} --index {args.index} --limit {args.corpus_size}`"
        )
    args.cache.mkdir(parents=True, exist_ok=True)
    pool = dev_rest + nonmembers
    from provenance.store import ProvenanceIndex

    index = ProvenanceIndex.open(args.index)
    members_x = np.asarray(index.vectors("sscd"), dtype=np.float32)  # (n_members, 512), as the scanner searches
    pool_x = sscd_vectors(pool, args.cache / "pool_sscd.npz")
    negatives, dupes = mine_negatives(
        members_x, list(index.ids), pool, pool_x, args.hard, args.random, args.duplicate_at, args.seed
    )
    fillers = [p for p in nonmembers]
    if args.sources == "hires":
        # copies of real-resolution photos (openimages-hires, appended to the index), and real-resolution
        # non-members (coco-cc) beside the Flickr negatives
        sources = load_folder("openimages-hires")
        missing = [p.id for p in sources if index.find(p.id) is None]
        if missing:
            raise SystemExit(
                f"{len(missing)} openimages-hires photos are not in {args.index}: add them with `python -m "
                f"provenance.cli index build {DATA / 'openimages-hires'} --index {args.index} --append`"
            )
        members = sources
        negatives += [
            Query(f"neg-realres-{p.id}", "negative", p.image, None, quality=90, info={"kind": "realres"})
            for p in load_folder("coco-cc", "coco:")
        ]
    wanted = set(args.families.split(","))
    # every family is made, then filtered, so that a family's copies are the same whichever others are asked for
    queries = [q for q in make_queries(members, fillers, args.per_family, args.seed) if q.family in wanted]
    queries += negatives
    logger.info("%d queries (%d negatives); %d duplicate pairs left out", len(queries), len(negatives), len(dupes))

    results: dict[str, Any] = {}
    norm = None
    if args.normalisation:
        used = {q.name.removeprefix("neg-hard-").removeprefix("neg-random-") for q in negatives}
        background = pool_x[[p.id not in used for p in pool]]
        norm = normalisation_check(index, queries, background)
        logger.info("normalisation: %s", norm)
    thumbs = None
    if args.thumbnails:
        thumbs = thumbnail_check(args.thumbnails, args.seed)
        logger.info("thumbnails: %s", thumbs)
    for mode in [m for m in args.modes.split(",") if m]:
        records, cpu_ms = scan_mode(args.index, mode, queries, args.verify, args.regions)
        results[mode] = dict(
            cpu_ms=cpu_ms,
            summary=summarise(queries, records),
            records=[
                dict(
                    name=q.name,
                    family=q.family,
                    target=q.target,
                    verdict=r["verdict"],
                    top=(r["matches"][0]["id"] if r["matches"] else None),
                    sscd=r["scores"]["sscd"],
                    region=(r["matches"][0].get("region") if r["matches"] else None),
                    extra=r.get("extra"),
                    truth={"query": q.query_box, "corpus": q.corpus_box},
                )
                for q, r in zip(queries, records, strict=False)
            ],
        )
        found = {f: s["found"] for f, s in results[mode]["summary"].items() if f in FAMILIES}
        logger.info("%s: %s CPU ms/image %s", mode, cpu_ms, found)
    meta = dict(
        date=time.strftime("%Y-%m-%d"),
        command="python -m training.copydet_eval " + " ".join(argv or []),
        machine="2 shared CPU cores / 24 GB, no GPU",
        corpus_size=args.corpus_size,
        per_family=args.per_family,
        seed=args.seed,
        n_hard=args.hard,
        n_random=args.random,
    )
    text = render(results, meta)
    if dupes:
        text += f"\nLeft out as the same photo twice (SSCD >= {args.duplicate_at}): {len(dupes)} pairs.\n"
    if thumbs:
        text += (
            "\nVerification against the corpus side at three sizes, on openimages-hires photos (most 2048 px; "
            f"{args.thumbnails} copies per family; share verified):\n\n| family | "
            + " | ".join(next(iter(thumbs.values())))
            + " |\n|---|"
            + "---|" * len(next(iter(thumbs.values())))
            + "\n"
        )
        for family, r in thumbs.items():
            text += f"| {family} | " + " | ".join(f"{v:.2f}" for v in r.values()) + " |\n"
    if norm:
        text += (
            "\nSSCD score normalisation (whole image only; threshold at <= 1% false alarms on these negatives; "
            "share of each family found with the right id):\n\n| method | threshold | false alarms | "
            + " | ".join(FAMILIES)
            + " |\n|---|---|---|"
            + "---|" * len(FAMILIES)
            + "\n"
        )
        for name, r in norm.items():
            if name == "per_query":
                continue
            text += (
                f"| {name} | {r['threshold']:.2f} | {r['false_alarms']}/{r['negatives']} | "
                + " | ".join(f"{r[f]:.2f}" for f in FAMILIES)
                + " |\n"
            )
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(
            json.dumps(dict(meta=meta, dupes=dupes, normalisation=norm, results=results), indent=1), encoding="utf-8"
        )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
