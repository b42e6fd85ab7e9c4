"""Training speed and memory of a config: images/s, step time and peak memory, measured on train.py itself.

    python benchmarks/train.py --config configs/tiny.py                                  # CPU, seconds
    python benchmarks/train.py --config configs/tiny.py --lora_rank=4                    # LoRA of the same model
    python benchmarks/train.py --config configs/finetune_sd15.py --config.model.variant=sd15 \
        --config.data.source=shapes --config.batch_size=8 --steps=20                     # SD 1.5, 512 px, one GPU
    python benchmarks/train.py --config configs/finetune_sdxl.py --config.model.variant=sdxl \
        --config.data.source=shapes --config.batch_size=8 --steps=20                     # SDXL, 1024 px, FSDP
    python benchmarks/train.py --config configs/tiny.py --config.model.variant=tiny_sdxl --config.data.resolution=32

Runs `train.main` for warmup + steps optimizer steps with checkpoints, export and previews off, reads
the per-step times train.py logs (the device runs one step ahead of the host, so in steady state the
interval between steps is the device's step time), and reports the median after the warm-up. Peak
memory is the accelerator's `peak_bytes_in_use` (the host's peak RSS on CPU). Data: whatever the
config reads (random weights with `model.variant` when no checkpoint is at hand; synthetic shapes by
default with `--config.data.source=shapes`). `--lora_rank=R` trains rank-R adapters (lora.rank) instead of the
weights; run it once with and once without (one process each: the host's peak RSS only grows) for the comparison.
"""
from __future__ import annotations

import importlib.util
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/*.py import each other as `configs.*`
_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs/tiny.py"), "training config file")
_STEPS = flags.DEFINE_integer("steps", 10, "timed optimizer steps")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation)")
_OUTPUT = flags.DEFINE_string("output", "", "also write the result as JSON here")
_LORA_RANK = flags.DEFINE_integer("lora_rank", -1, "lora.rank: 0 = full fine-tuning, > 0 = LoRA; -1 = the config's")


def _train_module():
    """The repository's train.py (this file is also called train.py, so import it by path)."""
    spec = importlib.util.spec_from_file_location("sdjax_train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_memory() -> tuple[str, float]:
    """("device" | "host", peak GiB)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device", stats["peak_bytes_in_use"] / 2 ** 30
    return "host", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def benchmark(config, *, steps: int, warmup: int, lora_rank: int = -1) -> dict:
    import jax

    train = _train_module()
    with config.unlocked():
        if lora_rank >= 0:
            config.lora.rank = lora_rank
        config.num_steps = warmup + steps
        config.checkpoint.every = 0
        config.export.formats = ()
        config.preview_every = 0
        config.log_every = 1
        config.progress_bar = False
    with tempfile.TemporaryDirectory() as tmp:
        if not config.workdir:
            with config.unlocked():
                config.workdir = tmp
        trained_params = train.main(config)["trained_params"]
        rows = [json.loads(line) for line in (Path(config.workdir) / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if warmup < r["step"] <= warmup + steps]
    step_time = statistics.median(times)
    where, peak = peak_memory()
    images = config.batch_size * config.optimizer.grad_accum_steps
    return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "batch_size": images,
            "resolution": config.data.resolution, "dtype": config.model.dtype, "remat": config.model.remat,
            "lora_rank": config.lora.rank, "trained_params": trained_params,
            "step_time_s": step_time, "images_per_s": images / step_time, "images_per_s_per_device":
            images / step_time / jax.device_count(), f"peak_{where}_memory_gib": peak, "timed_steps": len(times)}


def main(argv):
    del argv
    result = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, lora_rank=_LORA_RANK.value)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
