"""The Stable Diffusion pipeline: text2img, img2img and inpainting in one compiled function.

    pipe = sdjax.load_pretrained("stable-diffusion-v1-5")            # a StableDiffusion
    images = pipe.text2img(["an astronaut riding a horse"], seed=0)  # uint8 (1, 512, 512, 3)
    images = pipe.img2img(prompts, init_images, strength=0.6)
    images = pipe.inpaint(prompts, images, masks)                    # mask: white = repaint

Text encoding, the denoising loop (`sdjax.sampling.sample_loop`) and the VAE decode all run inside one
`jax.jit`; a second call with the same shapes and settings reuses the compiled program. Image k of a
call starts from noise drawn from `fold_in(key(seed), index_k)` (index_k = k unless `indices` are given),
and the loop runs per image under `vmap`, so an image does not depend on the batch it is in, nor on
the number of devices the batch is split over (`mesh`: a `jax.sharding.Mesh` with a "data" axis).

Prompts take A1111's emphasis syntax, "(word)", "[word]", "(word:1.5)", BREAK, and any length: 75 tokens per
77-token chunk of context (`sdjax.prompts`). The prompts of a call share one chunk count, the most any needs (a
shorter prompt gets empty chunks, which change its image a little): for images independent of their batch mates,
pass `min_chunks` covering all prompts (sample.py does, per job) or prompts of one chunk count.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sdjax import sampling, schedulers, sdxl
from sdjax.autoencoder import approx_decode, from_latents, to_latents
from sdjax.prompts import encode_prompts, tokenize_prompts


@dataclasses.dataclass
class StableDiffusion:
    """What `sdjax.load_pretrained` returns.

    text_encoder: `sdjax.clip.CLIPTextEncoder`; unet: `sdjax.unet.UNet2DConditionModel`;
    vae: `sdjax.autoencoder.AutoencoderKL`; tokenizer: `sdjax.tokenizer.CLIPTokenizer`;
    scheduler_config: the diffusers `scheduler_config.json` fields as a dict.
    SDXL adds text_encoder_2 (ViT-bigG with its projection) and tokenizer_2; its refiner has only those (text_encoder
    and tokenizer None). options: the pipeline's own model_index.json settings (SDXL's
    force_zeros_for_empty_prompt, requires_aesthetics_score).
    """

    text_encoder: Any
    unet: Any
    vae: Any
    tokenizer: Any
    scheduler_config: dict
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    options: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_modules(cls, modules: dict, tokenizer, scheduler_config: dict, *, tokenizer_2=None,
                     options: dict | None = None) -> "StableDiffusion":
        """A pipeline of {"text_encoder", "unet", "vae"(, "text_encoder_2")} modules (a run's or a variant's; SDXL's
        refiner has no "text_encoder")."""
        return cls(modules.get("text_encoder"), modules["unet"], modules["vae"], tokenizer, scheduler_config,
                   text_encoder_2=modules.get("text_encoder_2"), tokenizer_2=tokenizer_2, options=dict(options or {}))

    @property
    def family(self) -> str:
        """"sdxl" (the UNet's added text_time conditioning), else "sd1" or "sd2" from the text encoder (SD 2.x uses
        OpenCLIP ViT-H, 1024 wide, gelu)."""
        if self.unet.config.addition_embed_type == "text_time":
            return "sdxl"
        return self.text_encoder.config.family

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def default_size(self) -> int:
        """The image side the UNet was trained at (512 for SD 1.x / 2.x-base, 768 for SD 2.x)."""
        size = self.unet.config.sample_size or 64
        return (size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def text2img(self, prompts, **kwargs) -> np.ndarray:
        return generate(self, prompts, **kwargs)

    def img2img(self, prompts, init_images, *, strength: float = 0.8, **kwargs) -> np.ndarray:
        return generate(self, prompts, init_images=_as_images(init_images, "init_images", len(_as_list(prompts))),
                        strength=strength, **kwargs)

    def inpaint(self, prompts, images, masks, *, strength: float = 1.0, **kwargs) -> np.ndarray:
        count = len(_as_list(prompts))
        return generate(self, prompts, init_images=_as_images(images, "images", count),
                        masks=_as_images(masks, "masks", count), strength=strength, **kwargs)

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Add a textual inversion embedding (A1111 .pt / .safetensors, diffusers learned_embeds); returns the name
        prompts use for it. See `sdjax.textual_inversion`."""
        from sdjax import textual_inversion

        return textual_inversion.load_textual_inversion(self, path, token)

    # LoRA (sdjax.lora): several adapters at once, each at its scale; a new scale does not recompile.
    def load_lora(self, path, scale: float = 1.0, name: str | None = None,
                  text_encoder_scale: float | None = None) -> str:
        """Attach a LoRA file (diffusers / PEFT or kohya / A1111); returns its name."""
        from sdjax import lora

        return lora.load_lora(self, path, scale=scale, name=name, text_encoder_scale=text_encoder_scale)

    def set_lora_scale(self, name: str, scale: float, text_encoder_scale: float | None = None) -> None:
        from sdjax import lora

        lora.set_lora_scale(self, name, scale, text_encoder_scale)

    def fuse_lora(self) -> None:
        from sdjax import lora

        lora.fuse_lora(self)

    def unfuse_lora(self) -> None:
        from sdjax import lora

        lora.unfuse_lora(self)

    def unload_lora(self, name: str | None = None) -> None:
        from sdjax import lora

        lora.unload_lora(self, name)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program (hashable; a change recompiles)."""
    scheduler: tuple  # sorted (key, value) items of the effective scheduler config
    num_inference_steps: int
    height: int
    width: int
    guidance: bool  # classifier-free guidance on (guidance_scale > 1)
    clip_skip: int
    strength: float
    mode: str  # "text2img" | "img2img" | "inpaint"
    batch_invariant: bool  # one image at a time (lax.map): bit-identical whatever the batch / device count
    output_type: str  # "uint8": decoded images; "latent": the final latents, not decoded
    normalize_emphasis: bool  # A1111's emphasis keeps each chunk's mean (False: "No norm")
    trajectory_every: int = 0  # also return x̂₀ of model calls 0, k, 2k, ... and the last; 0: not
    trajectory_decoder: str = "vae"  # "vae" | "approx" | "latent"
    zero_uncond: bool = False  # SDXL without a negative prompt: zeros as the unconditional context and pooled
    latent_input: bool = False  # img2img from latents (init_latents), not encoded images
    denoising_start: float | None = None  # run only the part of the schedule below / above this noise fraction
    denoising_end: float | None = None


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _unhashable(items: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in items}


def classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale=0.0):
    """uncond + s (cond - uncond), then diffusers' `guidance_rescale` (Lin et al. 2023, section 3.4):
    the result's std is pulled towards the conditional prediction's, per image."""
    guided = uncond + guidance_scale * (cond - uncond)
    axes = tuple(range(1, cond.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True)
    std_guided = jnp.std(guided, axis=axes, keepdims=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def initial_noise(seeds, indices, shape):
    """Each image's starting noise (B, *shape) and the key its sampler draws further noise from: a function of
    (seed, index) alone, so an image is the same in any batch and on any number of devices."""
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(jnp.asarray(seeds, jnp.uint32),
                                                                         jnp.asarray(indices, jnp.int32))
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
    return noise, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)


def _denoise(graphdef, state, ids, neg_ids, weights, neg_weights, seeds, indices, images, masks, time_ids,
             guidance_scale, guidance_rescale, *, static: _Static):
    modules = nnx.merge(graphdef, state)
    batch = (ids, neg_ids, weights, neg_weights, seeds, indices, images, masks, time_ids)
    if not static.batch_invariant:
        return _denoise_batch(modules, *batch, guidance_scale, guidance_rescale, static=static)
    return jax.lax.map(lambda item: jax.tree.map(lambda a: a[0], _denoise_batch(
        modules, *(a[None] for a in item), guidance_scale, guidance_rescale, static=static)), batch)


def _denoise_batch(modules, ids, neg_ids, weights, neg_weights, seeds, indices, images, masks, time_ids,
                   guidance_scale, guidance_rescale, *, static: _Static):
    text_encoder, text_encoder_2, unet, vae = modules
    scaling = vae.config.latent_scaling
    f = vae.config.downsample_factor
    h, w = static.height // f, static.width // f
    scheduler_config = _unhashable(static.scheduler)

    # ids, weights: (B, chunks, 77) -> context (B, 77 chunks, D) (sdjax.prompts); SDXL: (B, encoders, chunks, 77),
    # and the pooled embeddings and size ids (time_ids: (B, 2, n), the negative's then the prompt's) go to the UNet
    kw = dict(clip_skip=static.clip_skip, normalize=static.normalize_emphasis)
    if text_encoder_2 is None:  # (context, an empty pooled embedding)
        def encode(ids, weights):
            return encode_prompts(text_encoder, ids, weights, **kw), jnp.zeros((ids.shape[0], 0), jnp.float32)
    else:
        encode = functools.partial(sdxl.encode, [e for e in (text_encoder, text_encoder_2) if e is not None], **kw)
    context, pooled = encode(ids, weights)
    uncond, uncond_pooled = context, pooled
    if static.guidance and static.zero_uncond:
        uncond, uncond_pooled = jnp.zeros_like(context), jnp.zeros_like(pooled)
    elif static.guidance:
        uncond, uncond_pooled = encode(neg_ids, neg_weights)
    noise, loop_rngs = initial_noise(seeds, indices, (h, w, vae.config.latent_channels))

    B = ids.shape[0]
    zeros = jnp.zeros((B, h, w, 1), jnp.float32)
    image_latents = masked_latents = zeros
    mask_latent = zeros
    if static.latent_input:
        image_latents = images
    elif static.mode != "text2img":
        image_latents = to_latents(vae.encode(images)[0].astype(jnp.float32), scaling)  # the posterior mean
    if static.mode == "inpaint":
        mask_latent = masks[:, ::f, ::f, :]  # F.interpolate(mode="nearest") to latent size
        if unet.config.in_channels == 9:
            masked = images * (masks < 0.5)
            masked_latents = to_latents(vae.encode(masked)[0].astype(jnp.float32), scaling)

    def one_image(noise_i, rng_i, ctx_i, uncond_i, image_latents_i, mask_i, masked_i, pooled_i, uncond_pooled_i,
                  time_ids_i):
        added = None  # SDXL's: the negative's and the prompt's pooled embeddings and size ids
        if text_encoder_2 is not None:
            added = {"text_embeds": jnp.stack([uncond_pooled_i, pooled_i]), "time_ids": time_ids_i}

        def model_fn(x, t):
            inp = x
            if unet.config.in_channels == 9:
                inp = jnp.concatenate([x, mask_i[None].astype(x.dtype), masked_i[None].astype(x.dtype)], axis=-1)
            if not static.guidance:
                cond = None if added is None else jax.tree.map(lambda a: a[1:], added)
                return unet(inp, t, ctx_i[None], added_cond_kwargs=cond).astype(jnp.float32)
            out = unet(jnp.concatenate([inp, inp]), t, jnp.stack([uncond_i, ctx_i]),
                       added_cond_kwargs=added).astype(jnp.float32)
            return classifier_free_guidance(out[:1], out[1:], guidance_scale, guidance_rescale)

        extra = dict(denoising_start=static.denoising_start, denoising_end=static.denoising_end)
        # img2img noises the image even at strength 1 (as diffusers); inpainting at strength 1 starts from noise
        if static.mode == "img2img" or (static.mode == "inpaint" and static.strength < 1.0):
            extra.update(init_latents=image_latents_i[None], strength=static.strength)
        if static.mode == "inpaint" and unet.config.in_channels == 4:
            extra.update(inpaint_latents=image_latents_i[None], inpaint_mask=mask_i[None])
        if static.trajectory_every:   # then (latents, x̂₀ of the kept calls (F, 1, h, w, C))
            extra.update(return_predictions=True, predictions_every=static.trajectory_every)
        latents = sampling.sample_loop(model_fn, noise_i[None], scheduler_config, static.num_inference_steps,
                                       rng_i, **extra)
        return jax.tree.map(lambda a: a[..., 0, :, :, :], latents)   # drop the batch axis of 1

    latents = jax.vmap(one_image)(noise, loop_rngs, context, uncond, image_latents, mask_latent, masked_latents,
                                  pooled, uncond_pooled, time_ids)
    latents, x0s = latents if static.trajectory_every else (latents, None)
    images = latents if static.output_type == "latent" else _decode(vae, latents)
    if not static.trajectory_every:
        return images
    if static.trajectory_decoder == "approx":
        return images, _to_uint8(approx_decode(vae, x0s))
    if static.trajectory_decoder == "vae":   # one batch at a time, as the images: no more memory than they take
        x0s = jnp.swapaxes(jax.lax.map(functools.partial(_decode, vae), jnp.swapaxes(x0s, 0, 1)), 0, 1)
    return images, x0s


def _decode(vae, latents):
    """The diffusion model's latents (B, h, w, C) -> uint8 images (B, H, W, 3)."""
    z = from_latents(latents, vae.config.latent_scaling).astype(vae.decoder.conv_in.kernel.dtype)
    return _to_uint8(vae.decode(z).astype(jnp.float32))


