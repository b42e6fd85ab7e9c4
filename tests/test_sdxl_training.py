"""train.py on SDXL: configs/finetune_sdxl.py on a tiny SDXL diffusers folder and a folder of captioned images of
several sizes: each image's size ids come from its real size and crop; LoRA resumed after a kill gives the
uninterrupted run's losses and train state; the cache of latents and encodings trains as the images do; the refiner
fine-tuned whole (UNet and its text encoder) in bfloat16 with remat resumes so too; the full-size base UNet's train
state on 1 and 8 devices by train.py's FSDP rule."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sdjax
from sdjax.clip import sdxl_conditioning
from sdjax.weights import diffusers_folder as df
from sdjax.weights.safetensors_io import read_safetensors

from tests import tiny_models
from tests.test_train_script import cache_dir, checkpoint_state, losses, train_module, write_png  # noqa: F401

pytestmark = pytest.mark.xdist_group("sdxl_training")

SIZES = {"a_wide": (32, 48), "b_tall": (56, 32), "c_square": (40, 40), "d_small": (44, 36)}  # (height, width)


@pytest.fixture(scope="module")
def data_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-train")
    data = root / "images"
    data.mkdir()
    for k, (name, size) in enumerate(SIZES.items()):
        write_png(data / f"{name}.png", (60 * k, 255 - 50 * k, 90), size=size)
        (data / f"{name}.txt").write_text(f"a {name[2:]} picture\n")
    model = root / "tiny-sdxl"
    # two text-encoder layers (SDXL reads the penultimate): a smaller step to compile
    tiny_models.tiny_sdxl_pipeline(root, text_layers=2).save_pretrained(str(model), safe_serialization=True)
    return data, model


def sdxl_config(workdir, data, model, **overrides):
    """configs/finetune_sdxl.py (FSDP over every device) at 32 px, 2 images a step, in float32 without remat (a third
    less compile time; bf16 and remat train the same code: tests/test_train_script.py)."""
    from tests.test_training import load_config

    return load_config("finetune_sdxl", **{"workdir": str(workdir), "data.path": str(data),
                                           "model.init_from": str(model), "data.resolution": 32, "batch_size": 2,
                                           "num_steps": 2, "log_every": 1, "progress_bar": False,
                                           "checkpoint.every": 1, "ema.decay": 0.9, "export.formats": (),
                                           "optimizer.learning_rate": 1e-3, "model.dtype": "float32",
                                           "model.remat": False, **overrides})


def record_time_ids(monkeypatch, train_module) -> list:
    """Every host batch's size ids as train.py computes them: [(captions, aesthetic_score, ids)]."""
    seen = []
    time_ids = train_module.training.sdxl_time_ids

    def spy(host, resolution, aesthetic_score):
        seen.append((list(host["captions"]), aesthetic_score, time_ids(host, resolution, aesthetic_score)))
        return seen[-1][2]
    monkeypatch.setattr(train_module.training, "sdxl_time_ids", spy)
    return seen


def assert_resumes_after_losing_step_2(train_module, config):
    """As if killed before step 2 was saved: its checkpoint is removed and train.py runs `config` again; it resumes
    from step 1 and gives step 2's loss and whole train state (parameters, AdamW moments, EMA) bit for bit."""
    run = Path(config.workdir)
    expected, expected_losses = checkpoint_state(run, 2), losses(run)
    shutil.rmtree(run / "checkpoints" / "2")
    resumed = train_module.main(config)
    assert resumed["step"] == 2 and losses(run) == expected_losses
    state = checkpoint_state(run, 2)
    assert state.keys() == expected.keys()
    for key in state:
        np.testing.assert_array_equal(state[key], expected[key], err_msg=key)


def module_weights(folder, module: str) -> dict:
    """A diffusers folder's module weights (text_encoder_2 is named as text_encoder)."""
    return df.read_weights(Path(folder) / module, df.WEIGHT_NAMES[module.removesuffix("_2")])


