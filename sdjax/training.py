"""Training: the objectives, the optimizer, EMA and the pure train step that `train.py` jits.

The train state is a plain pytree, so one `jax.jit` with explicit shardings and buffer donation runs a
step, and orbax saves it as is:

    state = {"step": int32 (), "rng": uint32 key data, "params": {name: pure state dict},
             "opt_state": optax state, "ema": {name: pure state dict}}   # "ema" only when ema_decay > 0

Modules enter as (graphdef, pure state dict) pairs (`split_modules`) and are rebuilt inside the step
with `nnx.merge` (`merge_modules`): the step is a function of arrays only, which also holds in NNX's
tree mode. What trains lives in `params`: whole trainable modules, or with LoRA only their adapters
(`split_trainable`, `trainable_variables`); the rest (the VAE, a frozen text encoder, the base weights
under adapters) is a separate, non-donated argument.

Objectives:
  diffusion    latents = to_latents(vae.encode(images) (mean, or a posterior sample)); t ~ U[t_min, t_max);
               x_t = add_noise(latents, noise, t); the UNet regresses noise (epsilon), v (v_prediction)
               or the latents (sample), MSE, optionally min-SNR-gamma weighted, with optional offset noise.
  autoencoder  reconstruct images through a posterior sample: L1 or L2 + kl_weight * KL (LDM's
               convention: both summed over each image, averaged over the batch); no GAN.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sdjax import schedulers
from sdjax.autoencoder import sample_latent, to_latents
from sdjax.prompts import encode_prompts

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---------------------------------------------------------------------------------------------------------
# Modules <-> pytrees
# ---------------------------------------------------------------------------------------------------------

def split_modules(modules: dict[str, nnx.Module]) -> tuple[dict, dict]:
    """{name: module} -> ({name: graphdef}, {name: pure state dict of arrays})."""
    graphdefs, states = {}, {}
    for name, module in modules.items():
        graphdef, state = nnx.split(module)
        graphdefs[name], states[name] = graphdef, nnx.to_pure_dict(state)
    return graphdefs, states


def merge_modules(graphdefs: dict, states: dict, *more: dict) -> dict[str, nnx.Module]:
    """The inverse of `split_modules` (states may hold a subset of the names: those are built); with more state
    dicts (`split_trainable`'s two parts), each module is built from its parts in all of them."""
    names = dict.fromkeys(name for part in (states, *more) for name in part)
    return {name: nnx.merge(graphdefs[name], *(part[name] for part in (states, *more) if name in part))
            for name in names}


def split_trainable(graphdefs: dict, states: dict, trainable: tuple[str, ...], wrt=...) -> tuple[dict, dict]:
    """{name: pure state} -> (params, frozen): the `wrt` variables (an nnx filter) of the `trainable` modules, and
    everything else. wrt=... (everything) trains whole modules; nnx.LoRAParam only their adapters (sdjax.lora),
    the rest of those modules joining the frozen ones. `merge_modules(graphdefs, frozen, params)` rebuilds them."""
    if wrt is ...:
        return ({name: states[name] for name in trainable},
                {name: state for name, state in states.items() if name not in trainable})
    params, frozen = {}, dict(states)
    for name in trainable:
        _, train, rest = nnx.split(nnx.merge(graphdefs[name], states[name]), wrt, ...)
        params[name], frozen[name] = nnx.to_pure_dict(train), nnx.to_pure_dict(rest)
        if not jax.tree.leaves(params[name]):
            raise ValueError(f"nothing of the {name} trains: it has no {wrt} variables")
    return params, frozen


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------

TIMESTEP_BIASES = ("none", "later", "earlier")


def timestep_bias_logits(t_min: int, t_max: int, strategy: str = "none", portion: float = 0.25,
                         multiplier: float = 1.0):
    """Log-probabilities over [t_min, t_max) that draw the last ("later") or first ("earlier") `portion` of the
    range `multiplier` times as often as the rest (diffusers' --timestep_bias_strategy); None = uniform.

    "later" spends more steps at high noise, where a model decides layout from the prompt alone.
    """
    if strategy not in TIMESTEP_BIASES:
        raise ValueError(f"unknown timestep bias {strategy!r}; choose one of {TIMESTEP_BIASES}")
    if strategy == "none" or multiplier == 1.0:
        return None
    if not 0.0 < portion < 1.0 or multiplier <= 0.0:
        raise ValueError(f"timestep bias needs 0 < portion < 1 and multiplier > 0, got portion={portion}, "
                         f"multiplier={multiplier}")
    n = t_max - t_min
    k = max(1, int(round(portion * n)))
    weights = np.ones(n)
    if strategy == "later":
        weights[n - k:] = multiplier
    else:
        weights[:k] = multiplier
    return np.log(weights / weights.sum()).astype(np.float32)


def sample_timesteps(rng, batch_size: int, t_min: int, t_max: int, logits=None):
    """Integer train timesteps in [t_min, t_max): uniform, or drawn from `logits` (see timestep_bias_logits)."""
    if logits is None:
        return jax.random.randint(rng, (batch_size,), t_min, t_max)
    return t_min + jax.random.categorical(rng, jnp.asarray(logits), shape=(batch_size,))


def sample_noise(rng, shape, offset_noise: float = 0.0):
    """Gaussian noise, plus `offset_noise` * one Gaussian per (image, channel) (offset noise)."""
    k_noise, k_offset = jax.random.split(rng)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    if offset_noise:
        noise = noise + offset_noise * jax.random.normal(k_offset, (shape[0], 1, 1, shape[-1]), jnp.float32)
    return noise


def diffusion_target(prediction_type: str, alphas_cumprod, latents, noise, t):
    """What the UNet regresses: the noise, the velocity v, or the clean latents."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return schedulers.get_velocity(alphas_cumprod, latents, noise, t)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")


def min_snr_weights(alphas_cumprod, t, prediction_type: str, gamma: float):
    """Min-SNR-gamma loss weights (Hang et al. 2023) in each target's parameterisation; ones when gamma <= 0.

    epsilon: min(snr, g) / snr; v_prediction: min(snr, g) / (snr + 1); sample: min(snr, g).
    epsilon at snr = 0 (the last step of a zero-terminal-SNR schedule) gets 1, the formula's limit (it is 1 for
    every snr < g), not 0 / 0 = NaN (which diffusers' train_text_to_image.py computes there).
    """
    if gamma <= 0:
        return jnp.ones(jnp.shape(t), jnp.float32)
    snr = schedulers.snr(alphas_cumprod, t).astype(jnp.float32)
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr < gamma, jnp.float32(1), gamma / jnp.maximum(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(unet: Callable, latents, context, rng, alphas_cumprod, *, prediction_type: str = "epsilon",
                   min_snr_gamma: float = 0.0, offset_noise: float = 0.0, t_min: int = 0, t_max: int | None = None,
                   timestep_logits=None, added_cond_kwargs=None):
    """The denoising loss of one batch: (scalar loss, {"t": timesteps, "mse": per-example MSE}).

    Timesteps are uniform in [t_min, t_max), or drawn from `timestep_logits` (over that range) when given.
    added_cond_kwargs: SDXL's pooled text embedding and size ids, passed to the UNet.
    """
    latents = latents.astype(jnp.float32)
    t_max = len(alphas_cumprod) if t_max is None else t_max
    k_t, k_noise = jax.random.split(rng)
    t = sample_timesteps(k_t, latents.shape[0], t_min, t_max, timestep_logits)
    noise = sample_noise(k_noise, latents.shape, offset_noise)
    noisy = schedulers.add_noise(alphas_cumprod, latents, noise, t)
    target = diffusion_target(prediction_type, alphas_cumprod, latents, noise, t)
    extra = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
    pred = unet(noisy, t, context, **extra).astype(jnp.float32)
    mse = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
    weights = min_snr_weights(alphas_cumprod, t, prediction_type, min_snr_gamma)
    return jnp.mean(weights * mse), {"t": t, "mse": mse}


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) per image, summed over the latent."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.astype(jnp.float32), axis=tuple(range(1, mean.ndim)))


def autoencoder_loss(vae, images, rng, *, reconstruction: str = "l1", kl_weight: float = 1e-6):
    """VAE training loss: (loss, {"recon": mean per-pixel error, "kl": mean per-image KL})."""
    mean, logvar = vae.encode(images)
    recon = vae.decode(sample_latent(mean, logvar, rng)).astype(jnp.float32)
    diff = recon - images.astype(jnp.float32)
    if reconstruction == "l1":
        err = jnp.abs(diff)
    elif reconstruction == "l2":
        err = jnp.square(diff)
    else:
        raise ValueError(f"unknown reconstruction loss {reconstruction!r}; choose 'l1' or 'l2'")
    kl = kl_divergence(mean, logvar)
    per_image = jnp.sum(err, axis=(1, 2, 3))
    loss = jnp.mean(per_image) + kl_weight * jnp.mean(kl)
    return loss, {"recon": jnp.mean(err), "kl": jnp.mean(kl)}


def make_loss_fn(cfg, *, scheduler_config: dict | None = None, latent_scaling: tuple[float, float] = (1.0, 0.0)):
    """loss_fn(modules, batch, rng) -> (loss, metrics) for `cfg.stage`.

    Diffusion batches hold "images" (B, R, R, 3) in [-1, 1] or cached "latent_mean"/"latent_logvar", and
    "input_ids" (B, 77) or (B, chunks, 77) with optional "token_weights" (`sdjax.prompts.CaptionTokenizer`), or
    cached "context" (SDXL: with "pooled"). `latent_scaling` is the VAE's (scaling_factor, shift_factor),
    `vae_config.latent_scaling`: the loss sees `sdjax.autoencoder.to_latents(z, latent_scaling)`, as the pipeline.
    SDXL (modules with "text_encoder_2"): "input_ids" / "token_weights" (B, encoders, chunks, 77), one row per
    tokenizer, and "time_ids" (B, 6): each image's original size, crop top-left and target size (the refiner's
    (B, 5): the aesthetic score for the target size), which the UNet takes with the pooled text embedding
    (`sdxl_time_ids`).
    """
    if cfg.stage == "autoencoder":
        ae = cfg.autoencoder

        def ae_loss(modules, batch, rng):
            return autoencoder_loss(modules["vae"], batch["images"], rng, reconstruction=ae.reconstruction,
                                    kl_weight=ae.kl_weight)
        return ae_loss
    if cfg.stage != "diffusion":
        raise ValueError(f"unknown stage {cfg.stage!r}; choose 'diffusion' or 'autoencoder'")

    obj = cfg.objective
    alphas_cumprod = np.asarray(schedulers.alphas_cumprod(scheduler_config))
    prediction_type = scheduler_config.get("prediction_type", "epsilon")  # model.prediction_type is in it
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}")
    T = len(alphas_cumprod)
    t_min, t_max = int(obj.timestep_min), int(obj.timestep_max or T)
    if not 0 <= t_min < t_max <= T:
        raise ValueError(f"objective.timestep_min={obj.timestep_min}, timestep_max={obj.timestep_max}: "
                         f"need 0 <= min < max <= {T} (max=0 means {T})")
    logits = timestep_bias_logits(t_min, t_max, obj.timestep_bias, obj.timestep_bias_portion,
                                  obj.timestep_bias_multiplier)

    def loss_fn(modules, batch, rng):
        k_latent, k_loss = jax.random.split(rng)
        if "latent_mean" in batch:
            mean, logvar = batch["latent_mean"], batch["latent_logvar"]
        else:
            mean, logvar = jax.lax.stop_gradient(modules["vae"].encode(batch["images"]))
        z = sample_latent(mean, logvar, k_latent) if obj.latent_sample else mean
        latents = to_latents(z.astype(jnp.float32), latent_scaling)
        added = None
        if "context" in batch:  # cached (sdjax.latent_cache); SDXL's with its pooled embedding and size ids
            context = batch["context"]
            if "pooled" in batch:
                added = {"text_embeds": batch["pooled"], "time_ids": batch["time_ids"]}
        elif "text_encoder_2" in modules:  # SDXL: both encoders' context, bigG's pooled embedding, the size ids
            from sdjax import sdxl

            context, pooled = sdxl.encode_modules(modules, batch["input_ids"], batch.get("token_weights"),
                                                  clip_skip=cfg.model.clip_skip)
            added = {"text_embeds": pooled, "time_ids": batch["time_ids"]}
        else:
            context = encode_prompts(modules["text_encoder"], batch["input_ids"], batch.get("token_weights"),
                                     clip_skip=cfg.model.clip_skip)  # (B, 77 chunks, D)
        loss, aux = diffusion_loss(modules["unet"], latents, context, k_loss, jnp.asarray(alphas_cumprod),
                                   prediction_type=prediction_type, min_snr_gamma=obj.min_snr_gamma,
                                   offset_noise=obj.offset_noise, t_min=t_min, t_max=t_max,
                                   timestep_logits=logits, added_cond_kwargs=added)
        return loss, {"mse": jnp.mean(aux["mse"])}
    return loss_fn


def sdxl_time_ids(host: dict, resolution: int, aesthetic_score: float | None = None) -> np.ndarray:
    """SDXL's size ids of a host batch, float32: each image's original (height, width), the (top, left) of its crop
    and the target size (resolution, resolution), (B, 6), as diffusers' SDXL training script builds add_time_ids;
    for the refiner (`aesthetic_score` given) the score in place of the target size, (B, 5), as the refiner's
    pipeline orders them. Batches without "original_size" / "crop_top_left" (a dataset already at its resolution)
    get the target size and (0, 0)."""
    n = len(host["images"])
    original = host.get("original_size", np.full((n, 2), resolution))
    corner = host.get("crop_top_left", np.zeros((n, 2)))
    tail = np.full((n, 2), resolution) if aesthetic_score is None else np.full((n, 1), aesthetic_score)
    return np.concatenate([original, corner, tail], axis=1).astype(np.float32)


def latent_scaling_factor(vae, images) -> float:
    """1 / std of the posterior means of `images`: the VAE's `scaling_factor` (unit-variance latents, as LDM
    sets it for a new autoencoder)."""
    graphdef, state = nnx.split(vae)
    mean = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x)[0].astype(jnp.float32))(state, images)
    return float(1.0 / jnp.std(mean))


# ---------------------------------------------------------------------------------------------------------
# Optimizer and EMA
# ---------------------------------------------------------------------------------------------------------

def lr_schedule(peak: float, *, num_steps: int, warmup_steps: int = 0, schedule: str = "constant",
                end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant or cosine decay to peak * end_fraction."""
    warmup_steps = min(int(warmup_steps), max(int(num_steps) - 1, 0))
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(int(num_steps), warmup_steps + 1),
                                                  end_value=peak * end_fraction)
    if schedule == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
                                    [warmup_steps])
    raise ValueError(f"unknown lr schedule {schedule!r}; choose 'constant' or 'cosine'")


