"""LoRA training (sdjax/lora_training.py and train.py with lora.rank > 0): only the adapters train, the optimizer state
and EMA hold only them, a killed run resumes with the same losses, and the exported files load back with
sdjax.load_lora into a fresh model that gives the trained model's outputs.

train.py runs in this process on a small stand-in "unet" (sdjax.layers convolutions and an attention with diffusers'
to_q / to_k / to_v / to_out.0 names) whose step compiles in about a second; sdjax's UNet and text encoder (one block,
one layer) are adapted, exported and loaded back outside train.py. Modules get numpy random values (`numpy_init`):
building them eagerly compiles a kernel per parameter shape, seconds on 2 cores. diffusers' own load_lora_weights
reading the files is tests/test_lora.py's.
"""
from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import train_base
from sdjax import layers, lora, lora_training, training
from sdjax.weights.torch_names import BASE_PARAMS
from tests.test_train_script import cache_dir, checkpoint_state, checkpoints, losses, tiny_config, train_module  # noqa: F401

pytestmark = pytest.mark.xdist_group("lora_training")

LORA = {"lora.rank": 2, "lora.alpha": 4.0, "lora.dropout": 0.25, "lora.name": "style", "checkpoint.every": 2,
        "ema.decay": 0.9, "optimizer.learning_rate": 1e-2}
ADAPTER_LEAVES = ("['lora']['default']['down']", "['lora']['default']['up']")


class SmallUNet(nnx.Module):
    """A convolution, one self-attention over the pixels (diffusers' layer names), a strided convolution."""

    def __init__(self, rngs):
        self.conv_in = layers.conv(3, 8, 3, rngs=rngs)
        self.attn = nnx.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(self.attn, name, layers.linear(8, 8, rngs=rngs))
        self.attn.to_out = nnx.List([layers.linear(8, 8, rngs=rngs)])
        self.conv_out = layers.conv(8, 4, 3, stride=2, rngs=rngs)

    def __call__(self, images):
        h = jnp.tanh(self.conv_in(images))
        b, hh, ww, c = h.shape
        x = h.reshape(b, hh * ww, c)
        q, k, v = self.attn.to_q(x), self.attn.to_k(x), self.attn.to_v(x)
        x = x + self.attn.to_out[0](jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(c)) @ v)
        return self.conv_out(x.reshape(b, hh, ww, c))


def numpy_init(build, seed: int = 0) -> nnx.Module:
    """build(rngs) with N(0, 0.2) values drawn by numpy (its structure traced, nothing compiled)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                                            nnx.to_pure_dict(state)))


def small_unet(seed: int = 0) -> SmallUNet:
    return numpy_init(SmallUNet, seed)


def small_models(config):
    """A stand-in for training.build_models: the SmallUNet, "loaded" (pretrained), nothing frozen besides it."""
    from sdjax.tokenizer import default_tokenizer

    graphdefs, states = training.split_modules({"unet": small_unet(config.seed)})
    return training.Models(graphdefs, states, None, default_tokenizer(), {},
                           types.SimpleNamespace(latent_scaling=(1.0, 0.0)))


def noisy_loss_fn(config, **kwargs):
    """A loss that draws from the step's rng (as the diffusion loss draws noise and timesteps)."""
    def loss_fn(modules, batch, rng):
        images = batch["images"] + 0.1 * jax.random.normal(rng, batch["images"].shape)
        return jnp.mean((modules["unet"](images) - 0.3) ** 2), {}
    return loss_fn


@pytest.fixture
def small(monkeypatch, train_module):
    monkeypatch.setattr(train_module.training, "build_models", small_models)
    monkeypatch.setattr(train_module.training, "make_loss_fn", noisy_loss_fn)
    return train_module


@nnx.jit
def apply(module, x):
    return module(x)


