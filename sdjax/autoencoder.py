"""diffusers `AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX, NHWC, images in [-1, 1].

Module and attribute names mirror diffusers (`encoder.down_blocks.0.resnets.0.conv1`,
`encoder.mid_block.attentions.0.to_q`, `quant_conv`, `decoder.up_blocks.0.upsamplers.0.conv`, ...),
so `sdjax.weights.torch_names` loads a diffusers `vae/` state dict as is.

Latent scaling lives in one pair of functions, used by the pipeline, training and the latent cache's
consumers: `to_latents(z, config.latent_scaling)` turns the VAE's latents into the diffusion model's,
`(z - shift_factor) * scaling_factor` (shift_factor is None, i.e. 0, for SD 1.x / 2.x), and
`from_latents` undoes it before `decode`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import modelconfig
from sdjax.layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, activation, conv

_EPS = 1e-6  # every norm in the diffusers VAE


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config.json fields and defaults."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if tuple(self.down_block_types) != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"AutoencoderKL: down_block_types must be {n} x 'DownEncoderBlock2D', "
                             f"got {self.down_block_types}")
        if tuple(self.up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"AutoencoderKL: up_block_types must be {n} x 'UpDecoderBlock2D', got {self.up_block_types}")
        activation(self.act_fn)  # raises on an unsupported name

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, d: dict) -> "AutoencoderKLConfig":
        return modelconfig.from_dict(cls, d)

    def to_diffusers(self) -> dict:
        return {"_class_name": "AutoencoderKL", **modelconfig.to_dict(self)}

    @property
    def latent_scaling(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor), shift 0.0 when unset: what `to_latents` / `from_latents` take."""
        return float(self.scaling_factor), float(self.shift_factor or 0.0)


def vae_kwargs(config: AutoencoderKLConfig, kwargs: dict) -> dict:
    """The VAE's dtypes: float32 where the model asks for float16 and the VAE's config says `force_upcast` (diffusers'
    default, and what SD 1.x, 2.x and SDXL's VAEs ship with): their activations overflow float16's 65504 (SDXL's
    decoder gives NaN images), as diffusers upcasts them to decode. bfloat16 has float32's range and is kept; a VAE
    made for float16 (force_upcast false, e.g. SDXL's fp16-fix VAE) too. Used by every builder of a pipeline
    (sdjax.pretrained's loaders, sdjax.variants)."""
    if config.force_upcast and jnp.float16 in (kwargs.get("dtype"), kwargs.get("param_dtype")):
        return dict(kwargs, dtype=jnp.float32, param_dtype=jnp.float32)
    return kwargs


def to_latents(z, latent_scaling: tuple[float, float]):
    """The VAE's latents (posterior mean or sample) -> the diffusion model's: (z - shift) * scale.

    latent_scaling: (scaling_factor, shift_factor), e.g. `vae.config.latent_scaling`."""
    scale, shift = latent_scaling
    return (z - shift) * scale


def from_latents(latents, latent_scaling: tuple[float, float]):
    """The diffusion model's latents -> the VAE's (what `AutoencoderKL.decode` takes): latents / scale + shift."""
    scale, shift = latent_scaling
    return latents / scale + shift


# A cheap preview: RGB as a linear function of the diffusion model's latents, at latent resolution.
# For SD 1.x / 2.x (one VAE): rows = latent channels, columns = R, G, B in [-1, 1]; the least-squares fit of
# decoded colour on latents that Keturn published in 2022 ("Decoding latents to RGB without upscaling"), the
# factors of A1111's "Approx cheap" live preview.
SD_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def latent_rgb_map(vae) -> tuple[jax.Array, jax.Array]:
    """(weights (C, 3), bias (3,)) of `approx_decode` for `vae`'s latent space.

    SD's factors for the SD 1.x / 2.x latent space (4 channels, scaling_factor 0.18215, no shift). Any other VAE (one
    trained here, other channel counts) gets a map fitted on itself: 8 mosaics of 16 random colours (each tile 4 x 4
    latent pixels) encoded, and the least-squares fit of each latent pixel's colour on (its latents, 1), as SD's
    factors were fitted on decoded images. (Flat-colour images would not do: GroupNorm takes their colour away.)
    The fit runs wherever it is called (in the pipeline: inside its compiled program, one small encode)."""
    cfg = vae.config
    if cfg.latent_channels == 4 and cfg.scaling_factor == 0.18215 and not cfg.shift_factor:
        return jnp.asarray(SD_LATENT_RGB, jnp.float32), jnp.zeros(3, jnp.float32)
    tiles = np.random.default_rng(0).uniform(-1, 1, (8, 4, 4, 3)).astype(np.float32)
    colours = tiles.repeat(4, axis=1).repeat(4, axis=2)                   # (8, 16, 16, 3): one per latent pixel
    f = cfg.downsample_factor
    images = colours.repeat(f, axis=1).repeat(f, axis=2)
    mean, _ = vae.encode(jnp.asarray(images, vae.encoder.conv_in.kernel.dtype))
    latents = to_latents(mean.astype(jnp.float32), cfg.latent_scaling).reshape(-1, cfg.latent_channels)
    solution = jnp.linalg.lstsq(jnp.concatenate([latents, jnp.ones((len(latents), 1))], -1),
                                jnp.asarray(colours.reshape(-1, 3)))[0]
    return solution[:-1], solution[-1]


