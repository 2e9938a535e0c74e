"""Embedding throughput per descriptor: end to end (read + decode + preprocess + model + stage + write the
index) against the bare model on the same, already preprocessed images, measured in the same run.

    .venv/bin/python bench/bench_embed.py [--shard PATH] [--limit N] [--repeats R]

Runs are interleaved (bare, end-to-end, bare, ...) so that a noisy, shared machine affects both alike;
the ratio is the number to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from provenance.corpus import detect_source, read_corpus
from provenance.images import decode_image
from provenance.indexer import BuildOptions, build
from provenance.models import ModelOptions, load_descriptor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARD = REPO.parent / "shared" / "data" / "flickr8k-dev" / "00000.tar"


def bare_rate(model, inputs: list[np.ndarray], batch_size: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        model.embed_batch(inputs[i : i + batch_size])
    return len(inputs) / (time.perf_counter() - t)


def end_to_end_rate(source: str, name: str, limit: int, batch_size: int, models: ModelOptions) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        res = build(
            source,
            Path(tmp) / "idx",
            BuildOptions(descriptors=[name], batch_size=batch_size, limit=limit, models=models),
        )
        dt = time.perf_counter() - t
        assert res.added == limit, (res.added, limit)
    return limit / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard", default=str(DEFAULT_SHARD))
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--descriptors", default="sscd,pdq,clip")
    ap.add_argument("--json", default=None, help="also write results here")
    args = ap.parse_args()

    items = list(read_corpus(detect_source(args.shard), limit=args.limit))
    images = [decode_image(it.data, it.id).image for it in items]
    results = {}
    tmpdir = Path(tempfile.mkdtemp())
    for name in args.descriptors.split(","):
        models = ModelOptions()
        if name == "clip":
            # No pretrained OpenCLIP weights offline: time the tiny architecture through the same code path,
            # which measures our pipeline overhead, not a real ViT's cost.
            from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint

            ckpt = make_tiny_checkpoint(tmpdir / "tiny.pt")
            models = ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(ckpt))
        model = load_descriptor(name, models.load_args(name))
        inputs = [model.preprocess(im) for im in images]
        bare_rate(model, inputs[:64], args.batch_size)  # warm-up
        bare, e2e = [], []
        for _ in range(args.repeats):
            bare.append(bare_rate(model, inputs, args.batch_size))
            e2e.append(end_to_end_rate(args.shard, name, args.limit, args.batch_size, models))
        ratios = [e / b for e, b in zip(e2e, bare, strict=False)]
        results[name] = {
            "bare_img_s": statistics.median(bare),
            "end_to_end_img_s": statistics.median(e2e),
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
            "model": model.spec.model_id,
        }
        print(
            f"{name:5s} bare {statistics.median(bare):7.1f} img/s  end-to-end {statistics.median(e2e):7.1f} img/s  "
            f"ratio {statistics.median(ratios):.2f}  (runs: {', '.join(f'{r:.2f}' for r in ratios)})",
            flush=True,
        )
    shutil.rmtree(tmpdir, ignore_errors=True)
    meta = {
        "images": args.limit,
        "source": args.shard,
        "batch_size": args.batch_size,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