def test_only_the_adapters_train_and_their_files_load_back(tmp_path, small):
    """4 steps of train.py with lora.rank=2 (dropout, EMA): the modules it previews and exports have the base weights
    bit for bit and trained adapters; the checkpoint's params, EMA and Adam moments are the adapters' alone; the
    diffusers and kohya files it wrote load into a fresh model that gives the trained (EMA) model's output."""
    seen = []

    def sample_fn(modules, prompts, seed):  # the preview at the last step: the modules train.py exports
        seen.append(modules)
        return np.zeros((len(prompts), 8, 8, 3), np.uint8)

    workdir = tmp_path / "run"
    result = small.main(tiny_config(workdir, num_steps=4, preview_every=4, **LORA), sample_fn=sample_fn)
    assert result["lora"] == str(workdir / "lora") and not result["preempted"]
    (modules,) = seen
    base = nnx.to_pure_dict(nnx.state(small_unet(0), nnx.Param))
    trained = modules["unet"]
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(trained, BASE_PARAMS)), base)  # bit for bit
    adapters = lora_training.adapter_layers(trained)
    assert len(adapters) == 4 and all(a.rank == 2 and a.alpha == 4.0 and a.dropout == 0.25 for a in adapters)
    assert all(np.abs(np.asarray(a.up[...])).max() > 1e-4 for a in adapters)  # up starts at zero: it trained

    state = checkpoint_state(workdir, 4)
    params = [k for k in state if k.startswith("['params']")]
    assert len(params) == 8 and all(k.endswith(ADAPTER_LEAVES) for k in params)
    assert sorted(k.replace("['ema']", "['params']") for k in state if k.startswith("['ema']")) == sorted(params)
    shapes = sorted(state[k].shape for k in params)
    opt = [state[k] for k in state if k.startswith("['opt_state']")]
    assert sorted(x.shape for x in opt if x.ndim) == sorted(shapes * 2)  # Adam's two moments of each adapter
    assert sum(x.size for x in opt if x.ndim) == 2 * sum(state[k].size for k in params)

    files = sorted(p.name for p in (workdir / "lora").iterdir())
    assert files == ["pytorch_lora_weights.safetensors", "style.safetensors"]
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 3))
    want = np.asarray(apply(trained, x))
    assert np.abs(want - np.asarray(apply(small_unet(0), x))).max() > 1e-4  # the adapters change the output
    for file in files:
        fresh = small_unet(0)
        lora.load_lora({"unet": fresh}, workdir / "lora" / file)
        np.testing.assert_allclose(apply(fresh, x), want, rtol=1e-5, atol=1e-5)


class Killed(BaseException):
    """What a SIGKILL does to the run, in-process: it stops wherever it is and saves nothing more."""


def test_killed_run_resumes_with_the_same_losses_and_adapters(tmp_path, small, monkeypatch):
    """An uninterrupted 6-step run against one killed while reading the 5th batch (in step 4; checkpoints every 2
    steps) and restarted: the same losses (bit for bit: the same program on the same device, the same data order,
    noise and dropout masks) and the same adapters, optimizer state and EMA at step 6."""
    small.main(tiny_config(tmp_path / "whole", num_steps=6, **LORA))
    put, calls = small.sharding.host_batch_to_global, []

    def killed_at_the_5th_batch(mesh, local):
        calls.append(1)
        if len(calls) == 5:
            raise Killed()
        return put(mesh, local)

    monkeypatch.setattr(small.sharding, "host_batch_to_global", killed_at_the_5th_batch)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        small.main(tiny_config(run, num_steps=6, **LORA))
    assert checkpoints(run) == [2] and max(losses(run)) == 3  # step 4 never finished
    monkeypatch.setattr(small.sharding, "host_batch_to_global", put)
    small.main(tiny_config(run, num_steps=6, **LORA))
    assert losses(run) == losses(tmp_path / "whole") and len(set(losses(run).values())) == 6
    assert [json.loads(line)["step"] for line in (run / "metrics.superseded.jsonl").read_text().splitlines()] == [3]
    whole, resumed = checkpoint_state(tmp_path / "whole", 6), checkpoint_state(run, 6)
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    for name in ("pytorch_lora_weights.safetensors", "style.safetensors"):
        assert (run / "lora" / name).read_bytes() == (tmp_path / "whole" / "lora" / name).read_bytes()
    # resuming under another alpha would rescale the trained adapters: one line, nothing moved
    with pytest.raises(ValueError, match=r"lora.alpha=2 \(scale alpha / rank = 1\), but the checkpoints in .* "
                                         r"trained with alpha 4: resume with --config.lora.alpha=4"):
        small.main(tiny_config(run, num_steps=8, **{**LORA, "lora.alpha": 2.0}))
    assert checkpoints(run) == [2, 4, 6]