def make_optimizer(opt_cfg, *, num_steps: int, trainable: tuple[str, ...]) -> tuple[optax.GradientTransformation, dict]:
    """(optax transformation, {module name: lr schedule}) from the config's `optimizer` block.

    `opt_cfg.name` is any optax optimizer taking `learning_rate` (adamw, adam, lion, sgd, ...), built with
    `opt_cfg.kwargs`; each trainable module gets its own learning rate (`text_encoder_learning_rate`,
    0 = the same as `learning_rate`); global-norm clipping first; `grad_accum_steps` > 1 wraps it all in
    optax.MultiSteps (the schedules count optimizer updates).
    """
    factory = getattr(optax, opt_cfg.name, None)
    if not callable(factory):
        raise ValueError(f"optimizer.name={opt_cfg.name!r} is not an optax optimizer (e.g. 'adamw', 'adam', 'lion')")
    peaks = {name: float(opt_cfg.learning_rate) for name in trainable}
    for name in ("text_encoder", "text_encoder_2"):
        if name in peaks and opt_cfg.text_encoder_learning_rate:
            peaks[name] = float(opt_cfg.text_encoder_learning_rate)
    schedules = {name: lr_schedule(peak, num_steps=num_steps, warmup_steps=opt_cfg.warmup_steps,
                                   schedule=opt_cfg.schedule, end_fraction=opt_cfg.end_lr_fraction)
                 for name, peak in peaks.items()}
    kwargs = dict(opt_cfg.kwargs)
    try:
        per_module = {name: factory(learning_rate=s, **kwargs) for name, s in schedules.items()}
    except TypeError as e:
        raise ValueError(f"optax.{opt_cfg.name}(learning_rate=..., **optimizer.kwargs={kwargs}) failed: {e}; "
                         "set optimizer.kwargs to that optimizer's arguments") from None
    tx = optax.multi_transform(per_module, lambda params: {name: jax.tree.map(lambda _: name, sub)
                                                            for name, sub in params.items()})
    if opt_cfg.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
    if opt_cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(opt_cfg.grad_accum_steps))
    return tx, schedules


