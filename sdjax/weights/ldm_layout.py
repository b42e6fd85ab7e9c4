"""The key-by-key correspondence between CompVis (ldm / A1111) single files and diffusers state dicts.

`layout(info)` lists one `Entry` per tensor of the original checkpoint: its CompVis key, the diffusers
key(s) it becomes and how the tensor changes shape on the way:
  ""        same tensor,
  "conv1x1" VAE attention projections: ldm 1x1 conv (out, in, 1, 1) <-> diffusers Linear (out, in),
  "qkv"     OpenCLIP fused attn.in_proj (3 * width, ...) <-> transformers q_proj, k_proj, v_proj,
  "T"       OpenCLIP's text_projection (width, out), applied as x @ P <-> a Linear weight (out, width).
`info` is a `sdjax.weights.single_file.SingleFileInfo` (only its architecture numbers are read).

SDXL files keep the UNet and VAE where SD does and put the text encoders under `conditioner.embedders.N.`: the base's
CLIP ViT-L as transformers names it (N = 0) and OpenCLIP ViT-bigG (N = 1, with its text_projection, all layers);
the refiner has the bigG encoder alone (N = 0). Its UNet's `label_emb` is diffusers' add_embedding.
"""
from __future__ import annotations

from typing import NamedTuple

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."  # SD 1.x: transformers CLIPTextModel inside ldm
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H text tower
SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."  # SDXL base: CLIP ViT-L


def sdxl_open_clip(has_clip_l: bool) -> str:
    """Where an SDXL file keeps OpenCLIP ViT-bigG: embedder 1 beside ViT-L (base), else embedder 0 (refiner)."""
    return f"conditioner.embedders.{1 if has_clip_l else 0}.model."


class Entry(NamedTuple):
    component: str  # "unet" | "vae" | "text"
    ldm: str
    diffusers: tuple[str, ...]
    transform: str = ""


_WB = ("weight", "bias")
_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def _pair(component, ldm, diffusers, leaves=_WB, transform=""):
    return [Entry(component, f"{ldm}.{leaf}", (f"{diffusers}.{leaf}",), transform) for leaf in leaves]


def _unet_resnet(ldm, diffusers, c_in, c_out):
    out = [e for a, b in _UNET_RESNET for e in _pair("unet", f"{UNET}{ldm}.{a}", f"{diffusers}.{b}")]
    if c_in != c_out:
        out += _pair("unet", f"{UNET}{ldm}.skip_connection", f"{diffusers}.conv_shortcut")
    return out


def _unet_transformer(ldm, diffusers, depth):
    """A SpatialTransformer / Transformer2DModel: the inner names are the same on both sides."""
    names = ["norm", "proj_in", "proj_out"]
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        names += [f"{block}.norm1", f"{block}.norm2", f"{block}.norm3", f"{block}.ff.net.0.proj", f"{block}.ff.net.2",
                  f"{block}.attn1.to_out.0", f"{block}.attn2.to_out.0"]
    out = [e for n in names for e in _pair("unet", f"{UNET}{ldm}.{n}", f"{diffusers}.{n}")]
    for k in range(depth):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):  # no bias
                n = f"transformer_blocks.{k}.{attn}.{proj}"
                out += _pair("unet", f"{UNET}{ldm}.{n}", f"{diffusers}.{n}", ("weight",))
    return out


def transformer_depths(info) -> tuple[int, ...]:
    """Transformer blocks per attention of each level (diffusers' transformer_layers_per_block, one value or one
    per level); the mid block has the last level's."""
    depth = info.transformer_layers_per_block
    return tuple(depth) if isinstance(depth, (tuple, list)) else (depth,) * len(info.block_out_channels)


def unet_layout(info) -> list[Entry]:
    ch, n = info.block_out_channels, info.layers_per_block
    levels, depths = len(ch), transformer_depths(info)
    attention = [t.startswith("CrossAttn") for t in info.down_block_types]
    out = []
    for ldm, diffusers in (("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                           ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")):
        out += _pair("unet", UNET + ldm, diffusers)
    # SDXL (a SingleFileInfo's addition_embed_dim, a UNetConfig's text_time): the pooled text embedding + size ids
    if getattr(info, "addition_embed_dim", 0) or getattr(info, "addition_embed_type", None) == "text_time":
        out += _pair("unet", UNET + "label_emb.0.0", "add_embedding.linear_1")
        out += _pair("unet", UNET + "label_emb.0.2", "add_embedding.linear_2")
    skips, c_in = [ch[0]], ch[0]  # channels of every input block, popped by the output blocks
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            out += _unet_resnet(f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", c_in, ch[level])
            c_in = ch[level]
            if attention[level]:
                out += _unet_transformer(f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", depths[level])
            skips.append(c_in)
        if level < levels - 1:
            i = 1 + level * (n + 1) + n
            out += _pair("unet", f"{UNET}input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            skips.append(c_in)
    out += _unet_resnet("middle_block.0", "mid_block.resnets.0", ch[-1], ch[-1])
    out += _unet_transformer("middle_block.1", "mid_block.attentions.0", depths[-1])
    out += _unet_resnet("middle_block.2", "mid_block.resnets.1", ch[-1], ch[-1])
    for u in range(levels):  # diffusers' up block u is ldm level levels-1-u
        level = levels - 1 - u
        for j in range(n + 1):
            i = u * (n + 1) + j
            out += _unet_resnet(f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}", c_in + skips.pop(), ch[level])
            c_in = ch[level]
            sub = 1
            if attention[level]:
                out += _unet_transformer(f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}", depths[level])
                sub = 2
            if level > 0 and j == n:
                out += _pair("unet", f"{UNET}output_blocks.{i}.{sub}.conv", f"up_blocks.{u}.upsamplers.0.conv")
    return out


def unet_module_paths(config) -> dict[str, str]:
    """{original (ldm / sgm) module path: diffusers module path} of every UNet layer with weights, for a UNet config
    (sdjax's UNetConfig or a SingleFileInfo): the names kohya's SDXL LoRA files use."""
    out = {}
    for e in unet_layout(config):
        out[e.ldm[len(UNET):].rsplit(".", 1)[0]] = e.diffusers[0].rsplit(".", 1)[0]
    return out


def _vae_resnet(ldm, diffusers, c_in, c_out):
    out = [e for a, b in _VAE_RESNET for e in _pair("vae", f"{VAE}{ldm}.{a}", f"{diffusers}.{b}")]
    if c_in != c_out:
        out += _pair("vae", f"{VAE}{ldm}.nin_shortcut", f"{diffusers}.conv_shortcut")
    return out


def _vae_mid(part, c):
    attn_ldm, attn = f"{VAE}{part}.mid.attn_1", f"{part}.mid_block.attentions.0"
    out = _vae_resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", c, c)
    out += _pair("vae", f"{attn_ldm}.norm", f"{attn}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out += _pair("vae", f"{attn_ldm}.{a}", f"{attn}.{b}", ("weight",), "conv1x1")
        out += _pair("vae", f"{attn_ldm}.{a}", f"{attn}.{b}", ("bias",))
    return out + _vae_resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", c, c)


def vae_layout(info) -> list[Entry]:
    ch, n, levels = info.vae_block_out_channels, info.vae_layers_per_block, len(info.vae_block_out_channels)
    out = []
    for ldm, diffusers in (("encoder.conv_in", "encoder.conv_in"), ("encoder.norm_out", "encoder.conv_norm_out"),
                           ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
                           ("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out"),
                           ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")):
        out += _pair("vae", VAE + ldm, diffusers)
    c_in = ch[0]
    for level in range(levels):
        for j in range(n):
            out += _vae_resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}",
                               c_in, ch[level])
            c_in = ch[level]
        if level < levels - 1:
            out += _pair("vae", f"{VAE}encoder.down.{level}.downsample.conv",
                         f"encoder.down_blocks.{level}.downsamplers.0.conv")
    out += _vae_mid("encoder", ch[-1]) + _vae_mid("decoder", ch[-1])
    for u in range(levels):  # the decoder's up blocks are stored in reverse: diffusers up block u is ldm up.(levels-1-u)
        level = levels - 1 - u
        for j in range(n + 1):
            out += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", c_in, ch[level])
            c_in = ch[level]
        if level > 0:
            out += _pair("vae", f"{VAE}decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv")
    return out


def clip_layout(num_layers: int, prefix: str = CLIP) -> list[Entry]:
    """SD 1.x (and SDXL's ViT-L): ldm wraps transformers' CLIPTextModel, so only the prefix changes."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             "final_layer_norm.weight", "final_layer_norm.bias"]
    names += [f"encoder.layers.{k}.{m}.{leaf}" for k in range(num_layers) for m in _CLIP_LAYER for leaf in _WB]
    return [Entry("text", prefix + name, ("text_model." + name,)) for name in names]


def open_clip_layout(num_layers: int, prefix: str = OPEN_CLIP, component: str = "text",
                     projection: bool = False) -> list[Entry]:
    """OpenCLIP's text tower, its first `num_layers` resblocks (SD 2.x: diffusers keeps 23 of 24, the
    penultimate-layer trick; SDXL's bigG: all 32) and, with `projection`, its text_projection (SDXL's pooled
    embedding)."""
    out = [Entry(component, prefix + "token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
           Entry(component, prefix + "positional_embedding", ("text_model.embeddings.position_embedding.weight",))]
    out += _pair(component, prefix + "ln_final", "text_model.final_layer_norm")
    if projection:
        out.append(Entry(component, prefix + "text_projection", ("text_projection.weight",), "T"))
    for k in range(num_layers):
        ldm, layer = f"{prefix}transformer.resblocks.{k}", f"text_model.encoder.layers.{k}"
        for leaf, ldm_leaf in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out.append(Entry(component, f"{ldm}.attn.{ldm_leaf}",
                             tuple(f"{layer}.self_attn.{p}_proj.{leaf}" for p in "qkv"), "qkv"))
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out += _pair(component, f"{ldm}.{a}", f"{layer}.{b}")
    return out


def text_layout(info) -> list[Entry]:
    """The text encoders' entries: component "text" (SD's encoder, SDXL's ViT-L) and "text_2" (SDXL's bigG)."""
    if info.family == "sd1":
        return clip_layout(info.text_num_layers)
    if info.family == "sd2":
        return open_clip_layout(info.text_num_layers)
    has_clip_l = info.text_num_layers > 0
    out = clip_layout(info.text_num_layers, SDXL_CLIP) if has_clip_l else []
    return out + open_clip_layout(info.text2_num_layers, sdxl_open_clip(has_clip_l), "text_2", projection=True)


def layout(info) -> list[Entry]:
    return unet_layout(info) + vae_layout(info) + text_layout(info)
