"""Shared diffusers building blocks (NHWC), used by the UNet and the autoencoder.

Owned by the UNet engineer; names mirror diffusers `models/resnet.py`, `downsampling.py`,
`upsampling.py`, `attention_processor.py` exactly (ResnetBlock2D.{norm1,conv1,time_emb_proj,norm2,conv2,
conv_shortcut}, Downsample2D.conv, Upsample2D.conv, Attention.{group_norm,to_q,to_k,to_v,to_out.0}),
so `sdjax.weights.torch_names` maps them to diffusers keys.
Every Linear and Conv (`linear`, `conv`) can carry named low-rank adapters (`LoRA`; `sdjax.lora` loads, fuses and
saves them); without any they are flax's nnx.Linear / nnx.Conv, with the same parameter paths.
Norms run in fp32 (like PyTorch autocast) and cast back to the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import initializers
from sdjax.attention import dot_product_attention

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "relu": jax.nn.relu}


def activation(name: str):
    """diffusers `get_activation`."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | str = "SAME",
         dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, use_bias: bool = True) -> "Conv":
    """nn.Conv2d equivalent: `padding` is an int (symmetric, like PyTorch) or an XLA padding string."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, kernel_init=initializers.LECUN_NORMAL,
                bias_init=initializers.ZEROS, rngs=rngs)


def linear(in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.float32,
           param_dtype=jnp.float32, rngs: nnx.Rngs) -> "Linear":
    """nn.Linear equivalent (flax's default initializers, named so that a model can be planned: sdjax.initializers)."""
    return Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=initializers.LECUN_NORMAL, bias_init=initializers.ZEROS, rngs=rngs)


class LoRAScale(nnx.Variable):
    """An adapter's strength, a float32 scalar: a value the compiled program reads (setting it never recompiles).
    Not an nnx.Param: nothing trains it."""


class UnfusedKernel(nnx.Variable):
    """A layer's kernel from before `fuse_lora`, kept as it was: `unfuse_lora` puts this very array back."""


class LoRA(nnx.Module):
    """One low-rank adapter of one layer: x -> scale * (alpha / rank) * up(down(x)), added to the layer's output.

    Linear: down (in, rank), up (rank, out). Conv (kohya's LoCon): down is a conv with the base's kernel size, stride
    and padding, (kh, kw, in, rank), and up a 1x1 conv, (1, 1, rank, out). Both are `nnx.LoRAParam`s, so a trainer
    selects exactly the adapters with that filter, and `sdjax.weights.torch_names` leaves them out of the base
    weights. `alpha` is fixed with the weights (kohya and PEFT files store it); `scale` is the user's strength.
    `dropout` is PEFT's lora_dropout: while a trainer sets `dropout_key` (a key per adapter, inside its step), the
    adapter's input is dropped with that probability; with no key (sampling, export) it is never applied.
    """

    def __init__(self, down, up, *, alpha: float, scale: float = 1.0, dropout: float = 0.0):
        self.down = nnx.LoRAParam(down)
        self.up = nnx.LoRAParam(up)
        self.alpha = float(alpha)
        self.scale = LoRAScale(jnp.asarray(scale, jnp.float32))
        self.dropout = float(dropout)
        self.dropout_key = nnx.data(None)

    def dropped(self, x):
        """x with the adapter's dropout applied (inverted scaling, as torch.nn.Dropout), when a key is set."""
        if self.dropout_key is None or self.dropout <= 0:
            return x
        keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

    @property
    def rank(self) -> int:
        return self.down.shape[-1]

    def kernel_delta(self):
        """What fusing adds to the base kernel (its shape, float32): scale * alpha / rank * down . up."""
        down, up = self.down.get_value(), self.up.get_value()
        delta = jnp.tensordot(down.astype(jnp.float32), up.reshape(self.rank, -1).astype(jnp.float32), axes=1,
                              precision=jax.lax.Precision.HIGHEST)
        return delta * (self.scale.get_value() * (self.alpha / self.rank))


