"""SDXL against diffusers on tiny random SDXL-shaped models: the two text encoders' conditioning (context and
pooled embedding) as StableDiffusionXLPipeline.encode_prompt gives it, base and refiner; diffusers folders and single
files loaded and written both ways; text2img, img2img, inpainting and the base -> refiner hand-off on the same
noise. (The UNet's added conditioning: tests/test_unet.py.)"""
from __future__ import annotations

import contextlib
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sdjax import pretrained
from sdjax.clip import CLIPTextConfig, CLIPTextEncoder, sdxl_conditioning, strip_text_model_prefix
from sdjax.weights.torch_names import load_state_dict
from tests import tiny_models
from tests.test_pipeline import SIZE, agree, init_image, mask_image  # 32 px (16 x 16 latents), pixels within 1/255
from tests.test_unet import rel_err

import torch

pytestmark = pytest.mark.xdist_group("sdxl")  # one worker builds the tiny pipelines once

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "lowres"]


@pytest.fixture(scope="module")
def torch_pipes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    return {"base": tiny_models.tiny_sdxl_pipeline(tmp), "refiner": tiny_models.tiny_sdxl_pipeline(tmp, refiner=True),
            "inpaint": tiny_models.tiny_sdxl_pipeline(tmp, inpaint=True)}


def sdjax_encoder(model) -> CLIPTextEncoder:
    config = dict(model.config.to_dict(), architectures=[type(model).__name__])  # as save_pretrained writes it
    encoder = pretrained.abstract_module(CLIPTextEncoder, CLIPTextConfig.from_transformers(config))
    load_state_dict(encoder, strip_text_model_prefix({k: v.numpy() for k, v in model.state_dict().items()}),
                    ignore=("position_ids",))
    return encoder


@pytest.mark.parametrize("which, clip_skip", [("base", None), ("base", 1), ("refiner", None)])
def test_text_conditioning_matches_diffusers(torch_pipes, which, clip_skip):
    pipe = torch_pipes[which]
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False, clip_skip=clip_skip)
    pairs = [(pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)]
    pairs = [(e, t) for e, t in pairs if e is not None]
    encoders = [sdjax_encoder(e) for e, _ in pairs]
    assert [e.config.with_projection for e in encoders] == [False] * (len(pairs) - 1) + [True]
    ids = [np.asarray(t(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids) for _, t in pairs]
    ours, ours_pooled = sdxl_conditioning(encoders, [jnp.asarray(i) for i in ids], clip_skip=clip_skip or 0)
    assert ours.shape == context.shape == (2, 77, tiny_models.SDXL_G_HIDDEN + tiny_models.CLIP_HIDDEN * (len(pairs) - 1))
    assert ours_pooled.shape == pooled.shape == (2, tiny_models.SDXL_POOLED)
    assert rel_err(ours, context.numpy()) <= 1e-4 and rel_err(ours_pooled, pooled.numpy()) <= 1e-4


@pytest.fixture(scope="module")
def folders(torch_pipes, tmp_path_factory):
    """The tiny base and refiner, saved by diffusers."""
    tmp = tmp_path_factory.mktemp("sdxl-folders")
    for name, pipe in torch_pipes.items():
        pipe.save_pretrained(str(tmp / name), safe_serialization=True)
    return {name: tmp / name for name in torch_pipes}


def unet_inputs(unet_config, seed=0):
    rng = np.random.default_rng(seed)
    n_ids = (unet_config.projection_class_embeddings_input_dim - tiny_models.SDXL_POOLED) // tiny_models.SDXL_TIME_DIM
    ids = np.tile(np.asarray([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0][:n_ids - 1] + [6.0 if n_ids == 5 else 896.0]],
                             np.float32), (2, 1))
    return (rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
            rng.standard_normal((2, 9, unet_config.cross_attention_dim)).astype(np.float32),
            {"text_embeds": rng.standard_normal((2, tiny_models.SDXL_POOLED)).astype(np.float32), "time_ids": ids})


