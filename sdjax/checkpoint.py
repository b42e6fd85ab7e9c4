"""Checkpoints in the work directory (orbax), preemption, and the trained model out (export).

    ckpt = Checkpointer(workdir, keep=3, async_save=True)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state)      # ShapeDtypeStructs carrying their shardings
    ckpt.save(step, state, meta)                        # asynchronous; ckpt.close() waits

A checkpoint holds the whole train state pytree (params, optimizer state, EMA, step, RNG key) plus a
JSON `meta` (data position, optimizer step, config) so a restarted run continues exactly. Start-up
order (train.py): resume from the workdir's latest checkpoint; else `init_from` a pretrained model;
else a fresh initialisation.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sdjax.cli import one_line

log = logging.getLogger(__name__)


class Checkpointer:
    """An orbax CheckpointManager under `workdir/checkpoints` keeping the last `keep` checkpoints."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep if keep > 0 else None, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` at `step` (returns once the arrays are copied off the devices)."""
        if step in self.manager.all_steps():
            return
        with self._disk_errors(step):
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

    @contextlib.contextmanager
    def _disk_errors(self, step: int | None = None):
        """A save that fails for want of disk space (here or, being asynchronous, at the next save or wait) is an
        OSError that says so, where, and which checkpoint is intact; orbax leaves the partial one as a tmp folder
        that no restore reads."""
        try:
            yield
        except Exception as e:  # orbax / tensorstore wrap the OS error in their own types
            text = str(e)
            if "No space left on device" not in text and "os_error_code='28'" not in text:
                raise
            intact = [s for s in self.manager.all_steps() if s != step]
            raise OSError(errno.ENOSPC, f"a checkpoint could not be written to {self.directory}: no space left on "
                          f"device; free some space (or lower checkpoint.keep) and restart: the run resumes from "
                          + (f"checkpoint {max(intact)}, which is intact" if intact else "the start")) from None

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of checkpoint `step` (default: the latest), placed as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def restore_readable(self, abstract_state):
        """(state, meta) of the newest checkpoint that reads back, or None if the workdir has none.

        A newer one that does not read back (files missing or truncated: a crash mid-save, a full disk) is renamed
        `checkpoints/N.unreadable` (kept for inspection, never deleted) with one log line that names it and why.
        Checkpoints of another model (other array shapes than `abstract_state`) are a ValueError that says so."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            self._check_same_model(step, abstract_state)
            try:
                return self.restore(abstract_state, step)
            except Exception as e:  # orbax / tensorstore raise many types for damaged files
                if jax.process_count() > 1:
                    raise ValueError(f"checkpoint {self.directory / str(step)} does not read back ({_short(e)}); "
                                     f"move it away to resume from an older one") from None
                aside = self.directory / f"{step}.unreadable"
                (self.directory / str(step)).rename(aside)
                log.warning("checkpoint %d does not read back (%s): moved to %s, resuming from an older one",
                            step, _short(e), aside)
                self.manager.reload()
        return None

    def _check_same_model(self, step: int, abstract_state) -> None:
        try:
            tree = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # unreadable metadata: restore() finds the damage and says so
            return
        saved, wanted = _arrays(tree), _arrays(abstract_state)
        if saved != wanted:
            count = sum(int(np.prod(s)) for s in saved.values())
            key = min(saved.keys() ^ wanted.keys() or {k for k in saved if saved[k] != wanted[k]})
            differ = (f"{key}: {saved[key] if key in saved else 'absent'} in the checkpoint, "
                      f"{wanted[key] if key in wanted else 'absent'} here")
            raise ValueError(f"{self.directory} holds checkpoints of a different model ({len(saved)} arrays, "
                             f"{count:,} values; this config's train state has {len(wanted)} arrays, "
                             f"{sum(int(np.prod(s)) for s in wanted.values()):,} values; first difference: "
                             f"{differ}): use another --config.workdir, or move {self.directory} away to start "
                             f"this model from the beginning")

    def wait(self) -> None:
        with self._disk_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._disk_errors():
            self.manager.wait_until_finished()
        self.manager.close()


def _arrays(tree) -> dict[str, tuple[int, ...]]:
    """{path: shape} of a train state's arrays (a checkpoint's metadata tree, or the state itself): two states
    that differ only in which layers hold adapters of one shape differ here."""
    def name(key):
        return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(map(name, path)): tuple(x.shape) for path, x in leaves if hasattr(x, "shape")}


def _short(error: Exception, limit: int = 300) -> str:
    text = one_line(f"{type(error).__name__}: {error}")
    return text if len(text) <= limit else text[:limit] + " ..."


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying `shardings` (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into a flag the train loop polls between steps.

    With several processes, `should_stop()` is true on all of them as soon as one got the signal, so
    they all save the same step and exit together.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.received = False
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        log.warning("received signal %d: saving a checkpoint and stopping after this step", signum)
        self.received = True

    def should_stop(self) -> bool:
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.received, np.int32))
        return bool(np.any(flags))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------
# Export: diffusers folder, single file, VAE folder
# ---------------------------------------------------------------------------------------------------------

def save_vae(vae, folder: str | os.PathLike, *, dtype=None) -> Path:
    """Write an AutoencoderKL as a diffusers `vae/` component folder (config.json + safetensors)."""
    from sdjax.weights import diffusers_folder as df
    from sdjax.weights.torch_names import to_state_dict

    folder = Path(folder)
    state_dict = to_state_dict(vae)
    if dtype is not None:
        state_dict = {k: v.astype(dtype) for k, v in state_dict.items()}
    df.write_weights(state_dict, folder, df.WEIGHT_NAMES["vae"])
    df.write_json(vae.config.to_diffusers(), folder / "config.json")
    return folder


def find_vae_folder(path: str | os.PathLike) -> Path:
    """The VAE component folder inside `path`: a vae/ folder itself, a diffusers pipeline folder, an
    autoencoder run's export folder, or an autoencoder run's workdir (its export/)."""
    path = Path(path)
    for candidate in (path, path / "vae", path / "export" / "vae"):
        if (candidate / "config.json").is_file() and any(candidate.glob("diffusion_pytorch_model*")):
            return candidate
    raise FileNotFoundError(f"{path}: no VAE found (looked for config.json + diffusion_pytorch_model.safetensors "
                            f"in {path}, {path}/vae and {path}/export/vae). Train one with stage='autoencoder' "
                            f"and export it, or give a diffusers Stable Diffusion folder.")


def load_vae(path: str | os.PathLike, **kwargs):
    """An AutoencoderKL from `find_vae_folder(path)`; kwargs: dtype, param_dtype, attention_impl."""
    from sdjax.autoencoder import AutoencoderKL, AutoencoderKLConfig
    from sdjax.initializers import plan
    from sdjax.weights import diffusers_folder as df
    from sdjax.weights.torch_names import load_state_dict

    folder = find_vae_folder(path)
    config = AutoencoderKLConfig.from_diffusers(df.read_json(folder / "config.json"))
    vae, _ = plan(lambda rngs: AutoencoderKL(config, rngs=rngs, **kwargs))  # abstract: nothing initialised
    load_state_dict(vae, df.read_weights(folder, df.WEIGHT_NAMES["vae"]), what=str(folder))
    return vae


_EXPORT_DTYPES = {"": None, "float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


EXPORT_FORMATS = ("diffusers", "single_file", "vae")


def check_export(formats, dtype: str, stage: str | None = None) -> None:
    """The export settings, checked before training starts (a typo must not cost the run): a ValueError that names
    the setting and the choices; with `stage`, also that the run trains what the formats write."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"export.formats={tuple(formats)}: {unknown[0]!r} is not a format; choose from "
                         f"{', '.join(EXPORT_FORMATS)}")
    if stage == "autoencoder" and set(formats) - {"vae"}:
        raise ValueError(f"export.formats={tuple(formats)}: an autoencoder run trains only the VAE; export it with "
                         f"export.formats=('vae',)")
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export.dtype={dtype!r}; choose one of {', '.join(repr(d) for d in _EXPORT_DTYPES)}")


