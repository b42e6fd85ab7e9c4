"""LoRA training: low-rank adapters on a pretrained UNet (and text encoder) train while its weights stay frozen.

    python train.py --config configs/lora_sd15.py --config.workdir=runs/my_style \
        --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/my_images
    # -> runs/my_style/lora/pytorch_lora_weights.safetensors  (diffusers' load_lora_weights, sdjax.load_lora)
    #    runs/my_style/lora/my_style.safetensors              (kohya: A1111 / ComfyUI, <lora:my_style:1>)

With `lora.rank` > 0 train.py adds the adapters (`add_adapters`: sdjax.lora.add_lora, PEFT's initialisation, up
zero so training starts from the pretrained model) to the built modules before they are placed on the mesh, so they
are sharded like any parameter. The train state's `params` are the adapters alone (`nnx.LoRAParam`,
`training.split_trainable`), and so are the optimizer state, the EMA and the checkpoints; the base weights are the
step's frozen argument, read again from `model.init_from` on a resume. `lora.dropout` (PEFT's lora_dropout) drops
each adapter's input while training, with keys drawn from the step's (`with_dropout`). At every checkpoint and at
the end the (EMA) adapters are written in diffusers' and kohya's formats (`export`).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import lora
from sdjax.cli import names as _names
from sdjax.checkpoint import export_dtype

log = logging.getLogger(__name__)

ADAPTER = "default"  # the adapters' name in the modules (PEFT's); lora.name names only the exported files
_INIT_STREAM, _DROPOUT_STREAM = 0x4C6F5241, 0x44726F70  # fold_in constants: "LoRA", "Drop"


def targets(cfg, modules=("unet", "text_encoder")) -> dict[str, tuple[str, ...]]:
    """{module: layer names} to adapt: lora.targets on the UNet, and lora.text_encoder_targets on the text encoders
    of `modules` (SDXL: both) when they train (train_text_encoder). A name is a path suffix ("to_q", "attn2.to_q");
    "a,b" is two names."""
    out = {"unet": _names(cfg.lora.targets)}
    if cfg.train_text_encoder:
        out.update({m: _names(cfg.lora.text_encoder_targets) for m in ("text_encoder", "text_encoder_2")
                    if m in modules})
    return out


# configs/train_base.py's lora block without the rank (tests/test_lora_training.py checks that they agree)
DEFAULTS = dict(alpha=0.0, targets=("to_q", "to_k", "to_v", "to_out.0"),
                text_encoder_targets=("q_proj", "k_proj", "v_proj", "out_proj"), dropout=0.0, name="")


def check_config(cfg) -> None:
    """The lora block, checked before anything is built: a ValueError that names the setting."""
    c = cfg.lora
    if c.rank < 0:
        raise ValueError(f"lora.rank={c.rank}: 0 trains the whole model, > 0 low-rank adapters of that rank")
    if c.rank == 0:  # then a lora setting changed from its default would do nothing: say so
        given = {k: _names(c[k]) if k.endswith("targets") else c[k] for k in DEFAULTS if k in c}
        changed = sorted(k for k, value in given.items() if value != DEFAULTS[k])
        if changed:
            raise ValueError(f"lora.{changed[0]} is set but lora.rank is 0 (full fine-tuning): set --config.lora.rank "
                             "(e.g. 4) to train adapters, or drop the lora settings")
        return
    if cfg.stage != "diffusion":
        raise ValueError("lora.rank > 0 trains adapters on the UNet and text encoder: stage must be 'diffusion'")
    for module, layer_names in targets(cfg).items():
        if not layer_names:
            field = "targets" if module == "unet" else "text_encoder_targets"
            raise ValueError(f"lora.{field} is empty: name the {module} layers to adapt (e.g. "
                             + ("to_q,to_k,to_v,to_out.0)" if module == "unet" else "q_proj,k_proj,v_proj,out_proj)"))
    if c.alpha < 0:
        raise ValueError(f"lora.alpha={c.alpha}: 0 means the rank (scale 1), else a positive number")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"lora.dropout={c.dropout}: a probability in [0, 1)")
    if c.name and (os.sep in c.name or "/" in c.name or c.name.startswith(".")
                   or f"{c.name}.safetensors" == lora.DIFFUSERS_NAMES[0]):
        raise ValueError(f"lora.name={c.name!r} names a file in workdir/lora: no folders, no leading dot, not the "
                         "diffusers file's name")


def checkpoint_meta(cfg) -> dict:
    """What a checkpoint records of the adapters beyond their arrays: the scale alpha / rank they trained under."""
    return {"lora_alpha": float(cfg.lora.alpha or cfg.lora.rank)} if cfg.lora.rank else {}


def check_resume(cfg, meta: dict) -> None:
    """A resume whose lora.alpha differs from the checkpoint's would scale the trained adapters anew: an error."""
    alpha = checkpoint_meta(cfg).get("lora_alpha")
    if alpha is not None and meta.get("lora_alpha", alpha) != alpha:
        raise ValueError(f"lora.alpha={alpha:g} (scale alpha / rank = {alpha / cfg.lora.rank:g}), but the "
                         f"checkpoints in {cfg.workdir} trained with alpha {meta['lora_alpha']:g}: resume with "
                         f"--config.lora.alpha={meta['lora_alpha']:g}, or use another --config.workdir")


