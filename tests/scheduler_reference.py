"""diffusers' scheduler loops, written out as its Stable Diffusion pipelines run them, for parity tests.

The reference runs in float64: after `set_timesteps` the scheduler's float32 tables are upcast and the
latents are float64, so it is diffusers' algorithm without diffusers' own float32 rounding (which alone
reaches ~1e-5 on some runs, e.g. zero-SNR Euler whose first sigma is 4096). sdjax runs in float32.
Stochastic samplers get sdjax's noise: diffusers' `randn_tensor` is patched to return
`sampling.step_noise(rng, call_index, shape)`.

Schedulers are built under `ieee_sqrt()`: torch's float32 (and float64) sqrt on some x86 CPUs (AVX2 builds) is
not correctly rounded (182 of the 1,000 SD `alphas_cumprod` square roots differ from IEEE sqrt by one ulp), and
the zero-terminal-SNR rescale (a difference of square roots) turns that last bit into ~3e-5 in a sigma. With
IEEE sqrt the reference tables are the same on every machine; sdjax builds its tables with numpy's IEEE sqrt.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from functools import partial

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import torch

from sdjax import samplers, sampling, schedulers

logging.getLogger("diffusers").setLevel(logging.ERROR)

SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                  "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def jax_model(x, t):
    """Deterministic stand-in UNet (NHWC): O(1) outputs that depend on x, its spatial mean (so a masked
    region sees the rest of the image), t and the channel."""
    channel = jnp.arange(x.shape[-1], dtype=jnp.float32)
    return 0.1 * x + 0.2 * x.mean(axis=(1, 2), keepdims=True) + jnp.sin(t.astype(jnp.float32) / 100.0 + channel)


def torch_model(x, t):
    """`jax_model` for NCHW torch tensors."""
    channel = torch.arange(x.shape[1], dtype=x.dtype)[:, None, None]
    t = torch.as_tensor(t).to(x.dtype)
    return 0.1 * x + 0.2 * x.mean(dim=(2, 3), keepdim=True) + torch.sin(t / 100.0 + channel)


def _nchw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)


@partial(jax.jit, static_argnums=(1, 2))
def _all_step_noise(rng, calls, shape):
    """`sampling.step_noise` of every model call, in one go."""
    return jax.vmap(lambda i: sampling.step_noise(rng, i, shape))(jnp.arange(calls))


@contextlib.contextmanager
def ieee_sqrt():
    """`Tensor.sqrt` (what diffusers' `rescale_zero_terminal_snr` calls) correctly rounded, as numpy's."""
    torch_sqrt = torch.Tensor.sqrt
    torch.Tensor.sqrt = lambda self: torch.from_numpy(np.sqrt(self.detach().cpu().numpy()))
    try:
        yield
    finally:
        torch.Tensor.sqrt = torch_sqrt


def diffusers_scheduler(config: dict, num_inference_steps: int | None = None):
    """diffusers' scheduler for `config` (built under `ieee_sqrt`), with `set_timesteps` done if given steps."""
    cls = getattr(diffusers, config["_class_name"])
    with ieee_sqrt():
        sched = cls.from_config({k: v for k, v in config.items() if k != "eta"})
        if num_inference_steps is not None:
            sched.set_timesteps(num_inference_steps)
    return sched


def diffusers_loop(config: dict, num_inference_steps: int, noise, rng=None, *, init_latents=None, strength=1.0,
                   inpaint_latents=None, inpaint_mask=None, record=None, predictions=None) -> np.ndarray:
    """diffusers' denoising loop (txt2img, img2img or 4-channel inpainting) with `torch_model`; NHWC float64.
    `record`: a list that receives (model input NHWC, timestep) of every model call; `predictions`: one that
    receives the `pred_original_sample` (NHWC) of every step() that reports one."""
    sched = diffusers_scheduler(config, num_inference_steps)
    for name, value in list(vars(sched).items()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(sched, name, value.double())
    module = importlib.import_module(type(sched).__module__)
    call = {"index": 0}
    if samplers.is_stochastic(schedulers.scheduler_config_for(config)):
        noises = torch.stack([_nchw(z) for z in np.asarray(_all_step_noise(rng, len(sched.timesteps), noise.shape))])

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noises.shape[1:]), shape
        return noises[call["index"]].to(dtype or torch.float32)

    patched = getattr(module, "randn_tensor", None)
    if patched is not None:
        module.randn_tensor = randn_tensor
    try:
        noise = _nchw(noise)
        timesteps, begin = sched.timesteps, 0
        if init_latents is not None or inpaint_latents is not None:   # the img2img / inpaint get_timesteps
            t_start = max(num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps), 0)
            begin = t_start * sched.order
            timesteps = timesteps[begin:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(begin)
        if init_latents is not None:
            x = sched.add_noise(_nchw(init_latents), noise, timesteps[:1])
        elif inpaint_latents is not None and strength < 1:
            x = sched.add_noise(_nchw(inpaint_latents), noise, timesteps[:1])
        else:
            x = noise * sched.init_noise_sigma
        kwargs = {"eta": config["eta"]} if config["_class_name"] == "DDIMScheduler" else {}
        for i, t in enumerate(timesteps):
            call["index"] = begin + i
            model_input = sched.scale_model_input(x, t)
            if record is not None:
                record.append((model_input.permute(0, 2, 3, 1).numpy(), t.numpy()))
            model_output = torch_model(model_input, t)
            result = sched.step(model_output, t, x, **kwargs)
            x = result.prev_sample
            if predictions is not None:
                predictions.append(result.pred_original_sample.permute(0, 2, 3, 1).double().numpy())
            if inpaint_latents is not None:
                known = _nchw(inpaint_latents)
                if i < len(timesteps) - 1:
                    known = sched.add_noise(known, noise, torch.tensor([timesteps[i + 1]]))
                mask = _nchw(inpaint_mask)
                x = (1 - mask) * known + mask * x
    finally:
        if patched is not None:
            module.randn_tensor = patched
    return x.permute(0, 2, 3, 1).double().numpy()


run_plan = jax.jit(sampling.run_plan, static_argnums=0)   # reused by every plan of the same sampler and length


def sdjax_loop(config: dict, num_inference_steps: int, noise, rng=None, *, strength=1.0, **kwargs) -> np.ndarray:
    plan = sampling.make_plan(config, num_inference_steps, strength=strength)
    return np.asarray(run_plan(jax_model, plan, noise, rng, **kwargs), np.float64)


def relative_error(ours, reference) -> float:
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
