"""sdjax: Stable Diffusion in JAX / Flax NNX.

The public entry points load lazily, so `import sdjax` stays cheap:
    sdjax.load_pretrained(path, dtype=...)      diffusers folder or CompVis single file -> StableDiffusion
    sdjax.save_pretrained(pipe, folder)         -> diffusers folder
    sdjax.save_single_file(pipe, path)          -> CompVis .safetensors
    sdjax.load_textual_inversion(pipe, path)    A1111 / diffusers embedding -> a name to use in prompts
    sdjax.load_lora(pipe, path, scale=0.8)      diffusers / kohya LoRA file -> an adapter on the UNet and text encoder
    sdjax.save_lora(pipe, path, format=...)     -> diffusers pytorch_lora_weights.safetensors or a kohya file
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
    "load_textual_inversion": "sdjax.textual_inversion",
    "load_lora": "sdjax.lora",
    "save_lora": "sdjax.lora",
}

_SUBMODULES = ("attention", "autoencoder", "clip", "data", "jobs", "lora", "pipeline", "pretrained", "prompts",
               "sampling", "schedulers", "sdxl", "textual_inversion", "tokenizer", "unet", "variants", "weights")

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:  # `sdjax.sampling.sample_loop` works after a plain `import sdjax`
        return importlib.import_module(f"sdjax.{name}")
    raise AttributeError(f"module 'sdjax' has no attribute {name!r}")
