"""Watching the denoising: x̂₀ per model call from sample_loop, the approximate decoder, and sample.py's strips."""
from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import sample as sample_config
from sdjax import autoencoder, initializers, jobs, sampling, schedulers
from tests.scheduler_reference import SD15_SCHEDULER, SD21_SCHEDULER, diffusers_loop, jax_model, relative_error

pytestmark = [pytest.mark.xdist_group("trajectory"),
              # diffusers' schedulers call np.array(tensor, copy=False), which numpy 2 flags on every set_timesteps
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

NOISE = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 4)))
IMAGE = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 4))) * 0.5
MASK = np.broadcast_to((np.arange(8) < 5)[None, None, :, None], (2, 8, 8, 1)).astype(np.float32)  # 1 = repaint
RNG = jax.random.key(1)
STEPS = 8


def loop(config, **kwargs):
    return jax.jit(lambda noise, rng: sampling.sample_loop(jax_model, noise, config, STEPS, rng, **kwargs))(NOISE, RNG)


@pytest.mark.parametrize("sampler, base", [("DDIM", SD21_SCHEDULER), ("Euler", SD15_SCHEDULER),
                                           ("Euler a", SD15_SCHEDULER)])
def test_predictions_are_the_schedulers_pred_original_sample(sampler, base):
    config = schedulers.scheduler_config_for(base, sampler)   # DDIM: v-prediction; Euler a: stochastic
    final, x0s = loop(config, return_predictions=True)
    np.testing.assert_array_equal(final, loop(config))   # the same latents, bit for bit
    reference = []
    diffusers_loop(config, STEPS, NOISE, RNG, predictions=reference)
    assert x0s.shape == (STEPS, *NOISE.shape)
    for ours, theirs in zip(np.asarray(x0s, np.float64), reference, strict=True):
        assert relative_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("sampler", ["PLMS", "Heun", "DPM++ 2M SDE Karras"])
def test_every_kth_prediction_and_the_same_latents(sampler):
    """PLMS (one call more than steps, an x̂₀ diffusers does not report), Heun (two calls a step), a stochastic
    multistep sampler: every call has its x̂₀, the kept ones are a subset, the latents do not change."""
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, sampler)
    latents = loop(config)
    final, x0s = loop(config, return_predictions=True)
    final_3, x0s_3 = loop(config, return_predictions=True, predictions_every=3)
    np.testing.assert_array_equal(final, latents)
    np.testing.assert_array_equal(final_3, latents)
    calls = len(sampling.make_plan(config, STEPS).rows["index"])
    assert x0s.shape == (calls, *NOISE.shape) and np.isfinite(x0s).all()
    kept = sampling.kept_predictions(calls, 3)
    assert kept[0] == 0 and kept[-1] == calls - 1 and set(np.diff(kept[:-1])) == {3}
    np.testing.assert_array_equal(x0s_3, x0s[kept])
    # the first prediction is a blur far from the result, the last one is (nearly) the result
    assert np.abs(x0s[-1] - latents).max() < 0.05 * np.abs(x0s[0] - latents).max()


def test_inpainting_predictions_keep_the_known_region():
    config = schedulers.scheduler_config_for(SD15_SCHEDULER, "Euler")
    kwargs = dict(inpaint_latents=IMAGE, inpaint_mask=MASK)
    final, x0s = loop(config, return_predictions=True, predictions_every=4, **kwargs)
    np.testing.assert_array_equal(final, loop(config, **kwargs))
    assert x0s.shape == (3, *NOISE.shape)   # calls 0, 4 and 7
    np.testing.assert_array_equal(x0s[..., 5:, :], np.broadcast_to(IMAGE[..., 5:, :], x0s[..., 5:, :].shape))
    with pytest.raises(ValueError, match="predictions_every must be 1 or more"):
        sampling.sample_loop(jax_model, NOISE, config, STEPS, return_predictions=True, predictions_every=0)


def planned(config, seed=0):
    """An AutoencoderKL with random weights, drawn in one small program (an eager build takes ~15x longer)."""
    module, plan = initializers.plan(lambda rngs: autoencoder.AutoencoderKL(config, rngs=rngs))
    graphdef, abstract = nnx.split(module)
    return nnx.merge(graphdef, plan.values({"vae": nnx.to_pure_dict(abstract)}, seed=seed)["vae"])


