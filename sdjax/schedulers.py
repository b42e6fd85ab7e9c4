"""Noise schedules as data: diffusers `scheduler_config.json` in, small numpy tables out.

A scheduler here is not an object with mutable state. It is
  * a config dict with diffusers' field names (`scheduler_config_for` fills in the defaults of the chosen
    class, exactly as diffusers' `SomeScheduler.from_config(base_config)` does, and rejects what we cannot do),
  * the training tables built from it (`betas` -> `alphas_cumprod`; `add_noise`, `get_velocity`, `snr`),
  * a `Schedule` for one sampling run (`schedule(config, num_inference_steps)`): the timesteps the UNet sees,
    the sigmas, `init_noise_sigma` -- the same numbers as diffusers' `scheduler.timesteps` / `scheduler.sigmas`.
The per-sampler step functions that consume a Schedule live in `sdjax.samplers`; the loop in `sdjax.sampling`.

The base tables are built in float32 with the same operations as diffusers (torch's float32 linspace, a
cumprod accumulated in float64, IEEE sqrt), so `alphas_cumprod` matches diffusers bit for bit. (torch's own
float32 sqrt is not correctly rounded on some CPUs; with rescale_betas_zero_snr diffusers' table then moves by a
last bit there, which the cancellation grows to ~3e-5 in a sigma: sdjax's tables are the same on every machine.)
Everything derived from the tables is computed in float64 numpy and only rounded to float32 when a loop runs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------------------------------------
# Config: names, aliases, defaults, validation
# ----------------------------------------------------------------------------------------------------------

_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0)
_X0_CLIP = dict(clip_sample=True, clip_sample_range=1.0)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_OTHER_SIGMAS = dict(use_exponential_sigmas=False, use_beta_sigmas=False)
# diffusers' karras conversion reads `sigma_min` / `sigma_max` from the config whenever the key is present.
_SIGMA_RANGE = dict(sigma_min=None, sigma_max=None)
_FLOW = dict(use_flow_sigmas=False, flow_shift=1.0, use_dynamic_shifting=False, time_shift_type="exponential")

# Every field of each diffusers class (diffusers 0.3x-0.4x defaults). "eta" is sdjax's: diffusers passes
# DDIM's eta to step(), our loop reads it from the config.
DEFAULTS: dict[str, dict] = {
    "DDPMScheduler": dict(_COMMON, **_X0_CLIP, **_THRESHOLD, variance_type="fixed_small",
                          timestep_spacing="leading", rescale_betas_zero_snr=False),
    "DDIMScheduler": dict(_COMMON, **_X0_CLIP, **_THRESHOLD, set_alpha_to_one=True, timestep_spacing="leading",
                          rescale_betas_zero_snr=False, eta=0.0),
    "PNDMScheduler": dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "LMSDiscreteScheduler": dict(_COMMON, use_karras_sigmas=False, **_OTHER_SIGMAS),
    "EulerDiscreteScheduler": dict(_COMMON, interpolation_type="linear", use_karras_sigmas=False, **_OTHER_SIGMAS,
                                   **_SIGMA_RANGE, timestep_type="discrete", rescale_betas_zero_snr=False,
                                   final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_COMMON, rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(_COMMON, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False,
                                  **_OTHER_SIGMAS, **_SIGMA_RANGE, clip_sample=False, clip_sample_range=1.0),
    "DPMSolverMultistepScheduler": dict(
        _COMMON, solver_order=2, **_THRESHOLD, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, **_OTHER_SIGMAS, **_SIGMA_RANGE,
        use_lu_lambdas=False, **_FLOW, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
        variance_type=None, rescale_betas_zero_snr=False),
    "UniPCMultistepScheduler": dict(
        _COMMON, solver_order=2, **_THRESHOLD, predict_x0=True, solver_type="bh2", lower_order_final=True,
        disable_corrector=[], solver_p=None, use_karras_sigmas=False, **_OTHER_SIGMAS, **_FLOW,
        final_sigmas_type="zero", rescale_betas_zero_snr=False, **_SIGMA_RANGE, shift_terminal=None),
}
SCHEDULER_CLASSES = tuple(DEFAULTS)

_PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Values sdjax implements, for the fields where diffusers offers more (anything else raises).
_SUPPORTED = dict(
    beta_schedule=("linear", "scaled_linear", "squaredcos_cap_v2"),
    prediction_type=_PREDICTIONS,
    timestep_spacing=("linspace", "leading", "trailing"),
    variance_type=("fixed_small", "fixed_large", None),
    interpolation_type=("linear",),
    use_exponential_sigmas=(False,), use_beta_sigmas=(False,), use_lu_lambdas=(False,),
    use_flow_sigmas=(False,), use_dynamic_shifting=(False,),
    timestep_type=("discrete", "continuous"),
    final_sigmas_type=("zero", "sigma_min"),
    algorithm_type=("dpmsolver++", "sde-dpmsolver++"),
    solver_order=(1, 2, 3),
    predict_x0=(True,), solver_p=(None,), shift_terminal=(None,),
)
_SUPPORTED_BY_CLASS = {
    ("PNDMScheduler", "prediction_type"): ("epsilon", "v_prediction"),
    ("EulerAncestralDiscreteScheduler", "prediction_type"): ("epsilon", "v_prediction"),
    ("DPMSolverMultistepScheduler", "variance_type"): (None,),
    ("DDPMScheduler", "variance_type"): ("fixed_small", "fixed_large"),
    ("DPMSolverMultistepScheduler", "solver_type"): ("midpoint", "heun"),
    ("UniPCMultistepScheduler", "solver_type"): ("bh1", "bh2"),
}
# Fields diffusers itself rewrites in __init__ (a DPM-Solver config handed to UniPC and back).
_RENAMED = {
    ("DPMSolverMultistepScheduler", "solver_type"): {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"},
    ("DPMSolverMultistepScheduler", "algorithm_type"): {"deis": "dpmsolver++"},
    ("UniPCMultistepScheduler", "solver_type"): {"midpoint": "bh2", "heun": "bh2", "logrho": "bh2"},
}
# Other diffusers scheduler fields that show up in real scheduler_config.json files; they mean nothing to
# the classes above (diffusers ignores them too), so they are accepted and dropped.
_FOREIGN_FIELDS = {"rho", "sigma_data", "sigma_schedule", "precondition_outputs", "shift", "base_shift", "max_shift",
                   "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "stochastic_sampling",
                   "original_inference_steps", "timestep_scaling"}
_KNOWN_FIELDS = set().union(*DEFAULTS.values()) | _FOREIGN_FIELDS

# name -> (class, fields the name implies). A1111 names, k-diffusion names and short names; matched after
# `_normalize` (case, spaces, "-", "_" ignored).
_ALIASES = {
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler Karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
    "Heun Karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler",
                     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
for _short, _long in [("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_karras", "DPM++ 2M Karras"),
                      ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras")]:
    _ALIASES[_short] = _ALIASES[_long]


def _normalize(name: str) -> str:
    return "".join(c for c in name.lower() if c not in " -_")


_BY_NAME = {_normalize(k): v for k, v in _ALIASES.items()}
_BY_NAME.update({_normalize(c): (c, {}) for c in SCHEDULER_CLASSES})


def sampler_names() -> list[str]:
    """Every name `scheduler_config_for` accepts (A1111 names, short names, diffusers class names)."""
    return list(_ALIASES) + list(SCHEDULER_CLASSES)


def scheduler_config_for(base_config: dict | None, sampler: str | None = None, **overrides) -> dict:
    """The effective scheduler config: `base_config` (a checkpoint's scheduler_config.json) switched to `sampler`.

    Keeps the checkpoint's noise schedule (betas, prediction_type, steps_offset, ...), switches `_class_name`
    to the sampler's class and applies what the name implies (e.g. "DPM++ 2M SDE Karras" sets
    algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), then `overrides`. Like diffusers'
    `Class.from_config(base_config, **overrides).config`, the result holds every field of the class, with the
    class defaults for missing ones; fields of other classes are dropped. `sampler=None` keeps the base class.
    Raises ValueError for an unknown sampler name (listing the valid ones), an unknown field, or a value
    sdjax does not implement.
    """
    base = dict(base_config or {})
    if sampler is None:
        if "_class_name" not in base:
            raise ValueError("scheduler config has no `_class_name`; pass a sampler name, one of "
                             f"{sampler_names()}")
        cls, implied = _resolve_name(base["_class_name"])
    else:
        cls, implied = _resolve_name(sampler)
    merged = {**base, **implied, **overrides}

    unknown = sorted(k for k in merged if not k.startswith("_") and k not in _KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"unknown scheduler config fields {unknown}; {cls} takes {sorted(DEFAULTS[cls])}")
    if merged.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in DEFAULTS[cls]:
        raise ValueError(f"rescale_betas_zero_snr=True but {cls} has no zero-terminal-SNR schedule (diffusers would "
                         "silently sample with the ordinary one); use DDPM, DDIM, Euler, Euler a, DPM++ or UniPC, "
                         "or pass rescale_betas_zero_snr=False")

    config = {"_class_name": cls}
    for key, default in DEFAULTS[cls].items():
        value = merged.get(key, default)
        value = _RENAMED.get((cls, key), {}).get(value, value) if isinstance(value, str) else value
        config[key] = list(value) if isinstance(value, (list, tuple)) else value
    _validate(config)
    return config


def _resolve_name(name: str) -> tuple[str, dict]:
    if not isinstance(name, str) or _normalize(name) not in _BY_NAME:
        raise ValueError(f"unknown sampler {name!r}; valid names: {sampler_names()}")
    cls, implied = _BY_NAME[_normalize(name)]
    return cls, dict(implied)


def _validate(config: dict) -> None:
    cls = config["_class_name"]
    for key, value in config.items():
        allowed = _SUPPORTED_BY_CLASS.get((cls, key), _SUPPORTED.get(key))
        if allowed is not None and value not in allowed:
            raise ValueError(f"{cls}: {key}={value!r} is not supported by sdjax; supported: {list(allowed)}")
    trained = config["trained_betas"]
    if trained is not None and len(trained) != config["num_train_timesteps"]:
        raise ValueError(f"trained_betas has {len(trained)} entries but num_train_timesteps is "
                         f"{config['num_train_timesteps']}")
    if config.get("eta", 0.0) < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {config['eta']}")


# ----------------------------------------------------------------------------------------------------------
# Training tables: betas -> alphas_cumprod
# ----------------------------------------------------------------------------------------------------------

def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace(start, stop, num, dtype=float32): float32 step, each value from the nearer end."""
    start, stop = np.float32(start), np.float32(stop)
    step = np.float64(np.float32((stop - start) / np.float32(num - 1)))
    i = np.arange(num)
    out = np.where(i < num // 2, np.float64(start) + step * i, np.float64(stop) - step * (num - 1 - i))
    return out.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch.cumprod on float32 (accumulates in float64)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep is pure noise (Lin et al. 2023, Alg. 1)."""
    sqrt_ac = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac ** 2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return np.float32(1) - alphas


def betas(config: dict) -> np.ndarray:
    """beta_t for t = 0 .. num_train_timesteps-1 (float32), from `beta_schedule` or `trained_betas`.

    A config without `_class_name` is read as a DDPMScheduler one (only the schedule fields matter here).
    """
    config = scheduler_config_for(config, None if "_class_name" in config else "DDPM")
    T, schedule = config["num_train_timesteps"], config["beta_schedule"]
    if config["trained_betas"] is not None:
        out = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "linear":
        out = _linspace_f32(config["beta_start"], config["beta_end"], T)
    elif schedule == "scaled_linear":
        out = _linspace_f32(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, T) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999
        alpha_bar = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T)
        out = np.minimum(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), 0.999).astype(np.float32)
    if config.get("rescale_betas_zero_snr"):
        out = _rescale_zero_terminal_snr(out)
    return out


def alphas_cumprod(config: dict) -> np.ndarray:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), float32, as diffusers' `scheduler.alphas_cumprod`."""
    return _cumprod_f32(np.float32(1) - betas(config))


def _table(config_or_alphas_cumprod):
    if isinstance(config_or_alphas_cumprod, dict):
        return jnp.asarray(alphas_cumprod(config_or_alphas_cumprod))
    if isinstance(config_or_alphas_cumprod, Schedule):
        return jnp.asarray(config_or_alphas_cumprod.alphas_cumprod)
    return jnp.asarray(config_or_alphas_cumprod)


def _per_example(values, ndim):
    """(B,) or () per-example scalars -> shape broadcastable against (B, H, W, C)."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def add_noise(config_or_schedule, x0, noise, t):
    """Forward diffusion q(x_t | x_0) = sqrt(a_t) x0 + sqrt(1 - a_t) noise at integer train timesteps `t`.

    `config_or_schedule`: a scheduler config dict, an alphas_cumprod array, or a `Schedule`. With a config or
    table, `t` are train timesteps (shape () or (B,)), as in training and in diffusers' DDPM/DDIM/PNDM
    `add_noise`. With a Schedule of the sigma / multistep samplers, `t` must be values of
    `schedule.timesteps` and the noise level is that scheduler's own (x0 + sigma * noise for Euler, ...), as
    diffusers' `scheduler.add_noise` (which takes the second match of a repeated timestep).
    """
    if isinstance(config_or_schedule, Schedule) and config_or_schedule.sigmas is not None:
        t = jnp.asarray(t)
        matches = jnp.asarray(config_or_schedule.timesteps)[None, :] == t.reshape(-1, 1)
        first = jnp.argmax(matches, axis=1)
        second = jnp.argmax(matches.at[jnp.arange(len(first)), first].set(False), axis=1)
        index = jnp.where(matches.sum(1) > 1, second, first).reshape(t.shape)
        signal, noise_scale = (jnp.asarray(v, x0.dtype)[index] for v in noise_levels(config_or_schedule))
        return _per_example(signal, x0.ndim) * x0 + _per_example(noise_scale, x0.ndim) * noise
    ac = _table(config_or_schedule).astype(x0.dtype)[t]
    return _per_example(ac ** 0.5, x0.ndim) * x0 + _per_example((1 - ac) ** 0.5, x0.ndim) * noise


def get_velocity(config_or_alphas_cumprod, x0, noise, t):
    """The v-prediction target v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022) at train timesteps t."""
    ac = _table(config_or_alphas_cumprod).astype(x0.dtype)[t]
    return _per_example(ac ** 0.5, x0.ndim) * noise - _per_example((1 - ac) ** 0.5, x0.ndim) * x0


def snr(config_or_alphas_cumprod, t):
    """Signal-to-noise ratio a_t / (1 - a_t) at train timesteps t (for min-SNR loss weighting)."""
    ac = _table(config_or_alphas_cumprod)[t]
    return ac / (1 - ac)


# ----------------------------------------------------------------------------------------------------------
# Sampling tables: timestep spacing, sigmas, karras
# ----------------------------------------------------------------------------------------------------------

SIGMA_SCHEDULERS = ("LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "HeunDiscreteScheduler")   # x lives at scale sqrt(1 + sigma^2): x = x0 + sigma * noise
MULTISTEP_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")   # x = alpha x0 + sigma_t noise


class Schedule(NamedTuple):
    """One sampling run's tables: what diffusers' scheduler holds after `set_timesteps(num_inference_steps)`.

    timesteps: (calls,) the value the UNet receives at each model call (int64, or float32 for the
      sigma schedulers, as in diffusers). Heun calls the model twice per step, so it has 2n-1 calls.
    sigmas: (calls + 1,) float32 noise levels sqrt((1 - a) / a) per call plus the final one
      (None for DDPM / DDIM / PNDM, which index alphas_cumprod by timestep instead).
    """
    config: dict
    num_inference_steps: int
    timesteps: np.ndarray
    sigmas: np.ndarray | None
    alphas_cumprod: np.ndarray
    init_noise_sigma: float
    order: int  # model calls per step, diffusers' `scheduler.order` (img2img skips `order * t_start` calls)


def spaced_timesteps(spacing: str, num_train_timesteps: int, n: int, steps_offset: int = 0) -> np.ndarray:
    """n descending train timesteps (float64; "linspace" ones may be fractional), Lin et al. 2023 Table 2.

    leading:  0, k, 2k, ... (k = T // n) plus steps_offset, reversed -- SD's original spacing
    trailing: T-1, T-1-T/n, ..., rounded -- starts at the last (noisiest) train timestep
    linspace: n evenly spaced points on [0, T-1]
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (T // n))[::-1] + float(steps_offset)
    return np.round(np.arange(T, 0, -T / n)) - 1.0


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep whose sigma is `sigma`, interpolating linearly in log-sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def schedule(config: dict, num_inference_steps: int) -> Schedule:
    """The timesteps / sigmas of one run of `num_inference_steps` steps (diffusers' `set_timesteps`)."""
    config = scheduler_config_for(config)
    cls, T, n = config["_class_name"], config["num_train_timesteps"], int(num_inference_steps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
    ac = alphas_cumprod(config)
    spacing, offset = config["timestep_spacing"], config["steps_offset"]
    if cls in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):
        ts = np.round(spaced_timesteps(spacing, T, n, offset)).astype(np.int64)
        if cls == "PNDMScheduler":
            ts = _pndm_timesteps(ts[::-1], T, n, config["skip_prk_steps"])
        return Schedule(config, n, ts, None, ac, 1.0, 1)

    if config.get("rescale_betas_zero_snr"):
        ac[-1] = 2.0 ** -24  # keep sigma_max finite
    base_sigmas = np.sqrt((1 - ac) / ac)                     # float32, indexed by train timestep
    log_sigmas = np.log(base_sigmas)
    karras = config.get("use_karras_sigmas", False)
    sigma_min0 = float(np.sqrt((1 - ac[0]) / ac[0]))          # "sigma_min" final sigma

    def karras_range(default_min, default_max, use_config=True):
        lo, hi = (config.get("sigma_min"), config.get("sigma_max")) if use_config else (None, None)
        return (default_min if lo is None else lo), (default_max if hi is None else hi)

    if cls in SIGMA_SCHEDULERS:
        ts = spaced_timesteps(spacing, T, n, offset).astype(np.float32)
        sig = np.interp(ts, np.arange(T), base_sigmas)
        if karras:
            lo, hi = karras_range(sig[-1], sig[0], use_config=cls != "LMSDiscreteScheduler")
            sig = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sig, log_sigmas).astype(np.float32)
        final = sigma_min0 if config.get("final_sigmas_type") == "sigma_min" else 0.0
        sig = np.append(sig, final).astype(np.float32)
        if config.get("timestep_type") == "continuous" and config["prediction_type"] == "v_prediction":
            ts = (0.25 * np.log(sig[:-1])).astype(np.float32)
        order = 1
        if cls == "HeunDiscreteScheduler":  # every step but the last has a second, corrector call at sigma_next
            sig = np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]])
            ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
            order = 2
        top = np.float32(sig.max())
        init = top if spacing in ("linspace", "trailing") else np.sqrt(top ** 2 + np.float32(1))
        return Schedule(config, n, ts, sig, ac, float(init), order)

    # DPM-Solver++ and UniPC: space n + 1 points and drop the last (t = 0), or karras over the whole range.
    last = T
    if cls == "DPMSolverMultistepScheduler":
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
        last = T - int(np.searchsorted(lambdas[::-1], config["lambda_min_clipped"]))
    if spacing == "trailing":
        ts = np.round(np.arange(last, 0, -T / n)) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, last - 1, n + 1))[::-1][:-1]
    else:
        ts = (np.arange(n + 1) * (last // (n + 1)))[::-1][:-1] + offset
    if karras:
        lo, hi = karras_range(float(base_sigmas[0]), float(base_sigmas[-1]))
        sig = karras_sigmas(lo, hi, n)
        ts = sigma_to_t(sig, log_sigmas)
        if cls == "UniPCMultistepScheduler" or config["beta_schedule"] != "squaredcos_cap_v2":
            ts = np.round(ts)
        final = sig[-1] if cls == "UniPCMultistepScheduler" else sigma_min0
    else:
        sig = np.interp(ts, np.arange(T), base_sigmas)
        final = sigma_min0
    sig = np.append(sig, final if config["final_sigmas_type"] == "sigma_min" else 0.0).astype(np.float32)
    return Schedule(config, n, ts.astype(np.int64), sig, ac, 1.0, 1)


def _pndm_timesteps(ascending: np.ndarray, T: int, n: int, skip_prk_steps: bool) -> np.ndarray:
    """PNDM's call order. PLMS only: the first step is taken twice (predictor, then a corrector at the same
    timestep). With PRK warm-up: three Runge-Kutta steps (4 calls each, at t, t - k/2, t - k/2, t - k)."""
    if skip_prk_steps:
        return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
    half = T // n // 2
    prk = np.repeat(ascending[-4:], 2) + np.tile([0, half], 4)
    prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
    return np.concatenate([prk, ascending[:-3][::-1]]).astype(np.int64)


def input_scale(sched: Schedule) -> np.ndarray:
    """Per call, the factor `scale_model_input` applies: 1 / sqrt(sigma^2 + 1) for the sigma schedulers."""
    if sched.config["_class_name"] in SIGMA_SCHEDULERS:
        s = sched.sigmas[:-1].astype(np.float64)
        return 1 / np.sqrt(s ** 2 + 1)
    return np.ones(len(sched.timesteps))


def noise_levels(sched: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Per call, (signal, noise) with `add_noise(x0, noise) = signal * x0 + noise * noise` at that call's noise
    level, as diffusers' `scheduler.add_noise` at that timestep / step index."""
    cls = sched.config["_class_name"]
    if cls in SIGMA_SCHEDULERS:
        s = sched.sigmas[:-1].astype(np.float64)
        return np.ones_like(s), s
    if cls in MULTISTEP_SCHEDULERS:
        s = sched.sigmas[:-1].astype(np.float64)
        alpha = 1 / np.sqrt(s ** 2 + 1)
        return alpha, s * alpha
    ac = sched.alphas_cumprod.astype(np.float64)[sched.timesteps]
    return np.sqrt(ac), np.sqrt(1 - ac)
