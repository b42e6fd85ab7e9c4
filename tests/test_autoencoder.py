"""sdjax.autoencoder against diffusers' AutoencoderKL (tiny random model, CPU)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.autoencoder import VARIANTS, AutoencoderKL, AutoencoderKLConfig, sample_latent
from sdjax.weights.torch_names import load_state_dict, to_state_dict

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

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
    return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), **kwargs))


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