def test_adapter_dropout_acts_in_training_only():
    """with_dropout gives each adapter its own key from the step's rng and leaves the rng to the loss; an adapter
    with a key drops its input as PEFT's lora_dropout (zeros with probability p, the rest scaled by 1 / (1 - p));
    without one (sampling, previews, export) it passes it through."""
    config = tiny_config("unused", **LORA)
    graphdefs, states = lora_training.add_adapters(*training.split_modules({"unet": small_unet(0)}), config)
    modules = training.merge_modules(graphdefs, states)
    adapter = lora_training.adapter_layers(modules["unet"])[0]
    x = jnp.ones((64, 64))
    assert adapter.dropout == 0.25 and adapter.dropout_key is None and adapter.dropped(x) is x

    def keys_and_rng(modules, batch, rng):  # a "loss" that returns what it was given
        return [a.dropout_key for a in lora_training.adapter_layers(modules["unet"])], rng

    keys, rng = lora_training.with_dropout(keys_and_rng)(modules, {}, jax.random.key(3))
    np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(3)))
    assert len({tuple(np.asarray(jax.random.key_data(k))) for k in keys}) == 4
    y = np.asarray(adapter.dropped(x))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)} and 0.2 < np.mean(y == 0) < 0.3


def small_sd_modules(seed: int = 0) -> dict[str, nnx.Module]:
    """sdjax's UNet (one cross-attention block) and text encoder (one layer, 64 tokens), numpy-initialised."""
    from sdjax import clip, unet

    unet_config = unet.UNetConfig(sample_size=8, block_out_channels=(16,), layers_per_block=1, norm_num_groups=4,
                                  down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                  cross_attention_dim=16, attention_head_dim=2)
    clip_config = clip.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=1, max_position_embeddings=8, pad_token_id=0,
                                      bos_token_id=62, eos_token_id=63, projection_dim=16)
    return {"unet": numpy_init(lambda rngs: unet.UNet2DConditionModel(unet_config, rngs=rngs), seed),
            "text_encoder": numpy_init(lambda rngs: clip.CLIPTextEncoder(clip_config, rngs=rngs), seed + 1)}


def test_unet_and_text_encoder_adapters_export_and_load_back(tmp_path):
    """sdjax's UNet and text encoder adapted as train.py adapts them (lora.targets on the UNet; with
    train_text_encoder, lora.text_encoder_targets), with trained-looking values, written by lora_training.export
    (both formats) and read by sdjax.load_lora into fresh modules: the same text encoder and UNet outputs. Loaded
    under the training adapter's name, the modules have the trained ones' structure: one compiled forward."""
    config = tiny_config(tmp_path, train_text_encoder=True,
                         **{**LORA, "lora.dropout": 0.0, "lora.targets": ("to_q,to_k,to_v,to_out.0",)})
    graphdefs, states = training.split_modules(small_sd_modules())
    graphdefs, states = lora_training.add_adapters(graphdefs, states, config)
    rng = np.random.default_rng(0)
    states = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.normal(0, 0.2, x.shape).astype(x.dtype) if "'up'" in jax.tree_util.keystr(p) else x, states)
    trained = training.merge_modules(graphdefs, states)
    # 4 transformer blocks (down, mid, 2 up) x attn1 / attn2 x q, k, v, out; 1 text encoder layer x q, k, v, out
    assert [len(lora_training.adapter_layers(trained[k])) for k in ("unet", "text_encoder")] == [32, 4]
    written = lora_training.export(trained, tmp_path / "lora", name="style")
    ids = jnp.asarray(np.arange(8)[None], jnp.int32)
    sample, t = jax.random.normal(jax.random.key(0), (1, 8, 8, 4)), jnp.array([500])

    @nnx.jit
    def forward(modules):
        context = modules["text_encoder"](ids)
        return context, modules["unet"](sample, t, context)

    want = forward(trained)
    for file in written:
        fresh = small_sd_modules()
        lora.load_lora(fresh, file, name=lora_training.ADAPTER)
        for got, expected in zip(forward(fresh), want):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    lora.set_lora_scale(fresh, lora_training.ADAPTER, 0.0)  # the base model, same program: the adapters mattered
    assert all(np.abs(np.asarray(got) - np.asarray(expected)).max() > 1e-3 for got, expected in zip(forward(fresh), want))


