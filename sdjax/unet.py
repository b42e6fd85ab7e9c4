"""diffusers `UNet2DConditionModel` (SD 1.x / 2.x / XL) in Flax NNX, NHWC.

Parameter paths mirror diffusers exactly (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, ...), so
`sdjax.weights.torch_names.load_state_dict(unet, diffusers_state_dict)` loads a diffusers checkpoint.

    unet = UNet2DConditionModel(VARIANTS["sd15"], rngs=nnx.Rngs(0))
    eps = unet(latents_nhwc, timestep, encoder_hidden_states)       # (B, H, W, out_channels)

SDXL's UNets (addition_embed_type="text_time") also take the pooled text embedding and the micro-conditioning
ids, as diffusers: `unet(x, t, context, added_cond_kwargs={"text_embeds": (B, P), "time_ids": (B, 6)})` (the
refiner's time ids are 5: original size, crop top-left, aesthetic score).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import modelconfig
from sdjax.layers import (Attention, Downsample2D, GroupNorm, LayerNorm, ResnetBlock2D, Upsample2D, activation,
                          conv, linear)

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Config keys for features SD 1.x / 2.x never use: any value but diffusers' default is refused by name.
_UNSUPPORTED_DEFAULTS = {
    "dual_cross_attention": False, "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "attention_type": "default", "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers UNet2DConditionModel config.json: same names, same defaults.

    `resnet_skip_time_act`, `resnet_out_scale_factor`, `cross_attention_norm`, `mid_block_only_cross_attention`
    and `addition_embed_type_num_heads` only affect block types SD does not use; diffusers ignores them for
    the supported blocks, and so do we.
    """
    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (from JSON or callers) become tuples: the config stays hashable
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            if getattr(self, key) != default:
                raise ValueError(f"UNetConfig: {key}={getattr(self, key)!r} is not supported "
                                 f"(SD 1.x/2.x UNets use {default!r})")
        if self.num_attention_heads is not None:
            raise ValueError("UNetConfig: num_attention_heads must be None; as in diffusers, the head count is "
                             "given by attention_head_dim")
        if self.norm_num_groups is None:
            raise ValueError("UNetConfig: norm_num_groups=None is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig: addition_embed_type={self.addition_embed_type!r} is not supported "
                             "(SD 1.x/2.x use None, SDXL 'text_time')")
        sizes = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time" and not all(isinstance(x, int) for x in sizes):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim (SDXL: 256 and 2816, the refiner 256 and 2560)")
        n = len(self.block_out_channels)
        for key, types, allowed in (("down_block_types", self.down_block_types, _DOWN_TYPES),
                                    ("up_block_types", self.up_block_types, _UP_TYPES)):
            if len(types) != n:
                raise ValueError(f"UNetConfig: {key} has {len(types)} entries, block_out_channels has {n}")
            for t in types:
                if t not in allowed:
                    raise ValueError(f"UNetConfig: {key} entry {t!r} is not supported; use one of {allowed}")
        if self.mid_block_type not in _MID_TYPES:
            raise ValueError(f"UNetConfig: mid_block_type {self.mid_block_type!r} is not supported; "
                             f"use one of {_MID_TYPES}")
        for key in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                    "transformer_layers_per_block"):
            self.per_block(key)

    def per_block(self, key: str) -> tuple:
        """An int/bool-or-per-block field as one value per down block."""
        value, n = getattr(self, key), len(self.block_out_channels)
        if not isinstance(value, tuple):
            return (value,) * n
        if len(value) != n or any(isinstance(v, (tuple, list)) for v in value):
            raise ValueError(f"UNetConfig: {key}={value!r} must be one value or one value per block ({n})")
        return value

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block: diffusers' `num_attention_heads or attention_head_dim` naming quirk."""
        return self.per_block("attention_head_dim")

    @classmethod
    def from_diffusers(cls, d: dict) -> "UNetConfig":
        return modelconfig.from_dict(cls, d)

    def to_diffusers(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", **modelconfig.to_dict(self)}


def get_timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, max_period: int = 10000):
    """diffusers get_timestep_embedding: (N,) int or float timesteps -> (N, embedding_dim) float32."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_channels: int, time_embed_dim: int, *, act_fn: str = "silu", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = activation(act_fn)
        self.linear_1 = linear(in_channels, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(time_embed_dim, time_embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = linear(dim_in, dim_out * 2, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net = [GEGLU, Dropout, Linear] as in diffusers (keys ff.net.0.proj, ff.net.2)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.net = nnx.List([GEGLU(dim, dim * mult, **kw), nnx.Dropout(0.0), linear(dim * mult, dim, **kw)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, *, cross_attention_dim: int,
                 only_cross_attention: bool = False, upcast_attention: bool = False, attention_impl: str = "auto",
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn = dict(heads=heads, dim_head=dim_head, upcast_attention=upcast_attention, attention_impl=attention_impl)
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, **kw)
        self.attn1 = Attention(dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                               **attn, **kw)
        self.norm2 = LayerNorm(dim, **kw)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn, **kw)
        self.norm3 = LayerNorm(dim, **kw)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context):
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (1x1 conv, or Linear with use_linear_projection), transformer blocks, proj_out, residual."""

    def __init__(self, heads: int, dim_head: int, *, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, only_cross_attention: bool,
                 upcast_attention: bool, attention_impl: str, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, **kw)
        if use_linear_projection:
            self.proj_in, self.proj_out = linear(in_channels, inner, **kw), linear(inner, in_channels, **kw)
        else:
            self.proj_in, self.proj_out = conv(in_channels, inner, 1, padding=0, **kw), conv(inner, in_channels, 1,
                                                                                           padding=0, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim=cross_attention_dim,
                                  only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
                                  attention_impl=attention_impl, **kw)
            for _ in range(num_layers)])

    def __call__(self, x, context):
        B, H, W, _ = x.shape
        h = self.proj_in(self.norm(x))  # a 1x1 conv and a Linear act alike on NHWC
        h = h.reshape(B, H * W, h.shape[-1])
        for block in self.transformer_blocks:
            h = block(h, context)
        return self.proj_out(h.reshape(B, H, W, -1)) + x


