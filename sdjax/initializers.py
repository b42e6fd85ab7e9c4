"""Parameter initializers that a whole model can be planned with, then drawn for in one small program.

sdjax's layers pass these to flax's (`conv`, `linear`, `embed`, the norms in sdjax.layers): called with a key,
each is exactly flax's default for its place (`jax.nn.initializers.lecun_normal()`, the embedding's
`variance_scaling(1.0, "fan_in", "normal", out_axis=0)`, zeros, ones), so a module built with `nnx.Rngs(seed)`
is what it always was. The other way to build one:

    modules, model_plan = initializers.plan(lambda rngs: Model(config, rngs=rngs))   # nothing computed
    graphdef, abstract = nnx.split(modules)                    # parameters are jax.ShapeDtypeStructs
    state = model_plan.values({"model": nnx.to_pure_dict(abstract)}, seed=0)["model"]   # numpy, on the host
    # == nnx.to_pure_dict(nnx.state(Model(config, rngs=nnx.Rngs(0)))), bit for bit

Why: under `jax.jit`, `Model(config, rngs=nnx.Rngs(seed))` traces slowly (each count update of the Rngs makes
JAX scan the whole trace so far: quadratic in the parameter count), and XLA then compiles a random generator
(a threefry loop) and an output kernel for every parameter: on 2 CPU cores ~1 s per distinct kernel shape,
30-70 s of compiling for the shapes demo's models. A plan builds the modules in plain Python, `rngs.params()`
handing out draw numbers that these initializers record; `Plan.values` draws every random parameter in a few
batched, flat draws (one program, one generator per size bucket) and cuts them into parameters on the host.

It gives the same bits because JAX's partitionable threefry (the default) makes a draw of shape (a, b, c) the
row-major reshape of a draw of shape (a * b * c,) with the same key, and drawing for a batch of keys is drawing
for each; key i of an `nnx.Rngs(seed)` is `fold_in(key(seed), i)`. tests/test_training.py checks the values
against flax's construction.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# The standard deviation of a unit normal truncated to (-2, 2): a truncated-normal draw divided by it has unit
# variance (jax.nn.initializers.variance_scaling's constant for real dtypes).
_TRUNCATED_NORMAL_STD = .87962566103423978
# A bucket draws the largest of its parameters' sizes for each of them: sizes down to half the largest join it,
# and any that pad by at most this many elements in all (cheaper than another random program).
_BUCKET_SLACK = 1 << 22


class Draw:
    """What a planned construction's `rngs.params()` hands out: the draw's number. An initializer given one
    records itself instead of computing (a flax default initializer fails on it: every parameter of a
    planned model must come from this module's initializers)."""

    __slots__ = ("index", "_records")

    def __init__(self, index: int, records: dict):
        self.index, self._records = index, records

    def record(self, init, shape, dtype) -> jax.ShapeDtypeStruct:
        value = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jax.dtypes.canonicalize_dtype(dtype))
        self._records[id(value)] = (value, self.index, init)  # the value kept alive: its id stays unique
        return value

    def __repr__(self):
        return f"Draw({self.index})"


class PlanningRngs:
    """The `rngs` a planned model is built with: numbers the `params()` draws in the order an `nnx.Rngs(seed)`
    counts them (any other stream or method is an AttributeError: sdjax's layers only draw parameters)."""

    def __init__(self):
        self.count, self.records = 0, {}

    def params(self) -> Draw:
        draw = Draw(self.count, self.records)
        self.count += 1
        return draw


@dataclasses.dataclass(frozen=True)
class Constant:
    """Every element `value` (flax's zeros / ones for biases and norm scales)."""

    value: float

    def __call__(self, key, shape, dtype=jnp.float32):
        if isinstance(key, Draw):
            return key.record(self, shape, dtype)
        return jax.nn.initializers.constant(self.value, dtype)(key, shape, dtype)

    def host_value(self, shape, dtype) -> np.ndarray:
        return np.broadcast_to(np.asarray(self.value, dtype), shape)  # read-only, no memory per element


@dataclasses.dataclass(frozen=True)
class VarianceScaling:
    """jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis, out_axis) for real dtypes."""

    scale: float
    mode: str           # fan_in | fan_out | fan_avg | fan_geo_avg
    distribution: str   # truncated_normal | normal | uniform
    in_axis: int = -2
    out_axis: int = -1

    def __post_init__(self):
        if self.mode not in ("fan_in", "fan_out", "fan_avg", "fan_geo_avg"):
            raise ValueError(f"VarianceScaling: unknown mode {self.mode!r}")
        if self.distribution not in ("truncated_normal", "normal", "uniform"):
            raise ValueError(f"VarianceScaling: unknown distribution {self.distribution!r}")

    def __call__(self, key, shape, dtype=jnp.float32):
        if isinstance(key, Draw):
            return key.record(self, shape, dtype)
        return jax.nn.initializers.variance_scaling(self.scale, self.mode, self.distribution, in_axis=self.in_axis,
                                                    out_axis=self.out_axis)(key, shape, dtype)

    def variance(self, shape) -> float:
        """scale / the mode's fan, as a Python float (the fans as JAX computes them, in the same order)."""
        in_size, out_size = shape[self.in_axis], shape[self.out_axis]
        receptive_field = math.prod(shape) / in_size / out_size
        fan_in, fan_out = in_size * receptive_field, out_size * receptive_field
        denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2,
                       "fan_geo_avg": (fan_in * fan_out) ** 0.5}[self.mode]
        return self.scale / denominator

    def draw(self, keys, variances: list[float], size: int, dtype):
        """Flat draws of `size` elements, one row per key, each scaled for its variance (traceable)."""
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"VarianceScaling plans real dtypes only, got {dtype}")
        variance = jnp.asarray(np.asarray(variances, np.float64), dtype)[:, None]
        if self.distribution == "truncated_normal":
            unit = jax.vmap(lambda k: jax.random.truncated_normal(k, -2, 2, (size,), dtype))(keys)
            return unit * (jnp.sqrt(variance) / jnp.array(_TRUNCATED_NORMAL_STD, dtype))
        if self.distribution == "normal":
            return jax.vmap(lambda k: jax.random.normal(k, (size,), dtype))(keys) * jnp.sqrt(variance)
        unit = jax.vmap(lambda k: jax.random.uniform(k, (size,), dtype, -1))(keys)
        return unit * jnp.sqrt(3 * variance)


