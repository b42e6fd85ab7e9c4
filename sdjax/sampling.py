"""The sampling loop: one `lax.scan` over the model calls of a schedule.

    latents = sample_loop(model_fn, noise, scheduler_config, num_inference_steps, rng)

`model_fn(x, t)` gets exactly what diffusers' pipelines hand the UNet (the scaled input and the scheduler's
timestep value); classifier-free guidance lives inside it. The loop is pure and jittable with the config
and step count static. It is two halves that can be used apart:
  * `make_plan(config, steps, strength=...)` -> `Plan`: numpy tables, one row per model call (the timestep,
    the input scale, the sampler's coefficients from `sdjax.samplers`), and
  * `run_plan(model_fn, plan, noise, rng, ...)`: the scan. A Plan is a pytree whose arrays are leaves, so a
    jitted `run_plan` is reused by every config with the same sampler, step count and static step options.

`return_predictions=True` also returns what each model call predicts the clean latents to be (x̂₀,
diffusers' `pred_original_sample`), gathered by the same scan, for watching the denoising:

    latents, x0s = sample_loop(model_fn, noise, config, 30, return_predictions=True)   # x0s: (30, B, h, w, C)
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import samplers, schedulers


@partial(jax.tree_util.register_dataclass, data_fields=["rows", "init_signal", "init_noise", "init_noise_sigma"],
         meta_fields=["sampler", "options", "stochastic", "begin"])
@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything one run needs, as arrays (leaves) and static settings.

    rows: per model call from `begin` on: "timestep" (what the UNet receives), "scale" (scale_model_input),
      "index" (the call's index in the full schedule, which keys its noise), "next_signal"/"next_noise"
      (add_noise coefficients of the following call, (1, 0) after the last) and the sampler's coefficients.
    init_signal, init_noise: add_noise coefficients at call `begin` (img2img start).
    init_noise_sigma: the scale of the pure-noise start.
    """
    rows: dict
    init_signal: np.ndarray
    init_noise: np.ndarray
    init_noise_sigma: np.ndarray
    sampler: str
    options: samplers.Options
    stochastic: bool
    begin: int