class DownBlock2D(nnx.Module):
    """diffusers DownBlock2D, or CrossAttnDownBlock2D when `transformer` (Transformer2DModel kwargs) is given."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool,
                 downsample_padding: int, resnet: dict, transformer: dict | None, kw: dict):
        self.resnets = nnx.List([ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels,
                                               out_channels=out_channels, **resnet, **kw) for i in range(num_layers)])
        self.attentions = (nnx.List([Transformer2DModel(in_channels=out_channels, **transformer, **kw)
                                     for _ in range(num_layers)]) if transformer is not None else None)
        self.downsamplers = (nnx.List([Downsample2D(out_channels, padding=downsample_padding, **kw)])
                             if add_downsample else None)

    def __call__(self, x, temb, context):
        states = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, tuple(states)


class UNetMidBlock2DCrossAttn(nnx.Module):
    def __init__(self, channels: int, *, num_layers: int = 1, resnet: dict, transformer: dict, kw: dict):
        self.resnets = nnx.List([ResnetBlock2D(in_channels=channels, out_channels=channels, **resnet, **kw)
                                 for _ in range(num_layers + 1)])
        self.attentions = nnx.List([Transformer2DModel(in_channels=channels, **transformer, **kw)
                                    for _ in range(num_layers)])

    def __call__(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock2D(nnx.Module):
    """diffusers UpBlock2D, or CrossAttnUpBlock2D when `transformer` is given; consumes skip connections."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, *, num_layers: int,
                 add_upsample: bool, resnet: dict, transformer: dict | None, kw: dict):
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels=(prev_output_channel if i == 0 else out_channels)
                          + (in_channels if i == num_layers - 1 else out_channels),
                          out_channels=out_channels, **resnet, **kw) for i in range(num_layers)])
        self.attentions = (nnx.List([Transformer2DModel(in_channels=out_channels, **transformer, **kw)
                                     for _ in range(num_layers)]) if transformer is not None else None)
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)]) if add_upsample else None

    def __call__(self, x, res_states, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, res_states[-1 - i]], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def _check_inputs(c: UNetConfig, sample, timestep, context, added_cond_kwargs) -> None:
    """Shape errors that would otherwise surface deep inside a conv or an einsum."""
    if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
        raise ValueError(f"UNet: sample must be NHWC latents (batch, height, width, {c.in_channels}), got shape "
                         f"{tuple(sample.shape)}; transpose NCHW input with x.transpose(0, 2, 3, 1)")
    cross_dims = set(c.per_block("cross_attention_dim"))
    if context.ndim != 3 or context.shape[0] != sample.shape[0] or context.shape[-1] not in cross_dims:
        raise ValueError(f"UNet: encoder_hidden_states must be (batch={sample.shape[0]}, tokens, "
                         f"{'|'.join(map(str, sorted(cross_dims)))}) (the text encoder's output), "
                         f"got shape {tuple(context.shape)}")
    t_shape = jnp.shape(timestep)
    if not (t_shape in ((), (1,)) or t_shape == (sample.shape[0],)):
        raise ValueError(f"UNet: timestep must be a scalar or one per image ({sample.shape[0]},), "
                         f"got shape {t_shape}")
    if c.addition_embed_type == "text_time":
        want = ("added_cond_kwargs={'text_embeds': (batch, pooled width), 'time_ids': (batch, n)}, with pooled "
                f"width + n * {c.addition_time_embed_dim} = {c.projection_class_embeddings_input_dim}")
        given = added_cond_kwargs or {}
        if set(given) != {"text_embeds", "time_ids"}:
            raise ValueError(f"UNet: this SDXL UNet (addition_embed_type='text_time') needs {want}; got "
                             f"{sorted(given) if added_cond_kwargs is not None else 'none'}")
        text, ids = jnp.shape(given["text_embeds"]), jnp.shape(given["time_ids"])
        if (len(text) != 2 or len(ids) != 2 or text[0] != sample.shape[0] or ids[0] != sample.shape[0]
                or text[1] + ids[1] * c.addition_time_embed_dim != c.projection_class_embeddings_input_dim):
            raise ValueError(f"UNet: {want}; got text_embeds {text}, time_ids {ids} for a batch of {sample.shape[0]}")
    elif added_cond_kwargs:
        raise ValueError("UNet: added_cond_kwargs is for SDXL UNets (addition_embed_type='text_time'); this one "
                         "takes none")