def test_lora_settings_are_checked_before_anything_is_built(tmp_path, small):
    cases = {"lora.rank": (-1, r"lora.rank=-1"), "lora.dropout": (1.0, r"lora.dropout=1.0: a probability"),
             "lora.targets": ((), r"lora.targets is empty"), "lora.alpha": (-2.0, r"lora.alpha=-2.0"),
             "lora.name": ("a/b", r"lora.name='a/b' names a file")}
    for key, (value, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            small.main(tiny_config(tmp_path, **{**LORA, key: value}))
    with pytest.raises(ValueError, match="stage must be 'diffusion'"):
        small.main(tiny_config(tmp_path, stage="autoencoder", **LORA))
    with pytest.raises(ValueError, match=r"LoRA targets \['to_z'\] match no layer"):
        small.main(tiny_config(tmp_path, **{**LORA, "lora.targets": ("to_q", "to_z")}))
    with pytest.raises(ValueError, match=r"lora.alpha is set but lora.rank is 0"):
        small.main(tiny_config(tmp_path, **{"lora.alpha": 8.0}))
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    base = train_base.get_config().lora
    assert {k: tuple(base[k]) if k.endswith("targets") else base[k] for k in lora_training.DEFAULTS} == \
        lora_training.DEFAULTS and base.rank == 0
    config = tiny_config(tmp_path, **LORA)
    config.lock()
    with pytest.raises(AttributeError, match="rnak"):
        config.lora.rnak = 4  # what --config.lora.rnak=4 does: an unknown field is an error
    assert lora_training.file_name(tiny_config(tmp_path / "my_style", **{**LORA, "lora.name": ""})) == "my_style"


def test_adapters_over_a_bfloat16_base_are_float32():
    """A bf16 adapter rounds small updates away (PEFT keeps adapters in fp32 for that): add_lora(dtype=) and
    train.py's add_adapters ask for float32; the layer still computes in its own dtype."""
    class Block(nnx.Module):
        def __init__(self):
            self.to_q = layers.linear(8, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    block = Block()
    lora.add_lora(block, "default", rank=2, targets=("to_q",), key=jax.random.key(0), dtype=jnp.float32)
    adapter = block.to_q.lora["default"]
    assert adapter.down.get_value().dtype == adapter.up.get_value().dtype == jnp.float32
    assert block.to_q(jnp.ones((1, 8), jnp.bfloat16)).dtype == jnp.bfloat16
    graphdefs, states = lora_training.add_adapters(
        {"unet": nnx.graphdef(Block())}, {"unet": nnx.to_pure_dict(nnx.state(Block()))},
        types.SimpleNamespace(lora=types.SimpleNamespace(rank=2, alpha=0.0, dropout=0.0, targets=("to_q",)),
                              seed=0, train_text_encoder=False))
    assert states["unet"]["to_q"]["lora"]["default"]["down"].dtype == jnp.float32
