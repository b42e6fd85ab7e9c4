"""sdjax.unet against diffusers' UNet2DConditionModel (tiny random models, CPU fp32)."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax.unet import VARIANTS, UNet2DConditionModel, UNetConfig
from sdjax.weights.torch_names import load_state_dict, to_state_dict

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
tiny_models = pytest.importorskip("tests.tiny_models")

# The tiny diffusers UNets of tests/tiny_models.py: 3 levels (32/64/64 or 64/128/128 channels), 2 layers per block.
REFERENCES = {
    "sd1": tiny_models.tiny_unet_sd1,          # 8 heads, conv proj_in/proj_out
    "sd2": tiny_models.tiny_unet_sd2,          # heads (1, 2, 2) = head dim 64, linear projections, upcast_attention
    "inpaint": tiny_models.tiny_unet_inpaint,  # SD 1.x with 9 input channels
}
FULL_SIZE_PARAMS = {"sd15": 859_520_964, "sd15_inpaint": 859_535_364, "sd21_base": 865_910_724,
                    "sd21": 865_910_724}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def build(cfg, **kwargs):
    """A UNet with abstract parameters (no random init), ready for load_state_dict."""
    return nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0), **kwargs))


def twin(unet, **kwargs):
    """A copy of `unet` (same weights) built with other constructor arguments."""
    other = build(unet.config, **kwargs)
    load_state_dict(other, to_state_dict(unet))
    return other


@functools.cache
def abstract_param_count(cfg):
    """Parameter count through nnx.eval_shape; cached per architecture (sample_size and upcast change no weight)."""
    if cfg.sample_size is not None or cfg.upcast_attention:
        return abstract_param_count(dataclasses.replace(cfg, sample_size=None, upcast_attention=False))
    return sum(x.size for x in jax.tree.leaves(nnx.state(build(cfg), nnx.Param)))


@nnx.jit
def apply(unet, x, t, context):
    return unet(x, t, context)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (tiny diffusers UNet saved with save_pretrained, its sdjax twin loaded from those files), built once."""
    import safetensors.numpy

    @functools.cache
    def load(name):
        ref = REFERENCES[name]()
        folder = tmp_path_factory.mktemp(f"unet-{name}")
        ref.save_pretrained(folder, safe_serialization=True)
        cfg = UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
        unet = build(cfg)
        load_state_dict(unet, safetensors.numpy.load_file(str(folder / "diffusion_pytorch_model.safetensors")))
        return ref, unet

    return load


def inputs(cfg, height, width, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, height, width, cfg.in_channels)).astype(np.float32)
    context = rng.standard_normal((2, 7, cfg.cross_attention_dim)).astype(np.float32)
    return x, context


def run_diffusers(ref, x, t, context):
    with torch.no_grad():
        out = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.as_tensor(t),
                  torch.from_numpy(context)).sample
    return out.numpy().transpose(0, 2, 3, 1)


def random_unet(cfg, seed=0, **kwargs):
    """A UNet with random parameters drawn in NumPy (cheaper than compiling the random initialisers)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        noise, leaf = rng.standard_normal(s.shape), [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if leaf == "kernel":
            noise /= np.sqrt(np.prod(s.shape[:-1]))
        elif leaf == "scale":
            noise = 1 + 0.1 * noise
        else:
            noise *= 0.1
        return jnp.asarray(noise, s.dtype)

    graphdef, state = nnx.split(build(cfg, **kwargs))
    return nnx.merge(graphdef, jax.tree.map_with_path(draw, state))


# Each case compiles once: (16, 16) with one int timestep for the batch; (10, 14) with a timestep per image, one
# of them a float. 10 and 14 are not multiples of 2**2 (two upsamplers): 10 -> 5 -> 3 -> 5 -> 10, so the skips'
# sizes must be forwarded to the upsamplers.
CASES = {"16x16-scalar-t": (16, 16, 500), "10x14-per-image-t": (10, 14, np.array([10.0, 999.5], np.float32))}


@pytest.mark.parametrize("name, case", [("sd1", "16x16-scalar-t"), ("sd1", "10x14-per-image-t"),
                                        ("sd2", "10x14-per-image-t"), ("inpaint", "16x16-scalar-t")])
def test_matches_diffusers(references, name, case):
    ref, unet = references(name)
    height, width, timestep = CASES[case]
    x, context = inputs(unet.config, height, width)
    out = apply(unet, jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(context))
    assert out.shape == (2, height, width, 4) and out.dtype == jnp.float32
    assert rel_err(out, run_diffusers(ref, x, timestep, context)) <= 1e-4


def test_attention_implementations_agree(references):
    _, unet = references("sd2")
    height, width, timestep = CASES["10x14-per-image-t"]
    x, context = (jnp.asarray(a) for a in inputs(unet.config, height, width))
    out = apply(unet, x, timestep, context)
    assert rel_err(apply(twin(unet, attention_impl="xla"), x, timestep, context), out) <= 1e-5


@pytest.mark.parametrize("name", ["tiny", "tiny_sd2"])
def test_bf16_compute_with_fp32_params(name):
    """tiny: attention logits in bf16 (as diffusers without upcast_attention); tiny_sd2: upcast to fp32."""
    unet = random_unet(VARIANTS[name])
    bf16 = twin(unet, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    x, context = (jnp.asarray(a) for a in inputs(unet.config, 16, 16))
    out = apply(bf16, x, 500, context)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, apply(unet, x, 500, context)) < 5e-2


def test_remat_gives_same_output_and_gradient():
    """One level (a down, a mid and an up block, each checkpointed): value and every parameter's gradient agree."""
    cfg = dataclasses.replace(VARIANTS["tiny"], block_out_channels=(16,), down_block_types=("DownBlock2D",),
                              up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=4)
    x, context = (jnp.asarray(a) for a in inputs(cfg, 8, 8))
    state = nnx.state(random_unet(cfg))

    results = {}
    for remat in (False, True):
        graphdef = nnx.graphdef(build(cfg, remat=remat))

        def loss(state):
            return jnp.mean(nnx.merge(graphdef, state)(x, jnp.array([3, 700]), context) ** 2)

        traced = jax.jit(jax.value_and_grad(loss)).trace(state)
        assert ("remat" in str(traced.jaxpr)) == remat  # the flag really checkpoints the blocks
        results[remat] = traced.lower().compile()(state)
    (value, grads), (value_remat, grads_remat) = results[False], results[True]
    np.testing.assert_allclose(value_remat, value, rtol=1e-6)
    for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
        assert rel_err(g_remat, g) <= 1e-5


