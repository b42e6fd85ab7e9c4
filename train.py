"""Train Stable Diffusion (fine-tune, or from scratch with its autoencoder): see configs/train_base.py.

    python train.py --config configs/finetune_sd15.py --config.workdir=runs/x --config.batch_size=64 \
        --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/my_images
    python train.py --config configs/tiny.py --config.workdir=runs/tiny          # CPU, minutes
    python train.py --config configs/lora_sd15.py --config.workdir=runs/my_style \
        --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/my_images   # LoRA

Reads top to bottom: config -> processes and mesh -> data -> models (resume | init_from | scratch) ->
sharded train state -> one jitted, donated train step -> loop with metrics, previews, checkpoints ->
export. A run killed at any point and restarted with the same command continues where its last
checkpoint left off, with the same data order and the same randomness; SIGTERM saves one first.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the command line is checked before jax and the models load: a typo fails at once
    from absl import app
    from ml_collections import config_flags

    from sdjax import cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                              lock_config=True)
    app.define_help_flags()  # --help, as app.run would
    _ARGV = cli.parse(sys.argv, prog="train.py")
    if len(_ARGV) > 1:
        cli.fail("train.py", f"unexpected arguments {_ARGV[1:]}; settings go in --config.FIELD=VALUE")
    if _CONFIG.value is None:
        cli.fail("train.py", "--config=configs/NAME.py is required")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sdjax import checkpoint, latent_cache, lora, lora_training, prompts, sharding, training  # noqa: E402
from sdjax.data import preprocess  # noqa: E402

log = logging.getLogger("train")


def make_dataset(config):
    """The config's dataset: map-style, {"image": uint8 (H, W, 3), "caption": str} per index."""
    d = config.data
    if d.source == "shapes":
        from sdjax.data.shapes import ShapesDataset

        try:
            return ShapesDataset(size=d.shapes_size, seed=config.seed, split=d.shapes_split,
                                 length=d.shapes_length, colors=d.shapes_colors)
        except ValueError as e:
            raise ValueError(f"data.shapes_*: {e}") from None
    if d.source == "folder":
        from sdjax.data.folder import FolderDataset

        if not d.path:
            raise ValueError("data.source='folder' needs --config.data.path=FOLDER")
        return FolderDataset(d.path, min_size=d.min_size, missing_caption=d.missing_caption,
                             caption_column=d.caption_column)
    if d.source == "tfds":
        from sdjax.data.tfds import TFDSDataset

        if not d.tfds_name:
            raise ValueError("data.source='tfds' needs --config.data.tfds_name=NAME")
        return TFDSDataset(d.tfds_name, split=d.tfds_split, data_dir=d.tfds_data_dir or None, image_key=d.image_key,
                           caption_key=d.caption_key, min_size=d.min_size)
    raise ValueError(f"data.source={d.source!r}; choose 'shapes', 'folder' or 'tfds'")


def init_processes(config) -> None:
    """Device set-up: mesh.cpu_devices, then multi-process (distributed.enabled, or JAX_COORDINATOR_ADDRESS in the
    environment); must run before anything touches the devices."""
    dist = config.distributed
    if config.mesh.cpu_devices > 0 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        try:  # one CPU device per core runs the data-parallel halves of a step side by side
            jax.config.update("jax_num_cpu_devices", config.mesh.cpu_devices)
        except RuntimeError as e:  # JAX already started in this process (a notebook, a test): keep its devices
            log.warning("mesh.cpu_devices=%d not applied: %s", config.mesh.cpu_devices, e)
    if dist.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    if config.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
    if dist.enabled or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # the config's fields first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then
        # jax's cluster detection (SLURM, Open MPI, TPU pods, Kubernetes) for whatever is still unset
        kwargs = {}
        address = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
        num_processes = dist.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", 0))
        process_id = dist.process_id if dist.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
        if address:
            kwargs["coordinator_address"] = address
        if num_processes:
            kwargs["num_processes"] = num_processes
        if process_id >= 0:
            kwargs["process_id"] = process_id
        jax.distributed.initialize(**kwargs)


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
    """The global batch (per micro-step) splits evenly over the mesh's devices and over the processes; else a
    ValueError that names whichever of the two it does not."""
    failed = [f"the {n} {what}" for n, what in ((num_devices, "devices of the mesh"),
                                                  (num_processes, "processes (each reads batch_size / processes rows)"))
              if batch_size % n]
    if failed:
        raise ValueError(f"batch_size={batch_size} must be a multiple of " + " and of ".join(failed))