def ema_decay_at(decay: float, num_updates, warmup: bool):
    """The EMA decay after `num_updates` optimizer updates; with warm-up min(decay, (1 + n) / (10 + n))."""
    if not warmup:
        return jnp.float32(decay)
    n = jnp.asarray(num_updates, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
    """ema <- decay * ema + (1 - decay) * params, in each leaf's dtype."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema, params)


# ---------------------------------------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------------------------------------

def init_state(params: dict, tx: optax.GradientTransformation, *, seed: int, ema_decay: float) -> dict:
    """The step-0 train state for `params` (`sharded_init_state` creates it sharded)."""
    state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed)),
             "params": params, "opt_state": tx.init(params)}
    if ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state


def sharded_init_state(params: dict, tx: optax.GradientTransformation, shardings: dict, *, seed: int,
                       ema_decay: float) -> dict:
    """`jax.jit(init_state, out_shardings=shardings, donate_argnums=0)(params)`, without compiling a kernel per
    parameter (XLA's cost on a CPU: ~1-2 ms each, seconds for a small model's parameters, EMA and Adam moments).

    `params` (global arrays) become the state's parameters as they are, placed as shardings["params"]; the EMA
    is a copy the runtime makes (`jax.device_put`); the optimizer state's constants (zeros, counts) are placed
    from the host and the rest (the key) comes from a jitted program (`sharding.jit_placed`).
    """
    from sdjax.sharding import jit_placed

    def rest(p):
        state = init_state(p, tx, seed=seed, ema_decay=0.0)
        del state["params"]
        return state

    state = jit_placed(rest, {k: v for k, v in shardings.items() if k not in ("params", "ema")}, params)
    state["params"] = jax.device_put(params, shardings["params"])
    if ema_decay > 0:
        state["ema"] = jax.device_put(params, shardings["ema"], may_alias=False)
    return state


def make_train_step(graphdefs: dict, loss_fn: Callable, tx: optax.GradientTransformation, schedules: dict, *,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0, ema_warmup: bool = True) -> Callable:
    """train_step(state, frozen, batch) -> (state, metrics): one micro-batch; pure, to be jitted.

    The step's randomness is fold_in(key(seed), step): a function of the step number only, so a resumed
    run draws what an uninterrupted one would. metrics: loss, grad_norm, lr (first trainable module's,
    and lr_<name> for each), plus the loss function's own.
    """
    names = tuple(schedules)

    def train_step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def objective(params):
            return loss_fn(merge_modules(graphdefs, frozen, params), batch, rng)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        num_updates = (state["step"] + 1) // grad_accum_steps  # optimizer updates done after this micro-step
        new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        if "ema" in state:
            decay = ema_decay_at(ema_decay, num_updates, ema_warmup)
            stepped = ema_update(state["ema"], params, decay)
            if grad_accum_steps > 1:  # the parameters only change on the last micro-step of an update
                stepped = jax.tree.map(lambda s, e: jnp.where(tx.has_updated(opt_state), s, e),
                                       stepped, state["ema"])
            new["ema"] = stepped
        lr_count = state["step"] // grad_accum_steps
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        for name in names:
            metrics[f"lr_{name}"] = schedules[name](lr_count)
        metrics["lr"] = metrics[f"lr_{names[0]}"]
        return new, metrics

    return train_step


def trainable_modules(cfg, modules: tuple[str, ...] = ("text_encoder", "unet", "vae")) -> tuple[str, ...]:
    """Which of the run's `modules` train: the VAE for stage="autoencoder"; the UNet (+ the text encoders: SDXL's
    both) for diffusion."""
    if cfg.stage == "autoencoder":
        return ("vae",)
    text = ("text_encoder", "text_encoder_2") if cfg.train_text_encoder else ()
    return tuple(m for m in ("unet", *text) if m in modules)


def trainable_variables(cfg):
    """What of the trainable modules trains (an nnx filter): everything, or with lora.rank > 0 their adapters."""
    return nnx.LoRAParam if cfg.lora.rank > 0 else ...


def check_finite(step: int, metrics: dict) -> None:
    """Stop on a NaN / inf loss, naming the step and what usually helps."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        grad = float(metrics.get("grad_norm", float("nan")))
        raise FloatingPointError(
            f"loss is {loss} at step {step} (grad norm {grad}); the run stopped without saving this state. "
            "Lower optimizer.learning_rate, set optimizer.grad_clip_norm (e.g. 1.0), add warm-up steps, "
            "or use fp32 compute (model.dtype='float32'); then restart: it resumes from the last checkpoint.")