def _materialize(abstract):
    """Zero arrays in place of an eval_shape module's abstract parameters (to_state_dict reads values)."""
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


@pytest.mark.parametrize("name", [n for n in sorted(VARIANTS) if n.startswith("tiny")])
def test_state_dict_names_and_shapes_match_diffusers(name):
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(VARIANTS[name].to_diffusers())
    ours = to_state_dict(_materialize(build(VARIANTS[name])))
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_to_diffusers_builds_the_same_model(name):
    """Full-size variants through nnx.eval_shape only: nothing is materialised on either side."""
    cfg = VARIANTS[name]
    d = cfg.to_diffusers()
    assert d["_class_name"] == "UNet2DConditionModel"
    json.dumps(d)
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel.from_config(d)
    count = abstract_param_count(cfg)
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == FULL_SIZE_PARAMS.get(name, count)
    assert UNetConfig.from_diffusers(dict(ref.config)) == cfg


def test_full_size_variants_are_covered():
    assert set(FULL_SIZE_PARAMS) == {n for n in VARIANTS if not n.startswith("tiny")}


TINY = VARIANTS["tiny"].to_diffusers()


@pytest.mark.parametrize("change, message", [
    (dict(addition_embed_type="text_time"), r"addition_embed_type='text_time' is not supported"),
    (dict(class_embed_type="timestep"), r"class_embed_type='timestep' is not supported"),
    (dict(time_embedding_type="fourier"), r"time_embedding_type='fourier' is not supported"),
    (dict(resnet_time_scale_shift="scale_shift"), r"resnet_time_scale_shift='scale_shift' is not supported"),
    (dict(num_attention_heads=8), r"num_attention_heads must be None"),
    (dict(down_block_types=["CrossAttnDownBlock2D"]), r"down_block_types has 1 entries, block_out_channels has 2"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
     r"down_block_types entry 'SimpleCrossAttnDownBlock2D' is not supported"),
    (dict(up_block_types=["UpBlock2D", "AttnUpBlock2D"]), r"up_block_types entry 'AttnUpBlock2D' is not supported"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), r"mid_block_type 'UNetMidBlock2DSimpleCrossAttn'"),
    (dict(attention_head_dim=[1, 2, 3]), r"attention_head_dim=\(1, 2, 3\) must be one value or one value per block"),
    (dict(transformer_layers_per_block=[[1, 2], [1, 2]]), r"transformer_layers_per_block=.* must be one value"),
    (dict(norm_num_groups=None), r"norm_num_groups=None is not supported"),
    (dict(sdxl_typo=1), r"unsupported config keys \['sdxl_typo'\]"),
])
def test_config_rejects_what_it_cannot_represent(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_diffusers(dict(TINY, **change))


def test_config_reads_diffusers_json_lists():
    cfg = UNetConfig.from_diffusers(dict(TINY, attention_head_dim=[2, 4], sample_size=[32, 48]))
    assert cfg.heads == (2, 4) and cfg.sample_size == (32, 48)
    hash(cfg)


def test_call_rejects_wrong_shapes():
    unet = build(VARIANTS["tiny"])
    x, context = inputs(VARIANTS["tiny"], 8, 8)
    with pytest.raises(ValueError, match=r"NHWC"):
        jax.eval_shape(lambda: unet(jnp.asarray(x.transpose(0, 3, 1, 2)), 1, jnp.asarray(context)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states"):
        jax.eval_shape(lambda: unet(jnp.asarray(x), 1, jnp.asarray(context[..., :5])))
    with pytest.raises(ValueError, match=r"timestep"):
        jax.eval_shape(lambda: unet(jnp.asarray(x), jnp.arange(3), jnp.asarray(context)))
