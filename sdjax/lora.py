"""LoRA: low-rank adapters on the UNet and the text encoder, loaded from and saved to the files people hold.

    pipe = sdjax.load_pretrained("stable-diffusion-v1-5")
    pipe.load_lora("add_detail.safetensors", scale=0.8)         # a kohya / A1111 file: named "add_detail"
    sdjax.load_lora(pipe, "my-lora/", scale=0.5, name="style")   # a diffusers folder (pytorch_lora_weights.safetensors)
    images = pipe.text2img("a castle")                           # both adapters, each at its own scale
    pipe.set_lora_scale("style", 1.0)                           # a value of the compiled program: no recompiling
    pipe.fuse_lora(); ...; pipe.unfuse_lora()                   # merged into the kernels; unfuse restores them exactly
    pipe.unload_lora("style")
    sdjax.save_lora(pipe, "detail.safetensors", format="kohya")  # or "diffusers": diffusers' load_lora_weights

Every Linear and Conv of the UNet and the text encoder (`sdjax.layers.linear` / `conv`) can carry any number of
named adapters (`sdjax.layers.LoRA`); the file layouts (diffusers / PEFT, diffusers' older ones, kohya / A1111
with LoCon convolutions) are in `sdjax.weights.lora_files`.

Unfused, each adapter adds scale * alpha / rank * up(down(x)) to its layer's output: its weights and scale are
arrays the compiled program reads, so a new scale reuses the program (adding or removing an adapter changes it:
one compilation). Fused, the kernels hold W + sum of scale * alpha / rank * down . up (no extra matmuls) and keep
the kernels from before, which unfusing puts back bit for bit. save_pretrained / save_single_file refuse a pipeline
with unfused adapters (fuse them to save the merged model, or unload them to save the base).

For training: adapter weights are `nnx.LoRAParam`s, so `nnx.state(unet, nnx.LoRAParam)` or an optimizer's
`wrt=nnx.LoRAParam` selects exactly them; scales are `sdjax.layers.LoRAScale`, not parameters; `add_lora` creates
fresh adapters as PEFT and kohya initialise them (down Kaiming-uniform, up zero), and `save_lora` exports them.

For sample.py (`--config.lora=PATH[:SCALE]`, `--config.lora_dir`; sdjax.jobs): A1111's prompt tags (`prompt_loras`:
`<lora:name:0.8>`, cut from the text the encoder reads), the files they name (`find_lora`) and the hash A1111
records in a PNG's "Lora hashes" (`lora_hash`).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sdjax import layers
from sdjax.weights import ldm_layout, lora_files
from sdjax.weights.safetensors_io import data_offset, read_metadata, write_safetensors
from sdjax.weights.torch_names import kernel_from_torch, kernel_to_torch

SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
DIFFUSERS_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
FORMATS = ("diffusers", "kohya")


# ---------------------------------------------------------------------------------------------- the model's layers

def components(target) -> dict[str, nnx.Module]:
    """{"unet": ..., "text_encoder": ...} of a StableDiffusion (SDXL's with "text_encoder_2"; its refiner without
    "text_encoder"), or of a mapping holding some of those keys."""
    if isinstance(target, Mapping):
        unknown = sorted(set(target) - set(lora_files.COMPONENTS))
        if unknown:
            raise ValueError(f"LoRA adapters live on {' and '.join(lora_files.COMPONENTS)}, not {unknown}")
        return {k: target[k] for k in lora_files.COMPONENTS if target.get(k) is not None}
    parts = {"unet": target.unet, "text_encoder": target.text_encoder,
             "text_encoder_2": getattr(target, "text_encoder_2", None)}
    return {k: v for k, v in parts.items() if v is not None}


def adaptable_layers(module: nnx.Module) -> dict[str, layers.Linear | layers.Conv]:
    """{dotted path: layer} of every layer of `module` that can carry adapters (diffusers' module paths)."""
    return {".".join(str(p) for p in path): node for path, node in nnx.iter_graph(module)
            if isinstance(node, (layers.Linear, layers.Conv))}


def _adapted(target):
    """(component, path, layer) for every layer that carries adapters."""
    for component, module in components(target).items():
        for path, layer in adaptable_layers(module).items():
            if layer.lora is not None:
                yield component, path, layer


def adapters(target) -> dict[str, dict[str, int]]:
    """{adapter name: {component: the number of its layers there}}, names sorted."""
    out = collections.defaultdict(collections.Counter)
    for component, _, layer in _adapted(target):
        for name in layer.lora:
            out[name][component] += 1
    return {name: dict(out[name]) for name in sorted(out)}


def is_fused(target) -> bool:
    return any(layer.unfused_kernel is not None for _, _, layer in _adapted(target))


def _unfused_only(target, doing: str) -> None:
    if is_fused(target):
        raise ValueError(f"cannot {doing}: the adapters are fused into the weights; call unfuse_lora() first")


# ---------------------------------------------------------------------------------------------- load / save

def lora_file(path: str | os.PathLike) -> Path:
    """The weights file a path names: the file itself, or a diffusers folder's pytorch_lora_weights.safetensors
    (or its one .safetensors file)."""
    path = Path(path)
    if path.is_dir():
        for name in DIFFUSERS_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{path} is a folder without {DIFFUSERS_NAMES[0]}" +
                                (f" and with {len(found)} .safetensors files: give one of them" if found else ""))
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path} is not a LoRA file: expected one of {', '.join(SUFFIXES)}")
    return path


