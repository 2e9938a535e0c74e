"""Optional parts of the install: the heavy libraries behind CLIP, generation, serving and Hugging Face datasets.

The base install runs `index build` (SSCD, PDQ), `search`, `scan` and `demo`; each extra adds one feature. Every
import of an extra's library goes through `require`, so a missing one names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from provenance.errors import MissingExtraError

# the extra (pyproject.toml [project.optional-dependencies]) that installs each top-level module
EXTRA_OF = {
    "open_clip": "clip",
    "diffusers": "generate",
    "transformers": "generate",
    "huggingface_hub": "generate",
    "fastapi": "serve",
    "uvicorn": "serve",
    "pydantic_settings": "serve",
    "datasets": "hf",
    "httpx": "consent",
    "ray": "ray",
    "fsspec": "remote",
    "aiohttp": "remote",
}


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a dotted name is fine) for `feature`, or raise MissingExtraError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRA_OF.get(module.split(".")[0])
        hint = f"pip install 'provenance[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        raise MissingExtraError(
            f"{feature} needs {module.split('.')[0]}, which is not installed ({e}); {hint}"
        ) from None
