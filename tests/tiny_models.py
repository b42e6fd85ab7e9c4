"""Tiny random PyTorch reference models (diffusers / transformers) for parity and conversion tests.

Every builder is deterministic (its own torch seed) and perturbs every parameter with noise, so
zero-initialised biases and unit norm scales are non-trivial. The tiny models follow the SD
conventions that cannot be read from tensors (see sdjax.weights.single_file): SD 1.x UNets use 8
attention heads, SD 2.x UNets and both CLIP text encoders use a head dim of 64, GroupNorm has 32
groups (16 in the UNet of the train and sampling runs' folder, which travels as a diffusers folder), and an SD 2.x
text encoder has 23 layers (OpenCLIP's 24 minus the last, as in diffusers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_HIDDEN = 128  # 2 heads of 64
SD1_UNET = dict(block_out_channels=(32, 64, 64), attention_head_dim=8, use_linear_projection=False)
SD2_UNET = dict(block_out_channels=(64, 128, 128), attention_head_dim=(1, 2, 2), use_linear_projection=True,
                upcast_attention=True)
SD2_TEXT_LAYERS = 23
SDXL_G_HIDDEN = 192  # the tiny ViT-bigG stand-in's width, 3 heads of 64 (1280 in SDXL); not CLIP_HIDDEN: diffusers'
# from_single_file tells SDXL's two encoders apart by their widths
SDXL_POOLED = 64  # the tiny ViT-bigG stand-in's projection width (1280 in SDXL)
SDXL_TIME_DIM = 8  # Fourier features per size/crop id (256 in SDXL)


def perturb_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add deterministic Gaussian noise to every parameter, in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model.eval()


def _unet(arch: dict, *, in_channels: int, sample_size: int, seed: int, layers_per_block: int = 2, levels: int = 3,
          norm_num_groups: int = 32):
    """SD's layout (cross-attention blocks, then one without) over `levels` resolutions (3, or 2: the first two).
    norm_num_groups=16 gives every GroupNorm of the tiny UNet two channels per group: with one (32 groups of a
    32-channel level) the norm erases the bias of the conv before it and the time embedding added there, whose
    gradients are then round-off that Adam (eps 1e-8) turns into +-lr steps, different on another device layout."""
    from diffusers import UNet2DConditionModel

    if levels not in (2, 3):
        raise ValueError(f"levels must be 2 or 3, got {levels}")
    arch = {k: v[:levels] if isinstance(v, tuple) else v for k, v in arch.items()}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=CLIP_HIDDEN, norm_num_groups=norm_num_groups, **arch)
    return perturb_(unet, seed)


def tiny_unet_sd1(in_channels: int = 4, **layout):
    """SD 1.x style: 8 heads, conv proj_in/proj_out, cross-attention dim = the tiny CLIP width; layout: _unet's."""
    return _unet(SD1_UNET, in_channels=in_channels, sample_size=64, seed=1, **layout)


def tiny_unet_sd2(in_channels: int = 4, **layout):
    """SD 2.x style: head dim 64 (per-block head counts), linear proj_in/proj_out, attention upcast."""
    return _unet(SD2_UNET, in_channels=in_channels, sample_size=96 if in_channels == 4 else 64, seed=2, **layout)


def tiny_unet_inpaint(family: str = "sd1"):
    """The 9-channel inpainting UNet (latents + mask + masked-image latents)."""
    return tiny_unet_sd1(in_channels=9) if family == "sd1" else tiny_unet_sd2(in_channels=9)


def tiny_vae(sample_size: int = 512):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=sample_size, scaling_factor=0.18215)
    return perturb_(vae, 3)


def tiny_clip(hidden_act: str = "quick_gelu", num_hidden_layers: int | None = None, vocab_size: int | None = None,
              with_projection: bool = False):
    """transformers CLIPTextModel; quick_gelu is OpenAI CLIP (SD 1.x), gelu is OpenCLIP (SD 2.x). with_projection:
    CLIPTextModelWithProjection, SDXL's second encoder (SDXL_G_HIDDEN wide, a bias-free text_projection to
    SDXL_POOLED)."""
    import transformers

    if num_hidden_layers is None:
        num_hidden_layers = SD2_TEXT_LAYERS if hidden_act == "gelu" else 2
    # projection_dim: no layer of a plain text model, so single-file detection assumes SD's (ViT-H 512, ViT-L its width)
    projection_dim = SDXL_POOLED if with_projection else 512 if hidden_act == "gelu" else CLIP_HIDDEN
    hidden = SDXL_G_HIDDEN if with_projection else CLIP_HIDDEN
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size or 49408, hidden_size=hidden, intermediate_size=256,
        num_hidden_layers=num_hidden_layers, num_attention_heads=hidden // 64, max_position_embeddings=77,
        hidden_act=hidden_act, projection_dim=projection_dim, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1)
    seed = 6 if with_projection else 4 if hidden_act == "quick_gelu" else 5
    torch.manual_seed(6 if with_projection else 4)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return perturb_(cls(config), seed)