# ---------------------------------------------------------------------------------------------------------
# Models: pretrained, partly pretrained (a trained VAE) or random
# ---------------------------------------------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: str, field: str):
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def needed_modules(cfg, variant_modules: tuple[str, ...] = ("text_encoder", "unet", "vae")) -> tuple[str, ...]:
    """The modules a run builds: the VAE alone for the autoencoder stage, else all the model has (SDXL: with
    text_encoder_2)."""
    return ("vae",) if cfg.stage == "autoencoder" else tuple(variant_modules)


@dataclasses.dataclass
class Models:
    """What `build_models` found: module structure, weights read from disk, and how to make the rest."""

    graphdefs: dict            # {name: nnx graphdef}
    loaded: dict               # {name: pure state} of modules read from disk
    init_fn: Callable | None   # () -> {name: pure state of numpy arrays} of the randomly initialised ones
    tokenizer: Any
    scheduler_config: dict
    vae_config: Any            # the VAE's AutoencoderKLConfig (latent scaling)
    tokenizer_2: Any = None    # SDXL's second tokenizer
    options: dict = dataclasses.field(default_factory=dict)  # SDXL's pipeline options (StableDiffusion.options)
    size_ids: int = 0          # SDXL: the size ids its UNet takes (6: the base's, 5: the refiner's)


