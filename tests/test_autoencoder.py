"""sdjax.autoencoder against diffusers' AutoencoderKL (tiny random model, CPU)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import pretrained
from sdjax.autoencoder import VARIANTS, AutoencoderKL, AutoencoderKLConfig, from_latents, sample_latent, to_latents
from sdjax.weights.torch_names import load_state_dict, to_state_dict

import torch
import diffusers

TINY = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def build(cfg, **kwargs):
    """An AutoencoderKL with abstract parameters (no random init), ready for load_state_dict."""
    return pretrained.abstract_module(AutoencoderKL, cfg, **kwargs)


def param_count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A perturbed random diffusers VAE saved with save_pretrained, and its sdjax twin loaded from the files."""
    import safetensors.numpy

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms' 1/0 and zero biases would hide layout mistakes
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder, safe_serialization=True)
    cfg = AutoencoderKLConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    vae = build(cfg)
    load_state_dict(vae, safetensors.numpy.load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return ref, vae


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


@nnx.jit
def encode(vae, x):
    return vae.encode(x)


@nnx.jit
def decode(vae, z):
    return vae.decode(z)


def test_encode_decode_match_diffusers(reference, images):
    ref, vae = reference
    with torch.no_grad():
        posterior = ref.encode(nchw(images)).latent_dist
        z = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32))
        ref_image = ref.decode(z).sample
    mean, logvar = encode(vae, jnp.asarray(images))
    assert mean.shape == logvar.shape == (2, 16, 16, 4)
    assert rel_err(mean, nhwc(posterior.mean)) <= 1e-4
    assert rel_err(logvar, nhwc(posterior.logvar)) <= 1e-4
    image = decode(vae, jnp.asarray(nhwc(z)))
    assert image.shape == (2, 32, 32, 3)
    assert rel_err(image, nhwc(ref_image)) <= 1e-4


def _materialize(abstract):
    """Zero arrays in place of an eval_shape module's abstract parameters (to_state_dict reads values)."""
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def test_state_dict_names_and_shapes_match_diffusers():
    """Every parameter name and PyTorch shape, also without quant convs / mid-block attention, 3 levels."""
    for kwargs in (TINY, dict(TINY, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                              block_out_channels=[8, 16, 16], layers_per_block=2, use_quant_conv=False,
                              use_post_quant_conv=False, mid_block_add_attention=False)):
        ref = {k: tuple(v.shape) for k, v in diffusers.AutoencoderKL(**kwargs).state_dict().items()}
        ours = build(AutoencoderKLConfig.from_diffusers(kwargs))
        assert {k: v.shape for k, v in to_state_dict(_materialize(ours)).items()} == ref


def test_round_trip_state_dict(reference):
    _, vae = reference
    fresh = build(vae.config)
    load_state_dict(fresh, to_state_dict(vae))
    for a, b in zip(jax.tree.leaves(nnx.state(vae)), jax.tree.leaves(nnx.state(fresh))):
        np.testing.assert_array_equal(a, b)


def test_full_size_parameter_count():
    vae = build(VARIANTS["sd"])
    assert param_count(vae) == 83_653_863
    assert VARIANTS["sd"].downsample_factor == 8


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_to_diffusers_loads_in_diffusers(name):
    cfg = VARIANTS[name]
    d = cfg.to_diffusers()
    assert d["_class_name"] == "AutoencoderKL"
    json.dumps(d)
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(d)
    ours = build(cfg)
    assert param_count(ours) == sum(p.numel() for p in ref.parameters())
    assert AutoencoderKLConfig.from_diffusers(dict(ref.config)) == cfg


def test_config_rejects_what_it_cannot_represent():
    with pytest.raises(ValueError, match="unsupported config keys"):
        AutoencoderKLConfig.from_diffusers(dict(TINY, norm_type="spatial"))
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        AutoencoderKLConfig.from_diffusers(dict(TINY, down_block_types=["DownBlock2D"] * 2))