def outputs_of_diffusers(pipe, unet_config):
    """(context, pooled, UNet output (NHWC)) of a diffusers SDXL pipeline."""
    x, context, added = unet_inputs(unet_config)
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
        eps = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(context),
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    return ctx.numpy(), pooled.numpy(), eps.numpy().transpose(0, 2, 3, 1)


@nnx.jit  # one compilation per UNet graph (the folders, single files and LoRA tests share some)
def _unet_call(unet, x, context, added):
    return unet(x, 500, context, added_cond_kwargs=added)


def outputs_of_sdjax(pipe):
    x, context, added = unet_inputs(pipe.unet.config)
    tokenizers = [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2) if e is not None]
    ctx, pooled = sdxl_conditioning(encoders, [t(PROMPTS) for t in tokenizers])
    eps = _unet_call(pipe.unet, x, context, added)
    return np.asarray(ctx), np.asarray(pooled), np.asarray(eps)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_folders_and_single_files_load_and_save_both_ways(folders, torch_pipes, tmp_path, which):
    """A diffusers SDXL folder (text_encoder_2, tokenizer_2; the refiner without the first encoder) loads in sdjax
    with diffusers' conditioning and UNet output (1e-4); sdjax's save_pretrained writes a folder diffusers loads
    with the same outputs, and sdjax reads back bit for bit. save_single_file writes the released files' layout:
    diffusers' from_single_file reads it with diffusers' outputs (1e-6), sdjax reads it back bit for bit, and without
    sdjax's metadata the family, base or refiner, and every size are read off the tensors (outputs 1e-4)."""
    import diffusers

    import sdjax
    from sdjax.weights import single_file
    from sdjax.weights.safetensors_io import read_metadata

    pipe = sdjax.load_pretrained(folders[which])
    assert pipe.family == "sdxl" and pipe.text_encoder_2.config.with_projection
    assert (pipe.text_encoder is None) == (which == "refiner")
    assert pipe.options == {"force_zeros_for_empty_prompt": which == "base",
                            "requires_aesthetics_score": which == "refiner"}
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    want = outputs_of_diffusers(torch_pipes[which], pipe.unet.config)
    ours = outputs_of_sdjax(pipe)
    for a, b in zip(ours, want):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-4

    sdjax.save_pretrained(pipe, tmp_path / "saved")
    cls = diffusers.StableDiffusionXLPipeline if which == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
    reloaded = cls.from_pretrained(str(tmp_path / "saved"))
    assert type(reloaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for a, b in zip(outputs_of_diffusers(reloaded, pipe.unet.config), want):
        assert rel_err(a, b) <= 1e-6
    again = sdjax.load_pretrained(tmp_path / "saved")
    for a, b in zip(outputs_of_sdjax(again), ours):
        np.testing.assert_array_equal(a, b)

    # single files: the released layout (the UNet and VAE where SD keeps them, ViT-L under
    # conditioner.embedders.0.transformer, bigG under embedders.1.model, or 0 in the refiner, its text_projection
    # transposed as OpenCLIP applies it)
    path = sdjax.save_single_file(pipe, tmp_path / f"{which}.safetensors")
    for a, b in zip(outputs_of_sdjax(sdjax.load_pretrained(path)), ours):
        np.testing.assert_array_equal(a, b)
    tensors = single_file.read_checkpoint(path)
    bigg = "conditioner.embedders.1.model." if which == "base" else "conditioner.embedders.0.model."
    assert tensors[bigg + "text_projection"].shape == (tiny_models.SDXL_G_HIDDEN, tiny_models.SDXL_POOLED)
    assert ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in tensors) == (which == "base")
    assert tensors["model.diffusion_model.label_emb.0.0.weight"].shape[1] == \
        tiny_models.SDXL_POOLED + (6 if which == "base" else 5) * tiny_models.SDXL_TIME_DIM
    theirs = cls.from_single_file(str(path), config=str(folders[which]), local_files_only=True)
    for a, b in zip(outputs_of_diffusers(theirs, pipe.unet.config), want):
        assert rel_err(a, b) <= 1e-6

    plain = tmp_path / "plain.safetensors"
    single_file.write_checkpoint(tensors, plain)
    assert set(read_metadata(plain)) == {"format"}
    detected = sdjax.load_pretrained(plain)
    assert detected.family == "sdxl" and (detected.text_encoder is None) == (which == "refiner")
    assert detected.options == pipe.options and detected.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert detected.vae.config.scaling_factor == pytest.approx(0.13025) and detected.tokenizer_2.pad_token_id == 0
    assert detected.unet.config.addition_time_embed_dim == tiny_models.SDXL_TIME_DIM
    for a, b in zip(outputs_of_sdjax(detected), want):
        assert rel_err(a, b) <= 1e-4


