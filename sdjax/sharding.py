"""Device meshes and partition rules: sharding is data, read from the config.

    mesh = make_mesh(data=-1, fsdp=4)            # axes ("data", "fsdp"); -1 takes the remaining devices
    shardings = param_shardings(mesh, params)    # each array split along "fsdp" on its largest divisible dim
    batch = host_batch_to_global(mesh, {"images": local_np})   # leading dim split over both axes

Rules: parameters, optimizer state and EMA are sharded along `fsdp` on their largest dimension that
the `fsdp` size divides (arrays smaller than `min_size` elements, and arrays with no such dimension,
are replicated); a batch is split along its leading dimension over every mesh axis, so each device
sees batch_size / num_devices examples. Sampling uses the same helpers with `make_mesh(data=-1)`:
the `fsdp` axis then has size 1 and everything but the batch is replicated.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    One of `data` / `fsdp` may be -1: it takes all remaining devices. The product must equal the
    device count. Devices are ordered by process, so each process owns a contiguous block of the
    batch (what `host_batch_to_global` and the data loader's host shards assume).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp)]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}): at most one axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if known < 1 or n % known:
            raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}): {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if min(sizes) < 1 or sizes[0] * sizes[1] != n:
        raise ValueError(f"make_mesh(data={data}, fsdp={fsdp}) needs {sizes[0] * sizes[1]} devices, "
                         f"there are {n}; set mesh.data / mesh.fsdp so that data * fsdp = {n} (or one of them to -1)")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes, the rest replicated."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def fsdp_spec(shape: tuple[int, ...], fsdp: int, *, min_size: int = 0, axis: str = "fsdp") -> P:
    """The partition rule for one parameter-like array: `axis` on the largest dim `fsdp` divides, else P()."""
    if fsdp <= 1 or not shape or int(np.prod(shape)) < max(min_size, 1):
        return P()
    candidates = [(size, i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, dim = max(candidates, key=lambda c: (c[0], -c[1]))  # largest; the first one on ties
    spec = [None] * len(shape)
    spec[dim] = axis
    return P(*spec)


def param_shardings(mesh: Mesh, tree: Any, *, min_size: int = 0) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state, EMA)."""
    fsdp = mesh.shape.get("fsdp", 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp, min_size=min_size)),
                        tree)


def bytes_per_device(tree: Any, shardings: Any) -> tuple[int, int]:
    """(bytes each device holds, bytes of the whole tree) of arrays / ShapeDtypeStructs placed with `shardings`
    (NamedShardings, on a Mesh or an AbstractMesh: what a mesh would hold, without its devices): what FSDP saves.
    `param_shardings` splits a dim evenly or not at all, so every device holds the same."""
    held = whole = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        size = np.dtype(x.dtype).itemsize
        whole += int(np.prod(x.shape)) * size
        held += int(np.prod(s.shard_shape(tuple(x.shape)))) * size
    return held, whole


def host_batch_to_global(mesh: Mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the global batch -> global arrays split along the batch over the mesh.

    Process p passes rows [p * b, (p + 1) * b) of the global batch (b = global batch / process count).
    """
    sharding = batch_sharding(mesh)
    n = jax.process_count()
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * n, *value.shape[1:])
        if global_shape[0] % mesh.size:
            raise ValueError(f"global batch {global_shape[0]} ({key}) is not divisible by the {mesh.size} devices "
                             f"of the mesh; use a batch_size that is a multiple of {mesh.size}")
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def put_global(tree: Any, shardings: Any) -> Any:
    """Host (numpy / single-device) arrays, identical on every process -> global arrays with `shardings`."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def jit_placed(fn, out_shardings: Any, *args) -> Any:
    """`jax.jit(fn, out_shardings=out_shardings)(*args)`, where the outputs that `fn`'s trace shows to be constants
    (literals, broadcast literals, captured arrays: an optimizer's zeros, a step counter) are placed from the host
    instead (`make_array_from_callback`, no program). XLA compiles a kernel per output, about 1-2 ms each on a
    CPU: an optimizer state of two zero arrays per parameter is seconds of compiling for a small model.
    """
    from jax.extend.core import Literal, jaxpr_as_fun

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    consts = dict(zip(jaxpr.constvars, closed.consts))
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}

    def constant(v):
        if jax.dtypes.issubdtype(v.aval.dtype, jax.dtypes.prng_key):
            return None
        if isinstance(v, Literal):
            return np.asarray(v.val, v.aval.dtype)
        if v in consts:
            return np.asarray(consts[v])
        eqn = producers.get(v)
        if eqn is not None and eqn.primitive.name == "broadcast_in_dim" and isinstance(eqn.invars[0], Literal):
            return np.broadcast_to(np.asarray(eqn.invars[0].val, v.aval.dtype), v.aval.shape)  # no memory
        return None

    values = [constant(v) for v in jaxpr.outvars]
    shardings = jax.tree.leaves(out_shardings)
    dynamic = [i for i, value in enumerate(values) if value is None]
    if dynamic:  # from the trace already made (XLA drops the constants' equations)
        def computed(*leaves):
            outputs = jaxpr_as_fun(closed)(*leaves)
            return [outputs[i] for i in dynamic]
        computed = jax.jit(computed, out_shardings=[shardings[i] for i in dynamic])(*jax.tree.leaves(args))
        for i, x in zip(dynamic, computed):
            values[i] = x
    for i, value in enumerate(values):
        if isinstance(value, np.ndarray):
            values[i] = jax.make_array_from_callback(value.shape, shardings[i], lambda index, x=value: x[index])
    return jax.tree.unflatten(jax.tree.structure(out_shape), values)


def to_host(tree: Any) -> Any:
    """Global (possibly cross-process sharded) arrays -> full numpy arrays on every process."""
    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.tree.map(np.asarray, tree)
    mesh = next(x.sharding.mesh for x in leaves if isinstance(x, jax.Array) and not x.is_fully_addressable)
    full = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)  # one all-gather program
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), full)


_barriers = 0


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process gets here (no-op with one process).

    Through the coordination service, not a device collective: CPU (gloo) collectives give up if a
    peer is 30 s late, which a process still compiling can be; align processes with this first.
    """
    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    _barriers += 1
    distributed.global_state.client.wait_at_barrier(f"sdjax_{name}_{_barriers}", timeout_s * 1000)