def file_name(cfg) -> str:
    """The kohya file's stem (A1111's name for the LoRA): lora.name, or the workdir's folder name."""
    return cfg.lora.name or Path(cfg.workdir).absolute().name


def add_adapters(graphdefs: dict, states: dict, cfg, *, pretrained=None) -> tuple[dict, dict]:
    """New adapters (rank, alpha, dropout of cfg.lora) on the target layers of `states`' modules: (graphdefs,
    states) with them. Their initial values come from `seed` (a resume replaces them with the checkpoint's).
    `pretrained`: the names of the modules loaded from disk (a warning for adapters on a random one)."""
    c = cfg.lora
    graphdefs, states = dict(graphdefs), dict(states)
    key = jax.random.fold_in(jax.random.key(cfg.seed), _INIT_STREAM)
    for i, (name, layer_names) in enumerate(targets(cfg, tuple(states)).items()):
        if pretrained is not None and name not in pretrained:
            log.warning("LoRA on a randomly initialised %s: its weights never train (set model.init_from to a "
                        "pretrained model)", name)
        module = nnx.merge(graphdefs[name], states[name])
        paths = lora.add_lora(module, ADAPTER, rank=c.rank, targets=layer_names, key=jax.random.fold_in(key, i),
                              alpha=c.alpha or None, dtype=jnp.float32)  # fp32 over a bf16 base too
        for adapter in adapter_layers(module):
            adapter.dropout = float(c.dropout)  # static: part of the graph the step compiles
        graphdefs[name], state = nnx.split(module)
        states[name] = nnx.to_pure_dict(state)
        log.info("LoRA rank %d (alpha %g) on %d %s layers", c.rank, c.alpha or c.rank, len(paths), name)
    return graphdefs, states


def adapter_layers(module: nnx.Module) -> list:
    """The training adapters (sdjax.layers.LoRA) of a module, in layer order."""
    return [layer.lora[ADAPTER] for layer in lora.adaptable_layers(module).values()
            if layer.lora is not None and ADAPTER in layer.lora]


def with_dropout(loss_fn: Callable) -> Callable:
    """loss_fn whose modules' adapters drop their input (their `dropout` rate), each with its own key from the
    step's rng; the loss's own draws (noise, timesteps) are those of the run without dropout."""
    def loss(modules, batch, rng):
        key = jax.random.fold_in(rng, _DROPOUT_STREAM)
        for i, adapter in enumerate(a for module in modules.values() for a in adapter_layers(module)):
            adapter.dropout_key = jax.random.fold_in(key, i)
        return loss_fn(modules, batch, rng)
    return loss


def export(modules: dict, folder: str | os.PathLike, *, name: str, dtype: str = "") -> list[Path]:
    """The adapters of modules["unet"] (and the text encoders') as folder/pytorch_lora_weights.safetensors (diffusers)
    and folder/<name>.safetensors (kohya), in export.dtype `dtype`; each file replaced whole (a kill mid-write leaves
    the previous one)."""
    folder = Path(folder)
    target = {k: modules[k] for k in lora.lora_files.COMPONENTS if k in modules}
    written = []
    for fmt, file in (("diffusers", lora.DIFFUSERS_NAMES[0]), ("kohya", f"{name}.safetensors")):
        tmp = lora.save_lora(target, folder / ".writing" / file, format=fmt, name=ADAPTER, dtype=export_dtype(dtype))
        os.replace(tmp, folder / file)
        written.append(folder / file)
    shutil.rmtree(folder / ".writing", ignore_errors=True)
    return written
