"""OpenCLIP image/text embedding throughput on a CUDA GPU, through provenance's CLIPDescriptor.

    python bench/gpu_clip.py [--model ViT-B-32] [--batch 256] [--seconds 10]

No pretrained weights can be fetched on the lent GPU machine, so the architecture runs with random
weights: the same FLOPs as the real checkpoint, so the same speed. Writes JSON to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from provenance.descriptors.clip import CLIPDescriptor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    d = CLIPDescriptor.load(args.model, None, device="cuda")  # pretrained=None: random init, same compute
    d.model.half()
    size = d.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    results = {"model": args.model, "batch": args.batch, "device": torch.cuda.get_device_name(0)}
    for name, fn in (
        ("image", lambda: d.model.encode_image(torch.from_numpy(x).cuda().half())),
        ("text", lambda: d.model.encode_text(d._tokenizer(["a photo of a cat"] * args.batch).cuda())),
    ):
        with torch.inference_mode():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < args.seconds:
                fn()
                n += args.batch
            torch.cuda.synchronize()
            results[f"{name}_per_s"] = n / (time.perf_counter() - t)
        print(f"{args.model} fp16 {name}: {results[f'{name}_per_s']:.0f} /s at batch {args.batch}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_clip.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
