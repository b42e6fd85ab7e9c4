"""Original CompVis / A1111 / ComfyUI single-file checkpoints (SD 1.x, SD 2.x, SDXL) <-> diffusers state dicts.

    sd = read_checkpoint("v1-5-pruned-emaonly.safetensors")
    info = detect(sd)                                   # family, inpainting, architecture
    unet_sd, vae_sd, text_sd = to_diffusers(sd, info)   # diffusers / transformers keys, numpy
    unet_config_dict(info), vae_config_dict(info), text_config_dict(info)   # their config.json dicts

and back: `write_checkpoint(from_diffusers(unet_sd, vae_sd, text_sd, info), "model.safetensors")`, with
`info_from_configs(...)` describing a diffusers model. SDXL (`conditioner.embedders.*`) adds its second text
encoder, OpenCLIP ViT-bigG: to_diffusers gives (unet, vae, text, text_2), from_diffusers and info_from_configs take
text_2 too, text2_config_dict its config; the refiner has no first encoder (text None, text_num_layers 0). Pure
numpy; torch is imported only to read .ckpt.

What the tensors cannot tell, detection takes from the SD conventions (the diffusers configs of the
released models): SD 1.x UNets use 8 attention heads, SD 2.x and SDXL UNets a head dim of 64, all text encoders
a head dim of 64; GroupNorm has 32 groups; the VAE scaling factor is 0.18215 (SDXL: 0.13025); the prediction
type (epsilon or v) is left None; an SDXL file with both encoders is a base model (6 size ids), one with bigG alone a
refiner (5: the aesthetic score). A model that breaks these conventions needs a corrected `SingleFileInfo`
(`dataclasses.replace`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np

from sdjax.weights import ldm_layout as L
from sdjax.weights.diffusers_folder import read_torch_pickle
from sdjax.weights.safetensors_io import read_safetensors, write_safetensors

# Tensors of a training checkpoint that are no model weight (diffusion schedule buffers, EMA copies, ...).
_SCHEDULE_BUFFERS = {
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod", "logvar", "lvlb_weights",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
}
_IGNORED_PREFIXES = ("model_ema.",)
_IGNORED_SUFFIXES = (".position_ids",)
_UP = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
_WRITE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_ACT = {"sd1": "quick_gelu", "sd2": "gelu", "sdxl": "quick_gelu"}  # OpenAI CLIP-L vs OpenCLIP ViT-H (SDXL: ViT-L)


@dataclasses.dataclass(frozen=True)
class SingleFileInfo:
    """What a single file holds: family, inpainting, and the architecture numbers of its models."""
    family: str  # "sd1" (OpenAI CLIP text encoder) | "sd2" (OpenCLIP) | "sdxl" (both)
    unet_in_channels: int  # 4, or 9 for inpainting
    unet_out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    down_block_types: tuple[str, ...]
    transformer_layers_per_block: int | tuple[int, ...]  # one value, or one per level (SDXL: 1, 2, 10)
    cross_attention_dim: int
    attention_head_dim: int | tuple[int, ...]  # diffusers' name; it counts heads (SD1: 8, SD2: channels // 64)
    use_linear_projection: bool
    vae_in_channels: int
    vae_out_channels: int
    vae_block_out_channels: tuple[int, ...]
    vae_layers_per_block: int
    latent_channels: int
    text_vocab_size: int  # SD's text encoder, SDXL's ViT-L (all 0 for SDXL's refiner, which has none)
    text_hidden_size: int
    text_intermediate_size: int
    text_num_layers: int  # as diffusers counts them: SD 2.x drops OpenCLIP's last resblock
    text_num_heads: int
    text_max_positions: int
    prediction_type: str | None = None  # "epsilon" | "v_prediction"; a file does not say
    addition_embed_dim: int = 0  # SDXL: the UNet's added conditioning (pooled width + ids * addition_time_embed_dim)
    addition_time_embed_dim: int = 0
    text2_vocab_size: int = 0  # SDXL's OpenCLIP ViT-bigG, with its projection to text2_projection_dim
    text2_hidden_size: int = 0
    text2_intermediate_size: int = 0
    text2_num_layers: int = 0
    text2_num_heads: int = 0
    text2_max_positions: int = 0
    text2_projection_dim: int = 0


# ---------------------------------------------------------------------------------------------- files

def read_checkpoint(path, *, upcast_bfloat16: bool = True) -> dict[str, np.ndarray]:
    """The state dict of a .safetensors or .ckpt file (the ckpt's "state_dict"); .safetensors tensors are views of
    a memory map. bfloat16 becomes float32 unless `upcast_bfloat16=False` (load_pretrained casts each tensor
    once, straight to the parameter dtype)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd = read_safetensors(path)
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = read_torch_pickle(path)  # imports torch lazily, with a clear error when it is missing
    else:
        raise ValueError(f"{path}: not a checkpoint file; expected .safetensors or .ckpt")
    if not sd:
        raise ValueError(f"{path}: the checkpoint holds no tensors")
    if not upcast_bfloat16:
        return sd
    return {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in sd.items()}


def write_checkpoint(sd: dict[str, np.ndarray], path, *, dtype: str = "float32",
                     metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as .safetensors, floating-point tensors cast to `dtype` (float32, float16 or bfloat16),
    with optional string `metadata` in the header."""
    if Path(path).suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: write_checkpoint writes .safetensors only")
    if dtype not in _WRITE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_WRITE_DTYPES)}, got {dtype!r}")
    target = np.dtype(_WRITE_DTYPES[dtype])

    def cast(value):
        value = np.asarray(value)
        return value.astype(target) if value.dtype.kind == "f" or value.dtype.name == "bfloat16" else value

    write_safetensors({k: cast(v) for k, v in sd.items()}, path, metadata={"format": "pt", **(metadata or {})})


# ---------------------------------------------------------------------------------------------- detection

def _summary(keys) -> str:
    counts = Counter(".".join(k.split(".")[:2]) for k in keys)
    return ", ".join(f"{p}.* ({n})" for p, n in counts.most_common(8)) or "no tensors"


def _count(keys, pattern: str) -> int:
    """1 + the largest index captured by `pattern` over `keys` (0 if none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _normalize_clip_prefix(sd: dict) -> dict:
    """Old SD 1.x files store the CLIP text model without its `text_model.` level; add it back."""
    old = "cond_stage_model.transformer."
    if old + "embeddings.token_embedding.weight" not in sd:
        return sd
    return {(L.CLIP + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def _detect_unet(sd, family):
    U = L.UNET
    conv_in = sd[U + "input_blocks.0.0.weight"]
    levels = [[]]  # per level: has_attention for each of its resnets
    channels = []
    i = 1
    while True:
        if U + f"input_blocks.{i}.0.op.weight" in sd:
            levels.append([])
        elif U + f"input_blocks.{i}.0.in_layers.0.weight" in sd:
            if not levels[-1]:
                channels.append(sd[U + f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
            levels[-1].append(U + f"input_blocks.{i}.1.proj_in.weight" in sd)
        else:
            break
        i += 1
    if not channels or any(len(lv) != len(levels[0]) or len(set(lv)) != 1 for lv in levels):
        raise ValueError(f"unsupported UNet layout: resnets with attention per level {levels}")
    if U + "middle_block.1.proj_in.weight" not in sd:
        raise ValueError("unsupported UNet layout: the mid block has no attention")
    if family != "sd1" and any(c % 64 for c in channels):
        raise ValueError(f"{family} UNet channels {channels} are not multiples of the head dim 64")
    proj_in = sd[U + "middle_block.1.proj_in.weight"]
    return dict(
        unet_in_channels=int(conv_in.shape[1]), unet_out_channels=int(sd[U + "out.2.weight"].shape[0]),
        block_out_channels=tuple(int(c) for c in channels), layers_per_block=len(levels[0]),
        down_block_types=tuple("CrossAttnDownBlock2D" if lv[0] else "DownBlock2D" for lv in levels),
        transformer_layers_per_block=_transformer_depths(sd, [lv[0] for lv in levels], len(levels[0])),
        cross_attention_dim=int(sd[U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        attention_head_dim=8 if family == "sd1" else tuple(int(c) // 64 for c in channels),
        use_linear_projection=proj_in.ndim == 2)


def _transformer_depths(sd, attention: list[bool], per_level: int) -> int | tuple[int, ...]:
    """diffusers' transformer_layers_per_block: one value when every attention (and the mid block's) has the same
    number of transformer blocks, else one per level, the mid block's last (a level without attention gets 1, or
    the mid block's when it is the last). Every attention of a level must have that level's count."""
    U = L.UNET

    def depth(block: str) -> int:
        return _count(sd, re.escape(U + block) + r"\.transformer_blocks\.(\d+)\.norm1\.weight$")

    mid = depth("middle_block.1")
    levels = [depth(f"input_blocks.{1 + level * (per_level + 1)}.1") if has else None
              for level, has in enumerate(attention)]
    attention_block = re.compile(re.escape(U) + r"((?:in|out)put_blocks\.\d+)\.1\.transformer_blocks\.0\.norm1")
    found = {depth(f"{m.group(1)}.1") for k in sd if (m := attention_block.match(k))}
    if not found <= {d for d in levels if d} | {mid}:
        raise ValueError(f"unsupported UNet layout: transformer depths {sorted(found)} do not follow the levels' "
                         f"{levels}")
    if all(d in (None, mid) for d in levels):
        return mid
    if levels[-1] not in (None, mid):
        raise ValueError(f"unsupported UNet layout: the mid block has {mid} transformer blocks, the last level "
                         f"{levels[-1]}")
    return tuple(d or 1 for d in levels[:-1]) + (mid,)


def _detect_vae(sd):
    V = L.VAE
    levels = _count(sd, re.escape(V) + r"encoder\.down\.(\d+)\.")
    n = _count(sd, re.escape(V) + r"encoder\.down\.0\.block\.(\d+)\.")
    return dict(
        vae_in_channels=int(sd[V + "encoder.conv_in.weight"].shape[1]),
        vae_out_channels=int(sd[V + "decoder.conv_out.weight"].shape[0]),
        vae_block_out_channels=tuple(int(sd[V + f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
                                     for i in range(levels)),
        vae_layers_per_block=n, latent_channels=int(sd[V + "post_quant_conv.weight"].shape[0]))


def _detect_text(sd, family, prefix: str | None = None, field: str = "text"):
    """The `field`_* numbers of the text encoder at `prefix`: transformers' CLIP layout (sd1, SDXL's ViT-L) or
    OpenCLIP's (sd2 drops its last resblock as diffusers does; SDXL's bigG keeps them all and adds its projection)."""
    open_clip = family == "sd2" or field == "text2"
    if not open_clip:
        P = prefix or L.CLIP
        tokens, positions = sd[P + "embeddings.token_embedding.weight"], sd[P + "embeddings.position_embedding.weight"]
        layers = _count(sd, re.escape(P) + r"encoder\.layers\.(\d+)\.")
        intermediate = sd[P + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    else:
        P = prefix or L.OPEN_CLIP
        tokens, positions = sd[P + "token_embedding.weight"], sd[P + "positional_embedding"]
        layers = _count(sd, re.escape(P) + r"transformer\.resblocks\.(\d+)\.") - (family == "sd2")
        intermediate = sd[P + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    hidden = int(tokens.shape[1])
    out = {"vocab_size": int(tokens.shape[0]), "hidden_size": hidden, "intermediate_size": int(intermediate),
           "num_layers": layers, "num_heads": max(hidden // 64, 1), "max_positions": int(positions.shape[0])}
    if field == "text2":
        out["projection_dim"] = int(sd[P + "text_projection"].shape[1])
    return {f"{field}_{k}": v for k, v in out.items()}


def _detect_sdxl(sd) -> SingleFileInfo:
    """An SDXL base (ViT-L and bigG) or refiner (bigG alone) file."""
    has_clip_l = L.SDXL_CLIP + "embeddings.token_embedding.weight" in sd
    bigg = L.sdxl_open_clip(has_clip_l)
    required = {"UNet": L.UNET + "input_blocks.0.0.weight", "VAE": L.VAE + "encoder.conv_in.weight",
                "OpenCLIP ViT-bigG text encoder": bigg + "text_projection",
                "added conditioning (label_emb)": L.UNET + "label_emb.0.0.weight"}
    missing = [name for name, key in required.items() if key not in sd]
    if missing:
        raise ValueError(f"not an SDXL single file sdjax knows: no {', '.join(missing)} (looked for "
                         f"{', '.join(required.values())}); found {_summary(sd)}")
    try:
        text = _detect_text(sd, "sdxl", L.SDXL_CLIP) if has_clip_l else _text_fields(None, "text")
        info = SingleFileInfo(family="sdxl", **_detect_unet(sd, "sdxl"), **_detect_vae(sd), **text,
                              **_detect_text(sd, "sdxl", bigg, "text2"))
    except KeyError as e:
        raise ValueError(f"incomplete SDXL checkpoint: tensor {e.args[0]} is missing") from None
    added = int(sd[L.UNET + "label_emb.0.0.weight"].shape[1])
    ids = 6 if has_clip_l else 5  # the base's sizes and crop, the refiner's with the aesthetic score
    per_id, left = divmod(added - info.text2_projection_dim, ids)
    if left or per_id <= 0:
        raise ValueError(f"the UNet's added conditioning takes {added} features: not the pooled embedding "
                         f"({info.text2_projection_dim}) + {ids} size ids of equal width")
    context = info.text_hidden_size + info.text2_hidden_size
    if info.cross_attention_dim != context:
        raise ValueError(f"the UNet cross-attends to width {info.cross_attention_dim} but the text encoders give "
                         f"{context}")
    return dataclasses.replace(info, addition_embed_dim=added, addition_time_embed_dim=per_id)


def detect(sd: dict[str, np.ndarray]) -> SingleFileInfo:
    """Family (sd1 / sd2), inpainting and architecture of a CompVis single-file state dict."""
    sd = _normalize_clip_prefix(sd)
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return _detect_sdxl(sd)
    required = {"UNet": L.UNET + "input_blocks.0.0.weight", "VAE": L.VAE + "encoder.conv_in.weight"}
    if L.OPEN_CLIP + "token_embedding.weight" in sd:
        family = "sd2"
    elif L.CLIP + "embeddings.token_embedding.weight" in sd:
        family = "sd1"
    else:
        family = None
    missing = [name for name, key in required.items() if key not in sd] + ([] if family else ["text encoder"])
    if missing:
        raise ValueError(f"not a Stable Diffusion 1.x / 2.x single file: no {', '.join(missing)} "
                         f"(looked for {L.UNET}*, {L.VAE}*, {L.CLIP}* or {L.OPEN_CLIP}*); found {_summary(sd)}")
    for marker in ("label_emb.", "input_hint_block."):
        if any(k.startswith(L.UNET + marker) for k in sd):
            raise ValueError(f"unsupported UNet variant ({L.UNET}{marker}*: upscaler / unCLIP / ControlNet)")
    try:
        info = SingleFileInfo(family=family, **_detect_unet(sd, family), **_detect_vae(sd), **_detect_text(sd, family))
    except KeyError as e:
        raise ValueError(f"incomplete {family} checkpoint: tensor {e.args[0]} is missing") from None
    if info.unet_in_channels not in (4, 9):
        raise ValueError(f"unsupported UNet with {info.unet_in_channels} input channels (4, or 9 for inpainting)")
    if info.cross_attention_dim != info.text_hidden_size:
        raise ValueError(f"the UNet cross-attends to width {info.cross_attention_dim} but the text encoder is "
                         f"{info.text_hidden_size} wide")
    return info


# SingleFileInfo's text_* / text2_* numbers and the transformers CLIPTextConfig fields they are
_TEXT_CONFIG_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                     "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                     "max_positions": "max_position_embeddings"}


def _text_fields(config: dict | None, field: str) -> dict:
    """The `field`_* numbers of a text encoder's config.json (all 0 for none: SDXL's refiner has no first encoder)."""
    keys = dict(_TEXT_CONFIG_KEYS, **({"projection_dim": "projection_dim"} if field == "text2" else {}))
    return {f"{field}_{k}": config[v] if config is not None else 0 for k, v in keys.items()}


def _clip_config(info: SingleFileInfo, field: str, *, architecture: str, hidden_act: str, projection_dim: int) -> dict:
    """transformers' config.json of the text encoder whose numbers are info's `field`_* (token ids as in the released
    SD configs)."""
    return {"architectures": [architecture], "model_type": "clip_text_model", "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "hidden_act": hidden_act,
            "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
            "projection_dim": projection_dim,
            **{v: getattr(info, f"{field}_{k}") for k, v in _TEXT_CONFIG_KEYS.items()}}


def info_from_configs(unet_config: dict, vae_config: dict, text_config: dict | None,
                      text_2_config: dict | None = None) -> SingleFileInfo:
    """The SingleFileInfo of a diffusers model, from its config.json dicts (to write it as a single file): SDXL's
    gives its second text encoder's too (and no first one for the refiner)."""
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    family = "sdxl" if sdxl else {v: k for k, v in _ACT.items() if k != "sdxl"}.get((text_config or {}).get("hidden_act"))
    if family is None:
        raise ValueError(f"text encoder hidden_act {(text_config or {}).get('hidden_act')!r}: expected quick_gelu "
                         "(SD 1.x) or gelu (SD 2.x OpenCLIP)")
    if sdxl and text_2_config is None:
        raise ValueError("an SDXL UNet needs its second text encoder's config (text_2_config)")
    down = tuple(unet_config["down_block_types"])
    if tuple(unet_config["up_block_types"]) != tuple(_UP.get(t, t) for t in reversed(down)):
        raise ValueError(f"UNet up_block_types {unet_config['up_block_types']} do not mirror {down}")
    depth = unet_config.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        depth = tuple(depth)
        if not all(isinstance(d, int) for d in depth) or len(depth) != len(down):
            raise ValueError(f"transformer_layers_per_block {depth}: a single file stores one value or one per level")
    heads = unet_config["attention_head_dim"]
    extra = {}
    if sdxl:
        extra = dict(addition_embed_dim=unet_config["projection_class_embeddings_input_dim"],
                     addition_time_embed_dim=unet_config["addition_time_embed_dim"],
                     **_text_fields(text_2_config, "text2"))
    return SingleFileInfo(**extra,
        family=family, unet_in_channels=unet_config["in_channels"], unet_out_channels=unet_config["out_channels"],
        block_out_channels=tuple(unet_config["block_out_channels"]), layers_per_block=unet_config["layers_per_block"],
        down_block_types=down, transformer_layers_per_block=depth,
        cross_attention_dim=unet_config["cross_attention_dim"],
        attention_head_dim=tuple(heads) if isinstance(heads, (list, tuple)) else heads,
        use_linear_projection=bool(unet_config.get("use_linear_projection", False)),
        vae_in_channels=vae_config["in_channels"], vae_out_channels=vae_config["out_channels"],
        vae_block_out_channels=tuple(vae_config["block_out_channels"]), vae_layers_per_block=vae_config["layers_per_block"],
        latent_channels=vae_config["latent_channels"], **_text_fields(text_config, "text"))


def unet_config_dict(info: SingleFileInfo) -> dict:
    """diffusers UNet2DConditionModel config.json for the detected model."""
    config = {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": _jsonable(info.attention_head_dim),
        "block_out_channels": list(info.block_out_channels), "center_input_sample": False,
        "cross_attention_dim": info.cross_attention_dim, "down_block_types": list(info.down_block_types),
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": info.unet_in_channels,
        "layers_per_block": info.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
        "norm_num_groups": 32, "out_channels": info.unet_out_channels,
        # the default image size only: 768 px for SD 2.x as diffusers assumes (2.x-base and inpainting: 512)
        "sample_size": 128 if info.family == "sdxl" else 96 if info.family == "sd2" and info.unet_in_channels == 4
        else 64,
        "up_block_types": [_UP[t] for t in reversed(info.down_block_types)],
        "use_linear_projection": info.use_linear_projection,
        # SD 2.1 ships upcast_attention=True (fp16 overflow); it changes nothing in fp32
        "upcast_attention": info.family == "sd2",
    }
    if info.transformer_layers_per_block != 1:
        config["transformer_layers_per_block"] = _jsonable(info.transformer_layers_per_block)
    if info.family == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=info.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=info.addition_embed_dim)
    return config


def vae_config_dict(info: SingleFileInfo) -> dict:
    """diffusers AutoencoderKL config.json for the detected model."""
    levels = len(info.vae_block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(info.vae_block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels, "in_channels": info.vae_in_channels,
        "latent_channels": info.latent_channels, "layers_per_block": info.vae_layers_per_block,
        "norm_num_groups": 32, "out_channels": info.vae_out_channels,
        "sample_size": 1024 if info.family == "sdxl" else 768 if info.family == "sd2" and info.unet_in_channels == 4
        else 512,
        "scaling_factor": 0.13025 if info.family == "sdxl" else 0.18215, "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_config_dict(info: SingleFileInfo) -> dict | None:
    """transformers CLIPTextModel config.json for the detected model (token ids as in the released SD configs);
    None for SDXL's refiner, which has no first text encoder."""
    if not info.text_num_layers:
        return None
    return _clip_config(info, "text", architecture="CLIPTextModel", hidden_act=_ACT[info.family],
                        projection_dim=512 if info.family == "sd2" else info.text_hidden_size)


def text2_config_dict(info: SingleFileInfo) -> dict | None:
    """transformers CLIPTextModelWithProjection config.json of SDXL's OpenCLIP ViT-bigG (None for SD 1.x / 2.x)."""
    if info.family != "sdxl":
        return None
    return _clip_config(info, "text2", architecture="CLIPTextModelWithProjection", hidden_act="gelu",
                        projection_dim=info.text2_projection_dim)


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------- conversion

def _ignored(key: str, info: SingleFileInfo) -> bool:
    if key in _SCHEDULE_BUFFERS or key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
        return True
    if info.family == "sdxl":  # OpenCLIP's contrastive temperature: no part of SDXL
        return key == L.sdxl_open_clip(info.text_num_layers > 0) + "logit_scale"
    # OpenCLIP parts diffusers' SD 2.x text encoder has no use for: the last resblock, the projection head
    return info.family == "sd2" and (
        key in (L.OPEN_CLIP + "text_projection", L.OPEN_CLIP + "logit_scale")
        or key.startswith(f"{L.OPEN_CLIP}transformer.resblocks.{info.text_num_layers}."))


def _mismatch(what: str, missing: list[str], unexpected: list[str]) -> ValueError:
    lines = [f"{what} does not match the detected architecture:"]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            lines.append(f"  {name} tensors ({len(keys)}): {', '.join(keys[:20])}" + (" ..." if len(keys) > 20 else ""))
    return ValueError("\n".join(lines))


def to_diffusers(sd: dict[str, np.ndarray], info: SingleFileInfo):
    """(unet_sd, vae_sd, text_sd) with diffusers / transformers keys (text keys `text_model.*`); SDXL: (unet_sd,
    vae_sd, text_sd or None for the refiner, text_2_sd), text_2_sd with its `text_projection.weight`."""
    sd = _normalize_clip_prefix(sd)
    out = {"unet": {}, "vae": {}, "text": {}, "text_2": {}}
    used, missing = set(), []
    for e in L.layout(info):
        if e.ldm not in sd:
            missing.append(e.ldm)
            continue
        used.add(e.ldm)
        value = np.asarray(sd[e.ldm])
        if e.transform == "conv1x1" and value.ndim == 4:
            value = value[:, :, 0, 0]
        if e.transform == "T":
            value = value.T
        parts = np.split(value, 3, axis=0) if e.transform == "qkv" else [value]
        for key, part in zip(e.diffusers, parts):
            out[e.component][key] = part
    unexpected = sorted(k for k in sd if k not in used and not _ignored(k, info))
    if missing or unexpected:
        raise _mismatch(f"{info.family} single-file checkpoint", missing, unexpected)
    if info.family == "sdxl":
        return out["unet"], out["vae"], out["text"] or None, out["text_2"]
    return out["unet"], out["vae"], out["text"]


def from_diffusers(unet_sd: dict, vae_sd: dict, text_sd: dict | None, info: SingleFileInfo,
                   text_2_sd: dict | None = None) -> dict[str, np.ndarray]:
    """The CompVis single-file state dict of a diffusers model (text keys with or without `text_model.`); SDXL's
    with its second text encoder's state dict (`text_projection.weight` beside the text model)."""
    def prefixed(text):
        return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
                for k, v in (text or {}).items()}

    sources = {"unet": unet_sd, "vae": vae_sd, "text": prefixed(text_sd), "text_2": prefixed(text_2_sd)}
    used = {name: set() for name in sources}
    out, missing = {}, []
    for e in L.layout(info):
        src = sources[e.component]
        absent = [f"{e.component}:{k}" for k in e.diffusers if k not in src]
        if absent:
            missing += absent
            continue
        used[e.component].update(e.diffusers)
        values = [np.asarray(src[k]) for k in e.diffusers]
        if e.transform == "qkv":
            out[e.ldm] = np.concatenate(values, axis=0)
        elif e.transform == "T":
            out[e.ldm] = np.ascontiguousarray(values[0].T)
        elif e.transform == "conv1x1":
            out[e.ldm] = values[0][:, :, None, None]
        else:
            out[e.ldm] = values[0]
    unexpected = sorted(f"{name}:{k}" for name, src in sources.items() for k in src
                        if k not in used[name] and not k.endswith(_IGNORED_SUFFIXES))
    if missing or unexpected:
        raise _mismatch("diffusers state dicts", missing, unexpected)
    if info.family == "sd2":
        out.update(_open_clip_extras(info, out[L.OPEN_CLIP + "token_embedding.weight"].dtype))
    if info.family == "sdxl":  # as the released files have it
        bigg = L.sdxl_open_clip(info.text_num_layers > 0)
        out[bigg + "logit_scale"] = np.asarray(math.log(1 / 0.07), out[bigg + "token_embedding.weight"].dtype)
    return out


def _open_clip_extras(info: SingleFileInfo, dtype) -> dict[str, np.ndarray]:
    """The OpenCLIP tensors a diffusers SD 2.x text encoder does not have, written so the file has the real layout.

    diffusers' from_single_file needs none of them (it skips resblocks.23 and text_projection by name and
    would otherwise size its q/k/v split by text_projection's first dim, so it must be width-sized), but the
    SD 2.x layout has 24 resblocks, a text_projection and a logit_scale, and A1111 / ComfyUI / ldm build
    that model. The last resblock is written as an exact identity (zero attention out_proj and MLP c_proj,
    so x + 0 + 0 = x): every reader then gets the same features, whether it takes the penultimate layer
    (ldm, A1111, ComfyUI for SD 2.x) or the last layer, and equal to diffusers' 23-layer encoder. The
    projection is the identity and logit_scale OpenCLIP's initial log(1 / 0.07); SD never uses either.
    """
    w, f = info.text_hidden_size, info.text_intermediate_size
    block = f"{L.OPEN_CLIP}transformer.resblocks.{info.text_num_layers}."
    shapes = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
              "attn.out_proj.bias": (w,), "ln_1.bias": (w,), "ln_2.bias": (w,), "mlp.c_fc.weight": (f, w),
              "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (w, f), "mlp.c_proj.bias": (w,)}
    out = {block + name: np.zeros(shape, dtype) for name, shape in shapes.items()}
    out[block + "ln_1.weight"] = np.ones((w,), dtype)
    out[block + "ln_2.weight"] = np.ones((w,), dtype)
    out[L.OPEN_CLIP + "text_projection"] = np.eye(w, dtype=dtype)
    out[L.OPEN_CLIP + "logit_scale"] = np.asarray(math.log(1 / 0.07), dtype)
    return out
