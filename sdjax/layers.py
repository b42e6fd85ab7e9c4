"""Shared diffusers building blocks (NHWC), used by the UNet and the autoencoder.

Owned by the UNet engineer; names mirror diffusers `models/resnet.py`, `downsampling.py`,
`upsampling.py` exactly (ResnetBlock2D.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut},
Downsample2D.conv, Upsample2D.conv), so `sdjax.weights.torch_names` maps them to diffusers keys.
Norms run in fp32 (like PyTorch autocast) and cast back to the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
                "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)), "relu": jax.nn.relu}


def activation(name: str):
    """diffusers `get_activation`."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int | str = "SAME",
         dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Conv:
    """nn.Conv2d equivalent: `padding` is an int (symmetric, like PyTorch) or an XLA padding string."""
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=padding,
                    use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GroupNorm(nnx.GroupNorm):
    """torch.nn.GroupNorm: statistics in fp32, output in the compute dtype."""

    def __init__(self, num_groups: int, num_channels: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_channels, num_groups=num_groups, epsilon=eps, dtype=jnp.float32,
                         param_dtype=param_dtype, use_fast_variance=False, rngs=rngs)
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
        self.time_emb_proj = (nnx.Linear(temb_channels, out_channels, **kw) if temb_channels is not None else None)
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