def make_plan(scheduler_config: dict, num_inference_steps: int, *, strength: float = 1.0,
              denoising_start: float | None = None, denoising_end: float | None = None) -> Plan:
    """Tables for `num_inference_steps` steps; `strength` < 1 keeps only the last part of the schedule.

    As diffusers' img2img pipelines: init_timestep = min(int(steps * strength), steps),
    t_start = max(steps - init_timestep, 0), and the run starts at model call t_start * scheduler.order.

    SDXL's "ensemble of experts" splits one schedule between two models at a fraction d of the training noise
    range: cutoff = round(T - d T) (T = num_train_timesteps). `denoising_end=d` keeps the calls whose timestep is
    >= cutoff (the base model's part, diffusers' text2img `denoising_end`); `denoising_start=d` the calls below it
    (one more for a second-order sampler when their count is even, so it starts on a whole step), and the run
    starts from the given latents as they are: they are already at that noise level (diffusers' img2img
    `denoising_start`, which then ignores `strength`). The rows' coefficients are those of the full schedule.
    """
    config = schedulers.scheduler_config_for(scheduler_config)
    sched = schedulers.schedule(config, num_inference_steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError(f"{name}={value}: give a fraction of the noise range strictly between 0 and 1")
    n, calls = sched.num_inference_steps, len(sched.timesteps)

    def cutoff(fraction: float) -> int:  # the first training timestep below the split, as diffusers rounds it
        return int(round(config["num_train_timesteps"] * (1.0 - fraction)))

    if denoising_start is None:
        begin = max(n - min(int(n * strength), n), 0) * sched.order
    else:
        count = int((sched.timesteps < cutoff(denoising_start)).sum())
        count += sched.order == 2 and count % 2 == 0
        begin = calls - count
    end = calls if denoising_end is None else int((sched.timesteps >= cutoff(denoising_end)).sum())
    if begin >= min(end, calls):
        what = (f"strength={strength}" if denoising_start is None else f"denoising_start={denoising_start}") + \
            ("" if denoising_end is None else f" and denoising_end={denoising_end}")
        raise ValueError(f"{what} with num_inference_steps={n} leaves no step to run; "
                         "raise num_inference_steps or move the fractions apart")
    sampler = samplers.SAMPLERS[config["_class_name"]]
    signal, noise = schedulers.noise_levels(sched)
    timesteps = sched.timesteps.astype(np.float32 if sched.timesteps.dtype.kind == "f" else np.int32)
    rows = dict(timestep=timesteps[begin:],
                scale=schedulers.input_scale(sched)[begin:],
                index=np.arange(begin, calls, dtype=np.int32),
                next_signal=np.append(signal[begin + 1:], 1.0),
                next_noise=np.append(noise[begin + 1:], 0.0),
                **sampler.rows(sched, begin))
    rows = {k: (v.astype(np.float32) if v.dtype == np.float64 else v)[:end - begin] for k, v in rows.items()}
    init_signal, init_noise = (signal[begin], noise[begin]) if denoising_start is None else (1.0, 0.0)
    return Plan(rows, np.float32(init_signal), np.float32(init_noise), np.float32(sched.init_noise_sigma),
                config["_class_name"], samplers.options(config), samplers.is_stochastic(config), begin)


def step_noise(rng, index, shape, dtype=jnp.float32):
    """The standard normal noise a stochastic sampler adds at model call `index` (of the full schedule).

    Equal to `jax.random.normal(jax.random.fold_in(rng, index), shape, dtype)`, drawn flat and reshaped
    because XLA compiles the flat draw ~10x faster (threefry over a 4-d shape takes seconds on CPU).
    """
    flat = jax.random.normal(jax.random.fold_in(rng, index), (math.prod(shape),), dtype)
    return flat.reshape(shape)


def kept_predictions(num_calls: int, every: int) -> np.ndarray:
    """The model calls whose x̂₀ `run_plan(..., predictions_every=every)` keeps: 0, every, 2 * every, ... and
    the last."""
    if every < 1:
        raise ValueError(f"predictions_every must be 1 or more, got {every}")
    return np.unique(np.append(np.arange(0, num_calls, every), num_calls - 1))


def run_plan(model_fn, plan: Plan, noise, rng=None, *, init_latents=None, inpaint_latents=None,
             inpaint_mask=None, return_predictions=False, predictions_every=1):
    """Run `plan` from standard-normal `noise` (NHWC); returns the final latents (float32, or noise's float
    type if wider), or (latents, x̂₀ of the kept calls) with `return_predictions`. Arguments as in
    `sample_loop`; under `jax.jit`, return_predictions and predictions_every are static."""
    if plan.stochastic and rng is None:
        raise ValueError(f"{plan.sampler} draws fresh noise every step; pass rng=jax.random.key(seed)")
    if (inpaint_latents is None) != (inpaint_mask is None):
        raise ValueError("inpainting needs both inpaint_latents and inpaint_mask")
    dtype = jnp.promote_types(noise.dtype, jnp.float32)
    noise = noise.astype(dtype)
    if init_latents is None and plan.begin > 0:
        if inpaint_latents is None:
            raise ValueError("strength < 1 (or denoising_start) starts from a partly noised image: pass "
                             "init_latents")
        init_latents = inpaint_latents   # diffusers' inpaint pipeline noises the image it repaints
    if init_latents is not None:
        x = plan.init_signal * init_latents.astype(dtype) + plan.init_noise * noise
    else:
        x = noise * plan.init_noise_sigma
    step = samplers.SAMPLERS[plan.sampler].step
    hist = samplers.SAMPLERS[plan.sampler].history(x, plan.options)
    # x̂₀ of the kept calls go to their slot of a buffer in the carry, the others to a last, scratch slot: only
    # the kept ones are held in memory, whatever the step count
    num_calls = len(plan.rows["index"])
    kept = kept_predictions(num_calls, predictions_every) if return_predictions else np.zeros(0, np.int32)
    slots = np.full(num_calls, len(kept), np.int32)
    slots[kept] = np.arange(len(kept))
    x0s = jnp.zeros((len(kept) + 1,) + x.shape, dtype) if return_predictions else None

    def one_call(carry, xs):
        x, hist, x0s = carry
        row, slot = xs
        out = model_fn(x * row["scale"].astype(dtype), row["timestep"]).astype(dtype)
        z = step_noise(rng, row["index"], x.shape, dtype) if plan.stochastic else None
        row = {k: v.astype(dtype) if v.dtype == jnp.float32 else v for k, v in row.items()}
        if return_predictions:
            x0 = samplers.predict_x0(x, out, row, plan.options)
            if inpaint_latents is not None:   # the known region is known
                x0 = (1 - inpaint_mask) * inpaint_latents + inpaint_mask * x0
            x0s = jax.lax.dynamic_update_index_in_dim(x0s, x0, slot, 0)
        x, hist = step(x, out, row, hist, z, plan.options)
        if inpaint_latents is not None:   # keep the known region on the noise level of the next call
            known = row["next_signal"] * inpaint_latents + row["next_noise"] * noise
            x = (1 - inpaint_mask) * known + inpaint_mask * x
        return (x, hist, x0s), None

    (x, _, x0s), _ = jax.lax.scan(one_call, (x, hist, x0s), (plan.rows, slots))
    return (x, x0s[:-1]) if return_predictions else x


def sample_loop(model_fn, noise, scheduler_config, num_inference_steps, rng=None, *, init_latents=None,
                strength=1.0, inpaint_latents=None, inpaint_mask=None, return_predictions=False,
                predictions_every=1, denoising_start=None, denoising_end=None):
    """Denoise `noise` with the sampler of `scheduler_config` in `num_inference_steps` steps.

    model_fn(x, t) -> model output (epsilon / v / x0 as the config's prediction_type), where x is the scaled
      latents and t the scheduler's timestep (int32, or float32 for the Euler / Heun / LMS family).
    noise: standard normal latents (B, h, w, C); the loop scales them by `init_noise_sigma` itself.
    scheduler_config: a diffusers scheduler_config.json dict (see `schedulers.scheduler_config_for`).
    rng: jax key; required by the stochastic samplers (DDPM, Euler a, DPM++ 2M SDE, DDIM with eta > 0),
      which add `step_noise(rng, call_index, shape)` at each model call.
    img2img: `init_latents` (clean latents) and `strength`: start from add_noise(init_latents, noise) at the
      first kept call and run the last `int(steps * strength)` steps, as diffusers' img2img pipeline.
    inpainting with an ordinary 4-channel UNet: `inpaint_latents` (clean latents of the image) and
      `inpaint_mask` (1 = repaint, broadcastable to the latents): after every call the known region is reset
      to inpaint_latents noised to the next call's level (clean after the last), as diffusers'
      StableDiffusionInpaintPipeline. With strength < 1 the start is noised inpaint_latents.
    return_predictions: return (latents, x0s) instead, where x0s (kept calls, B, h, w, C) holds the clean
      latents each model call predicts, `samplers.predict_x0` (clipped / thresholded as the sampler does; with
      inpainting, the known region is inpaint_latents). The latents are the same, bit for bit. One x̂₀ per
      model call: per step for every sampler but Heun (two calls a step, one at the last) and PNDM (PRK: four
      calls a step; PLMS: one more call than steps).
    predictions_every: keep only the x̂₀ of calls 0, k, 2k, ... and the last (`kept_predictions`); only those
      are held in memory.
    denoising_end / denoising_start: run only the high-noise part of the schedule (returning latents that are
      still noisy) or only the low-noise part, from `init_latents` as they are (see `make_plan`): SDXL's base
      and refiner splitting one run.
    """
    plan = make_plan(scheduler_config, num_inference_steps, strength=strength, denoising_start=denoising_start,
                     denoising_end=denoising_end)
    return run_plan(model_fn, plan, noise, rng, init_latents=init_latents, inpaint_latents=inpaint_latents,
                    inpaint_mask=inpaint_mask, return_predictions=return_predictions,
                    predictions_every=predictions_every)