def _to_uint8(images):
    """Images in [-1, 1] -> uint8."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


_denoise_jit = jax.jit(_denoise, static_argnames=("graphdef", "static"))


def _as_list(prompts, what: str = "prompts") -> list[str]:
    """A prompt or a sequence of prompts as a list; anything else is a TypeError that says what was expected."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        return list(prompts)
    got = type(prompts).__name__ if not isinstance(prompts, Sequence) else \
        f"a {type(prompts).__name__} holding {sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})}"
    raise TypeError(f"{what} must be a string or a list of strings, got {got}")


def _as_images(images, what: str, count: int) -> list:
    """`count` images (PIL images or arrays) as a list: one image alone (PIL, or an (H, W, C) image / (H, W) mask
    array) stands for all of them; a (B, H, W[, C]) array is B of them."""
    from PIL import Image

    single_ndim = 2 if what == "masks" else 3
    if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == single_ndim):
        images = [images] * count
    if not isinstance(images, (Sequence, np.ndarray)):
        raise TypeError(f"{what} must be a list of PIL images or arrays, got {type(images).__name__}")
    if len(images) != count:
        raise ValueError(f"{len(images)} {what} for {count} prompts: give one per prompt (or one for all)")
    return list(images)


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W[, C]) array."""
    return image.size if hasattr(image, "size") and not isinstance(image, np.ndarray) else \
        (np.shape(image)[1], np.shape(image)[0])


def load_images(images, height: int, width: int) -> np.ndarray:
    """uint8 / float images or PIL images -> float32 (B, height, width, 3) in [-1, 1] (resized with Lanczos)."""
    from PIL import Image

    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                arr = np.clip(np.round(arr * 255), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
        img = img.convert("RGB")
        if img.size != (width, height):
            img = img.resize((width, height), Image.LANCZOS)
        out.append(np.asarray(img, np.float32) / 127.5 - 1.0)
    return np.stack(out)


def load_masks(masks, height: int, width: int) -> np.ndarray:
    """Masks (white / 1 = repaint) -> binary float32 (B, height, width, 1), as diffusers' mask processor."""
    from PIL import Image

    out = []
    for m in masks:
        if not isinstance(m, Image.Image):
            arr = np.asarray(m)
            if arr.ndim == 3:
                arr = arr[..., 0]
            m = Image.fromarray(arr if arr.dtype == np.uint8 else np.clip(np.round(arr * 255), 0, 255).astype(np.uint8))
        m = m.convert("L")
        if m.size != (width, height):
            m = m.resize((width, height), Image.LANCZOS)
        out.append((np.asarray(m, np.float32) / 255.0 >= 0.5).astype(np.float32)[..., None])
    return np.stack(out)


