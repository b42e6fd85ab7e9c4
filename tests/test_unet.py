"""sdjax.unet against diffusers' UNet2DConditionModel (tiny random models, CPU fp32)."""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import pretrained
from sdjax.unet import VARIANTS, UNet2DConditionModel, UNetConfig
from sdjax.weights.torch_names import load_state_dict, to_state_dict

import torch
import diffusers
from tests import tiny_models

# Two-level SD layouts (a cross-attention level, then a plain one), small enough to compile in about a second.
_LEVELS = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
REFERENCES = {
    # SD 1.x: 8 heads, conv proj_in/proj_out, 2 layers per block
    "sd1": dict(_LEVELS, layers_per_block=2, attention_head_dim=8, cross_attention_dim=48),
    # SD 2.x: per-block head counts, linear projections, attention upcast; per-block (transformer) layer counts
    "sd2": dict(_LEVELS, layers_per_block=(1, 2), transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                use_linear_projection=True, upcast_attention=True, cross_attention_dim=64),
    # inpainting: latents + mask + masked-image latents
    "inpaint": dict(_LEVELS, in_channels=9, layers_per_block=1, attention_head_dim=8, cross_attention_dim=48),
    # the offline demo's layout (a plain first level, cross-attention below it), here with bottom/right-only
    # padding before each stride-2 conv (downsample_padding=0)
    "shapes": dict(_LEVELS, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=4,
                   cross_attention_dim=64, downsample_padding=0),
    # SDXL: a plain first level, 1 and 2 transformer layers, linear projections, the pooled text embedding (24 wide
    # here) + 6 size/crop ids of 8 Fourier features each added to the time embedding
    "sdxl": dict(_LEVELS, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                 cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8),
    # the refiner's: 5 ids (the aesthetic score in place of the target size), a plain last level
    "sdxl_refiner": dict(_LEVELS, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         transformer_layers_per_block=2, attention_head_dim=(2, 4), use_linear_projection=True,
                         cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
                         projection_class_embeddings_input_dim=24 + 5 * 8),
}
FULL_SIZE_PARAMS = {"sd15": 859_520_964, "sd15_inpaint": 859_535_364, "sd21_base": 865_910_724,
                    "sd21": 865_910_724, "sdxl": 2_567_463_684, "sdxl_refiner": 2_259_526_660}


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def build(cfg, **kwargs):
    """A UNet with abstract parameters (no random init), ready for load_state_dict: what nnx.eval_shape of the
    constructor gives (test_pretrained), 30x quicker."""
    return pretrained.abstract_module(UNet2DConditionModel, cfg, **kwargs)


def twin(unet, **kwargs):
    """A copy of `unet` (same weights) built with other constructor arguments."""
    other = build(unet.config, **kwargs)
    load_state_dict(other, to_state_dict(unet))
    return other


@functools.cache
def abstract_param_count(cfg):
    """Parameter count of the abstract module; cached per architecture (sample_size and upcast change no weight)."""
    if cfg.sample_size is not None or cfg.upcast_attention:
        return abstract_param_count(dataclasses.replace(cfg, sample_size=None, upcast_attention=False))
    return sum(x.size for x in jax.tree.leaves(nnx.state(build(cfg), nnx.Param)))


