"""CPU benchmark of `provenance generate` with the tiny random SD pipeline: seconds per image, end to end.

Each measurement is one `generate()` call making 4 images (PNG + text chunks + sidecar written), the
median of --repeats calls. Variants: plain; + noise-norm hook (memorization on, CFG batch); + separate
first-steps pass (guidance 1, so no CFG batch to read); + pairwise SSCD (4 images of one prompt, the
int8 ONNX SSCD on CPU); + invisible mark (when provenance.watermarks.invisible exists).

    .venv/bin/python bench/bench_generate.py [--threads 1] [--repeats 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sizes", default="64,256")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    t0 = time.perf_counter()
    import torch

    from provenance import generator as g

    torch.set_num_threads(args.threads)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lp = g.load_pipeline(g.TINY_RANDOM, "cpu")
    load_s = time.perf_counter() - t0
    try:
        g._load_watermarker()
        have_mark = True
    except g.GenerationError:
        have_mark = False

    prompts = ["a red bicycle", "a lighthouse at dusk", "a bowl of ramen", "an owl in a tree"]
    variants = [
        ("plain", dict(memorization=False), prompts, 1),
        ("+ noise-norm hook", dict(memorization=True), prompts, 1),
        ("guidance 1 (no CFG batch), plain", dict(memorization=False, guidance=1.0), prompts, 1),
        ("guidance 1 + separate first-steps pass", dict(memorization=True, guidance=1.0), prompts, 1),
        ("+ pairwise SSCD (1 prompt x 4)", dict(memorization=True), prompts[:1], 4),
    ]
    if have_mark:
        variants.append(("+ invisible mark", dict(memorization=False, watermark=True), prompts, 1))
    with tempfile.TemporaryDirectory() as d:  # warm-up: first-call allocations, SSCD model load
        g.generate(g.GenerationConfig(steps=2, seed=0, num_images=4, watermark=False), prompts[:1], d, pipeline=lp)
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in (1, 4):
            for name, kw, ps, n in variants:
                kw = {"watermark": False, **kw}
                cfg = g.GenerationConfig(steps=args.steps, seed=0, height=size, width=size, batch_size=batch,
                                         num_images=n, **kw)  # fmt: skip
                times = []
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory() as d:
                        t = time.perf_counter()
                        g.generate(cfg, ps, d, pipeline=lp)
                        times.append((time.perf_counter() - t) / (len(ps) * n))
                rows.append({"size": size, "batch": batch, "variant": name, "s_per_image": statistics.median(times)})
                print(f"{size}x{size} batch {batch} {name}: {rows[-1]['s_per_image']:.3f} s/image", file=sys.stderr)

    print(f"\nmachine: {platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}; "
          f"imports {import_s:.1f} s, tiny-random load {load_s:.2f} s; {args.steps} steps, guidance 7.5, "
          f"median of {args.repeats}")  # fmt: skip
    print("\n| size | batch | variant | s / image | vs its plain row |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        ref = "guidance 1 (no CFG batch), plain" if r["variant"].startswith("guidance 1 +") else "plain"
        base = next(x for x in rows if x["size"] == r["size"] and x["batch"] == r["batch"] and x["variant"] == ref)
        rel = (r["s_per_image"] / base["s_per_image"] - 1) * 100
        print(f"| {r['size']}x{r['size']} | {r['batch']} | {r['variant']} | {r['s_per_image']:.3f} | "
              f"{'' if r is base else f'{rel:+.0f}%'} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