def record_config(workdir: Path, config, step: int) -> None:
    """workdir/config.json: the config of the run that started the workdir, kept; a resumed run whose settings
    differ from the last recorded ones is recorded beside it as config.step_<step>.json (the step it started from)."""
    text = config.to_json_best_effort(indent=2) + "\n"
    first = workdir / "config.json"
    if not first.exists():
        first.write_text(text)
        return
    latest = max(workdir.glob("config.step_*.json"), default=first)  # zero-padded steps: the names sort by step
    if json.loads(latest.read_text()) != json.loads(text):
        (workdir / f"config.step_{step:07d}.json").write_text(text)
        log.info("config differs from %s: recorded as config.step_%07d.json", latest.name, step)


def supersede_metrics(workdir: Path, step: int) -> None:
    """Rows of metrics.jsonl after `step` (the resumed step) were logged by a run that did not save them: they move
    to metrics.superseded.jsonl, so metrics.jsonl reads as one run and nothing is deleted."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return
    kept, later = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        (later if line.strip() and json.loads(line).get("step", 0) > step else kept).append(line)
    if later:
        with open(workdir / "metrics.superseded.jsonl", "a", encoding="utf-8") as f:
            f.writelines(later)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
        log.info("metrics.jsonl: %d row(s) after step %d moved to metrics.superseded.jsonl", len(later), step)


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch when it is installed (1.0 to
    1.6 s of train.py's start-up, measured) only to accept torch tensors, and train.py logs floats and numpy images.
    A process that has imported torch already keeps it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX is imported
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Reporter:
    """metrics.jsonl, TensorBoard and the progress bar (process 0 only)."""

    def __init__(self, config, workdir: Path, start_step: int):
        self.active = jax.process_index() == 0
        self.batch_size = config.batch_size * config.optimizer.grad_accum_steps
        self.losses, self.last = [], None
        self.mark_time, self.mark_step = time.time(), start_step
        if not self.active:
            return
        from tqdm import tqdm

        self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = summary_writer_class()(str(workdir / "tensorboard"))
        self.bar = tqdm(total=config.num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not config.progress_bar, file=sys.stderr)

    def add(self, metrics: dict) -> None:
        self.losses.append(float(metrics["loss"]))
        self.last = metrics

    def write(self, step: int, extra: dict) -> dict:
        now = time.time()
        steps = max(step - self.mark_step, 1)
        row = {"step": step, "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
               **{k: float(v) for k, v in self.last.items() if k != "loss"},
               "images_per_s": steps * self.batch_size / max(now - self.mark_time, 1e-9),
               "step_time_s": (now - self.mark_time) / steps, **extra}
        self.losses, self.mark_time, self.mark_step = [], now, step
        if self.active:
            self.jsonl.write(json.dumps(row) + "\n")
            self.jsonl.flush()
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}", refresh=False)
        return row

    def advance(self, step: int) -> None:
        if self.active:
            self.bar.update(step - self.bar.n)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self.active:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.active:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def main(config, *, sample_fn=None) -> dict:
    """Run (or resume) the training `config` describes; returns {"step", "loss", "preempted"}.

    sample_fn(modules, prompts, seed) -> uint8 images: the preview sampler (default: sdjax.pipeline).
    """
    init_processes(config)
    t_start = time.time()
    if not config.workdir:
        raise ValueError("set --config.workdir=DIR: checkpoints, metrics and the exported model go there")
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    checkpoint.check_export(tuple(config.export.formats), config.export.dtype, config.stage)
    lora_training.check_config(config)

    # Mesh and data: each process reads its own rows of every global batch.
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    nproc, accum = jax.process_count(), config.optimizer.grad_accum_steps
    log.info("mesh %s over %d %s device(s)", dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform)
    check_batch_size(config.batch_size, mesh.size, nproc)
    dataset = make_dataset(config)
    prep = preprocess.make_preprocess(config.data.resolution, center_crop=config.data.center_crop,
                                      random_flip=config.data.random_flip,
                                      caption_dropout=config.data.caption_dropout if config.stage == "diffusion" else 0.0,
                                      resample=config.data.resample)

    # Models: structure and pretrained weights; random ones drawn by one small program, cut on the host
    # (sdjax.initializers); LoRA adapters added (lora.rank > 0); all placed sharded. What trains (whole modules,
    # or only the adapters) is the train state's; the rest is the step's frozen argument.
    models = training.build_models(config)
    trainable = training.trainable_modules(config, tuple(models.graphdefs))
    sdxl = "text_encoder_2" in models.graphdefs
    min_size = config.mesh.fsdp_min_size
    states = {**models.loaded, **(models.init_fn() if models.init_fn is not None else {})}
    if config.lora.rank:
        models.graphdefs, states = lora_training.add_adapters(models.graphdefs, states, config,
                                                              pretrained=tuple(models.loaded))
    states = sharding.put_global(states, sharding.param_shardings(mesh, states, min_size=min_size))
    params, frozen = training.split_trainable(models.graphdefs, states, trainable,
                                              training.trainable_variables(config))
    del states

    # Train state: resume from the workdir, else start from the weights above.
    tx, schedules = training.make_optimizer(config.optimizer, num_steps=config.num_steps, trainable=trainable)
    init_state = functools.partial(training.init_state, tx=tx, seed=config.seed, ema_decay=config.ema.decay)
    state_abstract = jax.eval_shape(init_state, params)
    state_shardings = sharding.param_shardings(mesh, state_abstract, min_size=min_size)
    sharding.barrier("models")
    ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    restored = ckpt.restore_readable(checkpoint.abstract_with_shardings(state_abstract, state_shardings))
    if restored is not None:
        state, meta = restored
        del params
        lora_training.check_resume(config, meta)
        if (meta.get("batch_size"), meta.get("seed")) != (config.batch_size, config.seed):
            log.warning("resuming with batch_size/seed %s/%s (checkpoint: %s/%s): the data order changes",
                        config.batch_size, config.seed, meta.get("batch_size"), meta.get("seed"))
        if meta.get("init_from", config.model.init_from) != config.model.init_from:
            log.warning("resuming from model.init_from=%s (checkpoint: %s): the frozen weights are this one's",
                        config.model.init_from, meta["init_from"])
        log.info("resumed from %s at step %d", ckpt.directory, meta["step"])
    else:
        state = training.sharded_init_state(params, tx, state_shardings, seed=config.seed,
                                            ema_decay=config.ema.decay)

    start = int(jax.device_get(state["step"]))
    if is_main:  # the run is known to start: record its config, and supersede what a killed run logged after start
        record_config(workdir, config, start // config.optimizer.grad_accum_steps)
        supersede_metrics(workdir, start // config.optimizer.grad_accum_steps)
    trained_params = sum(np.size(x) for x in jax.tree.leaves(state["params"]))
    log.info("train state ready in %.1fs (%s parameters trained)", time.time() - t_start, f"{trained_params:,}")
    held, whole = sharding.bytes_per_device(state_abstract, state_shardings)
    log.info("train state: %.1f MB on each device of %.1f MB (mesh.fsdp=%d)", held / 1e6, whole / 1e6,
             mesh.shape["fsdp"])
    loss_fn = training.make_loss_fn(config, scheduler_config=models.scheduler_config,
                                    latent_scaling=models.vae_config.latent_scaling)
    if config.lora.rank and config.lora.dropout:
        loss_fn = lora_training.with_dropout(loss_fn)
    step_fn = training.make_train_step(models.graphdefs, loss_fn, tx, schedules, grad_accum_steps=accum,
                                       ema_decay=config.ema.decay, ema_warmup=config.ema.warmup)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))

    def host_modules() -> dict:
        """The modules with the EMA (else current) weights, as numpy, on every process."""
        return training.merge_modules(models.graphdefs, *sharding.to_host((frozen, state.get("ema", state["params"]))))

    def export_adapters() -> None:
        """workdir/lora: the EMA (else current) adapters as diffusers' and kohya's files (every process gathers
        them, process 0 writes; the base weights stay where they are)."""
        adapters = sharding.to_host(state.get("ema", state["params"]))
        if is_main:
            modules = training.merge_modules(models.graphdefs, {k: frozen[k] for k in adapters}, adapters)
            lora_training.export(modules, workdir / "lora", name=lora_training.file_name(config),
                                 dtype=config.export.dtype)

    if config.preview_every and sample_fn is None:
        if config.stage != "diffusion":
            raise ValueError("previews sample images: set preview_every=0 for stage='autoencoder'")
        sample_fn = training.pipeline_sample_fn(models.tokenizer, models.scheduler_config, mesh=mesh,
                                                num_inference_steps=config.preview.num_inference_steps,
                                                guidance_scale=config.preview.guidance_scale,
                                                resolution=config.data.resolution, tokenizer_2=models.tokenizer_2,
                                                options=models.options)

    # The loop: step s (micro-step m = s * accum + k) reads global batch m of the data order.
    total = config.num_steps * accum
    shard = dict(seed=config.seed, start_step=start, process_index=jax.process_index(), process_count=nproc,
                 shuffle=config.data.shuffle)
    caption_tokens = [prompts.CaptionTokenizer(t, chunks=config.data.caption_chunks,
                                               weighted=config.data.weighted_captions)
                      for t in (models.tokenizer, models.tokenizer_2) if t is not None]

    def caption_ids(captions: list[str]) -> dict:
        """{"input_ids"(, "token_weights")}: (B, 77) or (B, chunks, 77); SDXL (B, tokenizers, chunks, 77)."""
        if not sdxl:
            return caption_tokens[0](captions)
        parts = [tokens(captions) for tokens in caption_tokens]
        return {k: np.stack([p[k].reshape(len(p[k]), -1, p[k].shape[-1]) for p in parts], axis=1) for k in parts[0]}

    # SDXL's size ids of each image (the refiner's with data.aesthetic_score)
    time_ids = functools.partial(training.sdxl_time_ids, resolution=config.data.resolution,
                                 aesthetic_score=config.data.aesthetic_score if models.size_ids == 5 else None)
    cache = None
    if config.data.cache_latents:  # encode every image (and caption) once, with the frozen encoders
        if config.stage != "diffusion":
            raise ValueError("data.cache_latents is for stage='diffusion' (the autoencoder trains on pixels)")
        latent_cache.check_config(config.data)
        encode = jax.jit(latent_cache.make_encode_fn(models.graphdefs, with_context=not config.train_text_encoder,
                                                     clip_skip=config.model.clip_skip),
                         out_shardings=sharding.replicated(mesh))
        cache = latent_cache.build_cache(
            dataset, functools.partial(encode, {k: v for k, v in frozen.items() if k not in trainable}), mesh=mesh,
            batch_size=config.batch_size,
            preprocess_fn=preprocess.make_preprocess(config.data.resolution, resample=config.data.resample),
            tokenizer=lambda captions: caption_ids(captions)["input_ids"], process_index=jax.process_index(),
            process_count=nproc,
            time_ids_fn=time_ids if sdxl else None)
        batches = latent_cache.cached_batches(cache, batch_size=config.batch_size // nproc,
                                              caption_dropout=config.data.caption_dropout, **shard)
    else:
        batches = preprocess.iterate_batches(dataset, config.batch_size // nproc, preprocess=prep,
                                             num_threads=config.data.num_threads, **shard)

    def device_batch(host: dict) -> dict:
        if cache is not None:  # already the model's inputs
            return sharding.host_batch_to_global(mesh, host)
        batch = {"images": host["images"]}
        if config.stage == "diffusion":
            batch.update(caption_ids(host["captions"]))
            if sdxl:  # each image's size ids
                batch["time_ids"] = time_ids(host)
        return sharding.host_batch_to_global(mesh, batch)

    watcher = checkpoint.PreemptionWatcher()  # from here SIGTERM (during compilation too) saves the next step
    try:
        batch = device_batch(next(batches)) if start < total else None
        if batch is not None:  # compile ahead, then line the processes up before the first collective runs
            train_step = train_step.lower(state, frozen, batch).compile()
            log.info("train step compiled %.1fs after start", time.time() - t_start)
        sharding.barrier("compiled")
        reporter = Reporter(config, workdir, start // accum)
    except BaseException:
        watcher.restore()
        ckpt.close()
        raise
    pending, preempted, micro = None, False, start

    def read(pending):
        micro_step, metrics = pending
        metrics = jax.device_get(metrics)
        training.check_finite(micro_step // accum + 1, metrics)
        reporter.add(metrics)

    try:
        for micro in range(start, total):
            state, metrics = train_step(state, frozen, batch)
            if micro + 1 < total:
                batch = device_batch(next(batches))  # read the next batch while the device computes
            if pending is not None:
                read(pending)  # the previous step's metrics: the device stays one step ahead
            pending = (micro, metrics)
            done = micro + 1
            step = done // accum
            at_update = done % accum == 0
            preempted = watcher.should_stop()
            every = config.checkpoint.every
            save = every > 0 and (preempted or done == total or (at_update and step % every == 0))
            log_now = at_update and (step % config.log_every == 0 or done == total)
            preview = at_update and config.preview_every and step % config.preview_every == 0
            if save or log_now or preview:
                read(pending)  # a non-finite loss stops here, before anything is saved
                pending = None
            if log_now:
                skipped = len(getattr(dataset, "skipped", ()))
                reporter.write(step, {"skipped_images": skipped} if skipped else {})
            reporter.advance(step)
            if preview:
                grid = training.preview_grid(sample_fn, host_modules(), list(config.preview.prompts),
                                             config.preview.seed)
                reporter.image("preview", grid, step)
                if is_main:
                    from PIL import Image

                    (workdir / "previews").mkdir(exist_ok=True)
                    Image.fromarray(grid).save(workdir / "previews" / f"step_{step:07d}.png")
            if save:
                ckpt.save(done, state, {"step": step, "micro_step": done, "data_step": done, "seed": config.seed,
                                        "batch_size": config.batch_size, "init_from": config.model.init_from,
                                        **lora_training.checkpoint_meta(config)})
                if config.lora.rank:
                    export_adapters()
            if preempted:
                log.warning("preempted: saved step %d (micro-step %d); restart to continue", step, done)
                break
        if pending is not None:
            read(pending)
    finally:
        ckpt.close()
        reporter.close()
        watcher.restore()

    if not preempted and config.lora.rank:
        export_adapters()
    if not preempted and config.export.formats:
        modules = host_modules()
        if config.lora.rank:  # the whole model, with the adapters merged into its weights
            lora.fuse_lora({k: modules[k] for k in ("unet", "text_encoder", "text_encoder_2") if k in modules})
        if config.stage == "autoencoder" and config.autoencoder.set_scaling_factor:
            images = next(batches)["images"]  # this host's next batch
            factor = training.latent_scaling_factor(modules["vae"], images)
            modules["vae"].config = dataclasses.replace(modules["vae"].config, scaling_factor=factor)
            log.info("VAE scaling_factor = %.5f (1 / std of the latents of %d images)", factor, len(images))
        if is_main:
            out = Path(config.export.path or workdir / "export")
            written = checkpoint.export_model(modules, tokenizer=models.tokenizer,
                                              scheduler_config=models.scheduler_config, path=out,
                                              formats=tuple(config.export.formats), dtype=config.export.dtype,
                                              tokenizer_2=models.tokenizer_2, options=models.options)
            log.info("exported %s", ", ".join(map(str, written)))
    last = reporter.last or {}
    return {"step": (micro + 1) // accum if total > start else start // accum,
            "loss": float(last.get("loss", math.nan)), "preempted": preempted, "trained_params": trained_params,
            "checkpoints": str(ckpt.directory),
            "export": str(Path(config.export.path or workdir / "export")) if config.export.formats else "",
            "lora": str(workdir / "lora") if config.lora.rank else ""}


if __name__ == "__main__":
    def _run(argv):
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
        try:
            result = main(_CONFIG.value)
        except (ValueError, FileNotFoundError) as e:
            cli.fail("train.py", str(e))
        except OSError as e:  # a full disk (sdjax.checkpoint says which checkpoint is intact), a read-only workdir
            cli.fail("train.py", e.strerror if e.errno == errno.ENOSPC and e.strerror else str(e))
        except FloatingPointError as e:  # not a settings error: exit code 3
            print(f"train.py: error: {cli.one_line(e)}", file=sys.stderr)
            sys.exit(3)
        log.info("done: %s", result)
        if jax.process_index() == 0:
            print(f"train.py: step {result['step']}, loss {result['loss']:.4f}; checkpoints in {result['checkpoints']}"
                  + (f"; LoRA in {result['lora']}" if result["lora"] else "")
                  + (f"; model exported to {result['export']}" if result["export"] and not result["preempted"] else ""))

    cli.run(_run, prog="train.py", parsed=_ARGV)
