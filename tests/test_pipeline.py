"""text2img / img2img / inpainting / outpainting, SD 1.x and SD 2.x (v-prediction), against diffusers' pipelines with
the same tiny random weights and the same initial noise: every pixel within 1/255 (float32 parity, rounded to uint8),
or the final latents within 1e-4 relative."""
import json

import numpy as np
import pytest

import sdjax
from sdjax import pipeline
from tests import tiny_models

import torch
import diffusers

# One xdist worker runs the whole file: tests with the same settings share one compiled program (pipes is
# module-scoped and sdjax.pipeline caches its programs), as the comments below say where they do.
pytestmark = pytest.mark.xdist_group("pipeline")

SIZE = 32  # the tiny VAE downsamples 2x: 16 x 16 latents (at 64 px each run of the tiny UNet takes ~5x longer)
PROMPTS = ["a red fox in the snow", "a blue bird"]
NEGATIVE = ["blurry", ""]


def agree(ours, theirs_float):
    theirs = np.round(np.asarray(theirs_float) * 255).astype(np.int32)
    diff = np.abs(ours.astype(np.int32) - theirs)
    assert ours.shape == theirs.shape
    assert diff.max() <= 1, f"{(diff > 1).mean():.5f} of pixel values differ by more than 1/255 (max {diff.max()})"
    return diff


def noise_for(pipe, batch, seed=0):
    f = pipe.vae_scale_factor
    noise, _ = pipeline.initial_noise(np.full(batch, seed), np.arange(batch), (SIZE // f, SIZE // f, 4))
    return torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    small = dict(layers_per_block=1, levels=2)  # pipelines, not weight names, are tested here: the quicker UNet
    folders = {"sd1": tiny_models.tiny_diffusers_folder(tmp, "sd1", **small),
               "inpaint": tiny_models.tiny_diffusers_folder(tmp, "sd1", inpaint=True, **small),
               "sd2v": tiny_models.tiny_diffusers_folder(tmp, "sd2", **small)}
    # SD 2.x (768 px) style: the OpenCLIP-like text encoder, linear projections, and a v-prediction DDIM
    scheduler_file = folders["sd2v"] / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler_file.read_text())
    config.update(_class_name="DDIMScheduler", prediction_type="v_prediction", clip_sample=False)
    scheduler_file.write_text(json.dumps(config))
    index_file = folders["sd2v"] / "model_index.json"
    index_file.write_text(json.dumps(dict(json.loads(index_file.read_text()), scheduler=["diffusers", "DDIMScheduler"])))
    return folders


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: sdjax.load_pretrained(folder) for name, folder in folders.items()}


def reference(cls, folder):
    return cls.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


def patch_randn(monkeypatch, module, noise):
    """diffusers draws the initial noise with randn_tensor: hand it ours."""
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: noise.clone())