def test_lora_resumes_exactly_after_a_kill(tmp_path, monkeypatch, train_module, data_and_model):
    """LoRA on the UNet and both text encoders (train_text_encoder; each caption encoded by both, with its size ids),
    two steps with a checkpoint after each; then, as if killed before the second was saved, the checkpoint of step 2
    is removed and train.py runs again: it resumes from step 1 and gives step 2's loss and train state (the adapters
    and their AdamW moments) bit for bit. The exported files (diffusers' and kohya's: lora_te1_ / lora_te2_ /
    lora_unet_) change both encoders' part of the context when loaded on the base. (LoRA with the encoders frozen:
    test_cached_latents_train_as_the_images_do; whole-model training: the refiner's test.)"""
    data, model = data_and_model
    extra = {"lora.rank": 2, "ema.decay": 0.0, "train_text_encoder": True}
    seen = record_time_ids(monkeypatch, train_module)
    run = tmp_path / "run"
    config = sdxl_config(run, data, model, **extra)
    whole = train_module.main(config)
    assert whole["step"] == 2 and np.isfinite(whole["loss"])
    assert seen and all(score is None for _, score, _ in seen)  # the base: 6 size ids
    for captions, _, ids in seen:  # original (height, width), crop corner in the resized image, target 32 x 32
        for caption, row in zip(captions, ids):
            height, width = next(size for name, size in SIZES.items() if name[2:] in caption)
            scale = 32 / min(width, height)
            resized = (max(32, round(height * scale)), max(32, round(width * scale)))
            assert tuple(row[:2]) == (height, width) and tuple(row[4:]) == (32, 32)
            top, left = row[2:4]  # left: the resized width minus left after a flip, as diffusers
            assert 0 <= top <= resized[0] - 32 and 0 <= left <= resized[1]
    assert any(row[2] + row[3] > 0 for _, _, ids in seen for row in ids)  # a random crop off the corner

    state = checkpoint_state(run, 2)
    assert {k.split("'")[3] for k in state if k.startswith("['params']")} == {"unet", "text_encoder", "text_encoder_2"}
    assert len(losses(run)) == 2
    pipe = sdjax.load_pretrained(model)

    def context():
        encoders, tokenizers = (pipe.text_encoder, pipe.text_encoder_2), (pipe.tokenizer, pipe.tokenizer_2)
        return np.asarray(sdxl_conditioning(encoders, [t(["a wide picture"]) for t in tokenizers])[0])
    base = context()
    for file, prefixes in (("pytorch_lora_weights", ("unet.", "text_encoder.", "text_encoder_2.")),
                           (run.name, ("lora_unet_", "lora_te1_", "lora_te2_"))):
        keys = read_safetensors(run / "lora" / f"{file}.safetensors").keys()
        assert all(any(k.startswith(p) for k in keys) for p in prefixes), file
        name = pipe.load_lora(run / "lora" / f"{file}.safetensors")
        moved = np.abs(context() - base).max(axis=(0, 1))
        pipe.set_lora_scale(name, 0.0)
        width = pipe.text_encoder.config.hidden_size  # ViT-L's part of the context, then bigG's
        assert moved[:width].max() > 0 and moved[width:].max() > 0, file
    assert_resumes_after_losing_step_2(train_module, config)


def test_cached_latents_train_as_the_images_do(tmp_path, train_module, data_and_model):
    """data.cache_latents=True on SDXL: the latents, both encoders' context, the pooled embedding and each image's size
    ids (of the center crop) are computed once; with caption dropout 0.5 (a dropped caption takes the empty caption's
    context and pooled embedding) the two steps' losses are those of the run that encodes in the step (1e-5), and the train state ends
    the same to 1e-3 of each tensor's largest value (measured 2.0e-4, in a LoRA up-projection: it starts at zero and
    AdamW's first steps divide gradients near its eps by their own size, which magnifies float rounding)."""
    data, model = data_and_model
    extra = {"lora.rank": 2, "ema.decay": 0.0, "data.caption_dropout": 0.5, "checkpoint.every": 2,
             "data.center_crop": True, "data.random_flip": False}  # what a cache needs: the same crop every epoch
    train_module.main(sdxl_config(tmp_path / "images", data, model, **extra))
    train_module.main(sdxl_config(tmp_path / "cached", data, model, **extra, **{"data.cache_latents": True}))
    ref, got = losses(tmp_path / "images"), losses(tmp_path / "cached")
    assert sorted(got) == sorted(ref) == [1, 2]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    a, b = checkpoint_state(tmp_path / "cached", 2), checkpoint_state(tmp_path / "images", 2)
    assert a.keys() == b.keys()
    errors = {key: float(np.abs(a[key] - b[key]).max()) / max(float(np.abs(b[key]).max()), 1e-12) for key in a}
    assert max(errors.values()) <= 1e-3, max(errors, key=errors.get)


