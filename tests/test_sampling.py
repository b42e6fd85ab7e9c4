"""sample_loop's contract: what the model sees, jit / scan behaviour, randomness, img2img and inpainting."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import sampling, schedulers
from tests.scheduler_reference import (SD15_SCHEDULER, SD21_SCHEDULER, diffusers_loop, diffusers_scheduler, jax_model,
                                       relative_error, sdjax_loop)

# diffusers' schedulers call np.array(tensor, copy=False), which numpy 2 flags on every set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NOISE = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
IMAGE = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 4))) * 0.5
MASK = np.broadcast_to((np.arange(8) < 5)[None, None, :, None], (2, 8, 8, 1)).astype(np.float32)  # 1 = repaint
RNG = jax.random.key(1)
ALL = ["DDPM", "DDIM", "PLMS", "PNDM", "LMS", "LMS Karras", "Euler", "Euler a", "Heun", "DPM++ 2M",
       "DPM++ 2M SDE Karras", "UniPC"]


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DDIM", "DPM++ 2M Karras", "PLMS"])
def test_model_receives_what_the_unet_receives_in_diffusers(sampler):
    config = schedulers.scheduler_config_for(SD21_SCHEDULER, sampler)
    seen = []

    def model_fn(x, t):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), np.asarray(t))), x, t, ordered=True)
        return jax_model(x, t)

    jax.jit(lambda noise: sampling.sample_loop(model_fn, noise, config, 12))(NOISE).block_until_ready()
    expected = []
    diffusers_loop(config, 12, NOISE, record=expected)
    assert len(seen) == len(expected) == len(diffusers_scheduler(config, 12).timesteps)
    kind = diffusers_scheduler(config, 12).timesteps.numpy().dtype.kind   # float for Euler-type, int otherwise
    for (x, t), (x_ref, t_ref) in zip(seen, expected, strict=True):
        assert t.shape == () and t.dtype.kind == kind and t == t_ref
        assert relative_error(x, x_ref) < 1e-5


def test_jitted_loop_does_not_recompile_and_scans():
    traces = []

    def model_fn(x, t):
        traces.append(t)
        return jax_model(x, t)

    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "DPM++ 2M SDE Karras")
    loop = jax.jit(lambda noise, rng: sampling.sample_loop(model_fn, noise, config, 20, rng))
    first = loop(NOISE, RNG)
    second = loop(NOISE + 1, jax.random.key(7))
    assert len(traces) == 1, "the model must be traced once (lax.scan), not once per step"
    assert loop._cache_size() == 1
    assert not np.allclose(first, second)
    jaxpr = jax.make_jaxpr(lambda noise, rng: sampling.sample_loop(jax_model, noise, config, 50, rng))(NOISE, RNG)
    assert "scan" in str(jaxpr)


def test_heun_is_one_scan_with_two_calls_per_step():
    traces = []

    def model_fn(x, t):
        traces.append(t)
        return jax_model(x, t)

    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "Heun")
    out = jax.jit(lambda noise: sampling.sample_loop(model_fn, noise, config, 20))(NOISE)
    assert len(traces) == 1
    assert relative_error(np.asarray(out, np.float64), diffusers_loop(config, 20, NOISE)) < 1e-5


def test_randomness():
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "Euler a")
    with pytest.raises(ValueError, match="pass rng=jax.random.key"):
        sampling.sample_loop(jax_model, NOISE, config, 5)
    a = sampling.sample_loop(jax_model, NOISE, config, 5, jax.random.key(3))
    b = sampling.sample_loop(jax_model, NOISE, config, 5, jax.random.key(3))
    c = sampling.sample_loop(jax_model, NOISE, config, 5, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # deterministic samplers need no rng and ignore one
    euler = schedulers.scheduler_config_for(SD15_SCHEDULER, "Euler")
    np.testing.assert_array_equal(sampling.sample_loop(jax_model, NOISE, euler, 5),
                                  sampling.sample_loop(jax_model, NOISE, euler, 5, jax.random.key(3)))
    np.testing.assert_array_equal(sampling.step_noise(RNG, 7, (2, 8, 8, 4)),
                                  jax.random.normal(jax.random.fold_in(RNG, 7), (2, 8, 8, 4)))


def test_any_batch_and_half_precision_noise():
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "DDIM")
    one = sampling.sample_loop(jax_model, NOISE[:1], config, 5)
    two = sampling.sample_loop(jax_model, NOISE, config, 5)
    np.testing.assert_allclose(one, two[:1], rtol=1e-6)
    half = sampling.sample_loop(jax_model, NOISE.astype(jnp.bfloat16), config, 5)
    assert half.dtype == jnp.float32 and half.shape == NOISE.shape


@pytest.mark.parametrize("sampler", ALL)
def test_img2img_matches_diffusers(sampler):
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler)
    for n in (10, 25):
        ours = sdjax_loop(config, n, NOISE, RNG, init_latents=IMAGE, strength=0.6)
        assert relative_error(ours, diffusers_loop(config, n, NOISE, RNG, init_latents=IMAGE, strength=0.6)) < 1e-5


@pytest.mark.parametrize("sampler", ALL)
def test_inpaint_blend_matches_diffusers(sampler):
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler)
    for n, strength in ((10, 1.0), (25, 1.0), (10, 0.6)):
        ours = sdjax_loop(config, n, NOISE, RNG, strength=strength, inpaint_latents=IMAGE, inpaint_mask=MASK)
        ref = diffusers_loop(config, n, NOISE, RNG, strength=strength, inpaint_latents=IMAGE, inpaint_mask=MASK)
        assert relative_error(ours, ref) < 1e-5, (n, strength)
        np.testing.assert_allclose(ours[..., 5:, :], IMAGE[..., 5:, :], rtol=1e-6, atol=1e-6)  # known region


def test_sample_loop_img2img_and_inpaint_arguments():
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "DPM++ 2M")
    out = sampling.sample_loop(jax_model, NOISE, config, 10, init_latents=IMAGE, strength=0.6,
                               inpaint_latents=IMAGE, inpaint_mask=MASK)
    ref = diffusers_loop(config, 10, NOISE, init_latents=IMAGE, strength=0.6, inpaint_latents=IMAGE,
                         inpaint_mask=MASK)
    assert relative_error(np.asarray(out, np.float64), ref) < 1e-5
    with pytest.raises(ValueError, match="pass init_latents"):
        sampling.sample_loop(jax_model, NOISE, config, 10, strength=0.5)
    with pytest.raises(ValueError, match="needs both inpaint_latents and inpaint_mask"):
        sampling.sample_loop(jax_model, NOISE, config, 10, inpaint_latents=IMAGE)
    with pytest.raises(ValueError, match="leaves no step to run"):
        sampling.sample_loop(jax_model, NOISE, config, 10, init_latents=IMAGE, strength=0.05)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        sampling.sample_loop(jax_model, NOISE, config, 10, init_latents=IMAGE, strength=1.5)
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        sampling.sample_loop(jax_model, NOISE, config, 0)


@pytest.mark.parametrize("sampler", ["Euler", "Heun", "DPM++ 2M Karras", "UniPC"])
def test_denoising_end_and_start_split_the_schedule_as_diffusers(sampler):
    """SDXL's base + refiner split: the calls denoising_end keeps are those diffusers' StableDiffusionXLPipeline
    keeps, and denoising_start's those of its img2img pipeline's get_timesteps (second-order samplers included);
    the latents are taken as they are (no noise added). For Euler a run split in two is the whole run."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLImg2ImgPipeline

    config = schedulers.scheduler_config_for(SD15_SCHEDULER | {"timestep_spacing": "leading", "steps_offset": 1},
                                             sampler)
    for n, split in ((10, 0.8), (25, 0.63), (7, 0.5)):
        sched = diffusers_scheduler(config, n)
        end = sampling.make_plan(config, n, denoising_end=split)
        cutoff = int(round(1000 - split * 1000))
        np.testing.assert_array_equal(end.rows["timestep"], [t for t in sched.timesteps.numpy() if t >= cutoff])
        start = sampling.make_plan(config, n, denoising_start=split, strength=0.1)  # strength is unused then
        theirs, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), n, 0.1, "cpu",
                                                                    denoising_start=split)
        np.testing.assert_array_equal(start.rows["timestep"], theirs.numpy())
        assert (start.init_signal, start.init_noise) == (1.0, 0.0) and start.begin == len(sched.timesteps) - len(theirs)
    if sampler == "Euler":
        whole = sampling.sample_loop(jax_model, NOISE, config, 10)
        high = sampling.sample_loop(jax_model, NOISE, config, 10, denoising_end=0.6)
        split = sampling.sample_loop(jax_model, NOISE, config, 10, init_latents=high, denoising_start=0.6)
        assert relative_error(np.asarray(split), np.asarray(whole)) < 1e-6
        assert relative_error(np.asarray(high), np.asarray(whole)) > 0.03  # measured 0.072: still noisy
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        sampling.make_plan(config, 10, denoising_end=1.0)
    with pytest.raises(ValueError, match="leaves no step to run"):
        sampling.make_plan(config, 10, denoising_start=0.5, denoising_end=0.4)