def default_name(path: str | os.PathLike) -> str:
    """The name A1111 gives a LoRA: its file's stem (a diffusers file: its folder's name)."""
    path = Path(path)
    if path.is_dir() or path.name in DIFFUSERS_NAMES:
        return (path if path.is_dir() else path.parent).resolve().name
    return path.stem


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name.startswith("_") or hasattr(nnx.Dict, name):
        raise ValueError(f"{name!r} cannot name an adapter (empty, starting with _, or a method of nnx.Dict): "
                         "pass another name= (sample.py: rename the file)")


def read_lora(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, safetensors metadata) of a LoRA file or folder."""
    from sdjax.weights.single_file import read_checkpoint

    path = lora_file(path)
    metadata = read_metadata(path) if path.suffix.lower() == ".safetensors" else {}
    return read_checkpoint(path), metadata


def load_lora(target, path: str | os.PathLike, *, scale: float = 1.0, name: str | None = None,
              text_encoder_scale: float | None = None) -> str:
    """Attach the LoRA in `path` (any layout of `sdjax.weights.lora_files`) to a pipeline's UNet and text encoder
    at `scale` (`text_encoder_scale`: another for the text encoder); returns its name (default: `default_name`).
    Nothing is attached unless every key of the file is placed."""
    file = lora_file(path)
    name = default_name(path) if name is None else name
    _check_name(name)
    _unfused_only(target, "load a LoRA")
    if name in adapters(target):
        raise ValueError(f"a LoRA named {name!r} is loaded already: unload_lora({name!r}) first, or pass another name=")
    parts = components(target)
    found = {component: adaptable_layers(module) for component, module in parts.items()}
    state_dict, metadata = read_lora(file)
    aliases = None  # kohya's SDXL files name UNet layers as the original model does
    if hasattr(parts.get("unet"), "config") and lora_files.is_kohya(state_dict):
        aliases = ldm_layout.unet_module_paths(parts["unet"].config)
    parsed = lora_files.parse(state_dict, metadata, found, what=str(file), unet_aliases=aliases)
    for (component, path_), a in parsed.items():
        layer = found[component][path_]
        dtype = layer.kernel.get_value().dtype
        s = text_encoder_scale if component != "unet" and text_encoder_scale is not None else scale
        layer.add_lora(name, layers.LoRA(jnp.asarray(kernel_from_torch(a.down), dtype),
                                         jnp.asarray(kernel_from_torch(a.up), dtype), alpha=a.alpha, scale=s))
    return name


def save_lora(target, path: str | os.PathLike, *, format: str = "diffusers", name: str | None = None,
              dtype=None) -> Path:
    """Write one adapter of a pipeline (or of {"unet": ..., "text_encoder": ...}) as a LoRA file.

    format: "diffusers" (`pytorch_lora_weights.safetensors` with PEFT's LoraConfig in its metadata; `path` a folder
    or a .safetensors file) or "kohya" (the A1111 / ComfyUI single file, `path` a .safetensors file).
    name: which adapter (needed when there are several). dtype: of the stored weights (default: the adapter's).
    The scales are not saved (neither layout has a place for them); alpha is.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: use one of {', '.join(FORMATS)}")
    names = adapters(target)
    if not names:
        raise ValueError("there are no LoRA adapters to save: load_lora or add_lora first")
    if name is None:
        if len(names) > 1:
            raise ValueError(f"{len(names)} adapters are loaded ({', '.join(names)}): pass name= for the one to save")
        name = next(iter(names))
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(names)}")
    _unfused_only(target, "save a LoRA")
    out = {}
    for component, path_, layer in _adapted(target):
        if name in layer.lora:
            a = layer.lora[name]
            down, up = (kernel_to_torch(np.asarray(v.get_value())) for v in (a.down, a.up))
            if dtype is not None:
                down, up = down.astype(dtype), up.astype(dtype)
            out[component, path_] = lora_files.FileAdapter(down, up, a.alpha)
    path = Path(path)
    if format == "diffusers" and path.suffix.lower() != ".safetensors":
        path = path / DIFFUSERS_NAMES[0]
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a kohya LoRA file is a .safetensors file")
    if format == "diffusers":
        tensors, metadata = lora_files.to_diffusers(out)
    else:
        parts = components(target)  # SD 2.x (ss_v2, A1111's version tag): 1024-wide text, read off either model
        text_encoder, unet = parts.get("text_encoder"), parts.get("unet")
        unet_config = getattr(unet, "config", None)
        sdxl = "text_encoder_2" in parts or getattr(unet_config, "addition_embed_type", None) == "text_time"
        v2 = not sdxl and (text_encoder.config.family == "sd2" if text_encoder is not None
                           else getattr(unet_config, "cross_attention_dim", None) == 1024)
        names = None
        if sdxl:  # kohya's sd-scripts names SDXL's UNet layers as the original model does
            if unet_config is None:
                raise ValueError("an SDXL LoRA in kohya's layout names UNet layers by the UNet's layout: pass the "
                                 "pipeline (or a mapping with its unet)")
            names = {v: k for k, v in ldm_layout.unet_module_paths(unet_config).items()}
        tensors, metadata = lora_files.to_kohya(out, v2=v2, sdxl_unet_names=names)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata)
    return path


