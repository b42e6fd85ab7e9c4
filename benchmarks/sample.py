"""Sampling speed of a config: compile time, per-step time and images/s, measured on sdjax.pipeline itself.

    python benchmarks/sample.py --config configs/sample.py --config.variant=tiny --config.height=64 \
        --config.width=64 --config.batch_size=4                                          # CPU, seconds
    python benchmarks/sample.py --config configs/sample.py --config.variant=sd15 --config.dtype=bfloat16 \
        --config.batch_size=8 --config.steps=50                                          # SD 1.5, 512 px, a GPU
    python benchmarks/sample.py --config configs/sample.py --config.variant=sdxl --config.dtype=bfloat16 \
        --config.batch_size=4 --config.steps=30                                          # SDXL, 1024 px, a GPU

Random weights of `--config.variant` (or `--config.checkpoint`). `load_s` is the time `sdjax.load_pretrained` takes
to load the checkpoint, or, for a variant, a diffusers folder of its random weights written to a temporary directory
first (so the files are in the page cache); parameters ready on the device. The first call compiles and runs; each
timed call runs the whole program (text encoding, `steps` UNet steps with classifier-free guidance, VAE
decode). The per-step time is the slope between a run of `steps` and a run of `steps // 2` steps, so it
excludes text encoding and decoding. Prints a table; `--output` also writes JSON.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs/sample.py"), "sampling config file")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls per step count")
_OUTPUT = flags.DEFINE_string("output", "", "also write the result as JSON here")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _load(config):
    """(the pipeline, seconds `load_pretrained` took): on the checkpoint, or on the variant saved as a folder."""
    import tempfile

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdjax import jobs, pretrained

    def timed(load):
        start = time.perf_counter()
        pipe = load()
        jax.block_until_ready(nnx.state((pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae)))
        return pipe, time.perf_counter() - start

    if config.checkpoint:
        return timed(lambda: jobs.load_model(config))
    with tempfile.TemporaryDirectory(prefix="sdjax-bench-") as folder:
        pretrained.save_pretrained(jobs.load_model(config), folder)
        return timed(lambda: pretrained.load_pretrained(folder, dtype=getattr(jnp, config.dtype),
                                                        attention_impl=config.attention))


def main(argv):
    del argv
    import jax

    from sdjax import jobs, pipeline

    config = _CONFIG.value
    if not config.checkpoint and not config.variant:
        config.variant = "tiny"
    pipe, load_s = _load(config)
    mesh = jobs._make_mesh(config)
    batch = -(-config.batch_size // mesh.size) * mesh.size
    size = (config.height or pipe.default_size, config.width or pipe.default_size)
    prompts = [f"a photo of object number {k}" for k in range(batch)]

    def run(steps):
        return lambda: pipeline.generate(pipe, prompts, num_inference_steps=steps, guidance_scale=config.guidance_scale,
                                         sampler=config.sampler or None, height=size[0], width=size[1], mesh=mesh)

    full, half = config.steps, max(config.steps // 2, 1)
    compile_s = _timed(run(full))
    _timed(run(half))  # compiles the shorter program
    t_full = statistics.median(_timed(run(full)) for _ in range(_REPEATS.value))
    t_half = statistics.median(_timed(run(half)) for _ in range(_REPEATS.value))
    step_s = (t_full - t_half) / (full - half) if full > half else t_full
    result = {
        "model": config.checkpoint or config.variant, "device": jax.devices()[0].device_kind,
        "devices": mesh.size, "dtype": config.dtype, "size": f"{size[1]}x{size[0]}", "batch": batch,
        "steps": full, "sampler": config.sampler or pipe.scheduler_config.get("_class_name"),
        "load_s": round(load_s, 3), "first_call_s": round(compile_s, 3), "compile_s": round(compile_s - t_full, 3),
        "call_s": round(t_full, 4), "step_ms": round(1000 * step_s, 3), "images_per_s": round(batch / t_full, 3),
    }
    width = max(map(len, result))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
