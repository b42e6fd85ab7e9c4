"""The offline demo (README's first command), shrunken: stage 1 (VAE), stage 2 (text encoder + UNet from scratch
on the frozen VAE), the pink LoRA on top (configs/lora_shapes.py) and its two exported files in diffusers, sample.py
and the evaluator's command line with that LoRA. It is also the test of the two-stage
from-scratch recipe (configs/train_autoencoder.py + train_scratch.py run the same code on other sizes). The full-size
run's accuracy is a benchmark (README), not a test.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import sdjax
from sdjax import variants
from sdjax.data.shapes import parse_caption
from sdjax.weights import diffusers_folder
from sdjax.weights.safetensors_io import read_safetensors
from tests.test_train_script import ROOT, cache_dir, losses, run_env, train  # noqa: F401 (fixture)

# 32 px; stage 2 caches the latents of 192 shapes (its 24 steps of 8), not the config's 10,000
SMALL = ["--config.data.shapes_size=32", "--config.data.resolution=32", "--config.checkpoint.every=0",
         "--config.data.shapes_length=192"]


def test_shrunken_demo_learns_samples_and_evaluates(tmp_path, cache_dir):  # noqa: F811
    env = run_env(cache_dir)
    train(tmp_path / "vae", *SMALL, "--config.num_steps=3", "--config.batch_size=4", "--config.export.formats=('vae',)",
          config="shapes_vae", env=env)
    train(tmp_path / "ldm", *SMALL, f"--config.model.init_from={tmp_path / 'vae'}", "--config.num_steps=24",
          "--config.batch_size=8", "--config.preview_every=24", "--config.preview.num_inference_steps=2",
          "--config.optimizer.warmup_steps=5", "--config.export.formats=('diffusers',)", config="shapes", env=env)
    vae_config = diffusers_folder.read_json(tmp_path / "vae" / "export" / "vae" / "config.json")
    assert vae_config["_class_name"] == "AutoencoderKL"
    assert vae_config["scaling_factor"] != variants.get("shapes").vae.scaling_factor  # measured by the export
    loss = losses(tmp_path / "ldm")
    assert sorted(loss) == list(range(1, 25))
    # the mean loss of the last 10 steps against the first 10 (measured: 0.71; 0.68 after 40 steps)
    first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(15, 25)])
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "ldm" / "previews" / "step_0000024.png").exists()
    assert list((tmp_path / "ldm" / "tensorboard").iterdir())
    export = tmp_path / "ldm" / "export"
    pipe = sdjax.load_pretrained(export)
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_config["scaling_factor"])
    trained_vae = read_safetensors(tmp_path / "vae" / "export" / "vae" / "diffusion_pytorch_model.safetensors")
    exported_vae = read_safetensors(export / "vae" / "diffusion_pytorch_model.safetensors")
    assert trained_vae.keys() == exported_vae.keys()
    for key in trained_vae:  # the VAE stays frozen in stage 2
        np.testing.assert_array_equal(exported_vae[key], trained_vae[key])

    # the README's LoRA demo: rank-8 adapters on the exported model, half the images pink
    train(tmp_path / "lora", *SMALL, f"--config.model.init_from={export}", "--config.num_steps=2",
          "--config.batch_size=8", "--config.preview_every=0", "--config.optimizer.warmup_steps=1",
          config="lora_shapes", env=env)
    adapter = tmp_path / "lora" / "lora" / "pink.safetensors"
    assert adapter.exists() and (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").exists()
    trained_adapter_loads_in_diffusers(export, tmp_path / "lora" / "lora")

    samples = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "shapes_sample.py"),
         f"--config.checkpoint={export}", f"--config.lora={adapter}:0.9", "--config.steps=2", "--config.height=32",
         "--config.width=32",
         f"--config.output_dir={samples}", f"--config.prompts_file={ROOT / 'configs' / 'shapes_prompts.txt'}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(samples.glob("0*.png"))) == 12 and (samples / "grid.png").exists()
    assert "<lora:pink:0.9>" in Image.open(next(samples.glob("0*.png"))).text["parameters"]

    out = tmp_path / "lora" / "eval"  # the LoRA run's, by default
    result = subprocess.run(
        [sys.executable, "-m", "sdjax.eval.shapes", "--checkpoint", str(export), "--num_images=4", "--steps=2",
         "--size=32", "--batch_size=12", "--colors=pink,pink", f"--lora={adapter}:0.9"],  # pink once
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)  # sample.py's program: read from the cache
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| seen combinations | 4 |" in result.stdout and "| held-out combinations | 4 |" in result.stdout
    assert result.stdout.count("| pink (every shape) | 4 |") == 1
    report = json.loads((out / "results.json").read_text())
    assert all(parse_caption(image["caption"]).color == "pink" for image in report["pink"]["images"])
    for split in ("train", "heldout", "pink"):
        assert report[split]["n"] == 4 and len(report[split]["images"]) == 4
        assert all(0.0 <= report[split][k] <= 1.0 for k in ("color", "shape", "position", "all"))
    assert (out / "grid_train.png").exists() and (out / "table.md").read_text().startswith("| prompts |")


def trained_adapter_loads_in_diffusers(export, folder):
    """The adapter train.py trained, in both files it exported (kohya's pink.safetensors, diffusers'
    pytorch_lora_weights.safetensors), loaded by diffusers' load_lora_weights: its UNet gives sdjax's output with
    the adapter to 1e-4 (measured 4e-7), and the change the adapter makes to 1e-2 (it moves the output 3e-3)."""
    import diffusers
    import torch
    from flax import nnx

    pipe = sdjax.load_pretrained(export)
    pipe.load_lora(folder / "pink.safetensors")
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, pipe.unet.config.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 8, pipe.text_encoder.config.hidden_size)).astype(np.float32)
    ours = np.asarray(nnx.jit(lambda unet, x, c: unet(x, 500, c))(pipe.unet, latents, context), np.float64)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None,
                                                                  requires_safety_checker=False)

    def theirs():
        with torch.no_grad():
            out = reference.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), 500, torch.from_numpy(context))
        return out.sample.numpy().transpose(0, 2, 3, 1).astype(np.float64)

    base = theirs()
    for name in ("pink", "pytorch_lora_weights"):
        reference.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
        got = theirs()
        reference.unload_lora_weights()
        assert np.abs(got - base).max() > 1e-3 * np.abs(base).max(), name  # the adapter was applied
        assert np.abs(ours - got).max() <= 1e-4 * np.abs(got).max(), name
        assert np.abs((ours - base) - (got - base)).max() <= 1e-2 * np.abs(got - base).max(), name


def test_evaluator_rejects_a_missing_checkpoint_and_an_unknown_colour(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sdjax.eval.shapes", "--checkpoint", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--checkpoint=" in result.stderr and "nope" in result.stderr
    result = subprocess.run([sys.executable, "-m", "sdjax.eval.shapes", "--checkpoint", str(tmp_path),
                             "--colors=pink,mauve"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown colour 'mauve'" in result.stderr
