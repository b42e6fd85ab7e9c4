"""The naming convention that ties sdjax modules to PyTorch state dicts.

Every sdjax module mirrors the attribute names of its diffusers / transformers counterpart, so a
parameter's NNX path joined with dots is the PyTorch key once the leaf is renamed:

    Linear kernel (in, out)          <-> weight (out, in)
    Conv   kernel (kh, kw, in, out)  <-> weight (out, in, kh, kw)
    GroupNorm / LayerNorm scale      <-> weight
    Embed  embedding                 <-> weight
    bias                             <-> bias

This file owns every transpose between the two layouts; nothing else in sdjax transposes weights.
"""
from __future__ import annotations

import math
import mmap
import os
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(3, 2, 0, 1)
        raise ValueError(f"unexpected kernel rank {value.ndim}")
    return value


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if value.ndim == 2:
            return value.T
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 1:  # never: kernels are 2-D or 4-D
            raise ValueError("a kernel cannot be 1-D")
    return value


def kernel_to_torch(value: np.ndarray) -> np.ndarray:
    """A Linear (in, out) or Conv (kh, kw, in, out) kernel in PyTorch's layout, (out, in) / (out, in, kh, kw)."""
    return _to_torch_layout("kernel", value)


def kernel_from_torch(value: np.ndarray) -> np.ndarray:
    """A PyTorch Linear (out, in) or Conv2d (out, in, kh, kw) weight in sdjax's layout."""
    return _from_torch_layout("kernel", value)


def torch_key(path: tuple) -> str:
    """NNX parameter path -> PyTorch state-dict key."""
    *body, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise KeyError(f"no PyTorch name for parameter leaf {leaf!r} at {path}")
    return ".".join(str(p) for p in body) + "." + _LEAF_TO_TORCH[leaf]


# The base weights: every nnx.Param but low-rank adapters (nnx.LoRAParam, sdjax.layers.LoRA), which sdjax.lora
# reads and writes in their own files.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def module_params(module: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    """{torch_key: (nnx path, variable)} for every base parameter of `module` (adapters left out)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, BASE_PARAMS)):
        out[torch_key(path)] = (path, var)
    return out


def to_state_dict(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """The module's parameters as a PyTorch-layout state dict of float32/float16/bfloat16 numpy arrays."""
    out = {}
    for key, (path, var) in module_params(module).items():
        out[prefix + key] = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(var.get_value())))
    return out


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], *, prefix: str = "",
                    what: str = "checkpoint", ignore: tuple[str, ...] = ()) -> None:
    """Copy a PyTorch-layout state dict into `module` in place, casting to each parameter's dtype.

    `module` may be abstract (from `nnx.eval_shape`): its shapes, dtypes and shardings are all that is read.
    Each tensor (typically a view of a memory-mapped file) is read once: transposed, cast and copied into a
    new buffer, which becomes the parameter (on CPU without a further copy; elsewhere it is put on the
    parameter's device / sharding directly). Tensors are converted on a few threads.

    Every parameter must be present and every tensor under `prefix` used (keys ending with a name in
    `ignore` excepted, e.g. buffers such as `position_ids`); otherwise the error names the missing and
    unexpected tensors. A shape mismatch names the tensor and both shapes.
    """
    with ThreadPoolExecutor(threads()) as pool:
        submit_state_dict(module, state_dict, pool, prefix=prefix, what=what, ignore=ignore)()