def build_models(cfg) -> Models:
    """The run's modules from `cfg.model`, before any checkpoint is restored. `model.init_from` is
      * a diffusers folder or a single file (sdjax.load_pretrained): every module is loaded;
      * a VAE (a diffusers vae/ folder, or an autoencoder run's workdir or export): the VAE is loaded and
        the rest is a random `model.variant` (training a latent diffusion model from scratch);
      * "": everything is a random `model.variant`.
    Random modules are only planned here (sdjax.initializers): `Models.init_fn` draws their values on the host,
    bit for bit what `variant.build(seed=cfg.seed)` initialises, in one small program.
    """
    from sdjax import pretrained, variants
    from sdjax.checkpoint import find_vae_folder, load_vae

    m = cfg.model
    kwargs = dict(dtype=_dtype(m.dtype, "model.dtype"), param_dtype=_dtype(m.param_dtype, "model.param_dtype"),
                  attention_impl=m.attention_impl)
    loaded_modules, abstract = {}, {}
    tokenizer_2, options = None, {}
    full_pipeline = m.init_from and (os.path.isfile(m.init_from) or
                                     os.path.isfile(os.path.join(m.init_from, "model_index.json")))
    if full_pipeline:
        pipe = pretrained.load_pretrained(m.init_from, **kwargs)
        loaded_modules = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae,
                          "text_encoder_2": pipe.text_encoder_2}
        loaded_modules = {k: v for k, v in loaded_modules.items() if v is not None}
        names = needed_modules(cfg, tuple(loaded_modules))
        tokenizer, scheduler_config = pipe.tokenizer, dict(pipe.scheduler_config)
        tokenizer_2, options = pipe.tokenizer_2, dict(pipe.options)
    else:
        if not m.variant:
            raise ValueError("model.init_from and model.variant are both empty: give a pretrained model "
                             "(--config.model.init_from=PATH, a diffusers folder or .safetensors file) or a named "
                             f"architecture to train from scratch (--config.model.variant=, one of {sorted(variants.VARIANTS)})")
        variant = variants.get(m.variant)
        names = needed_modules(cfg, variant.modules)
        if m.init_from:
            find_vae_folder(m.init_from)  # a clear error when it is neither a pipeline nor a VAE
            loaded_modules["vae"] = load_vae(m.init_from, **kwargs)
        tokenizers = variant.tokenizers()
        tokenizer, tokenizer_2 = tokenizers.get("text_encoder"), tokenizers.get("text_encoder_2")
        scheduler_config, options = dict(variant.scheduler), dict(variant.options)
        abstract, init_plan = variant.plan([name for name in names if name not in loaded_modules], **kwargs)
    if m.prediction_type:
        scheduler_config["prediction_type"] = m.prediction_type
    modules = {name: loaded_modules.get(name, abstract.get(name)) for name in names}
    if "unet" in modules:
        modules["unet"].remat = bool(m.remat)  # static: part of the graphdef
    size_ids = 0
    if "text_encoder_2" in modules:  # SDXL: the batches carry the base's 6 size ids or the refiner's 5
        from sdjax import sdxl

        size_ids = sdxl.size_ids(modules["unet"].config, modules["text_encoder_2"].config.projection_dim)
        if size_ids not in (5, 6):
            raise ValueError(f"this SDXL UNet takes {size_ids} size ids; train.py knows the base's 6 (original size, "
                             "crop, target size) and the refiner's 5 (original size, crop, aesthetic score)")
    graphdefs, states = split_modules(modules)
    random_names = tuple(name for name in names if name not in loaded_modules)

    def init_fn():
        return init_plan.values({name: states[name] for name in random_names}, seed=cfg.seed)

    vae = loaded_modules.get("vae", abstract.get("vae"))
    return Models(graphdefs, {name: states[name] for name in names if name in loaded_modules},
                  init_fn if random_names else None, tokenizer, scheduler_config, vae.config, tokenizer_2, options,
                  size_ids)


# ---------------------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------------------

def preview_grid(sample_fn: Callable, modules: dict, prompts: list[str], seed: int) -> np.ndarray:
    """One uint8 grid image of `sample_fn(modules, prompts, seed)` (uint8 (B, H, W, 3)), one tile per prompt."""
    images = np.asarray(sample_fn(modules, list(prompts), seed))
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(f"sample_fn must return uint8 (B={len(prompts)}, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    from sdjax.jobs import grid

    return grid(list(images))


def pipeline_sample_fn(tokenizer, scheduler_config: dict, *, num_inference_steps: int = 20,
                       guidance_scale: float = 5.0, resolution: int | None = None, mesh=None, tokenizer_2=None,
                       options: dict | None = None) -> Callable:
    """A `sample_fn` for previews that runs `sdjax.pipeline.generate` on the (EMA) modules."""
    def sample(modules, prompts, seed):
        from sdjax import pipeline

        pipe = pipeline.StableDiffusion.from_modules(modules, tokenizer, scheduler_config, tokenizer_2=tokenizer_2,
                                                     options=options)
        return pipeline.generate(pipe, prompts, seed=seed, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, height=resolution, width=resolution, mesh=mesh)
    return sample