@nnx.jit
def apply(unet, x, t, context, added=None):
    return unet(x, t, context, added_cond_kwargs=added)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (perturbed random diffusers UNet saved with save_pretrained, its sdjax twin loaded from those files)."""
    import safetensors.numpy

    @functools.cache
    def load(name):
        torch.manual_seed(0)
        ref = tiny_models.perturb_(diffusers.UNet2DConditionModel(**REFERENCES[name]), seed=0, scale=0.1)
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


def added_inputs(cfg, seed=0):
    """SDXL's added conditioning: a pooled text embedding and size/crop (/aesthetic score) ids as the pipelines
    give them (floats: 1024, 768, 0, 0, ... or a score of 6), or None for a UNet without it."""
    if cfg.addition_embed_type != "text_time":
        return None
    n_ids = 6 if (cfg.projection_class_embeddings_input_dim - 24) // cfg.addition_time_embed_dim == 6 else 5
    rng = np.random.default_rng(seed)
    ids = [[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 16.0, 0.0, 896.0, 1152.0]] if n_ids == 6 else \
        [[1024.0, 1024.0, 0.0, 0.0, 6.0], [768.0, 512.0, 8.0, 0.0, 2.5]]
    return {"text_embeds": rng.standard_normal((2, 24)).astype(np.float32), "time_ids": np.asarray(ids, np.float32)}


def run_diffusers(ref, x, t, context, added=None):
    kwargs = {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}} if added else {}
    with torch.no_grad():
        out = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.as_tensor(t),
                  torch.from_numpy(context), **kwargs).sample
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


# Each case compiles once: (16, 16) with one int timestep for the batch; (9, 13) with a timestep per image, one of
# them a float. Odd sizes make diffusers forward the skips' sizes to the upsampler: 9 -> 5 -> 9, not 10.
CASES = {"16x16-scalar-t": (16, 16, 500), "9x13-per-image-t": (9, 13, np.array([10.0, 999.5], np.float32))}


# (and sd1 at 9x13 with ControlNet residuals below)
@pytest.mark.parametrize("name, case", [("sd1", "16x16-scalar-t"), ("sd2", "9x13-per-image-t"),
                                        ("inpaint", "16x16-scalar-t"), ("shapes", "9x13-per-image-t"),
                                        ("sdxl", "9x13-per-image-t"), ("sdxl_refiner", "16x16-scalar-t")])
def test_matches_diffusers(references, name, case):
    ref, unet = references(name)
    height, width, timestep = CASES[case]
    x, context = inputs(unet.config, height, width)
    added = added_inputs(unet.config)
    out = apply(unet, jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(context), added)
    assert out.shape == (2, height, width, 4) and out.dtype == jnp.float32
    expected = run_diffusers(ref, x, timestep, context, added)
    assert rel_err(out, expected) <= 1e-4
    if added is not None:  # the added conditioning matters: other ids give another output
        other = dict(added, time_ids=added["time_ids"][::-1].copy())
        assert rel_err(run_diffusers(ref, x, timestep, context, other), expected) > 1e-3


def controlnet_residuals(cfg, height, width, seed=1):
    """Random NHWC residuals shaped like the skip connections (conv_in, each resnet, each downsampler) and mid block."""
    shapes, n = [(height, width, cfg.block_out_channels[0])], len(cfg.block_out_channels)
    for i, (channels, layers) in enumerate(zip(cfg.block_out_channels, cfg.per_block("layers_per_block"))):
        shapes += [(height, width, channels)] * layers
        if i < n - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((height, width, channels))
    rng = np.random.default_rng(seed)
    draw = lambda shape: rng.standard_normal((2, *shape)).astype(np.float32)  # noqa: E731
    return [draw(s) for s in shapes], draw((height, width, cfg.block_out_channels[-1]))


def test_controlnet_residuals_match_diffusers(references):
    ref, unet = references("sd1")
    height, width, timestep = CASES["9x13-per-image-t"]
    x, context = inputs(unet.config, height, width)
    down, mid = controlnet_residuals(unet.config, height, width)
    with_residuals = nnx.jit(lambda unet, x, t, context, down, mid: unet(
        x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid))
    out = with_residuals(unet, jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(context),
                         [jnp.asarray(d) for d in down], jnp.asarray(mid))
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        expected = ref(nchw(x), torch.as_tensor(timestep), torch.from_numpy(context),
                       down_block_additional_residuals=tuple(map(nchw, down)),
                       mid_block_additional_residual=nchw(mid)).sample.numpy().transpose(0, 2, 3, 1)
    assert rel_err(out, expected) <= 1e-4
    assert rel_err(expected, run_diffusers(ref, x, timestep, context)) > 1e-2  # the residuals matter
    with pytest.raises(ValueError, match=r"down_block_additional_residuals has 5 entries; this UNet has 6 skip"):
        jax.eval_shape(lambda: unet(jnp.asarray(x), timestep, jnp.asarray(context),
                                    down_block_additional_residuals=[jnp.asarray(d) for d in down[:5]]))


def test_attention_implementations_agree(references):
    _, unet = references("sd2")
    height, width, timestep = CASES["9x13-per-image-t"]
    x, context = (jnp.asarray(a) for a in inputs(unet.config, height, width))
    out = apply(unet, x, timestep, context)
    assert rel_err(apply(twin(unet, attention_impl="xla"), x, timestep, context), out) <= 1e-5


def test_bf16_compute_with_fp32_params(references):
    """SD 1.x: attention logits in bf16 too, as in diffusers without upcast_attention."""
    _, unet = references("sd1")
    bf16 = twin(unet, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    height, width, timestep = CASES["16x16-scalar-t"]
    x, context, timestep = (jnp.asarray(a) for a in (*inputs(unet.config, height, width), timestep))
    out = apply(bf16, x, timestep, context)
    assert out.dtype == jnp.bfloat16
    # every convolution and matmul runs in bf16 (the norms' statistics and the softmax stay in fp32)
    lines = [line for line in str(jax.make_jaxpr(lambda: bf16(x, timestep, context))()).splitlines()
             if "= conv_general_dilated[" in line or "= dot_general[" in line]
    assert len(lines) > 50 and all(":bf16[" in line.split("=")[0] for line in lines)
    assert rel_err(out, apply(unet, x, timestep, context)) < 5e-2


def test_remat_gives_same_output_and_gradient():
    """One level: a down block (with cross-attention), the mid block and an up block. With remat=True each is
    checkpointed, and the loss and every parameter's gradient are those of remat=False."""
    cfg = dataclasses.replace(VARIANTS["tiny"], block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                              up_block_types=("UpBlock2D",), norm_num_groups=4)
    x, context = (jnp.asarray(a) for a in inputs(cfg, 8, 8))
    state = nnx.state(random_unet(cfg))

    def loss_fn(remat):
        graphdef = nnx.graphdef(build(cfg, remat=remat))
        return lambda state: jnp.mean(nnx.merge(graphdef, state)(x, jnp.array([3, 700]), context) ** 2)

    for remat in (False, True):
        eqns = jax.make_jaxpr(loss_fn(remat))(state).eqns
        assert sum(e.primitive.name in ("remat2", "checkpoint") for e in eqns) == (3 if remat else 0)
    # one compilation for both gradients
    (value, grads), (value_remat, grads_remat) = jax.jit(
        lambda s: (jax.value_and_grad(loss_fn(False))(s), jax.value_and_grad(loss_fn(True))(s)))(state)
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
    """Full-size variants abstractly only (shapes and dtypes): nothing is materialised on either side."""
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
    assert set(FULL_SIZE_PARAMS) == {n for n in VARIANTS if not n.startswith("tiny") and n != "shapes"}


