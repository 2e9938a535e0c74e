"""Benchmark of invisible-watermark detection: detection rate per scheme and condition, false positives, speed.

    .venv/bin/python bench/bench_invisible.py [--marked 200] [--out bench/results/invisible.md]

Marked set: `--marked` Flickr8k-dev photos (224x224, upscaled to 512x512 as SD outputs are) plus the
51 COCO photos at native size (~640x427). Each gets each scheme's mark the way its real encoder
writes it (CompVis script for SD v1/v2, diffusers' SDXL watermarker arithmetic, our
`embed_provenance_mark`), then is saved as PNG, JPEG q95/q90/q75/q60 (Pillow's default 4:2:0 chroma) and
JPEG q90 4:4:4, and as a 2x Lanczos upscale in PNG (read with try_resized). Clean set: all 2,500
Flickr8k-dev photos and 500 non-members, upscaled to 512x512 and also at their native 224x224, the
COCO photos, and 500 non-members upscaled to 1024x1024 read with try_resized.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # timings are single-threaded
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from imwatermark import WatermarkDecoder, WatermarkEncoder  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance.images import decode_image  # noqa: E402
from provenance.watermarks.invisible import (  # noqa: E402
    DETECTION_P_VALUE,
    GENERATOR_SIZES,
    SCHEMES,
    binomial_p_value,
    detect_invisible_marks,
    embed_provenance_mark,
)

DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
SDXL_BITS = [int(c) for c in "101100111110110010010000011110111011000110011110"]


# -- data -------------------------------------------------------------------------------------------


def flickr_dev() -> list[Image.Image]:
    from provenance.corpus import read_webdataset

    return [decode_image(it.data, it.id).image for it in read_webdataset(str(DATA / "flickr8k-dev")) if it.data]


def folder(name: str) -> list[Image.Image]:
    return [decode_image(p.read_bytes(), str(p)).image for p in sorted((DATA / name).glob("*.jpg"))]


# -- the real encoders ------------------------------------------------------------------------------


def compvis(image: Image.Image, text: str) -> Image.Image:
    enc = WatermarkEncoder()
    enc.set_watermark("bytes", text.encode("utf-8"))
    return Image.fromarray(enc.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")[:, :, ::-1])


def sdxl(image: Image.Image) -> Image.Image:
    """diffusers' StableDiffusionXLWatermarker + postprocess (tests check it against diffusers itself)."""
    enc = WatermarkEncoder()
    enc.set_watermark("bits", SDXL_BITS)
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1]
    rgb = enc.encode(bgr, "dwtDct")[:, :, ::-1]
    return Image.fromarray(np.round(np.clip(rgb / 255, 0, 1) * 255).astype(np.uint8))


RUN_ID = 0x5EED1234
EMBEDDERS = {
    "sd-v1": lambda im: compvis(im, "StableDiffusionV1"),
    "sd-v2": lambda im: compvis(im, "SDV2"),
    "sdxl": sdxl,
    "provenance": lambda im: embed_provenance_mark(im, RUN_ID),
}


def save(image: Image.Image, fmt: str, **kw) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return decode_image(buf.getvalue()).image


CONDITIONS = {
    "PNG": lambda im: save(im, "PNG"),
    "JPEG q95": lambda im: save(im, "JPEG", quality=95),
    "JPEG q90": lambda im: save(im, "JPEG", quality=90),
    "JPEG q75": lambda im: save(im, "JPEG", quality=75),
    "JPEG q60": lambda im: save(im, "JPEG", quality=60),
    "JPEG q90 4:4:4": lambda im: save(im, "JPEG", quality=90, subsampling=0),
    "2x upscale PNG*": lambda im: save(im.resize((im.width * 2, im.height * 2), Image.Resampling.LANCZOS), "PNG"),
}


def stock_detected(image: Image.Image, scheme: str) -> bool:
    """Plain invisible-watermark decoding with the same p-value rule (one hypothesis, no correction)."""
    s = next(s for s in SCHEMES if s.name == scheme)
    bgr = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR)
    bits = np.asarray(WatermarkDecoder("bits", s.length).decode(bgr, "dwtDct"), dtype=np.uint8)
    agree = int(np.sum(bits[: s.n_fixed] == np.asarray(s.fixed_bits)))
    return binomial_p_value(agree, s.n_fixed) <= DETECTION_P_VALUE


# -- runs -------------------------------------------------------------------------------------------


