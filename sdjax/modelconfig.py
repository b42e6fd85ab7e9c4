"""Model configs: frozen dataclasses whose field names are diffusers' / transformers' config.json names."""
from __future__ import annotations

import dataclasses
from typing import Any


def from_dict(cls, d: dict[str, Any], *, ignore: tuple[str, ...] = ()):
    """Build config dataclass `cls` from a config.json dict.

    Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) and keys in `ignore` are dropped.
    Any other key the dataclass does not know is an error that names it, so a checkpoint we cannot
    represent is never silently loaded as something else.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, unknown = {}, []
    for key, value in d.items():
        if key.startswith("_") or key in ignore:
            continue
        if key not in names:
            unknown.append(key)
            continue
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if unknown:
        raise ValueError(f"{cls.__name__}: unsupported config keys {sorted(unknown)}")
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    """Config as a JSON-ready dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out