class UNet2DConditionModel(nnx.Module):
    """The SD noise predictor. `remat=True` checkpoints each down/mid/up block (gradient checkpointing)."""

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "auto", remat: bool = False, rngs: nnx.Rngs):
        c = config
        self.config, self.dtype, self.remat = c, dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = c.block_out_channels
        n = len(ch)
        heads, layers = c.heads, c.per_block("layers_per_block")
        cross_dim, only_cross = c.per_block("cross_attention_dim"), c.per_block("only_cross_attention")
        t_layers = c.per_block("transformer_layers_per_block")
        resnet = dict(temb_channels=ch[0] * 4, groups=c.norm_num_groups, eps=c.norm_eps, non_linearity=c.act_fn)

        def transformer(i: int, channels: int, only_cross_attention: bool):
            return dict(heads=heads[i], dim_head=channels // heads[i], num_layers=t_layers[i],
                        cross_attention_dim=cross_dim[i], norm_num_groups=c.norm_num_groups,
                        use_linear_projection=c.use_linear_projection, only_cross_attention=only_cross_attention,
                        upcast_attention=c.upcast_attention, attention_impl=attention_impl)

        self.conv_in = conv(c.in_channels, ch[0], c.conv_in_kernel, padding=(c.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(ch[0], ch[0] * 4, act_fn=c.act_fn, **kw)
        if c.addition_embed_type == "text_time":  # SDXL: pooled text + Fourier features of the size/crop ids
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, ch[0] * 4, **kw)

        self.down_blocks = nnx.List([
            DownBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=layers[i], add_downsample=i < n - 1,
                        downsample_padding=c.downsample_padding, resnet=resnet, kw=kw,
                        transformer=transformer(i, ch[i], only_cross[i]) if t == "CrossAttnDownBlock2D" else None)
            for i, t in enumerate(c.down_block_types)])
        mid_resnet = dict(resnet, output_scale_factor=c.mid_block_scale_factor)
        self.mid_block = (UNetMidBlock2DCrossAttn(ch[-1], resnet=mid_resnet, kw=kw,
                                                  transformer=transformer(n - 1, ch[-1], False))
                          if c.mid_block_type is not None else None)
        up = []
        for i, t in enumerate(c.up_block_types):
            j = n - 1 - i  # the matching down block
            attn = transformer(j, ch[j], only_cross[j]) if t == "CrossAttnUpBlock2D" else None
            up.append(UpBlock2D(ch[max(j - 1, 0)], ch[min(j + 1, n - 1)], ch[j], num_layers=layers[j] + 1,
                                add_upsample=i < n - 1, resnet=resnet, transformer=attn, kw=kw))
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(c.norm_num_groups, ch[0], eps=c.norm_eps, **kw)
        self.conv_act = activation(c.act_fn)
        self.conv_out = conv(ch[0], c.out_channels, c.conv_out_kernel, padding=(c.conv_out_kernel - 1) // 2, **kw)

    def _run(self, fn, *args):
        return (nnx.remat(fn) if self.remat else fn)(*args)

    def __call__(self, sample, timestep, encoder_hidden_states, *, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None):
        """sample (B, H, W, in_channels); timestep scalar or (B,), int or float; encoder_hidden_states (B, L, D).

        added_cond_kwargs: SDXL's {"text_embeds": (B, P), "time_ids": (B, N)}, as diffusers (no other UNet takes
        it). The optional residuals are ControlNet's, added to the skip connections and the mid-block output.
        """
        c = self.config
        _check_inputs(c, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        B = sample.shape[0]
        x = sample.astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (B,))
        t_emb = get_timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        if c.addition_embed_type == "text_time":  # each id its own sinusoid features, concatenated per image
            ids = jnp.asarray(added_cond_kwargs["time_ids"]).reshape(-1)
            id_emb = get_timestep_embedding(ids, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            add = jnp.concatenate([jnp.asarray(added_cond_kwargs["text_embeds"]).astype(jnp.float32),
                                   id_emb.reshape(B, -1)], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))
        context = encoder_hidden_states.astype(self.dtype)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, states = self._run(lambda blk, x, emb, ctx: blk(x, emb, ctx), block, x, emb, context)
            skips.extend(states)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"UNet: down_block_additional_residuals has {len(down_block_additional_residuals)} "
                                 f"entries; this UNet has {len(skips)} skip connections (a ControlNet of another "
                                 "architecture?)")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if self.mid_block is not None:
            x = self._run(lambda blk, x, emb, ctx: blk(x, emb, ctx), self.mid_block, x, emb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        # diffusers forwards the skip's size to the upsampler when H or W is not a multiple of 2**num_upsamplers
        factor = 2 ** (len(self.up_blocks) - 1)
        forward_size = sample.shape[1] % factor != 0 or sample.shape[2] % factor != 0
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = tuple(skips[-k:]), skips[:-k]
            size = tuple(skips[-1].shape[1:3]) if forward_size and i < len(self.up_blocks) - 1 else None
            x = self._run(lambda blk, x, res, emb, ctx: blk(x, res, emb, ctx, size), block, x, res, emb, context)

        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


_SD15 = UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
_SD21 = UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True)
_TINY = UNetConfig(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=2)