def outpaint_canvas(image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, fill: int = 127):
    """An image padded on its sides and the mask of the padding: outpainting is inpainting on this canvas."""
    arr = np.asarray(image, np.uint8)
    h, w = arr.shape[:2]
    canvas = np.full((h + top + bottom, w + left + right, 3), fill, np.uint8)
    canvas[top:top + h, left:left + w] = arr[..., :3]
    mask = np.full(canvas.shape[:2], 255, np.uint8)
    mask[top:top + h, left:left + w] = 0
    return canvas, mask


def generate(pipe: StableDiffusion, prompts: str | Sequence[str], *, negative_prompts: str | Sequence[str] | None = None,
             seed: int = 0, indices: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
             num_inference_steps: int = 50, guidance_scale: float = 7.5, guidance_rescale: float = 0.0,
             sampler: str | None = None, scheduler_overrides: dict | None = None, height: int | None = None,
             width: int | None = None, clip_skip: int = 0, init_images=None, masks=None, strength: float = 1.0,
             mesh: jax.sharding.Mesh | None = None, batch_invariant: bool = False,
             output_type: str = "uint8", emphasis: str = "Original", min_chunks: int = 1, trajectory_every: int = 0,
             trajectory_decoder: str = "vae", original_size: tuple[int, int] | None = None,
             crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
             negative_original_size: tuple[int, int] | None = None,
             negative_crops_coords_top_left: tuple[int, int] | None = None,
             negative_target_size: tuple[int, int] | None = None, aesthetic_score: float = 6.0,
             negative_aesthetic_score: float = 2.5, init_latents=None, denoising_start: float | None = None,
             denoising_end: float | None = None,
             refiner: StableDiffusion | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """uint8 images (B, height, width, 3) for `prompts`, one per prompt (or their latents: `output_type`).

    sampler: a scheduler name ("DPM++ 2M Karras", "Euler a", "DDIM", ...; default: the checkpoint's own).
    init_images: img2img (with `strength` in (0, 1]) or, with `masks`, inpainting (mask white = repaint).
    seeds / indices: per-image seed and noise index (default: `seed` for all, indices 0..B-1).
    mesh: split the batch over its "data" axis (parameters are replicated); default: one device.
    batch_invariant: compute one image at a time, so an image is bit-identical in any batch and on any number
    of devices (the default batched program can differ by float rounding: rarely, 1/255 on a pixel).
    output_type: "uint8" (images), or "latent": the final latents (float32 (B, height/f, width/f, C), in the
    diffusion model's scaling, as diffusers' output_type="latent"), not decoded.
    emphasis: A1111's prompt emphasis, "(word)", "[word]", "(word:1.5)", BREAK (`sdjax.prompts`): "Original", "No
    norm", "Ignore" or "None" (brackets are text). Prompts of any length: every 75 tokens are one more 77-token
    chunk of context; each prompt and negative prompt of the call is padded with empty chunks to the most any
    needs (at least `min_chunks`), so a short prompt next to a long one gets a slightly different image than
    alone. One compiled program per chunk count.
    trajectory_every: k > 0 returns (images, trajectory): what the model predicts the final image to be (x̂₀,
    diffusers' `pred_original_sample`) at model calls 0, k, 2k, ... and the last (`sampling.kept_predictions`;
    a call is a step for every sampler but Heun and PNDM), gathered inside the same loop (the images are the
    same), only the kept ones held in memory. trajectory: (B, frames, height, width, 3) uint8, decoded as
    `trajectory_decoder` says: "vae" (the VAE decoder, one frame of the batch at a time), "approx" (a linear map
    of the latents, `sdjax.autoencoder.approx_decode`, upscaled from latent resolution by repeating pixels:
    almost free, blurry colours), or "latent": the x̂₀ latents themselves, float32 (B, frames, h, w, C).
    SDXL's micro-conditioning, as diffusers' StableDiffusionXL pipelines: original_size and target_size (default
    (height, width)), crops_coords_top_left, their negative_* counterparts (each defaults to its own positive, as in
    diffusers' img2img pipelines; diffusers' text2img pipeline reads them only when negative_original_size and
    negative_target_size are both given, with crops (0, 0)), and for the refiner (5 ids) aesthetic_score /
    negative_aesthetic_score in place of the target size. Without negative prompts an
    SDXL base model (force_zeros_for_empty_prompt) takes zeros as the unconditional context, as diffusers does.
    init_latents: img2img from latents (B, height/f, width/f, C) in the diffusion model's scaling (what
    output_type="latent" returns) instead of images.
    denoising_end / denoising_start: SDXL's "ensemble of experts" (`sampling.make_plan`): run only the calls above
    the noise fraction `denoising_end` (use output_type="latent") or, from init_latents / init_images as they are
    (no noise added, `strength` unused), only those below `denoising_start`.
    refiner: a second model (SDXL's refiner) that finishes a text2img / img2img run: this model denoises down to
    `denoising_end` (default 0.8) and hands its latents to `refiner`, which runs the rest of the same schedule with
    the same prompts, seeds and settings, as diffusers' base + refiner recipe in one call (two compiled programs).
    """
    if refiner is not None:
        if trajectory_every or init_latents is not None or denoising_start is not None or masks is not None:
            raise ValueError("refiner= runs text2img or img2img with this model and finishes with the refiner; give "
                             "no masks (the refiner would repaint outside them: inpaint with one model), "
                             "init_latents, denoising_start or trajectory_every with it")
        shared = dict(negative_prompts=negative_prompts, seed=seed, indices=indices, seeds=seeds,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, sampler=sampler, scheduler_overrides=scheduler_overrides,
                      height=height, width=width, clip_skip=clip_skip, mesh=mesh, batch_invariant=batch_invariant,
                      emphasis=emphasis, min_chunks=min_chunks, original_size=original_size,
                      crops_coords_top_left=crops_coords_top_left, negative_original_size=negative_original_size,
                      negative_crops_coords_top_left=negative_crops_coords_top_left,
                      aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
        split = 0.8 if denoising_end is None else denoising_end
        latents = generate(pipe, prompts, init_images=init_images, strength=strength,
                           target_size=target_size, negative_target_size=negative_target_size,
                           output_type="latent", denoising_end=split, **shared)
        return generate(refiner, prompts, init_latents=latents, denoising_start=split, output_type=output_type,
                        **shared)
    prompts = _as_list(prompts)
    B = len(prompts)
    if B == 0:
        raise ValueError("no prompts given")
    negative = [""] * B if negative_prompts is None else _as_list(negative_prompts, "negative_prompts")
    if len(negative) == 1 and B > 1:
        negative = negative * B
    if len(negative) != B:
        raise ValueError(f"{len(negative)} negative prompts for {B} prompts")
    f = pipe.vae_scale_factor
    latent_hw = np.shape(init_latents)[1:3] if init_latents is not None else ()
    height = height or (latent_hw[0] * f if latent_hw else pipe.default_size)
    width = width or (latent_hw[1] * f if latent_hw else pipe.default_size)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if masks is not None and init_images is None:
        raise ValueError("inpainting needs the images to paint into (init_images) as well as the masks")
    if init_latents is not None:
        init_latents = np.asarray(init_latents, np.float32)
        want = (B, height // f, width // f, pipe.vae.config.latent_channels)
        if init_images is not None or masks is not None or init_latents.shape != want:
            raise ValueError(f"init_latents: give latents of shape {want} (B, height/{f}, width/{f}, channels) for "
                             f"img2img from latents, without init_images or masks; got {init_latents.shape}")
    if denoising_start is not None and init_images is None and init_latents is None:
        raise ValueError("denoising_start finishes a run: give init_latents (or init_images) to start from")
    if pipe.unet.config.in_channels == 9 and masks is None:
        raise ValueError("this is an inpainting UNet (9 input channels): give images and masks (pipe.inpaint)")
    if output_type not in ("uint8", "latent"):
        raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
    if not (isinstance(trajectory_every, (int, np.integer)) and trajectory_every >= 0):
        raise ValueError(f"trajectory_every={trajectory_every!r}: give a whole number of model calls, 0 for no "
                         "trajectory")
    if trajectory_decoder not in ("vae", "approx", "latent"):
        raise ValueError(f"trajectory_decoder must be 'vae', 'approx' or 'latent', got {trajectory_decoder!r}")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale={guidance_scale}: use 0 or more (up to 1: no guidance, the prompt alone)")
    is_sdxl = pipe.family == "sdxl"
    layers = (pipe.text_encoder or pipe.text_encoder_2).config.num_hidden_layers - is_sdxl  # SDXL: penultimate first
    if not 0 <= clip_skip < layers:
        raise ValueError(f"clip_skip={clip_skip}: the text encoder has {layers + is_sdxl} layers; use 0 to "
                         f"{layers - 1}")
    if init_images is not None:
        init_images = _as_images(init_images, "init_images", B)
    if masks is not None:
        masks = _as_images(masks, "masks", B)
        for k, (image, mask) in enumerate(zip(init_images, masks)):
            if _image_size(mask) != _image_size(image):
                raise ValueError("mask {} is {}x{}, its image {}x{}: give masks the size of their images (both are "
                                 "then resized to the output size)".format(k, *_image_size(mask), *_image_size(image)))
    mode = "text2img" if init_images is None and init_latents is None else ("img2img" if masks is None else "inpaint")
    scheduler_config = schedulers.scheduler_config_for(pipe.scheduler_config, sampler, **(scheduler_overrides or {}))
    if not is_sdxl:
        ids, weights = tokenize_prompts(pipe.tokenizer, prompts + negative, emphasis=emphasis, min_chunks=min_chunks)
        time_ids = np.zeros((B, 2, 0), np.float32)
        sdxl.check_no_micro_conditioning(original_size, crops_coords_top_left, target_size, negative_original_size,
                                         negative_crops_coords_top_left, negative_target_size)
    else:  # (2B, encoders, chunks, 77): each tokenizer's ids (they pad differently), as many chunks in both
        tokenizers = [t for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None]
        tokenize = functools.partial(tokenize_prompts, prompts=prompts + negative, emphasis=emphasis)
        pairs = [tokenize(t, min_chunks=min_chunks) for t in tokenizers]
        k = max(ids.shape[1] for ids, _ in pairs)  # the same unless their added tokens differ: then again, padded
        pairs = [pair if pair[0].shape[1] == k else tokenize(t, min_chunks=k) for t, pair in zip(tokenizers, pairs)]
        ids, weights = (np.stack([pair[i] for pair in pairs], axis=1) for i in (0, 1))
        time_ids = sdxl.time_ids(pipe, B, height, width, original_size, crops_coords_top_left, target_size,
                                 negative_original_size, negative_crops_coords_top_left, negative_target_size,
                                 aesthetic_score, negative_aesthetic_score)
    zero_uncond = is_sdxl and negative_prompts is None and bool(pipe.options.get("force_zeros_for_empty_prompt"))
    static = _Static(_hashable(scheduler_config), int(num_inference_steps), height, width, guidance_scale > 1.0,
                     int(clip_skip), float(strength), mode, bool(batch_invariant), output_type,
                     emphasis != "No norm", trajectory_every=int(trajectory_every),
                     trajectory_decoder=trajectory_decoder, zero_uncond=zero_uncond,
                     latent_input=init_latents is not None,
                     denoising_start=None if denoising_start is None else float(denoising_start),
                     denoising_end=None if denoising_end is None else float(denoising_end))
    sampling.make_plan(scheduler_config, num_inference_steps, strength=strength if mode != "text2img" else 1.0,
                       denoising_start=denoising_start,
                       denoising_end=denoising_end)  # its errors now, not inside the compiled program

    seeds = np.full(B, seed, np.uint32) if seeds is None else np.asarray(seeds, np.uint32)
    indices = np.arange(B, dtype=np.int32) if indices is None else np.asarray(indices, np.int32)
    images = np.zeros((B, 1, 1, 3), np.float32)
    mask_arr = np.zeros((B, 1, 1, 1), np.float32)
    if init_images is not None:
        images = load_images(init_images, height, width)
    if init_latents is not None:
        images = init_latents
    if masks is not None:
        mask_arr = load_masks(masks, height, width)
    batch = [ids[:B], ids[B:], weights[:B], weights[B:], seeds, indices, images, mask_arr, time_ids]

    graphdef, state = nnx.split((pipe.text_encoder, pipe.text_encoder_2, pipe.unet, pipe.vae))
    n = 1
    if mesh is not None:
        # sharding in types (Explicit axes) is not needed here: let the compiler propagate the batch split
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
        n = mesh.shape["data"]
        pad = -B % n  # pad the batch to a multiple of the data axis with copies of the last item
        batch = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a for a in batch]
        batch = [_put(a, NamedSharding(mesh, P("data"))) for a in batch]
        state = jax.tree.map(lambda x: _put(x, NamedSharding(mesh, P())), state)
    out = _run(graphdef, (state, *batch, jnp.float32(guidance_scale), jnp.float32(guidance_rescale)), static)
    if not all(a.is_fully_addressable for a in jax.tree.leaves(out)):  # several processes: each gets the batch
        from jax.experimental import multihost_utils

        out = multihost_utils.process_allgather(out, tiled=True)
    if not trajectory_every:
        return np.asarray(out)[:B]
    images, trajectory = (np.asarray(a)[:B] for a in out)
    if trajectory_decoder == "approx":   # latent resolution -> the images' (nearest neighbour)
        trajectory = trajectory.repeat(f, axis=2).repeat(f, axis=3)
    return images, trajectory


_programs: dict = {}  # multi-process: the compiled programs, by everything that shapes them


def _run(graphdef, args: tuple, static: _Static):
    """_denoise_jit(graphdef, *args, static=static). With several processes a new program is compiled first and
    every process waits for the others before running it: the CPU (gloo) collectives give up on a peer that is
    30 s late, as one still compiling (or one that loaded the program from its compilation cache) can be."""
    if jax.process_count() == 1:
        return _denoise_jit(graphdef, *args, static=static)
    from sdjax import sharding

    key = (graphdef, static, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in jax.tree.leaves(args)))
    if key not in _programs:
        _programs[key] = _denoise_jit.lower(graphdef, *args, static=static).compile()
        sharding.barrier("pipeline_compiled")
    return _programs[key](*args)


def _put(value, sharding: NamedSharding):
    """Place a value that every process holds in full onto a (possibly multi-process) sharding."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