def approx_decode(vae, latents):
    """The diffusion model's latents (B, h, w, C) -> RGB (B, h, w, 3), roughly in [-1, 1], at latent resolution:
    a linear map per pixel (`latent_rgb_map`) instead of the decoder, for previews."""
    weights, bias = latent_rgb_map(vae)
    return jnp.einsum("...c,cr->...r", latents.astype(jnp.float32), weights) + bias


VARIANTS = {
    # SD 1.x / 2.x VAE (stabilityai/sd-vae-ft-mse and the VAE inside every SD 1.x / 2.x checkpoint).
    "sd": AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215),
    # A ~660k-parameter VAE (downsamples 2x) for tests and CPU demos.
    "tiny": AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64),
    # The offline shapes demo's VAE: 64 px images <-> 16x16x4 latents (downsamples 4x).
    "shapes": AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64),
}


class UNetMidBlock2D(nnx.Module):
    """resnets.0, then (attentions.0, resnets.1): the VAE's mid block, without time embedding."""

    def __init__(self, channels: int, *, groups: int, act_fn: str, add_attention: bool, attention_impl: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=None, groups=groups, eps=_EPS,
                          non_linearity=act_fn, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            # one head over all channels, GroupNorm first, biases, residual: diffusers' VAE attention
            [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=_EPS,
                       residual_connection=True, attention_impl=attention_impl, **kw)] if add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_downsample: bool, groups: int,
                 act_fn: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, non_linearity=act_fn, **kw)
            for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample2D(out_channels, padding=0, **kw)] if add_downsample else [])

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpDecoderBlock2D(nnx.Module):
    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, add_upsample: bool, groups: int,
                 act_fn: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          temb_channels=None, groups=groups, eps=_EPS, non_linearity=act_fn, **kw)
            for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample2D(out_channels, **kw)] if add_upsample else [])

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nnx.Module):
    """Image (B, H, W, in_channels) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block,
                               add_downsample=i < len(ch) - 1, groups=groups, act_fn=cfg.act_fn, **kw)
            for i in range(len(ch))])
        self.mid_block = UNetMidBlock2D(ch[-1], groups=groups, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, attention_impl=attention_impl, **kw)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=_EPS, **kw)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # diffusers' conv_act is always SiLU


class Decoder(nnx.Module):
    """Latent (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, attention_impl: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, padding=1, **kw)
        self.mid_block = UNetMidBlock2D(ch[0], groups=groups, act_fn=cfg.act_fn,
                                        add_attention=cfg.mid_block_add_attention, attention_impl=attention_impl, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], num_layers=cfg.layers_per_block + 1,
                             add_upsample=i < len(ch) - 1, groups=groups, act_fn=cfg.act_fn, **kw)
            for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps=_EPS, **kw)
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The Stable Diffusion VAE. `encode(x) -> (mean, logvar)`, `decode(z) -> x`, NHWC, in the compute dtype."""

    def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str = "einsum", rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(config, attention_impl=attention_impl, **kw)
        self.decoder = Decoder(config, attention_impl=attention_impl, **kw)
        c = config.latent_channels
        self.quant_conv = conv(2 * c, 2 * c, 1, padding=0, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv(c, c, 1, padding=0, **kw) if config.use_post_quant_conv else None

    def encode(self, x):
        """Images (B, H, W, 3) in [-1, 1] -> the posterior's (mean, logvar), each (B, H/8, W/8, latent_channels).

        logvar is clipped to [-30, 20] as diffusers' DiagonalGaussianDistribution does. The UNet's input
        is `to_latents(mean or sample_latent(...), config.latent_scaling)`.
        """
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """Unscaled latents (B, h, w, latent_channels) -> images (B, 8h, 8w, 3), roughly in [-1, 1].

        Latents from the UNet go through `from_latents(latents, config.latent_scaling)` first.
        """
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, rng=None):
        """Reconstruction of `x`: decode the posterior mean, or a sample from it when `rng` is given."""
        mean, logvar = self.encode(x)
        return self.decode(mean if rng is None else sample_latent(mean, logvar, rng))


def sample_latent(mean, logvar, rng):
    """A draw from the diagonal Gaussian posterior: mean + exp(0.5 * logvar) * eps."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps
