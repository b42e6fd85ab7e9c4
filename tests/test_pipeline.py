"""text2img / img2img / inpainting against diffusers' pipelines with the same tiny random weights and the same
initial noise: images agree within 1/255 on >= 99% of pixels."""
import numpy as np
import pytest

import sdjax
from sdjax import pipeline
from tests import tiny_models

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 64  # the tiny VAE downsamples 2x: 32 x 32 latents
PROMPTS = ["a red fox in the snow", "a blue bird"]
NEGATIVE = ["blurry", ""]


def agree(ours, theirs_float):
    theirs = np.round(np.asarray(theirs_float) * 255).astype(np.int32)
    diff = np.abs(ours.astype(np.int32) - theirs)
    assert ours.shape == theirs.shape
    assert (diff <= 1).mean() >= 0.99, f"only {(diff <= 1).mean():.4f} of pixels within 1/255 (max diff {diff.max()})"
    return diff


def noise_for(pipe, batch, seed=0):
    noise, _ = pipeline.initial_noise(np.full(batch, seed), np.arange(batch), (SIZE // 2, SIZE // 2, 4))
    return torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    return {"sd1": tiny_models.tiny_diffusers_folder(tmp, "sd1"),
            "inpaint": tiny_models.tiny_diffusers_folder(tmp, "sd1", inpaint=True)}


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
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)


def mask_image():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[16:48, 8:40] = 255
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


@pytest.mark.parametrize("kind", ["inpaint", "sd1"])
def test_inpaint_matches_diffusers(folders, pipes, monkeypatch, kind):
    """A 9-channel inpainting UNet, and an ordinary UNet with the known region blended back every step."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module
    from PIL import Image

    pipe = pipes[kind]
    image, mask = init_image(), mask_image()
    ours = pipe.inpaint(PROMPTS[:1], [image], [mask], num_inference_steps=10, height=SIZE, width=SIZE)
    ref = reference(diffusers.StableDiffusionInpaintPipeline, folders[kind])
    patch_randn(monkeypatch, module, noise_for(pipe, 1))
    use_posterior_mode(monkeypatch, module)
    theirs = ref(PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(mask), num_inference_steps=10,
                 height=SIZE, width=SIZE, output_type="np").images
    agree(ours, theirs)
    if kind == "sd1":  # far from the mask the known image survives (up to the VAE's round trip)
        assert not np.array_equal(ours[0, 16:48, 8:40], pipe.img2img(PROMPTS[:1], [image], strength=1.0,
                                                                        num_inference_steps=2, height=SIZE,
                                                                        width=SIZE)[0, 16:48, 8:40])


def test_same_shapes_do_not_recompile(pipes):
    pipe = pipes["sd1"]
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE)
    pipe.text2img(PROMPTS, **kw)
    before = pipeline._denoise_jit._cache_size()
    a = pipe.text2img(["another prompt", "and one more"], guidance_scale=3.0, seed=5, **kw)
    assert pipeline._denoise_jit._cache_size() == before
    b = pipe.text2img(["another prompt", "and one more"], guidance_scale=3.0, seed=5, **kw)
    np.testing.assert_array_equal(a, b)


def test_image_depends_on_seed_and_index_only(pipes):
    """Image k of a batch equals the same (seed, index) generated alone."""
    pipe = pipes["sd1"]
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, sampler="Euler a")
    batch = pipe.text2img(["a fox", "a bird", "a cat"], seeds=[1, 2, 3], indices=[10, 11, 12], **kw)
    alone = pipe.text2img(["a bird"], seeds=[2], indices=[11], **kw)
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1
    assert not np.array_equal(batch[0], batch[2])


def test_pipeline_errors(pipes):
    pipe = pipes["sd1"]
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.text2img(["x"], height=63, width=64)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe.img2img(["x"], [init_image()], strength=0.0)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        pipe.text2img(["a", "b", "c"], negative_prompts=["x", "y"])
    inpaint = pipes["inpaint"]
    with pytest.raises(ValueError, match="inpainting UNet"):
        inpaint.text2img(["x"], height=SIZE, width=SIZE)


def test_outpainting_is_inpainting_on_a_padded_canvas(pipes):
    image = init_image()[:, 16:48]  # 64 x 32
    canvas, mask = pipeline.outpaint_canvas(image, left=16, right=16)
    assert canvas.shape == (SIZE, SIZE, 3) and mask.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(canvas[:, 16:48], image)
    assert mask[:, :16].min() == 255 and mask[:, 48:].min() == 255 and mask[:, 16:48].max() == 0
    out = pipes["sd1"].inpaint(["a wider view"], [canvas], [mask], num_inference_steps=4, height=SIZE, width=SIZE)
    assert out.shape == (1, SIZE, SIZE, 3)
    kept = np.abs(out[0, 8:56, 20:44].astype(int) - canvas[8:56, 20:44].astype(int)).mean()
    painted = np.abs(out[0, :, :12].astype(int) - canvas[:, :12].astype(int)).mean()
    assert painted > kept  # the padding is repainted, the image inside is (up to the VAE round trip) kept