def export_dtype(name: str):
    """export.dtype (checked by `check_export`) as a numpy dtype; None for "": each parameter's own."""
    if _EXPORT_DTYPES[name] == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _EXPORT_DTYPES[name]


def export_model(modules: dict, *, tokenizer, scheduler_config: dict, path: str | os.PathLike,
                 formats: tuple[str, ...], dtype: str = "", tokenizer_2=None, options: dict | None = None) -> list[Path]:
    """Write the trained modules: "diffusers" -> path/ (a diffusers folder), "single_file" ->
    path/model.safetensors (CompVis layout, A1111), "vae" -> path/vae/ (autoencoder stage).

    `modules` must hold host (numpy-backed) parameters. Returns the written paths.
    """
    from sdjax import pretrained
    from sdjax.pipeline import StableDiffusion

    check_export(formats, dtype)
    np_dtype = export_dtype(dtype)
    path = Path(path)
    written = []
    for fmt in formats:
        if fmt == "vae":
            written.append(save_vae(modules["vae"], path / "vae", dtype=np_dtype))
            continue
        missing = [m for m in ("unet", "vae") if m not in modules]
        missing += [] if "text_encoder" in modules or "text_encoder_2" in modules else ["text_encoder"]
        if missing:
            raise ValueError(f"export {fmt!r} needs a whole pipeline; this run has no {missing} (an autoencoder "
                             f"run exports with export.formats=('vae',))")
        pipe = StableDiffusion.from_modules(modules, tokenizer, scheduler_config, tokenizer_2=tokenizer_2,
                                            options=options)
        if fmt == "diffusers":
            written.append(pretrained.save_pretrained(pipe, path, dtype=np_dtype))
        else:
            written.append(pretrained.save_single_file(pipe, path / "model.safetensors", dtype=np_dtype))
    (path / "export_info.json").write_text(json.dumps({"formats": list(formats), "dtype": dtype}) + "\n")
    return written