def test_approx_decode_in_sds_latent_space():
    sd_like = planned(autoencoder.VARIANTS["tiny"])   # 4 channels, scaling_factor 0.18215: SD's factors
    rgb = np.asarray(autoencoder.approx_decode(sd_like, NOISE))
    assert rgb.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(rgb, NOISE @ np.asarray(autoencoder.SD_LATENT_RGB), rtol=1e-5, atol=1e-6)
    assert 0.3 < rgb.std() < 1.0 and np.abs(rgb).max() < 4   # unit-variance latents: colours of about [-1, 1]


class LinearVAE:
    """A stand-in VAE whose encoder is linear in colour (each latent pixel: its f x f pixels' mean colour @ A + c), so
    the fitted map must invert it."""
    A = np.array([[0.5, -1.0, 0.2, 0.0], [0.3, 0.4, -0.6, 1.0], [-0.2, 0.1, 0.9, 0.5]], np.float32)
    c = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    config = dataclasses.replace(autoencoder.VARIANTS["tiny"], scaling_factor=0.5, shift_factor=0.1)
    encoder = types.SimpleNamespace(conv_in=types.SimpleNamespace(kernel=np.zeros(1, np.float32)))

    def encode(self, images):
        b, h, w, _ = images.shape
        f = self.config.downsample_factor
        pooled = images.reshape(b, h // f, f, w // f, f, 3).mean(axis=(2, 4))
        return pooled @ self.A + self.c, None


def test_approx_decode_fits_other_latent_spaces():
    vae = LinearVAE()
    colours = np.random.default_rng(1).uniform(-1, 1, (2, 6, 6, 3)).astype(np.float32)
    f = vae.config.downsample_factor
    latents = autoencoder.to_latents(vae.encode(colours.repeat(f, 1).repeat(f, 2))[0], vae.config.latent_scaling)
    np.testing.assert_allclose(autoencoder.approx_decode(vae, latents), colours, atol=1e-4)
    # a real (random) VAE of another latent space: the fit runs inside a program, on its encoder
    config = dataclasses.replace(autoencoder.VARIANTS["tiny"], block_out_channels=(8,), norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                                 scaling_factor=0.7, mid_block_add_attention=False)
    weights, bias = nnx.jit(autoencoder.latent_rgb_map)(planned(config))
    assert weights.shape == (4, 3) and bias.shape == (3,) and np.isfinite(weights).all()
    assert not np.allclose(weights, autoencoder.SD_LATENT_RGB, atol=0.05)


def test_sample_py_writes_trajectory_strips_and_resumes(tmp_path):
    config = sample_config.get_config()
    config.update(variant="tiny", prompt="a red circle", num_images_per_prompt=2, steps=4, sampler="Euler",
                  height=16, width=16, batch_size=1, trajectory=2, output_dir=str(tmp_path))
    slots = jobs.image_slots(["a red circle"], num_images_per_prompt=2)
    jobs.run(config)
    frames = len(sampling.kept_predictions(4, 2)) + 1   # x̂₀ of calls 0, 2, 3, then the image
    for slot in slots:
        image = np.asarray(Image.open(tmp_path / slot.filename()))
        with Image.open(tmp_path / slot.trajectory_filename()) as png:
            strip = np.asarray(png)
            assert png.text["parameters"].startswith("a red circle\nSteps: 4, Sampler: Euler")
        assert strip.shape == (16, frames * 16, 3)
        np.testing.assert_array_equal(strip[:, -16:], image)
        # Euler's last call predicts exactly the result: its frame is the image, up to the decode's rounding
        assert np.abs(strip[:, -32:-16].astype(int) - image).max() <= 1
        assert strip.std() > 5 and np.abs(strip[:, :16].astype(int) - image).mean() > 5   # a blur first
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(
        [s.filename() for s in slots] + [s.trajectory_filename() for s in slots] + ["grid.png"])

    # resume: a missing strip is made again (its image is kept as it is), a missing image with its strip
    kept_image = (tmp_path / slots[0].filename()).read_bytes()
    (tmp_path / slots[0].trajectory_filename()).unlink()
    (tmp_path / slots[1].filename()).unlink()
    assert jobs.pending(slots, tmp_path) == [slots[1]]
    assert jobs.pending(slots, tmp_path, trajectory=True) == slots
    jobs.run(config)
    assert (tmp_path / slots[0].filename()).read_bytes() == kept_image
    assert all((tmp_path / name).exists() for s in slots for name in (s.filename(), s.trajectory_filename()))
    config.trajectory_decoder = "latent"   # no PNG of latents
    with pytest.raises(jobs.ConfigError, match="trajectory_decoder='latent'"):
        jobs.run(config)
