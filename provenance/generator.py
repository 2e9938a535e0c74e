"""Generating images with diffusers, each written with its provenance: PNG chunks, sidecar JSON, invisible mark.

`generate()` reads as numbered steps: check inputs, load the pipeline, run batches, write each image
atomically as it finishes (PNG with text chunks and one `provenance` JSON chunk, plus `NAME.json`), then
fill in the memorization signals (`provenance.memorization`) that need the whole prompt or the whole run.
Seeds are per image: image j of every prompt uses `seed + j`, drawn from a CPU `torch.Generator`, so the
same seed and settings give the same image on any device and whatever the batch size or prompt list.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import secrets
import socket
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from provenance.errors import GenerationError, ProvenanceError
from provenance.extras import require
from provenance.memorization import (
    MIN_IMAGES_FOR_PAIRWISE,
    Embedder,
    MemorizationSignals,
    NoiseNormProbe,
    flag_prompts,
    prompt_pairwise_sscd,
)
from provenance.tiny_random import (  # the documented `--model tiny-random`, built in its own module
    TINY_RANDOM,
    TINY_RANDOM_MARKER,
    TINY_RANDOM_NOTE,
    build_tiny_random_pipeline,
    clip_tokenizer,
    save_tiny_random_pipeline,
)

if TYPE_CHECKING:
    import torch

    from provenance.types import ScanRecord

logger = logging.getLogger(__name__)

METADATA_SCHEMA = "provenance.generation/1"
FALLBACK_GUIDANCE = 7.5  # guidance of the separate noise-norm pass when the run itself has no CFG batch
_HUB_PROBE_TIMEOUT_S = 5.0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf")

# Short names for --scheduler; any diffusers scheduler class name is accepted as well.
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-2m": "DPMSolverMultistepScheduler",
    "dpm-single": "DPMSolverSinglestepScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "kdpm2-a": "KDPM2AncestralDiscreteScheduler",
    "deis": "DEISMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}


# -- configuration and results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationConfig:
    """The settings of one generation run (recorded in every image's metadata)."""

    model: str = TINY_RANDOM  # hub id, local diffusers folder, or "tiny-random"
    num_images: int = 1  # per prompt
    steps: int = 25
    guidance: float = 7.5
    seed: int | None = None  # None: a random seed, recorded
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None
    scheduler: str | None = None  # alias (SCHEDULER_ALIASES) or diffusers class name; None: the model's own
    negative_prompt: str | None = None
    batch_size: int | None = None  # images per pipeline call; None: 4 on CUDA or for tiny-random, else 1
    watermark: bool = True  # embed our invisible mark carrying the run id
    memorization: bool = True  # compute the memorization signals
    noise_norm_steps: int = 3  # first denoiser evaluations averaged for the noise norm
    device: str | None = None  # None/"auto": cuda, then mps, then cpu

    def check(self) -> None:
        """Raise GenerationError naming the first bad value."""
        if self.num_images < 1:
            raise GenerationError(f"--num-images must be >= 1, got {self.num_images}")
        if self.steps < 1:
            raise GenerationError(f"--steps must be >= 1, got {self.steps}")
        if not np.isfinite(self.guidance) or self.guidance < 0:
            raise GenerationError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if self.seed is not None and not 0 <= self.seed < 2**63 - self.num_images:
            raise GenerationError(f"--seed must be >= 0 and below 2**63 - num_images, got {self.seed}")
        if (self.height is None) != (self.width is None):
            raise GenerationError("give both --height and --width, or neither")
        for name, v in (("height", self.height), ("width", self.width)):
            if v is not None and (v < 8 or v % 8):
                raise GenerationError(f"--{name} must be a positive multiple of 8, got {v}")
        if self.batch_size is not None and self.batch_size < 1:
            raise GenerationError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.noise_norm_steps < 1:
            raise GenerationError(f"noise_norm_steps must be >= 1, got {self.noise_norm_steps}")
        if self.scheduler is not None:
            resolve_scheduler_class(self.scheduler)


@dataclass
class LoadedPipeline:
    """A diffusers text-to-image pipeline on its device, with what the metadata records about the model."""

    pipe: Any  # diffusers.DiffusionPipeline
    model: str  # "tiny-random", the hub id, or the resolved local folder
    device: str
    dtype: torch.dtype
    model_info: dict[str, Any]  # model, model_revision, weights_sha256, pipeline, model_note...
    tiny_random: bool = False

    @property
    def tokenizer(self) -> Any | None:
        return getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)