def use_posterior_mode(monkeypatch, module):
    """diffusers img2img / inpainting encode with a posterior sample; sdjax uses the posterior mean."""
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def init_image():
    y, x = np.mgrid[0:SIZE, 0:SIZE] * (256 // SIZE)
    return np.stack([x, y, (x + y) // 2], -1).clip(0, 255).astype(np.uint8)


def mask_image():
    m = np.zeros((SIZE, SIZE), np.uint8)
    q = SIZE // 4
    m[q:3 * q, q // 2:5 * q // 2] = 255
    return m


@pytest.mark.parametrize("sampler,steps,guidance,rescale", [(None, 10, 7.5, 0.0), ("Euler", 8, 5.0, 0.7),
                                                            ("DPM++ 2M Karras", 8, 1.0, 0.0)])
def test_text2img_matches_diffusers(folders, pipes, sampler, steps, guidance, rescale):
    pipe = pipes["sd1"]
    ours = pipe.text2img(PROMPTS, negative_prompts=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                         guidance_rescale=rescale, sampler=sampler, height=SIZE, width=SIZE, seed=0)
    assert ours.dtype == np.uint8 and ours.shape == (2, SIZE, SIZE, 3)
    assert ours.std() > 5  # not a flat image
    ref = reference(diffusers.StableDiffusionPipeline, folders["sd1"])
    config = sdjax.schedulers.scheduler_config_for(pipe.scheduler_config, sampler)
    ref.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    theirs = ref(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
                 guidance_rescale=rescale, height=SIZE, width=SIZE, latents=noise_for(pipe, 2), output_type="np").images
    agree(ours, theirs)


def test_sd2_v_prediction_matches_diffusers(folders, pipes):
    """An SD 2.x (768 px) style model: OpenCLIP-like text encoder (gelu, 23 layers), linear projections, upcast
    attention, and a v-prediction DDIM scheduler (as stable-diffusion-2-1 ships), with guidance rescale."""
    pipe = pipes["sd2v"]
    assert pipe.family == "sd2" and pipe.prediction_type == "v_prediction"
    kw = dict(num_inference_steps=8, guidance_scale=7.5, guidance_rescale=0.7, height=SIZE, width=SIZE)
    ours = pipe.text2img(PROMPTS, negative_prompts=NEGATIVE, seed=0, **kw)
    assert ours.std() > 5
    ref = reference(diffusers.StableDiffusionPipeline, folders["sd2v"])
    assert type(ref.scheduler).__name__ == "DDIMScheduler" and ref.scheduler.config.prediction_type == "v_prediction"
    theirs = ref(PROMPTS, negative_prompt=NEGATIVE, latents=noise_for(pipe, 2), output_type="np", **kw).images
    agree(ours, theirs)


def test_img2img_matches_diffusers(folders, pipes, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as module

    pipe = pipes["sd1"]
    image = init_image()
    ours = pipe.img2img(PROMPTS, [image, image[::-1]], strength=0.6, num_inference_steps=10, height=SIZE, width=SIZE)
    ref = reference(diffusers.StableDiffusionImg2ImgPipeline, folders["sd1"])
    patch_randn(monkeypatch, module, noise_for(pipe, 2))
    use_posterior_mode(monkeypatch, module)
    from PIL import Image
    theirs = ref(PROMPTS, image=[Image.fromarray(image), Image.fromarray(image[::-1].copy())], strength=0.6,
                 num_inference_steps=10, output_type="np").images
    agree(ours, theirs)


def test_inpaint_matches_diffusers(folders, pipes, monkeypatch):
    """The 9-channel inpainting UNet: images as diffusers'."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from PIL import Image

    pipe = pipes["inpaint"]
    image, mask = init_image(), mask_image()
    ours = pipe.inpaint(PROMPTS[:1], [image], [mask], num_inference_steps=10, height=SIZE, width=SIZE)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, folders["inpaint"])
    patch_randn(monkeypatch, module, noise_for(pipe, 1))
    use_posterior_mode(monkeypatch, module)
    theirs = ref(PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(mask), num_inference_steps=10,
                 height=SIZE, width=SIZE, output_type="np").images
    agree(ours, theirs)


def test_inpaint_with_an_ordinary_unet_keeps_the_image_outside_the_mask(folders, pipes, monkeypatch):
    """A 4-channel UNet, the known region blended back every step: the final latents match diffusers'
    (output_type="latent", fp32 within 1e-4), and outside the mask they are the image's own latents while inside
    they are repainted. (Decoded, the random VAE's global GroupNorm and attention spread the repainted region's
    statistics over the whole image, so the check is made on the latents.)"""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from PIL import Image

    from sdjax.autoencoder import to_latents

    pipe = pipes["sd1"]
    image, mask = init_image(), mask_image()
    ours = pipe.inpaint(PROMPTS[:1], [image], [mask], num_inference_steps=10, height=SIZE, width=SIZE,
                        output_type="latent")
    assert ours.dtype == np.float32 and ours.shape == (1, SIZE // 2, SIZE // 2, 4)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, folders["sd1"])
    patch_randn(monkeypatch, module, noise_for(pipe, 1))
    use_posterior_mode(monkeypatch, module)
    theirs = ref(PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(mask), num_inference_steps=10,
                 height=SIZE, width=SIZE, output_type="latent").images
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    known = np.asarray(to_latents(pipe.vae.encode(pipeline.load_images([image], SIZE, SIZE))[0],
                                  pipe.vae.config.latent_scaling))
    repaint = mask_image()[::2, ::2] > 0  # the mask at latent resolution
    np.testing.assert_allclose(ours[0][~repaint], known[0][~repaint], rtol=1e-5, atol=1e-5)
    assert np.abs(ours[0][repaint] - known[0][repaint]).mean() > 0.1 * np.abs(known).mean()


def test_same_shapes_do_not_recompile(pipes):
    pipe = pipes["sd1"]
    # test_text2img_matches_diffusers' first program
    kw = dict(num_inference_steps=10, height=SIZE, width=SIZE, negative_prompts=NEGATIVE)
    pipe.text2img(PROMPTS, **kw)
    before = pipeline._denoise_jit._cache_size()
    a = pipe.text2img(["another prompt", "and one more"], guidance_scale=3.0, seed=5, **kw)
    assert pipeline._denoise_jit._cache_size() == before
    b = pipe.text2img(["another prompt", "and one more"], guidance_scale=3.0, seed=5, **kw)
    np.testing.assert_array_equal(a, b)


def test_pipeline_errors(pipes):
    pipe = pipes["sd1"]
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.text2img(["x"], height=63, width=64)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe.img2img(["x"], [init_image()], strength=0.0)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe.text2img(["a", "b", "c"], negative_prompts=["x", "y"])
    with pytest.raises(ValueError, match="output_type must be 'uint8' or 'latent', got 'pil'"):
        pipe.text2img(["x"], output_type="pil")
    inpaint = pipes["inpaint"]
    with pytest.raises(ValueError, match="inpainting UNet"):
        inpaint.text2img(["x"], height=SIZE, width=SIZE)


def test_outpainting_matches_diffusers_inpainting_on_the_padded_canvas(folders, pipes, monkeypatch):
    """outpaint_canvas pads an image on three sides and masks the padding; sdjax's inpainting (the 9-channel UNet)
    on that canvas matches diffusers' StableDiffusionInpaintPipeline given the same canvas and mask."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from PIL import Image

    q = SIZE // 4
    image = init_image()[q:, q:3 * q]  # 3/4 of the height, half the width
    canvas, mask = pipeline.outpaint_canvas(image, left=q, right=q, top=q)
    assert canvas.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(canvas[q:, q:3 * q], image)
    assert (canvas[:q] == 127).all() and (canvas[:, :q] == 127).all() and (canvas[:, 3 * q:] == 127).all()
    assert mask[:q].min() == mask[:, :q].min() == mask[:, 3 * q:].min() == 255 and mask[q:, q:3 * q].max() == 0
    pipe = pipes["inpaint"]
    # the settings of test_inpaint_matches_diffusers: its compiled program is reused
    ours = pipe.inpaint(PROMPTS[:1], [canvas], [mask], num_inference_steps=10, height=SIZE, width=SIZE)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, folders["inpaint"])
    patch_randn(monkeypatch, module, noise_for(pipe, 1))
    use_posterior_mode(monkeypatch, module)
    theirs = ref(PROMPTS[:1], image=Image.fromarray(canvas), mask_image=Image.fromarray(mask), num_inference_steps=10,
                 height=SIZE, width=SIZE, output_type="np").images
    agree(ours, theirs)


def test_pipeline_applies_the_vae_shift_factor(pipes):
    """With shift_factor c the pipeline encodes to (z - c) * s and decodes z / s + c, as training scales: img2img
    gives the same images as the unshifted VAE with c folded into the biases of quant_conv (the posterior mean)
    and post_quant_conv; folding c into only one of them (a pipeline that drops c on one side, as diffusers' SD
    pipelines drop it on both) gives other images."""
    import dataclasses

    import jax
    from flax import nnx

    base, c = pipes["sd1"], 50.0  # the random UNet's latents are wide: a small shift would hardly show

    def with_vae(*changes):
        graphdef, state = nnx.split(base.vae)
        vae = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
        for change in changes:
            change(vae)
        return dataclasses.replace(base, vae=vae)

    def shift(vae):
        vae.config = dataclasses.replace(vae.config, shift_factor=c)

    def fold_encode(vae):
        n = vae.config.latent_channels  # quant_conv's first n outputs are the posterior mean
        vae.quant_conv.bias[...] = vae.quant_conv.bias[...].at[:n].add(-c)

    def fold_decode(vae):
        kernel = vae.post_quant_conv.kernel[...]  # (1, 1, in, out): post_quant_conv(z + c) = conv(z) + c * sum_in
        vae.post_quant_conv.bias[...] = vae.post_quant_conv.bias[...] + c * kernel[0, 0].sum(0)

    shifted = with_vae(shift)
    assert shifted.vae.config.latent_scaling == (0.18215, c) and base.vae.config.shift_factor is None
    images = [init_image(), init_image()[::-1]]
    kw = dict(strength=0.6, num_inference_steps=10, height=SIZE, width=SIZE)  # as test_img2img: compiled once
    ours = shifted.img2img(PROMPTS, images, **kw).astype(int)
    diffs = {name: np.abs(ours - with_vae(*folds).img2img(PROMPTS, images, **kw))
             for name, folds in [("both", (fold_encode, fold_decode)), ("encode only", (fold_encode,)),
                                 ("decode only", (fold_decode,))]}
    print({name: (int(d.max()), round(float(d.mean()), 2)) for name, d in diffs.items()})
    assert diffs["both"].max() <= 1
    assert diffs["encode only"].mean() > 10 and diffs["decode only"].mean() > 10