def add_lora(module: nnx.Module, name: str, *, rank: int, targets: Sequence[str], key: jax.Array,
             alpha: float | None = None, scale: float = 1.0, dtype=None) -> list[str]:
    """New adapters on the layers of `module` whose path is a target or ends with "." + a target (PEFT's rule:
    "to_q" is every attention's to_q, "attn2.to_q" the cross-attentions'), initialised as PEFT and kohya do: down
    Kaiming-uniform (bound 1 / sqrt(fan_in)), up zero, so the model is unchanged until trained. alpha defaults to
    the rank (scale 1). dtype: of the adapters' weights (default: each layer's kernel's; training wants float32
    over a bfloat16 base, as PEFT's autocast_adapter_dtype: a bf16 adapter rounds small updates away; the
    adapters run in the layer's compute dtype either way). Returns the adapted paths."""
    _check_name(name)
    found = adaptable_layers(module)
    paths = [p for p in found if any(p == t or p.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(p == t or p.endswith("." + t) for p in found)]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no layer; layers are named like {', '.join(list(found)[:4])}")
    if any(layer.unfused_kernel is not None for layer in found.values()):
        raise ValueError("cannot add adapters: adapters are fused into this module; call unfuse_lora() first")
    if any(layer.lora is not None and name in layer.lora for layer in found.values()):
        raise ValueError(f"this module has adapters named {name!r} already: unload_lora({name!r}) first, or pick "
                         "another name")
    shapes = [found[path].lora_shapes(rank) for path in paths]
    sizes = [int(np.prod(down_shape)) for down_shape, _ in shapes]
    # one draw for all the layers, uniform in [-1, 1) and scaled per layer: one small program, not one per shape
    unit = np.asarray(jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0))
    starts = np.cumsum([0, *sizes])
    for path, (down_shape, up_shape), start, size in zip(paths, shapes, starts, sizes):
        layer = found[path]
        own = layer.kernel.get_value().dtype if dtype is None else dtype
        bound = 1.0 / np.sqrt(np.prod(down_shape[:-1]))
        down = (unit[start:start + size].reshape(down_shape) * bound).astype(own)
        layer.add_lora(name, layers.LoRA(jnp.asarray(down), jnp.asarray(np.zeros(up_shape, own)),
                                         alpha=rank if alpha is None else alpha, scale=scale))
    return paths


# ---------------------------------------------------------------------------------------------- scales, fusing

def set_lora_scale(target, name: str, scale: float, text_encoder_scale: float | None = None) -> None:
    """The adapter's strength (`text_encoder_scale`: another for the text encoder); the compiled program stays."""
    _unfused_only(target, "change a scale")
    hit = False
    for component, _, layer in _adapted(target):
        if name in layer.lora:
            s = text_encoder_scale if component != "unet" and text_encoder_scale is not None else scale
            layer.lora[name].scale.set_value(jnp.asarray(s, jnp.float32))
            hit = True
    if not hit:
        raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(adapters(target)) or 'none'}")


def fuse_lora(target) -> None:
    """Merge every adapter, at its scale, into its layer's kernel (the kernels from before are kept)."""
    for _, _, layer in _adapted(target):
        layer.fuse_lora()


def unfuse_lora(target) -> None:
    """The kernels from before `fuse_lora`, bit for bit; the adapters run unfused again."""
    for _, _, layer in _adapted(target):
        layer.unfuse_lora()


def unload_lora(target, name: str | None = None) -> None:
    """Remove one adapter (`name`), or all of them."""
    _unfused_only(target, "unload a LoRA")
    names = adapters(target)
    if name is not None and name not in names:
        raise ValueError(f"no adapter named {name!r}; loaded: {', '.join(names) or 'none'}")
    for _, _, layer in list(_adapted(target)):
        for n in [n for n in layer.lora if name is None or n == name]:
            layer.remove_lora(n)


