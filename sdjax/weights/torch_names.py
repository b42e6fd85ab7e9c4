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

from typing import Mapping

import jax.numpy as jnp
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


def torch_key(path: tuple) -> str:
    """NNX parameter path -> PyTorch state-dict key."""
    *body, leaf = path
    if leaf not in _LEAF_TO_TORCH:
        raise KeyError(f"no PyTorch name for parameter leaf {leaf!r} at {path}")
    return ".".join(str(p) for p in body) + "." + _LEAF_TO_TORCH[leaf]


def module_params(module: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    """{torch_key: (nnx path, variable)} for every nnx.Param of `module`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
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

    `module` may be abstract (from `nnx.eval_shape`): its shapes and dtypes are all that is read.

    Every parameter must be present and every tensor under `prefix` used (keys ending with a name in
    `ignore` excepted, e.g. buffers such as `position_ids`); otherwise the error names the missing and
    unexpected tensors. A shape mismatch names the tensor and both shapes.
    """
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
    for key, (path, var) in params.items():
        value = _from_torch_layout(path[-1], np.asarray(state_dict[prefix + key]))
        current = var.get_value()
        if tuple(value.shape) != tuple(current.shape):
            torch_shape = tuple(np.asarray(state_dict[prefix + key]).shape)
            expected = tuple(_to_torch_layout(path[-1], np.empty(current.shape, np.int8)).shape)
            raise ValueError(f"{what}: tensor {prefix + key} has shape {torch_shape}, the model expects {expected}")
        var.set_value(jnp.asarray(np.asarray(value).astype(current.dtype)))