def detection(marked_sources: list[Image.Image], with_stock: bool) -> tuple[dict, dict, dict]:
    rates: dict[tuple[str, str], list[bool]] = defaultdict(list)
    runid: dict[str, list[str]] = defaultdict(list)
    stock: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for i, src in enumerate(marked_sources):
        for name, embed in EMBEDDERS.items():
            marked = embed(src)
            for cond, f in CONDITIONS.items():
                if cond.startswith("2x") and src.size not in GENERATOR_SIZES:
                    continue  # only generator-sized images are tried at their original size
                im = f(marked)
                found = {m.scheme: m for m in detect_invisible_marks(im, try_resized=cond.startswith("2x"))}
                rates[(name, cond)].append(name in found)
                others = set(found) - {name}
                if others:
                    print(f"  !! image {i} marked {name} ({cond}) also flagged {others}", flush=True)
                if name == "provenance":
                    p = found.get("provenance")
                    runid[cond].append("missed" if p is None else "none" if p.payload is None
                                       else "right" if p.payload == f"{RUN_ID:08x}" else "wrong")
                if with_stock and name in ("sd-v1", "sdxl") and cond in ("PNG", "JPEG q90"):
                    stock[(name, cond)].append(stock_detected(im, name))
        if (i + 1) % 25 == 0:
            print(f"  marked {i + 1}/{len(marked_sources)}", flush=True)
    return rates, runid, stock


def false_positives(sets: dict[str, tuple[list[Image.Image], bool]]) -> dict[str, dict]:
    out = {}
    for set_name, (images, try_resized) in sets.items():
        flagged, min_p = [], {s.name: 1.0 for s in SCHEMES}
        small = {s.name: 0 for s in SCHEMES}  # p <= 1e-2, to see whether the null is calibrated
        for i, im in enumerate(images):
            marks = detect_invisible_marks(im, include_undetected=True, try_resized=try_resized)
            for m in marks:
                min_p[m.scheme] = min(min_p[m.scheme], m.p_value)
                small[m.scheme] += m.p_value <= 1e-2
                if m.p_value <= DETECTION_P_VALUE:
                    flagged.append((i, m.scheme, m.p_value))
        out[set_name] = {"n": len(images), "flagged": flagged, "min_p": min_p, "p_le_1e-2": small}
        print(f"  clean {set_name}: {len(images)} images, {len(flagged)} flagged", flush=True)
    return out


def timing(images: list[Image.Image], reps: int = 3, **kw) -> float:
    """Median CPU milliseconds per image over `reps` passes (CPU time: the machine is shared)."""
    per = []
    for _ in range(reps):
        t = time.process_time()
        for im in images:
            detect_invisible_marks(im, **kw)
        per.append((time.process_time() - t) / len(images) * 1000)
    return float(np.median(per))


