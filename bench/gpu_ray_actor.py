"""The Ray engine's GPU actor work, run directly on CUDA without Ray: images/s and the GPU's share of the time.

Run on a GPU machine:  python bench/gpu_ray_actor.py [--shard ../shared/data/flickr8k-dev/00000.tar] [--out DIR]

Why without Ray: the device machine has torch but no network, and the carry limit (64 MiB) is below the Ray wheel
(~76 MiB) and onnxruntime-gpu (~244 MiB). So this script runs what one `PartBuilder` actor runs, in this
process: `ray_engine.load_models(..., use_gpu=True)` (the same provider/device choice as `--gpus-per-worker 1`)
and the local engine's `_Run.index_unit` over one shard, writing a real part. Not measured by it: Ray's own
scheduling and object-store costs (bench/bench_ray.py measures those on CPUs), and SSCD's ONNX model on the
CUDA provider when onnxruntime-gpu is absent (then SSCD is skipped and said so).

Descriptors: OpenCLIP ViT-B-32 with random weights (`--clip-pretrained none`: no download; same compute as the
real weights) and SSCD (the bundled int8 ONNX model, CUDA provider) when onnxruntime has CUDA.
GPU share ("model_share"): the time of the image model calls (synchronised before and after) over the wall time
of the unit: how busy the actor keeps the GPU while it also decodes on the CPU. The text tower of CLIP (captions)
runs too and is counted in the wall time only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard", default=str(DATA / "flickr8k-dev" / "00000.tar"))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the same code on the CPU (checks the script)")
    args = ap.parse_args()
    use_gpu = not args.cpu_dry_run

    import onnxruntime as ort
    import torch

    from provenance.corpus import read_shard, shard_name
    from provenance.descriptors.clip import CLIPDescriptor
    from provenance.indexer import BuildOptions, _Run
    from provenance.models import ModelOptions
    from provenance.ray_engine import load_models, size_threads, torch_device

    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures the GPU actor (--cpu-dry-run checks it on the CPU)")
    size_threads(args.threads)
    names = []
    if not use_gpu or "CUDAExecutionProvider" in ort.get_available_providers():
        names.append("sscd")
    else:
        print("onnxruntime has no CUDA provider (onnxruntime-gpu not installed): SSCD not measured", flush=True)
    models_opts = ModelOptions(clip_model="ViT-B-32")
    t = time.perf_counter()
    models = load_models(names, models_opts, args.threads, use_gpu=use_gpu)  # SSCD: the actor's provider choice
    # OpenCLIP ViT-B-32 with random weights (pretrained=None: no download, the same compute), on the actor's device
    device = torch_device(use_gpu, torch.cuda.is_available())
    models["clip"] = CLIPDescriptor.load("ViT-B-32", None, device=device)
    names.append("clip")
    load_s = time.perf_counter() - t
    sync = torch.cuda.synchronize if use_gpu else (lambda: None)

    # time of every model call, synchronised (the CUDA work is done when it returns); image tower only
    model_s = [0.0]
    for m in models.values():
        inner = m.embed_batch

        def timed(batch, inner=inner):
            sync()
            t0 = time.perf_counter()
            out = inner(batch)
            sync()
            model_s[0] += time.perf_counter() - t0
            return out

        m.embed_batch = timed

    specs = {n: m.spec for n, m in models.items()}
    specs["clip_text"] = specs["clip"]
    work = Path(tempfile.mkdtemp(prefix="gpu_actor_"))
    (work / "parts").mkdir()
    options = BuildOptions(descriptors=names, batch_size=args.batch_size, workers=args.threads, models=models_opts)
    run = _Run(work, options, models, specs, "bench", None, [], None)
    t = time.perf_counter()
    markers = run.index_unit(read_shard(args.shard), shard_name(args.shard), 0)
    wall = time.perf_counter() - t
    n = markers[0]["n"]
    result = {
        "device": torch.cuda.get_device_name(0) if use_gpu else "cpu (dry run)",
        "descriptors": names,
        "shard": args.shard,
        "items": n,
        "model_load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "images_per_s": round(n / wall, 1),
        "model_share": round(model_s[0] / wall, 3),  # on a GPU: the share of the time the GPU runs the models
        "batch_size": args.batch_size,
        "cpu_threads": args.threads,
        "not_measured": ["Ray scheduling/object store (no Ray wheel on the device machine)"]
        + ([] if "sscd" in names else ["SSCD on onnxruntime's CUDA provider (no onnxruntime-gpu)"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_ray_actor.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
