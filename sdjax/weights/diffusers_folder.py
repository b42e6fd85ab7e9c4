"""Files of a diffusers folder: one component's config and weights, read and written.

A component folder (unet/, vae/, text_encoder/) holds `config.json` and its weights as
`<name>.safetensors`, a sharded `<name>.safetensors.index.json`, an fp16 variant
`<name>.fp16.safetensors`, or PyTorch pickles (`<name>.bin`, needs torch).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from sdjax.weights.safetensors_io import read_metadata, read_safetensors, write_safetensors

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_LEGACY_BIN = {"model": "pytorch_model"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def write_json(obj: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _not_a_torch_file(path: Path) -> str | None:
    """None if `path` starts as torch.save writes (a zip archive, or a legacy pickle), else what it looks like."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    try:
        read_metadata(path)  # its header parses: a safetensors file
        return "a .safetensors file with another suffix: rename it to .safetensors"
    except ValueError:
        pass
    if not head:
        return "an empty file"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "an HTML page (a download that returned a web page?)"
    if head.lstrip().startswith((b"version https://git-lfs", b"oid sha256")):
        return "a Git LFS pointer, not the weights: fetch them with git lfs pull"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"not a PyTorch checkpoint (it starts with bytes {head[:8].hex(' ')})"


def _load_torch(path: Path):
    """torch.load(path) with weights_only=True (no code runs), after sniffing that it is a torch file; the only place
    sdjax imports torch. torch.nn.ParameterDict is allowed too: old textual inversion files pickle one."""
    what = _not_a_torch_file(path)
    if what:
        raise ValueError(f"{path} is {what}, not a PyTorch checkpoint (torch.save writes a zip archive)"
                         if not what.startswith("not a") else f"{path} is {what}")
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), "
                          "or convert the checkpoint to .safetensors") from None
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        with safe_globals([torch.nn.ParameterDict]) if safe_globals else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise ValueError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {e})") from None


def _tensor_to_numpy(value):
    """A torch tensor as a numpy array (bfloat16, which numpy lacks, as float32); anything else as it is."""
    import torch

    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    return value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()


def read_torch_file(path: Path):
    """What a PyTorch pickle holds (.pt / .bin / .ckpt: dicts, lists, strings, numbers), every tensor as a numpy
    array and every dict (a ParameterDict too) as a plain dict; read safely (weights_only)."""
    obj = _load_torch(path)  # first: its errors say what the file is, or that torch is missing
    import torch

    def convert(value):
        if isinstance(value, torch.nn.ParameterDict):
            value = dict(value.items())
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return _tensor_to_numpy(value)

    return convert(obj)


def read_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict (.bin / .ckpt, the ckpt's "state_dict") as numpy arrays."""
    obj = _load_torch(path)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    arrays = {k: _tensor_to_numpy(v) for k, v in obj.items()}
    return {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}


def read_weights(folder: Path, name: str) -> dict[str, np.ndarray]:
    """The state dict of a component folder, whichever of the diffusers file layouts it uses."""
    folder = Path(folder)
    bin_name = _LEGACY_BIN.get(name, name)
    for candidate in (f"{name}.safetensors", f"{name}.fp16.safetensors"):
        if (folder / candidate).exists():
            return read_safetensors(folder / candidate)
    for index, reader in ((f"{name}.safetensors.index.json", read_safetensors),
                          (f"{name}.safetensors.index.fp16.json", read_safetensors),  # diffusers' sharded variant
                          (f"{bin_name}.bin.index.json", read_torch_pickle),
                          (f"{bin_name}.bin.index.fp16.json", read_torch_pickle)):
        if (folder / index).exists():
            shards = sorted(set(read_json(folder / index)["weight_map"].values()))
            out = {}
            for shard in shards:
                out.update(reader(folder / shard))
            return out
    for candidate in (f"{bin_name}.bin", f"{bin_name}.fp16.bin"):
        if (folder / candidate).exists():
            return read_torch_pickle(folder / candidate)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "folder missing"
    raise FileNotFoundError(f"{folder}: no weights found (looked for {name}.safetensors, sharded, fp16 "
                            f"and .bin variants); the folder holds {found}")


def write_weights(state_dict: dict[str, np.ndarray], folder: Path, name: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(state_dict, folder / f"{name}.safetensors", metadata={"format": "pt"})