def test_fp16_variant_folder_sharded_by_diffusers(torch_pipes, tmp_path):
    """fp16 variant files as the released SDXL folders have them, here also sharded, written by diffusers itself
    (save_pretrained(variant="fp16", max_shard_size=...): "<name>.fp16-0000k-of-0000n.safetensors" and
    "<name>.safetensors.index.fp16.json" for the UNet and bigG): sdjax loads them, in float32, with the outputs
    diffusers gives from the same files (1e-4)."""
    import copy

    import diffusers

    import sdjax

    folder = tmp_path / "fp16"
    copy.deepcopy(torch_pipes["base"]).to(torch.float16).save_pretrained(str(folder), variant="fp16",
                                                                         max_shard_size="1MB")
    names = {part: sorted(p.name for p in (folder / part).iterdir() if p.suffix != ".txt" and p.name != "config.json")
             for part in ("unet", "text_encoder_2")}
    assert names == {part: [*(f"{file}.fp16-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)),
                            f"{file}.safetensors.index.fp16.json"]
                     for part, file, n in (("unet", "diffusion_pytorch_model", len(names["unet"]) - 1),
                                           ("text_encoder_2", "model", len(names["text_encoder_2"]) - 1))}
    assert len(names["unet"]) > 2 and len(names["text_encoder_2"]) > 2
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder), variant="fp16", torch_dtype=torch.float32)
    ours = sdjax.load_pretrained(folder)
    assert ours.unet.conv_in.kernel.dtype == jnp.float32 and ours.tokenizer_2.pad_token_id == 0
    for a, b in zip(outputs_of_sdjax(ours), outputs_of_diffusers(theirs, ours.unet.config)):
        assert rel_err(a, b) <= 1e-4


SAMPLER = "DPM++ 2M Karras"
NEGATIVE_MICRO = dict(negative_original_size=(16, 16), negative_crops_coords_top_left=(0, 4),
                      negative_target_size=(24, 24))


# a batch of one: diffusers gives a batch of B > 1 the negative's size ids in the wrong rows (cat([neg, pos])
# .repeat(B, 1): neg, pos, neg, pos against embeddings neg, neg, pos, pos); sdjax gives each row its own
@pytest.mark.parametrize("batch, negative, micro", [
    (1, ["lowres, ugly"], dict(original_size=(64, 48), crops_coords_top_left=(8, 0), **NEGATIVE_MICRO))])
