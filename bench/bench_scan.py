"""Scan throughput end to end (read + decode + SSCD + PDQ + FAISS + invisible marks + visible watermark +
C2PA + metadata), and what each stage and CLIP add, measured in one run on the same images.

    .venv/bin/python bench/bench_scan.py [--images N] [--corpus DIR]

The corpus index (COCO sample by default, SSCD + PDQ + tiny CLIP) is built once into bench/results/.cache.
Inputs: real photos (flickr8k-nonmember by default, 500x~375 JPEGs). Target: >= 20 images/s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from provenance.descriptors.clip import TINY_CLIP_MODEL, make_tiny_checkpoint
from provenance.indexer import BuildOptions, build
from provenance.models import ModelOptions
from provenance.scan import Scanner, ScanOptions

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / "results" / ".cache" / "scan"
DATA = REPO.parent / "shared" / "data"


def rate(scanner: Scanner, files: list[Path]) -> float:
    t = time.perf_counter()
    records = scanner.scan_paths(files)
    dt = time.perf_counter() - t
    assert not [r for r in records if r.verdict == "error"]
    return len(files) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--inputs", default=str(DATA / "flickr8k-nonmember"))
    ap.add_argument("--corpus", default=str(REPO / "provenance" / "sample" / "coco-cc"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    ckpt = CACHE / "tiny-clip.pt"
    if not ckpt.exists():
        make_tiny_checkpoint(ckpt)
    models = ModelOptions(clip_model=TINY_CLIP_MODEL, clip_pretrained=str(ckpt))
    index_dir = CACHE / "index"
    if not (index_dir / "manifest.json").exists():
        build(args.corpus, index_dir, BuildOptions(descriptors=["sscd", "pdq", "clip"], models=models))
    files = sorted(Path(args.inputs).glob("*.jpg"))[: args.images]

    configs = {
        "sscd+pdq only": ScanOptions(use_clip=False, visible=False, invisible=False, c2pa=False, metadata=False),
        "full (sscd+pdq+invisible+visible+c2pa+metadata)": ScanOptions(use_clip=False),
        "full + clip (tiny ViT)": ScanOptions(use_clip=True),
        # scan --visible-thorough: the visible-watermark head also at 512 px (one more SSCD pass, cut at its map)
        "full, --visible-thorough": ScanOptions(use_clip=False, visible_thorough=True),
        # scan --centre-view: SSCD also on the centre 60% of each image (a second SSCD pass and search)
        "full, --centre-view": ScanOptions(use_clip=False, centre_view=True),
        # scan --invisible-crops: invisible marks also read as in a crop (64 grid offsets x widths x phases)
        "full, --invisible-crops": ScanOptions(use_clip=False, invisible_crops=True),
    }
    results = {}
    scanners = {name: Scanner.open(index_dir, opts) for name, opts in configs.items()}
    for s in scanners.values():
        rate(s, files[:20])  # warm-up: models loaded, caches hot
    for name, s in scanners.items():
        r = rate(s, files)
        results[name] = r
        print(f"{name:55s} {r:6.1f} images/s", flush=True)
    # CLIP's real extra cost: ViT-B-32 with random weights has the same FLOPs as the pretrained one.
    from PIL import Image

    from provenance.descriptors.clip import CLIPDescriptor

    vit = CLIPDescriptor.load("ViT-B-32", None, device="cpu")
    imgs = [Image.open(f).convert("RGB") for f in files[:64]]
    vit.embed(imgs[:8])
    t = time.perf_counter()
    for i in range(0, len(imgs), 16):
        vit.embed(imgs[i : i + 16])
    results["ViT-B-32 image embedding alone (random weights, CPU)"] = len(imgs) / (time.perf_counter() - t)
    print(
        f"{'ViT-B-32 image embedding alone':55s} {results['ViT-B-32 image embedding alone (random weights, CPU)']:6.1f} images/s"
    )
    meta = {
        "images": len(files),
        "inputs": args.inputs,
        "corpus": args.corpus,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "images_per_s": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