# The offline demo's UNet (configs/shapes*.py): 16x16x4 latents of 64 px shapes; cross-attention at 8x8 and 4x4
# only (self-attention over 256 tokens at 16x16 halves CPU training speed; cross-attention alone there costs 40%
# and did not sharpen shapes).
_SHAPES = UNetConfig(sample_size=16, block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=8,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=64, attention_head_dim=4)

# SDXL: three levels (the first without attention), 1/2/10 transformer layers, head dim 64, 2048-wide context (CLIP
# ViT-L's 768 + OpenCLIP ViT-bigG's 1280), and the pooled bigG embedding (1280) + 6 size/crop ids x 256 added to the
# time embedding. The refiner: four levels of 384-1536 channels, 4 layers, bigG's context alone, 5 ids (the
# aesthetic score in place of the target size).
_SDXL = UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                   transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                   cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=1280 + 6 * 256)
_SDXL_REFINER = UNetConfig(sample_size=128, block_out_channels=(384, 768, 1536, 1536),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                             "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
                           use_linear_projection=True, cross_attention_dim=1280, addition_embed_type="text_time",
                           addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 5 * 256)
_TINY_SDXL = UNetConfig(sample_size=32, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
                        addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=32 + 6 * 8)

VARIANTS = {
    "sd15": _SD15,
    "sd15_inpaint": dataclasses.replace(_SD15, in_channels=9),
    "sd21_base": dataclasses.replace(_SD21, sample_size=64, upcast_attention=False),
    "sd21": _SD21,
    "tiny": _TINY,
    "tiny_sd2": dataclasses.replace(_TINY, attention_head_dim=(2, 4), use_linear_projection=True,
                                    upcast_attention=True),
    "tiny_inpaint": dataclasses.replace(_TINY, in_channels=9),
    "shapes": _SHAPES,
    "sdxl": _SDXL,
    "sdxl_refiner": _SDXL_REFINER,
    "tiny_sdxl": _TINY_SDXL,
}