def test_text2img_matches_diffusers(folders, torch_pipes, batch, negative, micro):
    """SDXL base text2img (DPM++ 2M Karras, CFG 5 with guidance rescale 0.7) with negative prompts and
    micro-conditioning (original size, crop, the negative's own sizes): both condition alike, every pixel within
    1/255 of diffusers' on the same noise. (Without a negative prompt both use zeros as the unconditional context,
    force_zeros_for_empty_prompt: the hand-off and inpainting tests, with Euler; the refiner's img2img: UniPC.)"""
    import sdjax
    from sdjax import pipeline

    pipe = sdjax.load_pretrained(folders["base"])
    kw = dict(num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, height=SIZE, width=SIZE)
    prompts = PROMPTS[:batch]
    ours = pipe.text2img(prompts, negative_prompts=negative, seed=0, sampler=SAMPLER, **kw, **micro)
    assert ours.shape == (batch, SIZE, SIZE, 3) and ours.std() > 5
    noise, _ = pipeline.initial_noise(np.zeros(batch), np.arange(batch), (SIZE // 2, SIZE // 2, 4))
    latents = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    with with_sampler(torch_pipes["base"], pipe, SAMPLER) as reference:
        theirs = reference(prompts, negative_prompt=negative, latents=latents, output_type="np", **kw,
                           **micro).images
    agree(ours, theirs)
    if micro:  # the micro-conditioning changes the image
        assert np.abs(ours.astype(int) - pipe.text2img(prompts, negative_prompts=negative, seed=0, sampler=SAMPLER,
                                                       **kw)).max() > 8


@contextlib.contextmanager
def with_sampler(reference, pipe, sampler: str):
    """The diffusers pipeline `reference` with the scheduler sdjax's `sampler` names (on pipe's schedule) for the
    block; its own scheduler after."""
    import diffusers

    from sdjax import schedulers

    config = schedulers.scheduler_config_for(pipe.scheduler_config, sampler)
    own, reference.scheduler = reference.scheduler, getattr(diffusers, config["_class_name"]).from_config(config)
    try:
        yield reference
    finally:
        reference.scheduler = own


def test_refiner_img2img_matches_diffusers(folders, torch_pipes, monkeypatch):
    """The refiner's img2img (strength 0.6, UniPC, CFG 5) against diffusers' StableDiffusionXLImg2ImgPipeline, batch
    1 (see above): its 5 size ids (aesthetic score 6, the negative's 2.5), the bigG context alone, the image encoded
    with SDXL's scaling factor. (The base's img2img runs the same code with text2img's conditioning.) Measured on
    both: within 1/255."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as module
    from PIL import Image

    import sdjax
    from sdjax import pipeline

    pipe = sdjax.load_pretrained(folders["refiner"])
    image = init_image()
    kw = dict(strength=0.6, num_inference_steps=4, guidance_scale=5.0)
    ours = pipe.img2img(PROMPTS[:1], [image], height=SIZE, width=SIZE, sampler="UniPC", **kw)
    assert ours.std() > 5
    noise, _ = pipeline.initial_noise(np.zeros(1), np.arange(1), (SIZE // 2, SIZE // 2, 4))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **k: torch.from_numpy(
        np.asarray(noise).transpose(0, 3, 1, 2).copy()))
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())  # sdjax encodes with the posterior mean
    with with_sampler(torch_pipes["refiner"], pipe, "UniPC") as reference:
        theirs = reference(PROMPTS[:1], image=Image.fromarray(image), output_type="np", **kw).images
    agree(ours, theirs)


def test_base_hands_off_to_the_refiner_as_diffusers(folders, torch_pipes, tmp_path):
    """The ensemble of experts in one call, as sample.py runs it (--config.refiner, refiner_switch=0.6:
    `generate(..., refiner=refiner, denoising_end=0.6)`): the base runs the calls above 60% of the noise range (751,
    501 of Euler's 4) and the refiner the rest from its latents as they are, as diffusers' base(denoising_end=0.6,
    output_type="latent") then refiner(image=latents, denoising_start=0.6): within 1/255 (batch 1, see above); the
    PNG records the refiner. An SD 1.x embedding for SDXL stops the job with the fix."""
    from PIL import Image

    from configs import sample as sample_config
    from sdjax import jobs, pipeline

    config = sample_config.get_config()
    config.update(checkpoint=str(folders["base"]), refiner=str(folders["refiner"]), refiner_switch=0.6,
                  prompt=PROMPTS[0], steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, data_parallel=1,
                  output_dir=str(tmp_path / "out"))
    png = Image.open(next(jobs.run(config).glob("00000-*.png")))
    assert png.text["parameters"].endswith("Model: base, Refiner: refiner, Refiner switch at: 0.6")
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE)
    noise, _ = pipeline.initial_noise(np.zeros(1), np.arange(1), (SIZE // 2, SIZE // 2, 4))
    noise = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    latents = torch_pipes["base"](PROMPTS[:1], latents=noise, denoising_end=0.6, output_type="latent", **kw).images
    theirs = torch_pipes["refiner"](PROMPTS[:1], image=latents, denoising_start=0.6, output_type="np",
                                    num_inference_steps=4, guidance_scale=5.0).images
    agree(np.asarray(png)[None], theirs)
    alone = torch_pipes["base"](PROMPTS[:1], latents=noise, output_type="np", **kw).images
    assert np.abs(np.asarray(png).astype(int) - np.round(alone[0] * 255)).max() > 8  # the refiner's two steps count

    from sdjax.weights.safetensors_io import write_safetensors

    write_safetensors({"emb_params": np.zeros((1, 128), np.float32)}, tmp_path / "style.safetensors")  # SD 1.x's
    config.update(embeddings=str(tmp_path / "style.safetensors"), refiner="", output_dir=str(tmp_path / "ti"))
    with pytest.raises(jobs.ConfigError, match="is an embedding for one text encoder .* needs an SDXL embedding"):
        jobs.run(config)


def test_textual_inversion_puts_clip_l_and_clip_g_vectors_where_diffusers_does(folders, tmp_path):
    """An SDXL embedding file (A1111's {"clip_l": (n, D1), "clip_g": (n, D2)}, two vectors each) in sdjax and in
    diffusers' two load_textual_inversion calls (text_encoder / tokenizer, text_encoder_2 / tokenizer_2): the same
    context and pooled embedding (1e-4) for prompts that use its name, and not those without it. The refiner takes
    clip_g alone."""
    import diffusers

    import sdjax
    from sdjax.weights.safetensors_io import write_safetensors

    rng = np.random.default_rng(0)
    vectors = {"clip_l": (0.02 * rng.standard_normal((2, tiny_models.CLIP_HIDDEN))).astype(np.float32),
               "clip_g": (0.02 * rng.standard_normal((2, tiny_models.SDXL_G_HIDDEN))).astype(np.float32)}
    write_safetensors(vectors, tmp_path / "glossy.safetensors")
    prompts = ["a glossy astronaut riding a horse", "Glossy, lowres"]
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folders["base"]))
    for key, encoder, tokenizer in (("clip_l", reference.text_encoder, reference.tokenizer),
                                    ("clip_g", reference.text_encoder_2, reference.tokenizer_2)):
        reference.load_textual_inversion(torch.from_numpy(vectors[key]), token="glossy", text_encoder=encoder,
                                         tokenizer=tokenizer)
    with torch.no_grad():
        context, _, pooled, _ = reference.encode_prompt([p.lower() for p in prompts], device="cpu",  # see below
                                                        num_images_per_prompt=1, do_classifier_free_guidance=False)

    pipe = sdjax.load_pretrained(folders["base"])
    before = sdxl_conditioning([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer(prompts), pipe.tokenizer_2(
        prompts)])
    assert pipe.load_textual_inversion(tmp_path / "glossy.safetensors") == "glossy"
    ours = sdxl_conditioning([pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer(prompts), pipe.tokenizer_2(
        prompts)])  # sdjax expands "Glossy" too (A1111); diffusers only the lower-case name, hence .lower() above
    for a, b, old in zip(ours, (context.numpy(), pooled.numpy()), before):
        assert rel_err(a, b) <= 1e-4 and rel_err(old, b) > 1e-2
    with pytest.raises(ValueError, match="'glossy' is already loaded"):
        pipe.load_textual_inversion(tmp_path / "glossy.safetensors")

    refiner = sdjax.load_pretrained(folders["refiner"])
    refiner.load_textual_inversion(tmp_path / "glossy.safetensors")
    assert refiner.tokenizer is None and sorted(refiner.tokenizer_2.added_tokens) == ["glossy", "glossy_1"]
    table = np.asarray(refiner.text_encoder_2.embeddings.token_embedding.embedding[...])
    np.testing.assert_array_equal(table[-2:], vectors["clip_g"])


def test_inpainting_unet_matches_diffusers(folders, torch_pipes, monkeypatch):
    """SDXL's 9-channel inpainting UNet (the mask and the masked image's latents beside the latents, 6 size ids,
    zeros as the unconditional context) against diffusers' StableDiffusionXLInpaintPipeline at strength 1 on the
    same noise: within 1/255."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as module
    from PIL import Image

    import sdjax
    from sdjax import pipeline

    pipe = sdjax.load_pretrained(folders["inpaint"])
    assert pipe.family == "sdxl" and pipe.unet.config.in_channels == 9
    image, mask = init_image(), mask_image()
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE)
    ours = pipe.inpaint(PROMPTS[:1], [image], [mask], **kw)
    assert ours.std() > 5
    with pytest.raises(ValueError, match="give no masks .the refiner would repaint outside them"):
        pipe.inpaint(PROMPTS[:1], [image], [mask], refiner=pipe, **kw)
    noise, _ = pipeline.initial_noise(np.zeros(1), np.arange(1), (SIZE // 2, SIZE // 2, 4))
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **k: torch.from_numpy(
        np.asarray(noise).transpose(0, 3, 1, 2).copy()))
    monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    theirs = torch_pipes["inpaint"](PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                                    strength=1.0, output_type="np", **kw).images
    agree(ours, theirs)


def test_float16_keeps_the_vae_in_float32_unless_it_is_made_for_float16(folders, tmp_path):
    """SDXL's VAE overflows float16 (NaN images, diffusers' force_upcast): loaded with dtype=float16, the UNet and text
    encoders are float16 and the VAE float32, and a decoder whose activations pass 65504 decodes as in float32; a VAE
    whose config says force_upcast false (SDXL's fp16-fix VAE) is float16, and that decoder gives inf / NaN."""
    import shutil



    import sdjax
    from sdjax.weights.safetensors_io import read_safetensors, write_safetensors

    folder = tmp_path / "base"
    shutil.copytree(folders["base"], folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = dict(read_safetensors(weights))
    key = "decoder.up_blocks.0.resnets.0.conv1.weight"  # a GroupNorm follows: in float32 the scale washes out
    tensors[key] = tensors[key] * np.float32(1e5)
    write_safetensors(tensors, weights)
    z = np.asarray(jax_normal((1, 8, 8, 4)))
    decode = nnx.jit(lambda vae, z: vae.decode(z.astype(vae.decoder.conv_in.kernel.dtype)).astype(jnp.float32))
    reference = np.asarray(decode(sdjax.load_pretrained(folder).vae, z))
    half = sdjax.load_pretrained(folder, dtype=jnp.float16)
    assert half.unet.conv_in.kernel.dtype == half.text_encoder_2.final_layer_norm.scale.dtype == jnp.float16
    assert half.vae.decoder.conv_in.kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(decode(half.vae, z)), reference)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps(dict(config, force_upcast=False)))
    fp16 = sdjax.load_pretrained(folder, dtype=jnp.float16).vae
    assert fp16.decoder.conv_in.kernel.dtype == jnp.float16 and np.isfinite(reference).all()
    assert not np.isfinite(np.asarray(decode(fp16, z))).all()


def jax_normal(shape):
    import jax

    return jax.random.normal(jax.random.key(0), shape)


def test_variants_build_sdxl_pipelines():
    """sdjax.variants' SDXL pipelines (sample.py's and the benchmarks' --config.variant): sdxl plans the released
    model's parameter counts (ViT-L 123,060,480, bigG with its projection 694,659,840, the UNet 2,567,463,684, the VAE
    83,653,863) without computing anything; sdxl_refiner has bigG alone; tiny_sdxl builds, in float16 with its VAE in
    float32 as load_pretrained gives it (force_upcast)."""
    import math

    import jax
    from flax import nnx

    from sdjax import variants

    def counts(name):
        modules, _ = variants.get(name).plan()
        return {n: sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(m, nnx.Param))) for n, m in modules.items()}

    assert counts("sdxl") == {"text_encoder": 123_060_480, "unet": 2_567_463_684, "vae": 83_653_863,
                              "text_encoder_2": 694_659_840}
    refiner = variants.get("sdxl_refiner")  # its UNet's count: tests/test_unet.py
    assert refiner.modules == ("unet", "vae", "text_encoder_2") and refiner.text_encoder_2 == variants.get("sdxl").text_encoder_2
    pipe = variants.get("tiny_sdxl").pipeline(seed=0)  # benchmarks/sample.py's on a CPU (run by hand: 4 steps)
    assert pipe.family == "sdxl" and pipe.options["force_zeros_for_empty_prompt"]
    assert pipe.text_encoder_2.config.with_projection and pipe.tokenizer_2.pad_token_id == 0
    half = variants.get("tiny_sdxl").pipeline(seed=0, dtype=jnp.float16, param_dtype=jnp.float16)
    dtypes = {name: {x.dtype for x in jax.tree.leaves(nnx.state(getattr(half, name), nnx.Param))}
              for name in ("unet", "text_encoder_2", "vae")}
    assert dtypes == {"unet": {np.dtype("float16")}, "text_encoder_2": {np.dtype("float16")},
                      "vae": {np.dtype("float32")}}  # as load_pretrained gives them