def submit_state_dict(module: nnx.Module, state_dict: Mapping[str, np.ndarray], pool: Executor, *,
                      prefix: str = "", what: str = "checkpoint", ignore: tuple[str, ...] = ()) -> Callable[[], None]:
    """`load_state_dict` in two halves, so that the conversion overlaps other work: checks names and shapes now
    (raising as `load_state_dict` does), converts the tensors on `pool`, and returns the function that waits
    for them and sets the parameters."""
    params = module_params(module)
    wanted = {prefix + k for k in params}
    given = {k for k in state_dict if k.startswith(prefix) and not any(k.endswith(i) for i in ignore)}
    missing, unexpected = sorted(wanted - given), sorted(given - wanted)
    if missing or unexpected:
        lines = [f"{what} does not match the model:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        raise ValueError("\n".join(lines))
    jobs = []  # (variable, the tensor as a view in sdjax's layout, the parameter it replaces)
    for key, (path, var) in params.items():
        source = np.asarray(state_dict[prefix + key])
        value, current = _from_torch_layout(path[-1], source), var.get_value()
        if tuple(value.shape) != tuple(current.shape):
            expected = tuple(_to_torch_layout(path[-1], np.empty(current.shape, np.int8)).shape)
            raise ValueError(f"{what}: tensor {prefix + key} has shape {source.shape}, the model expects {expected}")
        jobs.append((var, value, current))
    futures = {}
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][1].nbytes):  # largest first: the threads end together
        futures[i] = pool.submit(_place, *jobs[i][1:])

    def finish():
        for i, (var, _, _) in enumerate(jobs):
            var.set_value(futures[i].result())
    return finish


def threads() -> int:
    """Threads for converting tensors: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


_ALIGN = 64  # XLA's CPU client adopts a host buffer aligned to 64 bytes instead of copying it
# A transposed copy goes tile by tile over the two swapped axes, so that each tile's reads and writes stay in cache:
# 256 x 256 for a linear weight; 64 x 64 for a conv kernel, whose tile spans its kh x kw taps too (SD 1.5's UNet
# kernels, 2.16 GB: 1.9 s with 256, 1.3 s with 64, 1.5 s with 48 or 96-128, one thread, measured).
_TILE = {2: 256, 4: 64}


def _on_cpu(like) -> bool:
    """Whether `like` lives on one CPU device (where jax.device_put adopts an aligned host buffer)."""
    sharding = getattr(like, "sharding", None)
    devices = sharding.device_set if sharding is not None else {jax.devices()[0]}
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


_POPULATE_FROM = 1 << 20  # bytes: larger buffers that stay on the CPU are faulted in at once (`_host_buffer`)


def _host_buffer(shape: tuple, dtype: np.dtype, *, stays: bool) -> np.ndarray:
    """A new, writable, 64-byte-aligned host array. One that `stays` the parameter's memory (XLA adopts it on a CPU
    device) and is 1 MB or more is its own anonymous mapping, which the kernel faults in at once (MAP_POPULATE),
    on the converting thread: on this project's VMs, touching 4.3 GB (SD 1.5 in float32) in 4 KB page faults took
    1.6-4.8 s and populating it 1.0-3.4 s (measured). Others: numpy's memory."""
    size = math.prod(shape) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if stays and populate and size >= _POPULATE_FROM:
        raw = np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate), np.uint8)
        start = 0  # page-aligned
    else:
        raw = np.empty(size + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


def _place(value: np.ndarray, like) -> jax.Array:
    """`value` (any strides, any float dtype) as a new array of `like`'s dtype on `like`'s sharding: one pass over
    `value` (a transposing, casting copy into an aligned buffer, `_host_buffer`; a transposed kernel that changes
    dtype is cast first), then `jax.device_put`, which adopts that buffer on one CPU device and copies it to the
    device elsewhere."""
    dtype = np.dtype(like.dtype)
    out = _host_buffer(tuple(value.shape), dtype, stays=_on_cpu(like))
    if value.ndim < 2 or value.flags.c_contiguous:
        np.copyto(out, value, casting="unsafe")
    else:  # a transposed kernel: tiles over the last two axes, which are the two torch axes swapped
        if value.dtype != dtype:  # cast in the file's memory order first: ml_dtypes' bfloat16 casts run 2-5x
            value = value.astype(dtype, order="K")  # faster on contiguous data than inside a transposing copy
        rows, cols, tile = *value.shape[-2:], _TILE.get(value.ndim, 64)
        for r in range(0, rows, tile):
            for c in range(0, cols, tile):
                np.copyto(out[..., r:r + tile, c:c + tile], value[..., r:r + tile, c:c + tile])
    return jax.device_put(out, getattr(like, "sharding", None))