class _Adaptable:
    """What Linear and Conv share: named adapters in `self.lora` (an nnx.Dict, None without any), added to the
    output unless they are fused into the kernel (then `self.unfused_kernel` holds the kernel as it was)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # the nnx layer's own
        self.lora = nnx.data(None)
        self.unfused_kernel = nnx.data(None)

    def __call__(self, x):
        y = super().__call__(x)
        if self.lora is None or self.unfused_kernel is not None:
            return y
        for adapter in self.lora.values():
            h = self._down(adapter.dropped(x.astype(y.dtype)), adapter.down[...].astype(y.dtype))
            up = adapter.up[...]
            h = jnp.matmul(h, up.reshape(up.shape[-2], up.shape[-1]).astype(y.dtype))
            y = y + (adapter.scale[...] * (adapter.alpha / adapter.rank)).astype(y.dtype) * h
        return y

    def add_lora(self, name: str, adapter: LoRA) -> None:
        if self.unfused_kernel is not None:
            raise ValueError("adapters are fused into this layer: unfuse them before adding another")
        shapes = self.lora_shapes(adapter.rank)
        got = (tuple(adapter.down.shape), tuple(adapter.up.shape))
        if got != shapes:
            raise ValueError(f"adapter {name!r}: down/up shapes {got[0]} / {got[1]}, this layer needs "
                             f"{shapes[0]} / {shapes[1]}")
        if self.lora is None:
            self.lora = nnx.Dict()
        if name in self.lora:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        self.lora[name] = adapter

    def remove_lora(self, name: str) -> None:
        if self.unfused_kernel is not None:
            raise ValueError("adapters are fused into this layer: unfuse them before removing one")
        del self.lora[name]
        if not len(self.lora):
            self.lora = None  # the layer's graph is again the plain layer's: programs compiled without adapters fit

    def fuse_lora(self) -> None:
        """Merge every adapter (at its current scale) into the kernel; the kernel as it was is kept for unfuse."""
        if self.lora is None or self.unfused_kernel is not None:
            return
        kernel = self.kernel.get_value()
        fused = kernel.astype(jnp.float32)
        for adapter in self.lora.values():
            fused = fused + adapter.kernel_delta()
        self.unfused_kernel = UnfusedKernel(kernel)
        self.kernel.set_value(fused.astype(kernel.dtype))

    def unfuse_lora(self) -> None:
        """The kernel from before `fuse_lora`, bit for bit (the kept array, not a subtraction)."""
        if self.unfused_kernel is None:
            return
        self.kernel.set_value(self.unfused_kernel.get_value())
        self.unfused_kernel = None


class Linear(_Adaptable, nnx.Linear):
    """nnx.Linear that can carry low-rank adapters (`LoRA`, named, any number; see sdjax.lora)."""

    def _down(self, x, down):
        return jnp.matmul(x, down)

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of an adapter's (down, up) of this rank on this layer."""
        return (self.in_features, rank), (rank, self.out_features)


class Conv(_Adaptable, nnx.Conv):
    """nnx.Conv (2-D, NHWC) that can carry low-rank adapters (`LoRA`: a conv down, a 1x1 conv up; see sdjax.lora)."""

    def _down(self, x, down):
        return jax.lax.conv_general_dilated(x, down, self.strides, self.padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def lora_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of an adapter's (down, up) of this rank on this layer."""
        return (*self.kernel_size, self.in_features, rank), (1, 1, rank, self.out_features)


def embed(num_embeddings: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
          rngs: nnx.Rngs) -> nnx.Embed:
    """nn.Embedding equivalent (flax's default initializer, named: sdjax.initializers)."""
    return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=initializers.EMBEDDING, rngs=rngs)