def test_lora_on_both_text_encoders_and_the_unet_matches_diffusers(folders, tmp_path):
    """An SDXL LoRA (PEFT adapters on the UNet's attention and both text encoders, saved by diffusers'
    StableDiffusionXLPipeline.save_lora_weights) gives diffusers' context, pooled embedding and UNet output in sdjax
    (1e-4, unfused at scale 0.7); exported in kohya's SDXL layout (lora_unet_ + the original model's names,
    lora_te1_ / lora_te2_), diffusers' load_lora_weights reads it to the same outputs, and sdjax reads it back."""
    import diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    import sdjax
    from sdjax import lora
    from tests.test_lora import randomize_

    def reference():
        return diffusers.StableDiffusionXLPipeline.from_pretrained(str(folders["base"]))

    dpipe = reference()
    configs = {"unet": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
               # out_proj in both: diffusers 0.42 reads a kohya text-encoder adapter only if it has one
               "text_encoder": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "out_proj"]),
               "text_encoder_2": LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "out_proj"])}
    dpipe.unet.add_adapter(configs["unet"])
    for seed, part in enumerate(configs):
        if part != "unet":
            inject_adapter_in_model(configs[part], getattr(dpipe, part))
        randomize_(getattr(dpipe, part), seed + 1)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path / "peft"), **{f"{part}_lora_layers": get_peft_model_state_dict(getattr(dpipe, part))
                                   for part in configs},
        **{f"{part}_lora_adapter_metadata": config.to_dict() for part, config in configs.items()})
    reloaded = reference()
    reloaded.load_lora_weights(str(tmp_path / "peft"), adapter_name="peft")
    reloaded.set_adapters(["peft"], [0.7])
    pipe = sdjax.load_pretrained(folders["base"])
    pipe.load_lora(tmp_path / "peft", scale=0.7)
    # 4 transformer blocks (1 down, 2 up, 1 mid) x 2 attentions x 4 projections; 3 layers x 2 per encoder
    assert lora.adapters(pipe) == {"peft": {"unet": 32, "text_encoder": 6, "text_encoder_2": 6}}
    want, ours = outputs_of_diffusers(reloaded, pipe.unet.config), outputs_of_sdjax(pipe)
    plain = outputs_of_diffusers(reference(), pipe.unet.config)
    for a, b, c in zip(ours, want, plain):
        assert rel_err(a, b) <= 1e-4 and rel_err(b, c) > 1e-2  # the adapter moves every output

    path = sdjax.save_lora(pipe, tmp_path / "kohya.safetensors", format="kohya")
    from sdjax.weights.safetensors_io import read_safetensors

    names = {k.split(".")[0] for k in read_safetensors(path)}
    assert {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",  # the tiny UNet's second level
            "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
            "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v"} <= names
    assert "lora_te2_text_model_encoder_layers_2_self_attn_out_proj" in names and \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    kohya = reference()
    kohya.load_lora_weights(str(path), adapter_name="kohya")
    kohya.set_adapters(["kohya"], [0.7])
    for a, b in zip(outputs_of_diffusers(kohya, pipe.unet.config), want):
        assert rel_err(a, b) <= 1e-4
    again = sdjax.load_pretrained(folders["base"])
    again.load_lora(path, scale=0.7, name="x")
    for a, b in zip(outputs_of_sdjax(again), ours):
        assert rel_err(a, b) <= 1e-6