def test_bf16_compute_with_fp32_params(reference, images):
    ref, vae = reference
    bf16 = build(vae.config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    load_state_dict(bf16, to_state_dict(vae))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x = jnp.asarray(images)
    mean, logvar = encode(bf16, x)
    assert mean.dtype == jnp.bfloat16
    mean32, logvar32 = encode(vae, x)
    assert rel_err(mean, mean32) < 5e-2 and rel_err(logvar, logvar32) < 5e-2
    image = decode(bf16, mean32)
    assert image.dtype == jnp.bfloat16 and rel_err(image, decode(vae, mean32)) < 5e-2


def test_sample_latent():
    mean = jnp.full((4, 32, 32, 4), 0.5)
    logvar = jnp.full_like(mean, np.log(0.25))  # std 0.5
    s = sample_latent(mean, logvar, jax.random.key(0))
    assert abs(float(s.mean()) - 0.5) < 0.01 and abs(float(s.std()) - 0.5) < 0.01
    np.testing.assert_allclose(sample_latent(mean, jnp.full_like(mean, -30.0), jax.random.key(1)), mean, atol=1e-5)
    assert not np.array_equal(s, sample_latent(mean, logvar, jax.random.key(1)))


SHIFTED = dict(TINY, scaling_factor=0.3611, shift_factor=0.1159)  # a VAE whose latents are shifted, then scaled


def test_latent_scaling_with_a_shift_factor_round_trips():
    """to_latents = (z - shift) * scale, from_latents undoes it; shift_factor survives diffusers' config."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**SHIFTED)
    cfg = AutoencoderKLConfig.from_diffusers(dict(ref.config))
    assert cfg.latent_scaling == (0.3611, 0.1159)
    assert AutoencoderKLConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert AutoencoderKLConfig.from_diffusers(TINY).latent_scaling == (0.18215, 0.0)  # shift_factor None
    z = jnp.asarray(np.random.default_rng(0).normal(0.3, 4.0, (2, 8, 8, 4)).astype(np.float32))
    latents = to_latents(z, cfg.latent_scaling)
    np.testing.assert_allclose(latents, (np.asarray(z) - 0.1159) * 0.3611, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(from_latents(latents, cfg.latent_scaling), z, rtol=1e-6, atol=1e-6)
    assert abs(float(jnp.mean(latents) - jnp.mean(z) * 0.3611)) > 0.03  # the shift is applied, not dropped


class _Identity:
    """A stand-in UNet (x_t, t, context) -> x_t: the loss then depends on the latents it is given."""

    def __call__(self, x, t, context):
        return x


class _FixedVAE:
    """A stand-in VAE whose encode returns given posterior moments (the training step's own encode path)."""

    def __init__(self, mean, logvar):
        self.moments = (jnp.asarray(mean), jnp.asarray(logvar))

    def encode(self, images):
        return self.moments


def test_training_loss_uses_to_latents_with_the_shift():
    """make_loss_fn scales cached and freshly encoded latents with to_latents: shifting the VAE's latents by c
    and setting shift_factor=c gives the same loss; dropping the shift does not."""
    import importlib
    import sys
    from pathlib import Path

    from sdjax import training, variants

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        cfg = importlib.import_module("configs.tiny").get_config()
    finally:
        sys.path.pop(0)
    cfg.objective.latent_sample = True
    rng = np.random.default_rng(1)
    mean = rng.normal(0.5, 3.0, (4, 8, 8, 4)).astype(np.float32)
    logvar = np.full_like(mean, -2.0)
    context = np.zeros((4, 77, 32), np.float32)
    scaling = AutoencoderKLConfig.from_diffusers(SHIFTED).latent_scaling
    sched = variants.SCHEDULERS["sd1"]
    key = jax.random.key(0)

    def loss(latent_scaling, m, batch_kind="cached", lv=logvar):
        fn = training.make_loss_fn(cfg, scheduler_config=sched, latent_scaling=latent_scaling)
        if batch_kind == "cached":
            batch = {"latent_mean": m, "latent_logvar": lv, "context": context}
            modules = {"unet": _Identity()}
        else:
            batch = {"images": np.zeros((4, 16, 16, 3), np.float32), "context": context}
            modules = {"unet": _Identity(), "vae": _FixedVAE(m, logvar)}
        return float(fn(modules, batch, key)[0])

    shifted = loss(scaling, mean)
    assert shifted == pytest.approx(loss((scaling[0], 0.0), mean - scaling[1]), rel=1e-5)
    # pre-scaled latents: the posterior's std scales with them (log-variance + 2 log scaling_factor)
    assert shifted == pytest.approx(loss((1.0, 0.0), np.asarray(to_latents(mean, scaling)), "cached",
                                         logvar + 2 * np.log(scaling[0])), rel=1e-5)
    assert shifted == pytest.approx(loss(scaling, mean, "images"), rel=1e-6)
    assert abs(shifted - loss((scaling[0], 0.0), mean)) > 1e-3 * shifted
