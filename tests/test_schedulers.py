"""Scheduler configs, tables and every sampler's full run against diffusers' scheduler classes."""
from __future__ import annotations

import itertools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import sampling, schedulers
from tests.scheduler_reference import (SD15_SCHEDULER, SD21_SCHEDULER, diffusers_loop, diffusers_scheduler,
                                       relative_error, sdjax_loop)

TOL = 1e-5
STEPS = (10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# diffusers' schedulers call np.array(tensor, copy=False), which numpy 2 flags on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NOISE = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
RNG = jax.random.key(1)


# ------------------------------------------------------------------------------------------------- configs

def test_sd_scheduler_configs_load_as_is():
    sd15 = schedulers.scheduler_config_for(SD15_SCHEDULER)
    assert sd15["_class_name"] == "PNDMScheduler" and sd15["skip_prk_steps"] and sd15["steps_offset"] == 1
    assert sd15["beta_schedule"] == "scaled_linear" and sd15["prediction_type"] == "epsilon"
    sd21 = schedulers.scheduler_config_for(SD21_SCHEDULER)
    assert sd21["_class_name"] == "DDIMScheduler" and sd21["prediction_type"] == "v_prediction"
    assert sd21["set_alpha_to_one"] is False and sd21["clip_sample"] is False
    sched = schedulers.schedule(SD15_SCHEDULER, 50)
    assert list(sched.timesteps[:4]) == [981, 961, 961, 941] and sched.timesteps[-1] == 1


@pytest.mark.parametrize("base", [SD15_SCHEDULER, SD21_SCHEDULER, {}], ids=["sd15", "sd21", "empty"])
def test_effective_config_is_diffusers_from_config(base):
    for cls in schedulers.SCHEDULER_CLASSES:
        ours = schedulers.scheduler_config_for(base, cls)
        theirs = dict(getattr(diffusers, cls).from_config(base).config)
        registered = {k for k in theirs if not k.startswith("_")} & set(schedulers.DEFAULTS[cls])
        assert registered, cls
        assert {k: ours[k] for k in registered} == {k: theirs[k] for k in registered}, cls
        assert ours["_class_name"] == cls


@pytest.mark.parametrize("name, cls, fields", [
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("DDIM", "DDIMScheduler", {"eta": 0.0}),
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    ("LMS", "LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    ("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("Heun", "HeunDiscreteScheduler", {}),
    ("UniPC", "UniPCMultistepScheduler", {"solver_type": "bh2"}),
    ("DDPM", "DDPMScheduler", {}),
    ("EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler", {}),
    ("dpmpp_2m_sde_karras", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}),
    ("dpm++ 2m karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
])
def test_sampler_names(name, cls, fields):
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, name)
    assert config["_class_name"] == cls
    assert {k: config[k] for k in fields} == fields
    # the checkpoint's noise schedule is kept
    assert (config["beta_schedule"], config["beta_start"], config["steps_offset"]) == ("scaled_linear", 0.00085, 1)


def test_overrides_and_switching_keep_the_schedule():
    config = schedulers.scheduler_config_for(SD21_SCHEDULER, "DPM++ 2M Karras", timestep_spacing="trailing")
    assert config["prediction_type"] == "v_prediction" and config["timestep_spacing"] == "trailing"
    assert schedulers.scheduler_config_for(config, "Euler")["use_karras_sigmas"] is False
    assert schedulers.scheduler_config_for(config, "EulerDiscreteScheduler")["use_karras_sigmas"] is True
    assert schedulers.scheduler_config_for(SD15_SCHEDULER, "DDIM", eta=0.3)["eta"] == 0.3


def test_unknown_sampler_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown sampler 'Euler b'.*DPM\+\+ 2M SDE Karras"):
        schedulers.scheduler_config_for(SD15_SCHEDULER, "Euler b")
    with pytest.raises(ValueError, match="unknown sampler 'FooScheduler'"):
        schedulers.scheduler_config_for({"_class_name": "FooScheduler"})
    with pytest.raises(ValueError, match="no `_class_name`"):
        schedulers.scheduler_config_for({"beta_start": 0.001})


@pytest.mark.parametrize("sampler, fields, match", [
    ("Euler", {"beta_schedul": "linear"}, r"unknown scheduler config fields \['beta_schedul'\]"),
    ("DDPM", {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid' is not supported"),
    ("Euler", {"use_exponential_sigmas": True}, "use_exponential_sigmas=True is not supported"),
    ("Euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("DPM++ 2M", {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver' is not supported"),
    ("DPM++ 2M", {"variance_type": "learned_range"}, "variance_type"),
    ("UniPC", {"predict_x0": False}, "predict_x0=False"),
    ("Euler a", {"prediction_type": "sample"}, "prediction_type='sample' is not supported"),
    ("PLMS", {"prediction_type": "sample"}, "prediction_type='sample' is not supported"),
    ("LMS", {"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True but LMSDiscreteScheduler"),
    ("DDIM", {"eta": -1.0}, "eta must be >= 0"),
    ("DDPM", {"trained_betas": [0.1, 0.2]}, "trained_betas has 2 entries"),
])
def test_unsupported_fields_raise(sampler, fields, match):
    with pytest.raises(ValueError, match=match):
        schedulers.scheduler_config_for(SD15_SCHEDULER, sampler, **fields)


def test_foreign_fields_are_ignored_like_diffusers():
    config = schedulers.scheduler_config_for(dict(SD15_SCHEDULER, solver_order=3, use_karras_sigmas=True), "DDIM")
    assert "solver_order" not in config and "skip_prk_steps" not in config


# -------------------------------------------------------------------------------------------------- tables

def _table_cases():
    for cls in schedulers.SCHEDULER_CLASSES:
        fields = schedulers.DEFAULTS[cls]
        karras = (False, True) if "use_karras_sigmas" in fields else (False,)
        zero_snr = (False, True) if "rescale_betas_zero_snr" in fields else (False,)
        for spacing, k, z, schedule in itertools.product(SPACINGS, karras, zero_snr,
                                                         ("scaled_linear", "linear", "squaredcos_cap_v2")):
            overrides = dict(timestep_spacing=spacing, beta_schedule=schedule)
            overrides.update({"use_karras_sigmas": True} if k else {})
            overrides.update({"rescale_betas_zero_snr": True} if z else {})
            if k and schedule == "squaredcos_cap_v2" and cls == "DPMSolverMultistepScheduler":
                continue  # diffusers truncates these timesteps to duplicates and then indexes past its sigmas
            yield schedulers.scheduler_config_for(SD15_SCHEDULER, cls, **overrides)


def test_tables_match_diffusers():
    for config, n in itertools.product(_table_cases(), (7, 25, 50)):
        ours, theirs = schedulers.schedule(config, n), diffusers_scheduler(config, n)
        what = f"{config['_class_name']} {n} steps {config}"
        # bit for bit, zero-terminal SNR included (the reference's sqrt is IEEE, see scheduler_reference)
        np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), err_msg=what)
        rtol = 1e-6
        assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype, what
        np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=rtol, err_msg=what)
        if ours.timesteps.dtype.kind == "i":
            np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy(), err_msg=what)
        if ours.sigmas is not None:
            np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=rtol, err_msg=what)
        assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6), what
        assert ours.order == theirs.order


