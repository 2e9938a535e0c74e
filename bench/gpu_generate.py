"""GPU benchmark of generation: SD 1.5-architecture pipeline with RANDOM weights, fp16, 512x512, 25 steps.

Measures images/s at batch 1 and 4, the extra cost of the memorization signal (the noise-norm hook on the
CFG batch, and the separate first-step pass used when guidance is off), and one end-to-end
`provenance.generator.generate()` batch (PNG + metadata + mark written). Random weights cost the same
FLOPs as real ones, so the timings hold for SD 1.5; nothing is downloaded.

Needs torch, diffusers, transformers (and numpy, pillow). Prints a Markdown table; writes
$OUT/gpu_generate.json when $OUT is set. `--tiny` runs a tiny config on CPU (a smoke test of this script).

    python bench/gpu_generate.py            # ~1.5 min on one H100/H200
    python bench/gpu_generate.py --tiny     # seconds, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# runwayml/stable-diffusion-v1-5: unet/config.json, vae/config.json, text_encoder/config.json (CLIP ViT-L/14)
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
)
VIT_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
PROMPTS = ["a photograph of an astronaut riding a horse", "an oil painting of a lighthouse at dusk",
           "a red bicycle leaning on a brick wall", "a bowl of ramen, studio lighting"]  # fmt: skip


def _tokenizer(tmp: Path):
    """CLIP's tokenizer from open_clip's BPE file when present; else a byte-level CLIP BPE with no merges
    (same special-token ids, so the random text encoder sees valid ids either way)."""
    from transformers import CLIPTokenizer

    from provenance import tiny_random

    try:
        tiny_random.build_clip_tokenizer_files(tiny_random._openclip_bpe_path(), tmp)
    except Exception:
        chars = list(tiny_random._bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars]
        vocab += [f"<|unused{i}|>" for i in range(49406 - len(vocab))] + ["<|startoftext|>", "<|endoftext|>"]
        (tmp / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer.from_pretrained(str(tmp), model_max_length=77)


def build_pipeline(tiny: bool, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from provenance import tiny_random

    unet_cfg, vae_cfg, text_cfg = (
        (tiny_random._TINY_UNET, tiny_random._TINY_VAE, tiny_random._TINY_TEXT)
        if tiny
        else (SD15_UNET, SD15_VAE, VIT_L14_TEXT)
    )
    torch.manual_seed(0)
    # build on the device: random init of 1B parameters on the GPU takes ~1 s, on the CPU ~20 s
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    tokenizer = _tokenizer(Path(tempfile.mkdtemp(prefix="gpu-generate-tok-")))
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=PNDMScheduler(**tiny_random._SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    if dtype != torch.float32:
        pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters())
    return pipe, params


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _run(pipe, batch: int, steps: int, size: int, seed: int = 0, **kw):
    import torch

    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    return pipe(prompt=[PROMPTS[i % len(PROMPTS)] for i in range(batch)], num_inference_steps=steps,
                guidance_scale=7.5, height=size, width=size, generator=gens, **kw)  # fmt: skip


def _timed(device: str, fn, repeats: int) -> float:
    """Seconds per call, the mean of `repeats` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    import torch

    from provenance import generator as g
    from provenance.memorization import NoiseNormProbe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU, 64x64, 2 steps (smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="default 25 (2 with --tiny)")
    ap.add_argument("--size", type=int, default=None, help="default 512 (64 with --tiny)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4; 1,2 with --tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3; 1 with --tiny)")
    ap.add_argument("--noise-norm-steps", type=int, default=3)
    args = ap.parse_args(argv)
    tiny = args.tiny
    steps = args.steps or (2 if tiny else 25)
    size = args.size or (64 if tiny else 512)
    batches = [int(b) for b in (args.batches or ("1,2" if tiny else "1,4")).split(",")]
    repeats = args.repeats or (1 if tiny else 3)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if device == "cpu" and not tiny:
        print("warning: no CUDA device; the full-size benchmark on CPU takes very long", file=sys.stderr)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    pipe, params = build_pipeline(tiny, device, dtype)
    build_s = time.perf_counter() - t0
    _run(pipe, 1, 2, size)  # warm-up: kernels, cuDNN autotuning, allocator
    rows = []
    for b in batches:
        plain_s = _timed(device, lambda b=b: _run(pipe, b, steps, size), repeats)
        with NoiseNormProbe(pipe.unet, args.noise_norm_steps) as probe:

            def probed(b=b, probe=probe):
                probe.start(b)
                _run(pipe, b, steps, size)

            probe_s = _timed(device, probed, repeats)
            norms = probe.norms()
        lp = g.LoadedPipeline(pipe=pipe, model="sd15-random", device=device, dtype=dtype, model_info={})
        cfg = g.GenerationConfig(steps=steps, noise_norm_steps=args.noise_norm_steps)
        with NoiseNormProbe(pipe.unet, args.noise_norm_steps) as probe2:
            size_kw = {"height": size, "width": size}
            sep_s = _timed(
                device,
                lambda lp=lp, probe2=probe2, b=b, cfg=cfg, size_kw=size_kw: g._separate_noise_norms(
                    lp, probe2, [PROMPTS[0]] * b, list(range(b)), cfg, size_kw
                ),
                repeats,
            )
        rows.append({
            "batch": b,
            "seconds_per_call": round(plain_s, 4),
            "images_per_s": round(b / plain_s, 3),
            "seconds_per_call_with_noise_norm_hook": round(probe_s, 4),
            "hook_overhead_pct": round(100 * (probe_s - plain_s) / plain_s, 2),
            "separate_pass_seconds": round(sep_s, 4),
            "separate_pass_pct_of_generation": round(100 * sep_s / plain_s, 2),
            "noise_norms_finite": bool(norms is not None and np.isfinite(norms).all()),
        })  # fmt: skip

    # one end-to-end batch through the library: PNGs, sidecars, metadata rewrite, mark if available
    e2e: dict = {}
    try:
        b = max(batches)
        lp = g.LoadedPipeline(pipe=pipe, model="sd15-random", device=device, dtype=dtype,
                              model_info={"model": "sd15-random", "pipeline": type(pipe).__name__})  # fmt: skip
        try:
            g._load_watermarker()
            wm = True
        except Exception:
            wm = False
        cfg = g.GenerationConfig(steps=steps, seed=0, height=size, width=size, batch_size=b, watermark=wm,
                                 memorization=True, noise_norm_steps=args.noise_norm_steps)  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            _sync(device)
            t = time.perf_counter()
            g.generate(cfg, PROMPTS[:b] if b <= len(PROMPTS) else [PROMPTS[0]] * b, d, pipeline=lp)
            _sync(device)
            e2e = {"batch": b, "images": b, "seconds": round(time.perf_counter() - t, 3), "watermark": wm}
            e2e["images_per_s"] = round(b / e2e["seconds"], 3)
    except Exception as e:
        e2e = {"error": f"{type(e).__name__}: {e}"}

    results = {
        "config": {
            "tiny": tiny,
            "steps": steps,
            "size": size,
            "dtype": str(dtype).removeprefix("torch."),
            "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "scheduler": type(pipe.scheduler).__name__,
            "guidance": 7.5,
            "params": params,
            "build_seconds": round(build_s, 2),
            "repeats": repeats,
            "noise_norm_steps": args.noise_norm_steps,
            "torch": torch.__version__,
        },
        "rows": rows,
        "end_to_end": e2e,
    }
    if device == "cuda":
        results["config"]["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    _print_table(results)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_generate.json").write_text(json.dumps(results, indent=2))
    return results


def _print_table(results: dict) -> None:
    c = results["config"]
    print(f"\n{c['device']}, {c['dtype']}, {c['size']}x{c['size']}, {c['steps']} steps, {c['scheduler']}, "
          f"{c['params'] / 1e6:.0f}M random parameters (built in {c['build_seconds']} s)")  # fmt: skip
    print("| batch | s / call | images/s | + noise-norm hook | hook overhead | separate first-steps pass |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['batch']} | {r['seconds_per_call']:.3f} | {r['images_per_s']:.2f} | "
              f"{r['seconds_per_call_with_noise_norm_hook']:.3f} | {r['hook_overhead_pct']:+.1f}% | "
              f"{r['separate_pass_seconds']:.3f} s ({r['separate_pass_pct_of_generation']:.1f}%) |")  # fmt: skip
    print(f"end to end (generate(), PNG + metadata + memorization): {results['end_to_end']}")


if __name__ == "__main__":
    main()