def tiny_tokenizer_files(folder) -> Path:
    """Write the real CLIP vocab.json and merges.txt (from the built-in tokenizer) into `folder`; returns it."""
    from sdjax.tokenizer import default_tokenizer

    default_tokenizer().save(folder)
    return Path(folder)


def tiny_tokenizer(folder, family: str = "sd1"):
    """transformers CLIPTokenizer on the real CLIP vocabulary (SD 2.x pads with "!", SD 1.x with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    folder = tiny_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token="!" if family == "sd2" else "<|endoftext|>")


def tiny_pipeline(tmp, family: str = "sd1", inpaint: bool = False, **layout):
    """A StableDiffusionPipeline of tiny random models (no safety checker). The UNet's layout (_unet's arguments):
    layers_per_block=1 (a UNet of ~2/3 the layers, ~30% quicker to compile) and levels=2 (two resolutions, not
    three: a train step compiles in 2/3 of the time again) are for tests of what runs the model, not of how its
    weights are named."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1' or 'sd2', got {family!r}")
    in_channels = 9 if inpaint else 4
    unet = (tiny_unet_sd1 if family == "sd1" else tiny_unet_sd2)(in_channels, **layout)
    vae = tiny_vae(768 if family == "sd2" and not inpaint else 512)
    text_encoder = tiny_clip("quick_gelu" if family == "sd1" else "gelu")
    tokenizer = tiny_tokenizer(Path(tmp) / "tokenizer_files", family)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_diffusers_folder(tmp, family: str = "sd1", inpaint: bool = False, **layout) -> Path:
    """Save a tiny StableDiffusionPipeline (layout: its UNet's, as tiny_pipeline) as a diffusers folder under `tmp`;
    returns its path."""
    path = Path(tmp) / f"tiny-{family}{'-inpaint' if inpaint else ''}"
    tiny_pipeline(tmp, family, inpaint, **layout).save_pretrained(str(path), safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------------------- SDXL


def tiny_unet_sdxl(refiner: bool = False, in_channels: int = 4, depth: int = 1):
    """SDXL's UNet layout, tiny: a plain first level, then cross-attention with `depth` transformer layers (head dim 64,
    32 GroupNorm groups, as SDXL: what a single file's tensors do not say), linear projections, the added text_time
    conditioning (the pooled embedding + 6 ids, or the refiner's 5); 9 input channels for SDXL's inpainting UNet;
    `depth` > 1 gives the transformer blocks a second layer (SDXL's are 2 and 10 deep; one compiles faster)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    cross = SDXL_G_HIDDEN + (0 if refiner else CLIP_HIDDEN)  # the refiner: the second encoder's context alone
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, depth), attention_head_dim=(1, 2), use_linear_projection=True,
        cross_attention_dim=cross, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED + (5 if refiner else 6) * SDXL_TIME_DIM)
    return perturb_(unet, 7 + refiner)


def tiny_sdxl_pipeline(tmp, refiner: bool = False, inpaint: bool = False, text_layers: int = 3, depth: int = 1):
    """diffusers' StableDiffusionXLPipeline (or, refiner=True, StableDiffusionXLImg2ImgPipeline with the second
    encoder only and aesthetic-score conditioning; inpaint=True, StableDiffusionXLInpaintPipeline with a 9-channel
    UNet) of tiny random models: a 3-layer CLIP ViT-L stand-in, the projection encoder above, SDXL's VAE scaling
    factor (0.13025), Euler discrete as SDXL ships. text_layers, depth: fewer layers (a smaller program to compile)."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                           StableDiffusionXLPipeline)

    vae = tiny_vae(1024)
    vae.register_to_config(scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    tokenizer_2 = tiny_tokenizer(Path(tmp) / "tokenizer_2_files", "sd2")  # pads with "!", as OpenCLIP
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=tiny_clip("gelu", text_layers, with_projection=True),
            tokenizer=None, tokenizer_2=tokenizer_2, unet=tiny_unet_sdxl(refiner=True, depth=depth), scheduler=scheduler,
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    return cls(
        vae=vae, text_encoder=tiny_clip("quick_gelu", num_hidden_layers=text_layers),
        text_encoder_2=tiny_clip("gelu", text_layers, with_projection=True),
        tokenizer=tiny_tokenizer(Path(tmp) / "tokenizer_files"), tokenizer_2=tokenizer_2,
        unet=tiny_unet_sdxl(in_channels=9 if inpaint else 4, depth=depth), scheduler=scheduler,
        force_zeros_for_empty_prompt=True)