def test_refiner_trains_whole_in_bfloat16_with_remat(tmp_path, monkeypatch, train_module, data_and_model):
    """configs/finetune_sdxl.py's bfloat16 compute and remat on the refiner, whose UNet takes 5 size ids (the aesthetic
    score, data.aesthetic_score, for the target size), with its text encoder trained too: the loss is finite, both
    trained modules move, the export is a refiner folder, and the run resumed after a kill gives the uninterrupted
    one's losses and train state bit for bit. (Its state over several devices: FSDP's arithmetic on
    the full-size model below; a (data=2, fsdp=2) run over two processes in test_train_script.py.)"""
    data, _ = data_and_model
    refiner = tmp_path / "tiny-refiner"
    tiny_models.tiny_sdxl_pipeline(tmp_path, refiner=True, text_layers=2).save_pretrained(str(refiner),
                                                                                         safe_serialization=True)
    seen = record_time_ids(monkeypatch, train_module)
    run = tmp_path / "run"
    config = sdxl_config(run, data, refiner, **{
        "model.dtype": "bfloat16", "model.remat": True, "train_text_encoder": True, "data.aesthetic_score": 5.5,
        "ema.decay": 0.5, "optimizer.text_encoder_learning_rate": 1e-3})
    train_module.main(config)
    assert seen and all(ids.shape == (2, 5) and (ids[:, 4] == 5.5).all() for _, _, ids in seen)
    loss = losses(run)
    assert sorted(loss) == [1, 2] and all(np.isfinite(v) for v in loss.values())
    start = {module: module_weights(refiner, module) for module in ("unet", "text_encoder_2")}
    state = checkpoint_state(run, 2)
    assert {k.split("'")[3] for k in state if k.startswith("['params']")} == set(start)  # the VAE stays frozen

    config.export.update(formats=("diffusers",), dtype="float32")  # the resumed run exports
    assert_resumes_after_losing_step_2(train_module, config)
    for module, weights in start.items():  # the export (the EMA) of each trained module moved
        exported = module_weights(run / "export", module)
        assert exported.keys() == weights.keys()
        assert any(not np.array_equal(exported[k], weights[k]) for k in exported), module
    pipe = sdjax.load_pretrained(run / "export")
    assert pipe.text_encoder is None and pipe.options["requires_aesthetics_score"]


def test_the_refiners_size_ids_carry_the_aesthetic_score():
    """The refiner's 5 ids: original (height, width), crop (top, left), score; the base's 6 end with the target size."""
    from sdjax import training

    host = {"images": np.zeros((2, 4, 4, 3)), "original_size": np.array([[40, 60], [50, 30]]),
            "crop_top_left": np.array([[0, 3], [2, 0]])}
    np.testing.assert_array_equal(training.sdxl_time_ids(host, 32, aesthetic_score=5.5),
                                  [[40, 60, 0, 3, 5.5], [50, 30, 2, 0, 5.5]])
    np.testing.assert_array_equal(training.sdxl_time_ids(host, 32), [[40, 60, 0, 3, 32, 32], [50, 30, 2, 0, 32, 32]])


def test_full_size_sdxl_train_state_on_one_and_eight_devices():
    """The README's memory figures for fine-tuning the whole SDXL base UNet (configs/finetune_sdxl.py), from train.py's
    own optimizer, train state and FSDP rule on the planned full-size model (nothing allocated, an abstract mesh): the
    parameters, AdamW's two moments and the EMA are 41.08 GB in float32, all of it on one device, and 5.16 GB on each
    of 8 (mesh.fsdp=8): an eighth (5.13 GB) and the arrays too small to split (norms, biases), whole on every device."""
    import functools

    import jax
    from flax import nnx
    from jax.sharding import AbstractMesh

    from sdjax import sharding, training, variants
    from tests.test_training import load_config

    config = load_config("finetune_sdxl")
    modules, _ = variants.get("sdxl").plan(["unet"])
    params = {"unet": nnx.state(modules["unet"], nnx.Param)}
    tx, _ = training.make_optimizer(config.optimizer, num_steps=config.num_steps, trainable=("unet",))
    state = jax.eval_shape(functools.partial(training.init_state, tx=tx, seed=0, ema_decay=config.ema.decay), params)
    sizes = {}
    for fsdp in (1, 8):
        mesh = AbstractMesh((1, fsdp), ("data", "fsdp"))
        shardings = sharding.param_shardings(mesh, state, min_size=config.mesh.fsdp_min_size)
        sizes[fsdp] = sharding.bytes_per_device(state, shardings)
    whole = 4 * 4 * 2_567_463_684  # bytes: parameters, two moments, EMA
    assert sizes[1][0] == sizes[1][1] == sizes[8][1] and abs(sizes[1][1] - whole) < 1e-4 * whole
    assert whole / 8 <= sizes[8][0] <= 1.01 * whole / 8, sizes[8][0] / whole
