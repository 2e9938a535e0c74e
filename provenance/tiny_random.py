"""The `tiny-random` generator (`provenance generate --model tiny-random`): a randomly initialised Stable Diffusion
1.x architecture small enough for CPU tests and offline demos, with a CLIP tokenizer built from OpenCLIP's shipped BPE
vocabulary (nothing is downloaded)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from provenance.errors import GenerationError

logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
TINY_RANDOM_NOTE = (
    "randomly initialised tiny Stable Diffusion architecture (for tests and offline demos): "
    "its outputs are noise, not images of the prompt"
)
TINY_RANDOM_MARKER = "provenance_tiny_random.json"  # written next to model_index.json by save_tiny_random_pipeline

# The tiny pipeline keeps SD 1.x's layout (VAE downsampling 8x, 4 latent channels, CLIP text encoder with
# a 77-token context and the real 49408-token vocabulary) with widths small enough that a 64x64 image
# runs in a fraction of a second on one CPU core.
_TINY_UNET: dict[str, Any] = dict(
    sample_size=8,  # 8x8 latents -> 64x64 images by default
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
_TINY_VAE: dict[str, Any] = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
)
_TINY_TEXT: dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
# runwayml/stable-diffusion-v1-5's scheduler/scheduler_config.json
_SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-character table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def _openclip_bpe_path() -> Path:
    # find_spec locates the file without importing open_clip (whose import costs seconds)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError(
            "the tiny-random tokenizer needs open_clip_torch's BPE vocabulary; pip install open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise GenerationError(f"open_clip's BPE vocabulary is missing at {path}; reinstall open_clip_torch")
    return path


def build_clip_tokenizer_files(bpe_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Write CLIP's vocab.json + merges.txt from a bpe_simple_vocab_16e6.txt.gz, as CLIP's tokenizer builds them.

    The vocabulary is the 256 byte characters, the same with '</w>', one entry per merge (the first
    48894 lines after the header), then <|startoftext|> and <|endoftext|>: 49408 tokens.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    # transformers reads merges.txt with a version header line, like the files on the hub
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return out


def clip_tokenizer(cache: Path | None = None) -> Any:
    """A transformers CLIPTokenizer built from OpenCLIP's shipped BPE vocabulary, cached under `cache`."""
    from transformers import CLIPTokenizer

    from provenance.generator import cache_dir

    tok_dir = (cache or cache_dir()) / "tokenizers" / "clip-bpe-16e6"
    if not ((tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file()):
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        # build in a private folder, then rename: concurrent builders never see half-written files
        tmp = Path(tempfile.mkdtemp(prefix=".clip-bpe-", dir=tok_dir.parent))
        build_clip_tokenizer_files(_openclip_bpe_path(), tmp)
        try:
            os.replace(tmp, tok_dir)
        except OSError:  # another process won the race; its files are identical
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        logger.info("built the CLIP tokenizer from open_clip's BPE vocabulary into %s", tok_dir)
    return CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)


def build_tiny_random_pipeline(seed: int = 0, cache: Path | None = None) -> Any:
    """A tiny, randomly initialised StableDiffusionPipeline (float32, CPU); the same weights for the same seed."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer(cache)
    # fork_rng: the seeded init must not disturb the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # diffusers' constructors are untyped (@register_to_config), and mypy does not see their nn.Module base
        unet: Any = UNet2DConditionModel(**_TINY_UNET)  # type: ignore[no-untyped-call]
        vae: Any = AutoencoderKL(**_TINY_VAE)  # type: ignore[no-untyped-call]
        text_encoder: Any = CLIPTextModel(CLIPTextConfig(**_TINY_TEXT))
    pipe = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler(**_SD15_SCHEDULER),  # type: ignore[no-untyped-call]
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def save_tiny_random_pipeline(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save the tiny random pipeline as a diffusers folder, loadable with `--model DIR` like a real one."""
    out = Path(out_dir)
    pipe = build_tiny_random_pipeline(seed)
    pipe.save_pretrained(str(out))
    (out / TINY_RANDOM_MARKER).write_text(json.dumps({"model": TINY_RANDOM, "seed": seed, "note": TINY_RANDOM_NOTE}))
    return out