@dataclass
class GeneratedImage:
    """One written image: its files, how it was made, and its prompt's memorization signals."""

    path: Path
    sidecar: Path
    prompt: str
    negative_prompt: str | None
    seed: int
    prompt_index: int
    image_index: int  # j: this is the prompt's image j, made with seed + j
    run_id: int
    width: int
    height: int
    memorization: MemorizationSignals | None  # shared by the prompt's images; final once generate() returns
    metadata: dict[str, Any] = field(default_factory=dict)  # exactly the `provenance` chunk / sidecar

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "sidecar": str(self.sidecar),
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "prompt_index": self.prompt_index,
            "image_index": self.image_index,
            "run_id": self.run_id,
            "width": self.width,
            "height": self.height,
            "memorization": self.memorization.to_dict() if self.memorization else None,
        }


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt as the model sees it: cut to the tokenizer's context when longer."""

    text: str
    original: str
    truncated: bool
    tokens: int | None  # tokens of the original, special tokens included


# -- devices, cache, tokenizer ---------------------------------------------------------------------------


def resolve_device(device: str | None = None) -> tuple[str, torch.dtype]:
    """(device, dtype): CUDA with float16, Apple MPS with float16, else CPU with float32."""
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GenerationError(f"device {device!r} requested but Apple MPS is not available; use --device cpu")
    if kind not in ("cuda", "mps", "cpu"):
        raise GenerationError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device, (torch.float32 if kind == "cpu" else torch.float16)