def check_base_export(target, what: str) -> None:
    """Refuse to write a model's base weights while unfused adapters would be left out without a word."""
    names = adapters(target)
    if names and not is_fused(target):
        raise ValueError(f"{what}: this pipeline carries LoRA adapters ({', '.join(names)}) that are not part of its "
                         "weights: pipe.fuse_lora() first saves the model with them merged, pipe.unload_lora() the "
                         "base model; sdjax.save_lora(pipe, path) saves the adapters alone")


# ---------------------------------------------------------------------------------------------- A1111's conventions

@dataclasses.dataclass(frozen=True)
class PromptLoRA:
    """One `<lora:...>` tag of a prompt: the LoRA's name and its strengths."""

    name: str
    text_encoder_scale: float = 1.0
    unet_scale: float = 1.0

    def tag(self) -> str:
        scales = (f"{self.text_encoder_scale:g}" if self.unet_scale == self.text_encoder_scale
                  else f"{self.text_encoder_scale:g}:{self.unet_scale:g}")
        return f"<lora:{self.name}:{scales}>"


_TAG = re.compile(r"<(lora|lyco):([^>]+)>")  # A1111's extra-network syntax, for its LoRA types


def prompt_loras(prompt: str) -> tuple[str, list[PromptLoRA]]:
    """(the prompt without its LoRA tags, the LoRAs they name), read as A1111 reads them:
    `<lora:name>` (strength 1), `<lora:name:0.8>` (both models), `<lora:name:te:unet>` or `<lora:name:te=0.5:unet=1>`
    (text encoder and UNet apart). The tags are cut out of the text that is encoded, leaving what surrounds them;
    a prompt without tags comes back as it is."""
    found = []

    def read(match):
        items = match[2].split(":")
        positional = [i for i in items[1:] if "=" not in i]
        named = dict(i.split("=", 1) for i in items[1:] if "=" in i)
        unknown = sorted(set(named) - {"te", "unet"})
        if unknown:
            raise ValueError(f"{match[0]}: sdjax reads te= and unet= strengths, not {unknown}")
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"{match[0]}: a strength is not a number (write <lora:name:0.8>)") from None
        if len(positional) > 2:
            raise ValueError(f"{match[0]}: at most two strengths (text encoder, UNet)")
        name = items[0].strip()
        if any(p.name == name for p in found):
            raise ValueError(f"{match[0]}: the prompt names LoRA {name!r} twice")
        found.append(PromptLoRA(name, te, unet))
        return ""

    text = _TAG.sub(read, prompt)
    return (text if found else prompt), found


def lora_hash(path: str | os.PathLike) -> str:
    """The short hash A1111 records for a LoRA (12 hex digits): a .safetensors file's `sshs_model_hash` metadata if it
    has one, else the sha256 of its tensor bytes after the header (kohya's "addnet" hash, which a metadata edit does
    not change); any other file's sha256."""
    file = lora_file(path)
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if file.suffix.lower() == ".safetensors":
            stored = read_metadata(file).get("sshs_model_hash")
            if stored:
                return stored[:12]
            f.seek(data_offset(file))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def parse_lora_setting(text: str) -> list[tuple[str, float]]:
    """`PATH[:SCALE],PATH2[:SCALE2]` (sample.py's --config.lora) as [(path, scale)]; scale 1 when not given."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        path, _, scale = item.rpartition(":")
        try:
            out.append((path, float(scale)) if path else (item, 1.0))
        except ValueError:
            out.append((item, 1.0))  # a colon in the path itself, no scale
    return out


def _output_name(path: Path) -> str | None:
    try:
        return read_metadata(path).get("ss_output_name")
    except ValueError:  # not a readable safetensors file: not this LoRA
        return None


def find_lora(name: str, folder: str | os.PathLike) -> Path:
    """The file of the LoRA a prompt tag names: NAME.safetensors (or .pt, .ckpt, ...) anywhere under `folder`, else
    the .safetensors file whose kohya metadata `ss_output_name` is NAME (A1111's alias: prompts copied from it or
    from model sites name LoRAs so)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    found = [p for p in files if p.stem == name]
    if not found:
        found = [p for p in files if p.suffix.lower() == ".safetensors" and _output_name(p) == name]
    if not found:
        raise FileNotFoundError(f"no LoRA file named {name} (.safetensors, .pt, ...), nor one whose ss_output_name "
                                f"is {name}, under {folder}")
    if len(found) > 1:
        raise ValueError(f"{len(found)} files could be LoRA {name!r} under {folder}: "
                         f"{', '.join(str(p) for p in found[:3])}")
    return found[0]