TINY = VARIANTS["tiny"].to_diffusers()


@pytest.mark.parametrize("change, message", [
    (dict(addition_embed_type="text_time"), r"addition_embed_type='text_time' needs addition_time_embed_dim"),
    (dict(addition_embed_type="image"), r"addition_embed_type='image' is not supported"),
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
    with pytest.raises(ValueError, match=r"added_cond_kwargs is for SDXL UNets"):
        jax.eval_shape(lambda: unet(jnp.asarray(x), 1, jnp.asarray(context), added_cond_kwargs={"time_ids": 1}))
    cfg = VARIANTS["tiny_sdxl"]
    sdxl = build(cfg)
    x, context = inputs(cfg, 8, 8)
    ids = jnp.zeros((2, 6))
    with pytest.raises(ValueError, match=r"SDXL UNet .* needs added_cond_kwargs=.*got none"):
        jax.eval_shape(lambda: sdxl(jnp.asarray(x), 1, jnp.asarray(context)))
    with pytest.raises(ValueError, match=r"pooled width \+ n \* 8 = 80; got text_embeds \(2, 24\), time_ids \(2, 6\)"):
        jax.eval_shape(lambda: sdxl(jnp.asarray(x), 1, jnp.asarray(context),
                                    added_cond_kwargs={"text_embeds": jnp.zeros((2, 24)), "time_ids": ids}))