class GroupNorm(nnx.GroupNorm):
    """torch.nn.GroupNorm: statistics in fp32, output in the compute dtype."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_channels, num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                         param_dtype=param_dtype, use_fast_variance=False, scale_init=initializers.ONES,
                         bias_init=initializers.ZEROS, rngs=rngs)
        self.out_dtype = dtype

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


class LayerNorm(nnx.LayerNorm):
    """torch.nn.LayerNorm over the last axis: statistics in fp32, output in the compute dtype."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        super().__init__(num_features, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                         use_fast_variance=False, scale_init=initializers.ONES, bias_init=initializers.ZEROS,
                         rngs=rngs)
        self.out_dtype = dtype

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (time_embedding_norm="default"); `temb_channels=None` drops time_emb_proj (VAE)."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, groups_out: int | None = None, eps: float = 1e-6, non_linearity: str = "swish",
                 output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None,
                 conv_shortcut_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_channels = in_channels if out_channels is None else out_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.nonlinearity = activation(non_linearity)
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, **kw)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = linear(temb_channels, out_channels, **kw) if temb_channels is not None else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, **kw)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, **kw)
        use_in_shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (conv(in_channels, out_channels, 1, padding=0, use_bias=conv_shortcut_bias, **kw)
                              if use_in_shortcut else None)

    def __call__(self, x, temb=None):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, None, None, :]
        h = self.conv2(self.nonlinearity(self.norm2(h)))  # dropout is identity at inference (p=0 in SD)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(nnx.Module):
    """diffusers Downsample2D(use_conv=True): stride-2 3x3 conv.

    padding=1 (UNet) pads 1 on every side; padding=0 (VAE) pads (0, 1) on the bottom/right first, as diffusers does.
    """

    def __init__(self, channels: int, *, out_channels: int | None = None, padding: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = conv(channels, out_channels or channels, 3, stride=2, padding=padding, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def upsample_nearest(x, size: tuple[int, int] | None = None):
    """F.interpolate(mode="nearest") on NHWC: 2x by default, or to `size` (H, W) with PyTorch's index rule."""
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        idx = jnp.minimum(jnp.floor(jnp.arange(out) * (n / out)).astype(jnp.int32), n - 1)
        x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nnx.Module):
    """diffusers Upsample2D(use_conv=True): nearest 2x (or to `output_size`) then a 3x3 conv."""

    def __init__(self, channels: int, *, out_channels: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = conv(channels, out_channels or channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, x, output_size: tuple[int, int] | None = None):
        return self.conv(upsample_nearest(x, output_size))


class Attention(nnx.Module):
    """diffusers Attention with the default processor: multi-head (cross-)attention on (B, L, C) or NHWC input.

    UNet transformer blocks: bias=False.  VAE mid-block: bias=True, norm_num_groups=..., residual_connection=True
    (NHWC input is flattened to (B, H*W, C) and restored, as the diffusers processor does).
    """

    def __init__(self, query_dim: int, *, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, out_bias: bool = True, upcast_attention: bool = False,
                 norm_num_groups: int | None = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, attention_impl: str = "auto", dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        inner_dim, kv_dim = heads * dim_head, cross_attention_dim or query_dim
        self.heads, self.upcast_attention, self.attention_impl = heads, upcast_attention, attention_impl
        self.residual_connection, self.rescale_output_factor = residual_connection, rescale_output_factor
        self.group_norm = (GroupNorm(norm_num_groups, query_dim, eps=eps, **kw) if norm_num_groups is not None
                           else None)
        self.to_q = linear(query_dim, inner_dim, use_bias=bias, **kw)
        self.to_k = linear(kv_dim, inner_dim, use_bias=bias, **kw)
        self.to_v = linear(kv_dim, inner_dim, use_bias=bias, **kw)
        self.to_out = nnx.List([linear(inner_dim, query_dim, use_bias=out_bias, **kw)])  # to_out.1 is Dropout

    def __call__(self, x, encoder_hidden_states=None):
        residual, shape = x, x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if encoder_hidden_states is None else encoder_hidden_states
        B, L, S = x.shape[0], x.shape[1], context.shape[1]
        q = self.to_q(x).reshape(B, L, self.heads, -1)
        k = self.to_k(context).reshape(B, S, self.heads, -1)
        v = self.to_v(context).reshape(B, S, self.heads, -1)
        out = dot_product_attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast_attention)
        out = self.to_out[0](out.reshape(B, L, -1)).reshape(shape)
        if self.residual_connection:
            out = out + residual
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor
