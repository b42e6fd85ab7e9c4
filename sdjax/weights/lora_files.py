"""LoRA files: the diffusers / PEFT and kohya / A1111 key layouts, read into per-layer adapters and written back.

A file holds, for each adapted layer, a down and an up projection (PyTorch layout) and possibly an alpha; the
adapter adds (alpha / rank) * up(down(x)) to the layer's output (rank: down's first axis; no alpha: alpha = rank).

    layout     one layer's keys                                                                alpha
    diffusers  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight,  the file's
               ... .lora_B.weight; text_encoder.text_model.encoder.layers.0.self_attn.q_proj.   lora_adapter_metadata
               lora_A.weight, ... (`text_model.` optional: transformers 5 has no such level)   (a PEFT LoraConfig)
      older    ... .to_q.lora.down.weight / .lora.up.weight (diffusers' training scripts),      <layer>.alpha if any
               ... .q_proj.lora_linear_layer.down.weight, ... .attn1.processor.to_q_lora.
               down.weight (attention processors, keys with or without `unet.`)
    kohya      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.  <layer>.alpha
               weight, .lora_up.weight, .alpha; lora_te_text_model_encoder_layers_0_self_attn_
               q_proj...; convolutions (LoCon): lora_unet_down_blocks_0_resnets_0_conv1...
      SDXL     text_encoder_2. (diffusers); lora_te1_ / lora_te2_ for the two text encoders and the UNet
               under the original model's names, lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
               (kohya's sd-scripts; the diffusers names are read too)

A kohya name is a module path with each dot an underscore: it is read by matching it against the model's own
paths (`down_blocks_0_attentions_0_proj_in` is `down_blocks.0.attentions.0.proj_in`), never by guessing where the
dots were. Every key is placed or the load fails: a key that names no layer is an error naming it and the nearest
layer; a shape that does not fit names both shapes; other adapter types (LoHa, LoKr, DoRA, ...) are refused by name.
A 1x1 convolution and a Linear are the same map, so an adapter stored as either fits a layer of the other kind.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import math
import re

import numpy as np

METADATA_KEY = "lora_adapter_metadata"  # diffusers: the JSON of each component's PEFT LoraConfig, keys "unet.r", ...
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_TEXT_MODEL = "text_model."  # the CLIPTextModel level that transformers < 5 (and most files) put in every name
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# Markers of adapter types that are not LoRA (LyCORIS and others), for the error that refuses them.
_OTHER_TYPES = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA",
                "lora_mid": "LoCon with a CP-decomposed middle (lora_mid)", "oft_": "OFT", "ia3": "IA3",
                "on_input": "IA3", ".diff": "a full weight difference", "w_norm": "a norm adapter",
                "b_norm": "a norm adapter", "lora_B.bias": "LoRA with biases (lora_bias)"}
# diffusers' attention-processor names: the projection each adapts, in the UNet and in the text encoder.
_PROCESSOR = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
              "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}
_DIFFUSERS_KEYS = (  # (pattern, part) over a key without its component prefix; group 1 is the layer's path
    (re.compile(r"(.+)\.lora_A\.weight"), "down"), (re.compile(r"(.+)\.lora_B\.weight"), "up"),
    (re.compile(r"(.+)\.lora\.(down|up)\.weight"), None),
    (re.compile(r"(.+)\.lora_linear_layer\.(down|up)\.weight"), None),
    (re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"), "processor"),
    (re.compile(r"(.+)\.alpha"), "alpha"),
)


@dataclasses.dataclass(frozen=True)
class FileAdapter:
    """One layer's adapter as a file holds it, in PyTorch's layout."""

    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def is_kohya(keys) -> bool:
    return any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in keys)


def parse(state_dict: dict, metadata: dict, layers: dict[str, dict], *, what: str,
          unet_aliases: dict[str, str] | None = None) -> dict[tuple[str, str], FileAdapter]:
    """{(component, layer path): FileAdapter} of a LoRA file, every key placed on one of `layers`
    ({component: {dotted path: layer}}, layers with `lora_shapes(rank)`), shapes checked against them.
    unet_aliases: {the original model's module path: the UNet's} (`ldm_layout.unet_module_paths`), the names kohya's
    SDXL files use."""
    if not state_dict:
        raise ValueError(f"{what}: the file holds no tensors")
    for key in state_dict:
        kind = next((name for marker, name in _OTHER_TYPES.items() if marker in key), None)
        if kind:
            raise ValueError(f"{what}: {key} is {kind}, not a plain LoRA; sdjax loads LoRA and LoCon "
                             "(down / up / alpha) adapters")
    kohya = is_kohya(state_dict)
    parts = (_kohya_parts(state_dict, layers, what, unet_aliases or {}) if kohya
             else _diffusers_parts(state_dict, layers, what))
    configs = {} if kohya else _peft_configs(metadata, what)
    out = {}
    for (component, path), found in sorted(parts.items()):
        for part, partner in (("down", "up"), ("up", "down")):
            if part not in found:
                key = next(iter(found.values()))[0]
                raise ValueError(f"{what}: {key} has no {part} weight beside it (the file has {partner} but not "
                                 f"{part} for {component} layer {path})")
        (down_key, down), (up_key, up) = found["down"], found["up"]
        layer = layers[component][path]
        down, up = _fit(layer, np.asarray(down), np.asarray(up), down_key, up_key, what)
        rank = int(down.shape[0])
        if "alpha" in found:
            alpha = float(np.asarray(found["alpha"][1], np.float64).reshape(()))
        else:
            alpha = _peft_alpha(configs.get(component, {}), component, path, rank)
        out[component, path] = FileAdapter(down, up, alpha)
    return out


def _kohya_parts(state_dict, layers, what, unet_aliases) -> dict:
    names = {}  # kohya name -> (component, path)
    for prefix, component in _KOHYA_PREFIXES.items():
        if prefix == "lora_te_" and "text_encoder_2" in layers:
            continue  # SDXL: lora_te1_ and lora_te2_
        for path in layers.get(component, {}):
            under = path.replace(".", "_")
            names[prefix + under] = component, path
            if component.startswith("text_encoder"):
                names[prefix + "text_model_" + under] = component, path
    for alias, path in unet_aliases.items():
        if path in layers.get("unet", {}):
            names["lora_unet_" + alias.replace(".", "_")] = "unet", path
    parts = collections.defaultdict(dict)
    for key, value in state_dict.items():
        name, _, part = key.partition(".")
        if part not in _KOHYA_PARTS:
            raise ValueError(f"{what}: {key} is not a LoRA weight (a kohya file has <name>.lora_down.weight, "
                             ".lora_up.weight and .alpha)")
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.0)
            nearest = f"; the nearest is {close[0]} ({'.'.join(names[close[0]])})" if close else ""
            raise ValueError(f"{what}: {key} names no layer of this model{nearest}")
        parts[names[name]][_KOHYA_PARTS[part]] = key, value
    return parts


def _diffusers_parts(state_dict, layers, what) -> dict:
    prefixed = any(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in state_dict)
    parts = collections.defaultdict(dict)
    for key, value in state_dict.items():
        component, rest = key.split(".", 1) if "." in key else ("", key)
        if component not in COMPONENTS:
            if prefixed:  # the file names its components: this key belongs to none sdjax has
                raise ValueError(f"{what}: {key} is not under unet., text_encoder. or text_encoder_2., the "
                                 "components a Stable Diffusion LoRA adapts")
            component, rest = "unet", key  # the oldest files: UNet attention processors without a prefix
        for pattern, part in _DIFFUSERS_KEYS:
            m = pattern.fullmatch(rest)
            if m:
                break
        else:
            raise ValueError(f"{what}: {key} is not a LoRA weight (expected <layer>.lora_A.weight / .lora_B.weight, "
                             "or diffusers' older .lora.down.weight / .lora.up.weight)")
        path = m[1]
        if part == "processor":
            path, part = f"{m[1]}.{_PROCESSOR[component][m[2]]}", m[3]
        elif part is None:
            part = m[2]
        if component.startswith("text_encoder"):
            path = path.removeprefix(_TEXT_MODEL)
        if path not in layers.get(component, {}):
            close = difflib.get_close_matches(path, list(layers.get(component, {})), n=1, cutoff=0.0)
            nearest = f"; the nearest is {component}.{close[0]}" if close else ""
            raise ValueError(f"{what}: {key} names no layer of this model ({component}.{path}){nearest}")
        parts[component, path][part] = key, value
    return parts


def _fit(layer, down, up, down_key, up_key, what):
    """down and up in the layer's own kind (a 1x1 conv's 4-D weights for a Linear become 2-D, and back), checked."""
    rank = down.shape[0] if down.ndim else 0
    want_down, want_up = (_torch_shape(s) for s in layer.lora_shapes(rank))
    if len(want_down) == 2 and down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]
    if len(want_down) == 4 and want_down[2:] == (1, 1) and down.ndim == 2:
        down = down[:, :, None, None]
    if len(want_up) == 2 and up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if len(want_up) == 4 and up.ndim == 2:
        up = up[:, :, None, None]
    if tuple(down.shape) != want_down:
        raise ValueError(f"{what}: {down_key} has shape {tuple(down.shape)}, the layer needs {want_down} (a LoRA made "
                         "for another base model, e.g. SD 2.x for SD 1.x? Use it with the model it was trained on)")
    if tuple(up.shape) != want_up:
        raise ValueError(f"{what}: {up_key} has shape {tuple(up.shape)}, the layer needs {want_up} "
                         f"(rank {rank} from {down_key})")
    return down, up


def _torch_shape(shape: tuple) -> tuple:
    """An sdjax kernel shape, (in, out) or (kh, kw, in, out), in PyTorch's order."""
    return (shape[1], shape[0]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def _peft_configs(metadata: dict, what: str) -> dict[str, dict]:
    """{component: its LoraConfig fields} from diffusers' metadata (keys "unet.r", "text_encoder.lora_alpha", ...)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: its {METADATA_KEY} metadata is not JSON ({e})") from None
    configs = {c: {k[len(c) + 1:]: v for k, v in flat.items() if k.startswith(c + ".")} for c in COMPONENTS}
    for component, config in configs.items():
        for flag, name in (("use_dora", "DoRA"), ("lora_bias", "LoRA with biases")):
            if config.get(flag):
                raise ValueError(f"{what}: its {component} adapter is {name} ({flag}=true); sdjax loads plain LoRA")
    return configs


def _peft_alpha(config: dict, component: str, path: str, rank: int) -> float:
    """A layer's alpha as PEFT's LoraConfig gives it: the first alpha_pattern key (a regex) that matches the end of
    the layer's name, else lora_alpha (PEFT's default 8); no config at all: the rank (scale 1, diffusers' rule).
    use_rslora scales by alpha / sqrt(rank): returned as the alpha that gives that scale over the rank."""
    if not config:
        return float(rank)
    names = [path] + ([_TEXT_MODEL + path] if component.startswith("text_encoder") else [])
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            alpha = value
            break
    return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)


def to_diffusers(adapters: dict[tuple[str, str], FileAdapter]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, metadata) of a diffusers `pytorch_lora_weights.safetensors` for `adapters`."""
    tensors, configs = {}, {}
    for (component, path), a in adapters.items():
        name = f"{component}.{_TEXT_MODEL if component.startswith('text_encoder') else ''}{path}"
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a.down, a.up
    for component in COMPONENTS:
        mine = {path: a for (c, path), a in adapters.items() if c == component}
        if not mine:
            continue
        rank = collections.Counter(a.rank for a in mine.values()).most_common(1)[0][0]
        alpha = collections.Counter(a.alpha for a in mine.values()).most_common(1)[0][0]
        configs.update({f"{component}.r": rank, f"{component}.lora_alpha": _number(alpha),
                        f"{component}.target_modules": sorted(mine),
                        f"{component}.rank_pattern": {p: a.rank for p, a in mine.items() if a.rank != rank},
                        f"{component}.alpha_pattern": {p: _number(a.alpha) for p, a in mine.items()
                                                       if a.alpha != alpha}})
    return tensors, {"format": "pt", METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}


def to_kohya(adapters: dict[tuple[str, str], FileAdapter], *, v2: bool,
             sdxl_unet_names: dict[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, metadata) of a kohya / A1111 LoRA file for `adapters` (`v2`: an SD 2.x model, kohya's ss_v2).
    sdxl_unet_names: {UNet path: the original model's} of an SDXL model, written as kohya's sd-scripts writes SDXL
    (lora_unet_ + the original names, lora_te1_ / lora_te2_)."""
    sdxl = sdxl_unet_names is not None
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for (component, path), a in adapters.items():
        if sdxl and component == "unet":
            path = sdxl_unet_names[path]
        name = prefixes[component] + ("text_model_" if component != "unet" else "") + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a.down, a.up
        tensors[f"{name}.alpha"] = np.asarray(a.alpha, np.float32)
    ranks = collections.Counter(a.rank for a in adapters.values()).most_common(1)
    alphas = collections.Counter(a.alpha for a in adapters.values()).most_common(1)
    metadata = {"format": "pt", "ss_network_module": "networks.lora", "ss_v2": str(v2),
                **({"ss_base_model_version": "sdxl_base_v1-0"} if sdxl else {}),
                "ss_network_dim": str(ranks[0][0]) if ranks else "0",
                "ss_network_alpha": str(_number(alphas[0][0])) if alphas else "0"}
    return tensors, metadata


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)