def cache_dir() -> Path:
    """$PROVENANCE_CACHE_DIR, else $XDG_CACHE_HOME/provenance, else ~/.cache/provenance."""
    if os.environ.get("PROVENANCE_CACHE_DIR"):
        return Path(os.environ["PROVENANCE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "provenance"


# -- pipelines -------------------------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    # a hub id is "name" or "owner/name"; anything else with a separator is meant as a folder
    return model.startswith((".", "/", "~")) or model.count("/") >= 2 or "\\" in model


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE) or env


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    # one TCP connect instead of huggingface_hub's retries (many seconds with backoff) to learn we are offline
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot from_pretrained used, read from the cache path."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(path, str):
        parts = Path(path).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


def _check_hub_model(model: str) -> bool:
    """Validate a hub id before any download; returns whether it must be loaded from the cache only."""
    from huggingface_hub import try_to_load_from_cache

    # re-exported by huggingface_hub.utils' __init__ without an __all__ entry mypy reads
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise GenerationError(
            f"--model {model!r} is neither an existing local folder nor a valid Hugging Face hub id (like "
            "'stabilityai/sd-turbo'), nor 'tiny-random'"
        ) from None
    cached = isinstance(try_to_load_from_cache(model, "model_index.json"), str)
    if cached and _hub_offline():
        return True
    if not cached and _hub_offline():
        raise GenerationError(
            f"model {model!r} is not a local folder, not in the local Hugging Face cache, and the hub is offline "
            "(HF_HUB_OFFLINE is set): download it first while online, or pass a local diffusers folder with "
            "--model DIR"
        )
    if not _hub_reachable():
        if cached:
            logger.info("the hub is unreachable; loading %s from the local cache", model)
            return True
        raise GenerationError(
            f"model {model!r} is not a local folder, not in the local Hugging Face cache, and the hub "
            "(https://huggingface.co) cannot be reached: you appear to be offline. Download it while online, "
            "or pass a local diffusers folder with --model DIR (or 'tiny-random' for a test pipeline)"
        )
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(model, timeout=10)
    except GatedRepoError:
        raise GenerationError(
            f"model {model!r} is gated on the hub: accept its licence on its page and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise GenerationError(f"no model {model!r} on the Hugging Face hub (check the spelling)") from None
    except Exception as e:
        logger.warning("could not query the hub about %s (%s); trying to load it anyway", model, e)
    return False


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise GenerationError(f"model folder {path} does not exist")
    if path.is_file():
        raise GenerationError(
            f"--model {path} is a single file; give a diffusers pipeline folder (with model_index.json), "
            "e.g. one converted with diffusers' convert_original_stable_diffusion_to_diffusers.py"
        )
    if not (path / "model_index.json").is_file():
        raise GenerationError(f"{path} is not a diffusers pipeline folder: it has no model_index.json")


def weights_sha256(folder: Path) -> str:
    """sha256 over the folder's weight files (relative name and content, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _module_weights_sha256(pipe: Any) -> str:
    import torch

    h = hashlib.sha256()
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            for key, t in sorted(module.state_dict().items()):
                h.update(f"{name}.{key}".encode() + b"\0")
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _dtype_kwarg() -> str:
    # diffusers renamed torch_dtype to dtype (the old name warns); older releases know only torch_dtype
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _from_pretrained(source: str, dtype: torch.dtype, local_files_only: bool) -> Any:
    from diffusers import DiffusionPipeline

    kwargs = {_dtype_kwarg(): dtype, "local_files_only": local_files_only}
    try:
        # diffusers' from_pretrained is untyped (its hub-args decorator)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise GenerationError(f"cannot load model {source!r}: {e}") from None
    if not _is_text_to_image(pipe):
        # e.g. a folder saved from an img2img or inpainting pipeline: the same components serve text-to-image
        from diffusers import AutoPipelineForText2Image

        try:
            pipe = AutoPipelineForText2Image.from_pipe(pipe)
        except Exception as e:
            raise GenerationError(
                f"model {source!r} loads as {type(pipe).__name__}, which is not a text-to-image pipeline ({e})"
            ) from None
    return pipe


def _is_text_to_image(pipe: Any) -> bool:
    name = type(pipe).__name__
    if any(word in name for word in ("Img2Img", "Inpaint", "Upscale", "Depth2Img", "InstructPix2Pix")):
        return False
    return "prompt" in inspect.signature(pipe.__call__).parameters


def load_pipeline(model: str, device: str | None = None, dtype: torch.dtype | None = None) -> LoadedPipeline:
    """Load `model` ("tiny-random", a local diffusers folder, or a hub id) onto `device`.

    Raises GenerationError before loading anything heavy when the model cannot be found: a missing
    folder, a folder without model_index.json, an invalid hub id, or a hub id that is not cached
    while offline.
    """
    for module in ("diffusers", "transformers"):  # before anything else: a missing extra is named, not a traceback
        require(module, "provenance generate")
    device, auto_dtype = resolve_device(device)
    dtype = dtype or auto_dtype
    tiny = False
    if model == TINY_RANDOM:
        logger.warning("model tiny-random: %s", TINY_RANDOM_NOTE)
        pipe = build_tiny_random_pipeline()
        info: dict[str, Any] = {
            "model": TINY_RANDOM,
            "model_revision": None,
            "weights_sha256": _module_weights_sha256(pipe),
            "model_note": TINY_RANDOM_NOTE,
        }
        tiny = True
        name = TINY_RANDOM
    elif Path(model).expanduser().exists() or _looks_like_path(model):
        path = Path(model).expanduser().resolve()
        _check_local_dir(path)
        t0 = time.perf_counter()
        info = {"model": str(path), "model_revision": None, "weights_sha256": weights_sha256(path)}
        logger.debug("hashed the weights of %s in %.1f s", path, time.perf_counter() - t0)
        if (path / TINY_RANDOM_MARKER).is_file():
            logger.warning("model %s: %s", path, TINY_RANDOM_NOTE)
            info["model_note"] = TINY_RANDOM_NOTE
            tiny = True
        pipe = _from_pretrained(str(path), dtype, local_files_only=True)
        name = str(path)
    else:
        local_only = _check_hub_model(model)
        pipe = _from_pretrained(model, dtype, local_files_only=local_only)
        info = {"model": model, "model_revision": _hub_revision(model), "weights_sha256": None}
        name = model
    info["pipeline"] = type(pipe).__name__
    import torch

    # from_pretrained already loaded in `dtype`; the tiny pipeline is built in float32
    pipe = pipe.to(device, dtype) if tiny and dtype != torch.float32 else pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe=pipe, model=name, device=device, dtype=dtype, model_info=info, tiny_random=tiny)


def resolve_scheduler_class(name: str) -> type[Any]:
    """The diffusers scheduler class for an alias ("euler-a") or a class name ("EulerDiscreteScheduler")."""
    import diffusers.schedulers as schedulers

    class_name = SCHEDULER_ALIASES.get(name.lower(), name)
    by_lower = {n.lower(): n for n in dir(schedulers) if n.endswith("Scheduler")}
    real = by_lower.get(class_name.lower())
    if real is None:
        raise GenerationError(
            f"unknown scheduler {name!r}; use one of {', '.join(sorted(SCHEDULER_ALIASES))} "
            "or a diffusers scheduler class name (e.g. EulerDiscreteScheduler)"
        )
    try:
        scheduler: type[Any] = getattr(schedulers, real)
        return scheduler
    except Exception as e:
        raise GenerationError(f"scheduler {real} cannot be loaded: {e}") from None


def set_scheduler(pipe: Any, name: str) -> None:
    cls = resolve_scheduler_class(name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


# -- prompts and outputs ---------------------------------------------------------------------------------


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per line, UTF-8; blank lines are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GenerationError(f"prompts file {p} does not exist") from None
    except UnicodeDecodeError:
        raise GenerationError(f"prompts file {p} is not UTF-8 text") from None
    except OSError as e:
        raise GenerationError(f"cannot read prompts file {p}: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def prepare_prompt(prompt: str, tokenizer: Any | None) -> PreparedPrompt:
    """Cut `prompt` to the tokenizer's context (77 tokens for CLIP), warning, so the metadata records
    exactly the text the model saw."""
    max_len = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if tokenizer is None or not max_len or max_len > 100_000:  # transformers' "no limit" sentinel is ~1e30
        return PreparedPrompt(prompt, prompt, False, None)
    enc = tokenizer(prompt, add_special_tokens=False, truncation=False, return_offsets_mapping=True, verbose=False)
    n_special = tokenizer.num_special_tokens_to_add()
    n_tokens = len(enc["input_ids"]) + n_special
    if n_tokens <= max_len:
        return PreparedPrompt(prompt, prompt, False, n_tokens)
    keep = max_len - n_special
    cut = enc["offset_mapping"][keep - 1][1]  # end of the last kept token, in characters of the original
    text = prompt[:cut].rstrip()
    logger.warning(
        "prompt of %d tokens truncated to the model's %d: %r... (dropped: %r)",
        n_tokens, max_len, text[:60], prompt[cut:][:60],
    )  # fmt: skip
    return PreparedPrompt(text, prompt, True, n_tokens)


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create `out_dir` if needed and prove it writable, or raise GenerationError (before any generation)."""
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise GenerationError(f"output folder {out} exists and is not a folder") from None
    except OSError as e:
        raise GenerationError(f"cannot create output folder {out}: {e.strerror or e}") from None
    if not out.is_dir():
        raise GenerationError(f"output folder {out} exists and is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise GenerationError(f"output folder {out} is not writable: {e.strerror or e}") from None
    return out


def _tool_version() -> str:
    try:
        from provenance import __version__

        return __version__
    except ImportError:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("provenance")
        except PackageNotFoundError:
            return "0+unknown"


def _atomic_write(path: Path, data: bytes) -> None:
    # temp file in the same folder + os.replace: a reader (or an interrupted run) sees the old file
    # or the new one, never half of one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"iTXt", b"zTXt")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(key: str, value: str) -> bytes:
    value = value.replace("\0", "")  # PNG text may not hold NUL bytes
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: UTF-8, no compression, no language tag, no translated keyword
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def png_with_text(png: bytes, text: dict[str, str]) -> bytes:
    """`png` with its text chunks replaced by `text` (pixels untouched), inserted right after IHDR."""
    if not png.startswith(_PNG_SIGNATURE):
        raise ValueError("not a PNG")
    chunks = []
    pos = len(_PNG_SIGNATURE)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        end = pos + 12 + length
        if kind not in _PNG_TEXT_CHUNKS:
            chunks.append(png[pos:end])
        if kind == b"IHDR":
            chunks.extend(_text_chunk(k, v) for k, v in text.items())
        pos = end
    return _PNG_SIGNATURE + b"".join(chunks)


def png_text_fields(meta: dict[str, Any]) -> dict[str, str]:
    """The PNG text chunks for one image: readable single fields plus `provenance`, the whole JSON."""
    size = f"{meta['width']}x{meta['height']}"
    fields = {
        "Software": f"provenance {meta['tool_version']}",
        "prompt": meta["prompt"],
        "negative_prompt": meta["negative_prompt"] or "",
        "seed": str(meta["seed"]),
        "model": meta["model"],
        "model_revision": meta["model_revision"] or "",
        "weights_sha256": meta["weights_sha256"] or "",
        "scheduler": meta["scheduler"],
        "steps": str(meta["steps"]),
        "guidance_scale": str(meta["guidance_scale"]),
        "size": size,
        "created": meta["created"],
        "tool_version": meta["tool_version"],
        "run_id": str(meta["run_id"]),
        "provenance": json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }
    return {k: v for k, v in fields.items() if v != ""}


def _write_image_files(png_path: Path, sidecar: Path, png: bytes, meta: dict[str, Any]) -> None:
    # PNG first: it carries the same metadata, so an interruption between the two loses nothing
    _atomic_write(png_path, png_with_text(png, png_text_fields(meta)))
    _atomic_write(sidecar, json.dumps(meta, ensure_ascii=False, indent=2, sort_keys=True).encode("utf-8"))


def _rewrite_metadata(image: GeneratedImage) -> None:
    """Rewrite an already written image's text chunks and sidecar from `image.metadata`."""
    _write_image_files(image.path, image.sidecar, image.path.read_bytes(), image.metadata)


def _load_watermarker() -> Callable[[Image.Image, int], Image.Image]:
    try:
        from provenance.watermarks.invisible import embed_provenance_mark
    except ImportError as e:
        raise GenerationError(
            f"the invisible provenance mark is unavailable ({e}); run with --no-watermark to skip it"
        ) from None
    return embed_provenance_mark


def _default_embedder() -> Embedder | None:
    try:
        from provenance.models import load_descriptor

        descriptor = load_descriptor("sscd")
    except (ImportError, ProvenanceError) as e:
        logger.warning("SSCD unavailable (%s): pairwise_sscd will not be computed", e)
        return None
    embed: Embedder = descriptor.embed
    return embed


# -- generation ------------------------------------------------------------------------------------------


def _cpu_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    import torch

    # CPU generators: the initial noise is the same on CUDA, MPS and CPU for the same seed
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def _separate_noise_norms(
    lp: LoadedPipeline, probe: NoiseNormProbe, prompts: list[str], seeds: list[int], config: GenerationConfig,
    size: dict[str, int | None],
) -> np.ndarray | None:  # fmt: skip
    """Noise norms from a short extra run with an empty negative prompt and guidance on, stopped after
    `noise_norm_steps` steps: for runs whose own CFG batch is absent (guidance <= 1) or conditioned on a
    negative prompt instead of the empty one."""
    pipe = lp.pipe
    can_stop = hasattr(type(pipe), "interrupt")

    def stop(p: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if can_stop and i + 1 >= config.noise_norm_steps:
            p._interrupt = True  # diffusers' loop skips the remaining steps
        return {}

    probe.start(len(prompts))
    pipe(
        prompt=prompts,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance if config.guidance > 1 else FALLBACK_GUIDANCE,
        generator=_cpu_generators(seeds),
        output_type="latent",
        callback_on_step_end=stop,
        **size,
    )
    return probe.norms()


def _base_metadata(
    config: GenerationConfig, lp: LoadedPipeline, run_id: int, scheduler: str, tool_version: str
) -> dict[str, Any]:
    info = lp.model_info
    meta = {
        "schema": METADATA_SCHEMA,
        "tool": "provenance",
        "tool_version": tool_version,
        "run_id": run_id,
        "run_id_hex": f"{run_id:08x}",
        "model": info["model"],
        "model_revision": info.get("model_revision"),
        "weights_sha256": info.get("weights_sha256"),
        "pipeline": info.get("pipeline"),
        "scheduler": scheduler,
        "steps": config.steps,
        "guidance_scale": config.guidance,
        "num_images": config.num_images,
        "device": lp.device,
        "dtype": str(lp.dtype).removeprefix("torch."),
        # replaced per image by {"scheme", "run_id", "embedded": bool, "reason"?}; None with --no-watermark
        "watermark": None,
    }
    if info.get("model_note"):
        meta["model_note"] = info["model_note"]
    return meta


def generate(  # noqa: C901 - one run read as numbered steps, as a diffusers __call__ is
    config: GenerationConfig,
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    pipeline: LoadedPipeline | None = None,
    embedder: Embedder | None = None,
    on_image: Callable[[GeneratedImage, int, int], None] | None = None,
) -> list[GeneratedImage]:
    """Generate `config.num_images` images per prompt into `out_dir`, each with its provenance.

    `pipeline`: an already loaded pipeline (else `load_pipeline(config.model, config.device)`).
    `embedder`: images -> (n, 512) L2-normalised SSCD rows for `pairwise_sscd` (default: SSCD, loaded
    when num_images >= 4). `on_image(image, done, total)` is called after each image is written.
    A KeyboardInterrupt propagates; every image written before it is complete on disk.
    """
    import torch

    # 1. Check inputs, before loading anything
    config.check()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise GenerationError("no prompts given (blank prompts are skipped)")
    out = check_output_dir(out_dir)
    watermark = _load_watermarker() if config.watermark else None

    # 2. Load the pipeline and settle the run's parameters
    lp = pipeline or load_pipeline(config.model, config.device)
    pipe = lp.pipe
    own_scheduler = pipe.scheduler  # put back afterwards: a caller's pipeline keeps its own scheduler
    if config.scheduler:
        set_scheduler(pipe, config.scheduler)
    scheduler_name = type(pipe.scheduler).__name__
    prepared = [prepare_prompt(p, lp.tokenizer) for p in prompts]
    run_id = secrets.randbits(32)
    seed = config.seed if config.seed is not None else secrets.randbits(31)
    batch_size = config.batch_size or (4 if lp.device.startswith("cuda") or lp.tiny_random else 1)
    size = {"height": config.height, "width": config.width} if config.height else {}
    jobs = [(p, j) for p in range(len(prepared)) for j in range(config.num_images)]
    total = len(jobs)
    base = _base_metadata(config, lp, run_id, scheduler_name, _tool_version())
    logger.info(
        "run %08x: %d prompt(s) x %d image(s) with %s on %s (%s), seed %d, batch %d",
        run_id, len(prepared), config.num_images, lp.model, lp.device, base["dtype"], seed, batch_size,
    )  # fmt: skip

    # Memorization: the CFG batch of the run gives eps(x_t, prompt) and eps(x_t, "") for free, unless
    # guidance is off or the negative branch holds a negative prompt; then a short separate pass.
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    probe = NoiseNormProbe(denoiser, config.noise_norm_steps) if config.memorization and denoiser else None
    separate_pass = config.guidance <= 1 or bool(config.negative_prompt)
    signals = [MemorizationSignals() for _ in prepared] if config.memorization else None
    image_norms: dict[int, list[float]] = {p: [] for p in range(len(prepared))}
    pending_images: dict[int, list[Image.Image]] = {p: [] for p in range(len(prepared))}
    by_prompt: dict[int, list[GeneratedImage]] = {p: [] for p in range(len(prepared))}
    if embedder is None and config.memorization and config.num_images >= MIN_IMAGES_FOR_PAIRWISE:
        embedder = _default_embedder()
    results: list[GeneratedImage] = []
    unmarked = 0

    # 3. Run the batches, writing each image as soon as it exists
    try:
        for start in range(0, total, batch_size):
            batch = jobs[start : start + batch_size]
            texts = [prepared[p].text for p, _ in batch]
            seeds = [seed + j for _, j in batch]
            norms, steps_measured = None, 0
            if probe is not None and separate_pass:
                norms = _separate_noise_norms(lp, probe, texts, seeds, config, size)
                steps_measured = probe.steps_captured
                probe.start(0)  # the run's own CFG batch holds the negative prompt: not ours to read
            elif probe is not None:
                probe.start(len(batch))
            t0 = time.perf_counter()
            with torch.inference_mode():
                output = pipe(
                    prompt=texts,
                    negative_prompt=[config.negative_prompt] * len(batch) if config.negative_prompt else None,
                    num_inference_steps=config.steps,
                    guidance_scale=config.guidance,
                    generator=_cpu_generators(seeds),
                    **size,
                )
            seconds = (time.perf_counter() - t0) / len(batch)
            if probe is not None and not separate_pass:
                norms, steps_measured = probe.norms(), probe.steps_captured
                probe.start(0)  # stop capturing until the next batch
            nsfw = getattr(output, "nsfw_content_detected", None)
            for k, ((p, j), image) in enumerate(zip(batch, output.images, strict=False)):
                meta = dict(base)
                if watermark is not None:
                    image, meta["watermark"] = _mark(watermark, image, run_id)
                    if not meta["watermark"]["embedded"] and not unmarked:
                        logger.warning("images left without the invisible mark: %s", meta["watermark"]["reason"])
                    unmarked += not meta["watermark"]["embedded"]
                pp = prepared[p]
                meta.update(
                    prompt=pp.text,
                    negative_prompt=config.negative_prompt,
                    seed=seed + j,
                    prompt_index=p,
                    image_index=j,
                    width=image.width,
                    height=image.height,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    generation_seconds=round(seconds, 4),
                )
                if pp.truncated:
                    meta.update(prompt_truncated=True, prompt_original=pp.original, prompt_tokens=pp.tokens)
                if nsfw is not None:
                    meta["nsfw_filtered"] = bool(nsfw[k])
                if signals is not None:
                    if norms is not None:
                        image_norms[p].append(float(norms[k]))
                    # the image's own value until its prompt is complete; see _finish_prompt
                    meta["memorization"] = MemorizationSignals(
                        noise_norm=round(float(norms[k]), 6) if norms is not None else None,
                        noise_norm_steps=steps_measured if norms is not None else 0,
                    ).to_dict()
                stem = f"{run_id:08x}-p{p:04d}-{j:03d}-s{seed + j}"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                png_path, sidecar = out / f"{stem}.png", out / f"{stem}.json"
                _write_image_files(png_path, sidecar, buf.getvalue(), meta)
                result = GeneratedImage(
                    path=png_path, sidecar=sidecar, prompt=pp.text, negative_prompt=config.negative_prompt,
                    seed=seed + j, prompt_index=p, image_index=j, run_id=run_id, width=image.width,
                    height=image.height, memorization=signals[p] if signals is not None else None, metadata=meta,
                )  # fmt: skip
                results.append(result)
                by_prompt[p].append(result)
                if signals is not None and not (nsfw is not None and nsfw[k]):
                    # a safety-checker black image is not an output of the model: keep it out of pairwise
                    pending_images[p].append(image)
                if on_image is not None:
                    on_image(result, len(results), total)
                if signals is not None and len(by_prompt[p]) == config.num_images:
                    _finish_prompt(signals[p], image_norms[p], pending_images.pop(p), by_prompt[p], embedder,
                                   steps_measured)  # fmt: skip
    finally:
        if probe is not None:
            probe.close()
        pipe.scheduler = own_scheduler

    # 4. Run-level memorization flags (robust z-score across prompts), rewritten where they changed
    if signals is not None:
        flag_prompts(signals)
        for image in results:
            new = image.memorization.to_dict()  # type: ignore[union-attr]
            if new != image.metadata.get("memorization"):
                image.metadata["memorization"] = new
                _rewrite_metadata(image)
        flagged = [i for i, s in enumerate(signals) if s.flag]
        for i in flagged:
            logger.warning("possible memorization, prompt %d %r: %s", i, prepared[i].text[:80], signals[i].flag_reason)
    return results


def _mark(
    watermark: Callable[[Image.Image, int], Image.Image], image: Image.Image, run_id: int
) -> tuple[Image.Image, dict[str, Any]]:
    """The marked image and what the metadata says about the mark; images too small for it stay unmarked."""
    record: dict[str, Any] = {"scheme": "provenance", "run_id": run_id, "embedded": True}
    try:
        return watermark(image, run_id), record
    except ValueError as e:  # the mark needs >= 256x256 pixels (invisible-watermark's own limit)
        return image, {**record, "embedded": False, "reason": str(e)}


def _finish_prompt(
    signals: MemorizationSignals,
    norms: list[float],
    images: list[Image.Image],
    written: list[GeneratedImage],
    embedder: Embedder | None,
    steps_measured: int,
) -> None:
    """Per-prompt signals once all its images exist: mean noise norm and pairwise SSCD; rewrite its files."""
    if norms:
        signals.noise_norm = round(float(np.mean(norms)), 6)
        signals.noise_norm_steps = steps_measured
    if embedder is not None:
        try:
            signals.pairwise_sscd = prompt_pairwise_sscd(images, embedder)
        except Exception as e:
            logger.warning("pairwise SSCD failed: %s", e)
    for image in written:
        image.metadata["memorization"] = signals.to_dict()
        _rewrite_metadata(image)


# -- scanning the outputs --------------------------------------------------------------------------------


def open_scanner(index_dir: str | os.PathLike[str], options: Any | None = None) -> Any:
    """`provenance.scan.Scanner.open(index_dir, options)`, opened before generating so a bad index fails first."""
    from provenance.scan import Scanner

    return Scanner.open(index_dir, options)


def scan_outputs(scanner: Any, images: Sequence[GeneratedImage], out_dir: str | os.PathLike[str]) -> list[ScanRecord]:
    """Scan the generated images against the scanner's index; write scan.html and scan.jsonl in `out_dir`.

    Each record's `extra` carries the image's generation facts and memorization signals.
    """
    from provenance.report import write_report

    out = Path(out_dir)
    records: list[ScanRecord] = scanner.scan_paths([im.path for im in images])
    by_path: dict[str, GeneratedImage] = {}
    for generated in images:
        by_path[str(generated.path)] = generated
        by_path[str(generated.path.resolve())] = generated
    for record in records:
        im = by_path.get(record.path) or by_path.get(str(Path(record.path).resolve()))
        if im is None:
            continue
        record.extra["generation"] = {
            "prompt": im.prompt,
            "seed": im.seed,
            "run_id": im.run_id,
            "model": im.metadata.get("model"),
        }
        if im.memorization is not None:
            record.extra["memorization"] = im.memorization.to_dict()
    write_report(records, "html", out / "scan.html", thumbnails=scanner.index.thumbnail)
    write_report(records, "jsonl", out / "scan.jsonl")
    return records


def captions_as_prompts(index_dir: str | os.PathLike[str], n: int, seed: int = 0) -> list[str]:
    """`n` captions sampled from an indexed corpus, to use as prompts (memorization probing)."""
    from provenance.store import ProvenanceIndex

    if n < 1:
        raise GenerationError(f"--n must be >= 1, got {n}")
    captions = ProvenanceIndex.open(index_dir).sample_captions(n, seed)
    if not captions:
        raise GenerationError(f"the index at {index_dir} holds no captions to use as prompts")
    if len(captions) < n:
        logger.warning("the index holds only %d captions; using all of them", len(captions))
    return captions


def read_png_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `provenance` JSON chunk of a PNG this module wrote, or None."""
    with Image.open(path) as im:
        text = getattr(im, "text", {}) or {}
    raw = text.get("provenance")
    return json.loads(raw) if raw else None


__all__ = [
    "TINY_RANDOM",
    "GeneratedImage",
    "GenerationConfig",
    "LoadedPipeline",
    "PreparedPrompt",
    "build_tiny_random_pipeline",
    "captions_as_prompts",
    "check_output_dir",
    "clip_tokenizer",
    "generate",
    "load_pipeline",
    "open_scanner",
    "prepare_prompt",
    "read_png_provenance",
    "read_prompts_file",
    "resolve_device",
    "resolve_scheduler_class",
    "save_tiny_random_pipeline",
    "scan_outputs",
]
