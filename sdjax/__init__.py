"""sdjax: Stable Diffusion in JAX / Flax NNX.

The public entry points load lazily, so `import sdjax` stays cheap:
    sdjax.load_pretrained(path, dtype=...)      diffusers folder or CompVis single file -> StableDiffusion
    sdjax.save_pretrained(pipe, folder)         -> diffusers folder
    sdjax.save_single_file(pipe, path)          -> CompVis .safetensors
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_pretrained": "sdjax.pretrained",
    "save_pretrained": "sdjax.pretrained",
    "save_single_file": "sdjax.pretrained",
    "StableDiffusion": "sdjax.pipeline",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
