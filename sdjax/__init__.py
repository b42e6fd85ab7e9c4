"""sdjax: Stable Diffusion in JAX / Flax NNX.

The public entry points load lazily, so `import sdjax` stays cheap:
    sdjax.load_pretrained(path, dtype=...)      diffusers folder or CompVis single file -> StableDiffusion
    sdjax.save_pretrained(pipe, folder)         -> diffusers folder
    sdjax.save_single_file(pipe, path)          -> CompVis .safetensors
    sdjax.sampling.sample_loop(...)             the jitted denoising loop of any scheduler
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

_SUBMODULES = ("attention", "autoencoder", "clip", "data", "jobs", "pipeline", "pretrained", "sampling",
               "schedulers", "tokenizer", "unet", "variants", "weights")

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:  # `sdjax.sampling.sample_loop` works after a plain `import sdjax`
        return importlib.import_module(f"sdjax.{name}")
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