def test_heun_calls_the_model_twice_per_step_but_the_last():
    plan = sampling.make_plan(SD15_SCHEDULER | {"_class_name": "HeunDiscreteScheduler"}, 10)
    assert len(plan.rows["timestep"]) == 19
    assert plan.rows["timestep"].dtype == np.float32


def test_training_helpers_match_diffusers():
    for overrides in ({}, {"rescale_betas_zero_snr": True}, {"beta_schedule": "squaredcos_cap_v2"}):
        config = schedulers.scheduler_config_for(SD21_SCHEDULER, "DDPM", **overrides)
        ddpm = diffusers_scheduler(config)
        ac = schedulers.alphas_cumprod(config)
        np.testing.assert_array_equal(ac, ddpm.alphas_cumprod.numpy())
        x0, noise = (np.array(jax.random.normal(jax.random.key(i), (3, 4, 4, 2))) for i in (2, 3))
        t = np.array([0, 500, 999])
        torch_args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        np.testing.assert_allclose(schedulers.add_noise(config, x0, noise, t), ddpm.add_noise(*torch_args).numpy(),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(schedulers.get_velocity(config, x0, noise, t),
                                   ddpm.get_velocity(*torch_args).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(schedulers.snr(config, t[:2]), ac[t[:2]] / (1 - ac[t[:2]]), rtol=1e-6)
    # jittable in t, and a scalar t broadcasts over the batch
    f = jax.jit(lambda t: schedulers.add_noise(SD15_SCHEDULER, jnp.ones((2, 2, 2, 1)), jnp.zeros((2, 2, 2, 1)), t))
    assert float(f(0)[1, 0, 0, 0]) == pytest.approx(float(np.sqrt(schedulers.alphas_cumprod(SD15_SCHEDULER)[0])))


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ 2M Karras", "DDIM"])
def test_add_noise_at_schedule_timesteps(sampler):
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler)
    sched, theirs = schedulers.schedule(config, 12), diffusers_scheduler(config, 12)
    t = sched.timesteps[[0, 3, 6]]
    x0, noise = NOISE[:1].repeat(3, 0), NOISE[1:].repeat(3, 0)
    expected = theirs.add_noise(*(torch.from_numpy(a).permute(0, 3, 1, 2) for a in (x0, noise)),
                                torch.from_numpy(t)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(schedulers.add_noise(sched, x0, noise, t), expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- full runs against diffusers

def _check(runs):
    """runs: (label, config, steps). Every run's final latents within TOL of diffusers (float64)."""
    failures = []
    for label, config, n in runs:
        err = relative_error(sdjax_loop(config, n, NOISE, RNG), diffusers_loop(config, n, NOISE, RNG))
        if not err <= TOL:
            failures.append(f"{label} steps={n}: {err:.2e}")
    assert not failures, "\n".join(failures)


def _matrix(sampler, predictions=PREDICTIONS, spacings=SPACINGS, steps=STEPS, **fields):
    for prediction, spacing, n in itertools.product(predictions, spacings, steps):
        overrides = dict(fields, prediction_type=prediction, timestep_spacing=spacing)
        try:
            config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler, **overrides)
        except ValueError:   # a prediction type the class does not support (checked above)
            continue
        yield f"{sampler} {overrides}", config, n


@pytest.mark.parametrize("sampler, fields", [
    ("DDPM", {}), ("DDIM", {}), ("DDIM", {"eta": 0.6}), ("PLMS", {}), ("LMS", {}), ("Euler", {}), ("Euler a", {}),
    ("Heun", {}), ("DPM++ 2M", {}), ("DPM++ 2M SDE", {}), ("UniPC", {}),
], ids=lambda v: str(v) if v else "")
def test_sampler_matches_diffusers(sampler, fields):
    """10 / 25 / 50 steps x every prediction type x every timestep spacing the class supports."""
    _check(_matrix(sampler, **fields))


@pytest.mark.parametrize("sampler", ["LMS Karras", "Euler Karras", "Heun Karras", "DPM++ 2M Karras",
                                     "DPM++ 2M SDE Karras", "UniPCMultistepScheduler"])
def test_karras_sigmas_match_diffusers(sampler):
    _check(_matrix(sampler, predictions=("epsilon",), use_karras_sigmas=True))


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_zero_terminal_snr_matches_diffusers(sampler):
    _check(_matrix(sampler, predictions=("v_prediction",), rescale_betas_zero_snr=True))


def test_checkpoint_configs_as_shipped_match_diffusers():
    _check([(name, schedulers.scheduler_config_for(config), n)
            for (name, config), n in itertools.product([("sd15", SD15_SCHEDULER), ("sd21", SD21_SCHEDULER)], STEPS)])


@pytest.mark.parametrize("sampler, fields", [
    ("PNDM", {"skip_prk_steps": False}),   # PRK warm-up
    ("PNDM", {"skip_prk_steps": False, "prediction_type": "v_prediction"}),
    ("DDPM", {"variance_type": "fixed_large"}), ("DDPM", {"clip_sample": True, "clip_sample_range": 0.8}),
    ("DDPM", {"thresholding": True, "sample_max_value": 1.2}),
    ("DDIM", {"clip_sample": True, "set_alpha_to_one": True}),
    ("DDIM", {"thresholding": True, "sample_max_value": 1.5}),
    ("Heun", {"clip_sample": True, "prediction_type": "sample"}),
    ("Euler", {"final_sigmas_type": "sigma_min"}), ("Euler", {"timestep_type": "continuous",
                                                              "prediction_type": "v_prediction"}),
    ("Euler Karras", {"sigma_min": 0.1, "sigma_max": 10.0}), ("Euler", {"beta_schedule": "squaredcos_cap_v2"}),
    ("DPM++ 2M", {"solver_type": "heun"}), ("DPM++ 2M SDE", {"solver_type": "heun"}),
    ("DPM++ 2M", {"solver_order": 3}), ("DPM++ 2M SDE", {"solver_order": 3}), ("DPM++ 2M", {"solver_order": 1}),
    ("DPM++ 2M", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("DPM++ 2M", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("DPM++ 2M", {"thresholding": True, "sample_max_value": 1.5}), ("DPM++ 2M", {"lambda_min_clipped": -5.1}),
    ("DPM++ 2M Karras", {"sigma_min": 0.1, "sigma_max": 10.0}),
    ("DPM++ 2M", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("UniPC", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}), ("UniPC", {"solver_order": 3}),
    ("UniPC", {"solver_order": 1}), ("UniPC", {"disable_corrector": [0, 3]}),
    ("UniPC", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("UniPC", {"thresholding": True, "sample_max_value": 1.5}),
    ("Euler a", {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
], ids=lambda v: str(v))
def test_options_match_diffusers(sampler, fields):
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler, **fields)
    _check([(f"{sampler} {fields}", config, n) for n in (10, 25)])


def test_unipc_bh1_to_zero_sigma_is_finite():
    """diffusers returns NaN here (-inf * 0 in its last predictor step); the last step is plain x0."""
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "UniPC", solver_type="bh1")
    assert np.isfinite(sdjax_loop(config, 10, NOISE)).all()