# flax's defaults, which sdjax's layers name explicitly so that a model can be planned.
ZEROS = Constant(0.0)
ONES = Constant(1.0)
LECUN_NORMAL = VarianceScaling(1.0, "fan_in", "truncated_normal")               # nnx.Linear / nnx.Conv kernels
EMBEDDING = VarianceScaling(1.0, "fan_in", "normal", in_axis=-2, out_axis=0)   # nnx.Embed


@dataclasses.dataclass
class Plan:
    """What a planned construction recorded: each abstract parameter's draw number and initializer."""

    records: dict   # {id(ShapeDtypeStruct): (ShapeDtypeStruct, draw number, initializer)}
    num_draws: int

    def values(self, states: dict, seed: int) -> dict:
        """Host values (numpy) for `states` ({name: pure state dict} of modules this plan built, leaves still its
        ShapeDtypeStructs): what the same construction with `nnx.Rngs(seed)` initialises, bit for bit.

        One jitted program draws every random parameter: flat, per (initializer, dtype), in buckets of
        similar sizes; the host cuts each parameter out of its bucket's row (a view) and fills constants.
        """
        leaves = []  # (name, path, spec, draw, init)
        for name, state in states.items():
            for path, spec in jax.tree_util.tree_leaves_with_path(state):
                entry = self.records.get(id(spec))
                if entry is None or entry[0] is not spec:
                    raise ValueError(f"{name}{jax.tree_util.keystr(path)} was not created by this plan's "
                                     "construction (or not by an sdjax.initializers initializer)")
                leaves.append((name, path, spec, entry[1], entry[2]))
        buckets = _buckets([leaf for leaf in leaves if not isinstance(leaf[4], Constant)])
        drawn = _draw_program(buckets)(jax.random.key(seed)) if buckets else []
        drawn = [np.asarray(x) for x in drawn]
        host = {}
        for (_, _, rows), table in zip(buckets, drawn):
            for row, (name, path, spec, _, _) in enumerate(rows):
                host[(name, path)] = table[row, :math.prod(spec.shape)].reshape(spec.shape)  # a view
        for name, path, spec, _, init in leaves:
            if isinstance(init, Constant):
                host[(name, path)] = init.host_value(spec.shape, spec.dtype)
        return {name: jax.tree_util.tree_map_with_path(lambda path, _, name=name: host[(name, path)], state)
                for name, state in states.items()}


def plan(build: Callable[[PlanningRngs], Any]) -> tuple[Any, Plan]:
    """`build(rngs)` (a model constructor) run without computing anything: what it built, its parameters
    jax.ShapeDtypeStructs as `nnx.eval_shape` would leave them, and the `Plan` of their values."""
    rngs = PlanningRngs()
    built = build(rngs)
    return built, Plan(rngs.records, rngs.count)


def _buckets(leaves: list) -> list:
    """Random leaves grouped by (initializer, dtype), each group cut into buckets of similar size, largest first:
    [((init, dtype), size drawn per row, leaves)]."""
    groups: dict = {}
    for leaf in leaves:
        spec, init = leaf[2], leaf[4]
        groups.setdefault((init, spec.dtype), []).append(leaf)
    out = []
    for (init, dtype), group in groups.items():
        group.sort(key=lambda leaf: -math.prod(leaf[2].shape))
        start = 0
        while start < len(group):
            size = math.prod(group[start][2].shape)
            end, padding = start + 1, 0
            while end < len(group):
                n = math.prod(group[end][2].shape)
                if 2 * n < size and padding + size - n > _BUCKET_SLACK:
                    break
                padding += size - n
                end += 1
            out.append(((init, dtype), size, group[start:end]))
            start = end
    return out


def _draw_program(buckets: list) -> Callable:
    """The jitted program: key -> [one (rows, size) table per bucket]."""
    draws = sorted({leaf[3] for _, _, rows in buckets for leaf in rows})
    position = {d: i for i, d in enumerate(draws)}

    @jax.jit
    def run(key):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(draws, jnp.uint32))  # nnx.Rngs' keys
        tables = []
        for (init, dtype), size, rows in buckets:
            rows_keys = keys[np.asarray([position[leaf[3]] for leaf in rows])]
            tables.append(init.draw(rows_keys, [init.variance(leaf[2].shape) for leaf in rows], size, dtype))
        return tables
    return run