def wall(images: list[Image.Image], **kw) -> float:
    t = time.perf_counter()
    for im in images:
        detect_invisible_marks(im, **kw)
    return (time.perf_counter() - t) / len(images) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--marked", type=int, default=200, help="Flickr8k-dev photos to mark (plus the 51 COCO photos)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "invisible.md")
    ap.add_argument("--no-stock", action="store_true", help="skip the plain invisible-watermark baseline")
    ap.add_argument("--clean-limit", type=int, default=None, help="use only this many clean photos per set (quick runs)")
    args = ap.parse_args()
    t0 = time.time()

    dev, nonmembers, coco = flickr_dev(), folder("flickr8k-nonmember"), folder("coco-cc")
    print(f"loaded {len(dev)} dev, {len(nonmembers)} non-members, {len(coco)} COCO photos", flush=True)
    up = lambda ims, s: [im.resize((s, s), Image.Resampling.BICUBIC) for im in ims]  # noqa: E731
    step = max(1, len(dev) // max(1, args.marked))
    marked_sources = up(dev[::step][: args.marked], 512) + coco

    # 1. Detection rates
    rates, runid, stock = detection(marked_sources, not args.no_stock)

    # 2. False positives
    clean = (dev + nonmembers)[: args.clean_limit]
    fp = false_positives({
        "Flickr8k dev+non-members, 512x512": (up(clean, 512), False),
        "Flickr8k dev+non-members, native 224x224": (clean, False),
        "COCO, native": (coco, False),
        "non-members 1024x1024, try_resized": (up(nonmembers[: args.clean_limit], 1024), True),
    })

    # 3. Speed
    t512 = up(nonmembers[:100], 512)
    t1024 = up(nonmembers[:30], 1024)
    speed = {
        "512x512": timing(t512),
        "COCO native (~640x427)": timing(coco),
        "1024x1024": timing(t1024),
        "1024x1024, try_resized": timing(t1024, reps=1, try_resized=True),
    }
    wall512 = wall(t512)
    te = time.process_time()
    for im in t512:
        embed_provenance_mark(im, RUN_ID)
    embed_ms = (time.process_time() - te) / len(t512) * 1000

    write_report(args, marked_sources, rates, runid, stock, fp, speed, wall512, embed_ms, time.time() - t0)


NOTES = [
    "### Reading the numbers",
    "",
    "- SD v1/v2 and SDXL write their mark in the U chroma channel with a quantisation step of 36 on single "
    "2x2-pixel cells. Pillow's JPEG keeps one chroma sample per 2x2 pixels (4:2:0) and quantises it coarsely, "
    "which erases the lattice at q90 and below whatever the decoder does; at q95 inverting libjpeg's chroma "
    "upsampling (the `jpeg 4:2:0` hypothesis) recovers part of it, and with full-resolution chroma (4:4:4) q90 "
    "keeps most marks. SD v2's 32-bit payload needs 30 of 32 bits right after the Bonferroni factor, hence its "
    "lower rates than SD v1's 136 bits.",
    "- Untouched PNGs: the plain decoder loses marks where quantising a block's largest coefficient made a "
    "neighbour the largest (common in smooth, upscaled photos) and, for SDXL, because diffusers encodes a float "
    "image, for which OpenCV centres U on 0.5 instead of 128 (a lattice shift the plain decoder ignores).",
    "- Our mark lives in luma (not subsampled by JPEG) with step 20 and nearest-lattice embedding, so it and its "
    "run id survive JPEG down to q60; the run id is only reported when its CRC checks.",
    "- False positives are bounded by construction (exact binomial tail x number of hypotheses); the clean sets "
    "check that real photos, including smooth upscaled ones, behave like random bits.",
    "",
]


def write_report(args, marked_sources, rates, runid, stock, fp, speed, wall512, embed_ms, elapsed) -> None:
    n = len(marked_sources)
    lines = [
        "## Invisible watermarks (dwtDct): detection, false positives, speed",
        "",
        f"Command: `.venv/bin/python bench/bench_invisible.py --marked {args.marked}`"
        f"{' --no-stock' if args.no_stock else ''}  ",
        f"Machine: 2-core x86_64 CPU, shared ({platform.processor() or platform.machine()}), "
        f"single-threaded; run took {elapsed / 60:.1f} min.  ",
        f"Marked images: {n} = {n - 51} Flickr8k-dev photos upscaled 224->512 + 51 COCO photos at native size; "
        "each marked by the real encoder of its scheme (CompVis script via invisible-watermark for SD v1/v2, "
        "diffusers' SDXL watermarker arithmetic, our `embed_provenance_mark`, run id 0x5eed1234). "
        f"Detected = p <= {DETECTION_P_VALUE:g} after Bonferroni. JPEGs are Pillow's (4:2:0 chroma unless noted). "
        "\\* = 2x Lanczos upscale saved as PNG, read with `try_resized=True` (512x512 sources only: COCO sizes "
        "are no generator size).",
        "",
        "### Detection rate (marked images)",
        "",
        "| scheme | " + " | ".join(CONDITIONS) + " |",
        "|---|" + "---|" * len(CONDITIONS),
    ]
    for name in EMBEDDERS:
        cells = [f"{100 * np.mean(rates[(name, c)]):.1f}% of {len(rates[(name, c)])}" for c in CONDITIONS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Our mark's run id (right / detected without run id / wrong / missed):", ""]
    for cond in CONDITIONS:
        r = runid[cond]
        lines.append(f"- {cond}: {r.count('right')} / {r.count('none')} / {r.count('wrong')} / {r.count('missed')} of {len(r)}")
    if stock:
        lines += ["", "Plain invisible-watermark decoding (`WatermarkDecoder.decode`, hard bits, same p-value rule, "
                  "no extra hypotheses) on the same images, for comparison:", ""]
        for (name, cond), v in sorted(stock.items()):
            lines.append(f"- {name}, {cond}: {100 * np.mean(v):.1f}% (ours: {100 * np.mean(rates[(name, cond)]):.1f}%)")
    lines += ["", "### False positives (clean images)", "",
              "| set | images | flagged | min p (sd-v1 / sd-v2 / sdxl / provenance) | share with p <= 0.01 |",
              "|---|---|---|---|---|"]
    total_n = total_flagged = 0
    for set_name, r in fp.items():
        total_n += r["n"]
        total_flagged += len(r["flagged"])
        mins = " / ".join(f"{r['min_p'][s.name]:.2g}" for s in SCHEMES)
        small = " / ".join(f"{100 * r['p_le_1e-2'][s.name] / r['n']:.2f}%" for s in SCHEMES)
        lines.append(f"| {set_name} | {r['n']} | {len(r['flagged'])} | {mins} | {small} |")
    lines += ["", f"Overall: {total_flagged} of {total_n} clean images flagged "
              f"({100 * total_flagged / total_n:.3f}%; target <= 0.1%). "
              "p-values are Bonferroni-corrected, so the share at p <= 0.01 should be at most ~1%: "
              "it measures whether clean images behave like random bits.", ""]
    for r in fp.values():
        for i, scheme, p in r["flagged"]:
            lines.append(f"- flagged: image {i}, {scheme}, p={p:.2g}")
    lines += ["### Speed (`detect_invisible_marks`, all four schemes, CPU time per image, median of passes)", ""]
    for k, v in speed.items():
        lines.append(f"- {k}: {v:.1f} ms")
    lines += [f"- 512x512 wall clock on the shared machine: {wall512:.1f} ms",
              f"- `embed_provenance_mark` 512x512: {embed_ms:.1f} ms", ""]
    lines += NOTES
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
