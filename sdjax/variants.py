"""Named Stable Diffusion architectures: which CLIP, UNet, VAE and scheduler make up each variant.

    sd15          SD 1.x (CLIP ViT-L/14, 512 px, epsilon)
    sd15_inpaint  SD 1.5 inpainting (9-channel UNet)
    sd21_base     SD 2.x 512 px base (OpenCLIP ViT-H text tower, epsilon)
    sd21          SD 2.x 768 px (v_prediction)
    sdxl          SDXL base (CLIP ViT-L + OpenCLIP ViT-bigG, 1024 px, Euler)
    sdxl_refiner  SDXL refiner (ViT-bigG alone, aesthetic-score conditioning)
    shapes        the offline demo's model: 64 px images, 16x16x4 latents (configs/shapes*.py)
    tiny*         a few-hundred-thousand-parameter SD (tiny_sdxl: SDXL) for tests and CPU demos
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sdjax import autoencoder, clip, initializers, sdxl, unet

MODULES = ("text_encoder", "unet", "vae")  # a variant's modules, in the order `build` creates them (SDXL: then
# text_encoder_2; its refiner has no text_encoder)

_SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# The scheduler_config.json each family ships with (SD 1.5: PNDM; SD 2.1: DDIM, v-prediction; SDXL: Euler).
SCHEDULERS = {
    "sd1": dict(_SD_SCHEDULER),
    "sd2": dict(_SD_SCHEDULER, _class_name="DDIMScheduler", prediction_type="v_prediction"),
    "sdxl": dict(_SD_SCHEDULER, _class_name="EulerDiscreteScheduler", timestep_spacing="leading",
                 interpolation_type="linear", use_karras_sigmas=False),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    text_encoder: clip.CLIPTextConfig | None
    unet: unet.UNetConfig
    vae: autoencoder.AutoencoderKLConfig
    scheduler: dict
    text_encoder_2: clip.CLIPTextConfig | None = None  # SDXL's OpenCLIP ViT-bigG
    options: tuple = ()  # SDXL's pipeline settings (StableDiffusion.options) as (key, value) pairs

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules this variant has, in the order `build` creates them."""
        names = MODULES + (("text_encoder_2",) if self.text_encoder_2 is not None else ())
        return tuple(n for n in names if n != "text_encoder" or self.text_encoder is not None)

    def build(self, *, seed: int = 0, **kwargs):
        """Randomly initialised (text_encoder, unet, vae), SDXL's with text_encoder_2 after them (its refiner's
        without the text_encoder); kwargs: dtype, param_dtype, attention_impl. The values are the plan's, what
        train.py starts from: one small program, bit for bit a jitted `nnx.Rngs(seed)` construction (an eager one,
        15x slower for the tiny variant, can differ in the last bit)."""
        abstract, init_plan = self.plan(**kwargs)
        split = {name: nnx.split(module) for name, module in abstract.items()}
        values = init_plan.values({name: nnx.to_pure_dict(state) for name, (_, state) in split.items()}, seed=seed)
        return tuple(nnx.merge(split[name][0], jax.tree.map(jnp.asarray, values[name])) for name in self.modules)

    def pipeline(self, *, seed: int = 0, **kwargs):
        """`build` as a `StableDiffusion` with the built-in tokenizers (random weights: demos, benchmarks)."""
        from sdjax import pipeline

        built = dict(zip(self.modules, self.build(seed=seed, **kwargs)))
        tokenizers = self.tokenizers()
        return pipeline.StableDiffusion.from_modules(built, tokenizers.get("text_encoder"), dict(self.scheduler),
                                                     tokenizer_2=tokenizers.get("text_encoder_2"),
                                                     options=dict(self.options))

    def tokenizers(self) -> dict:
        """{"text_encoder": ..., "text_encoder_2": ...}: the built-in tokenizer for each text encoder the variant has,
        padding as its family does."""
        from sdjax.tokenizer import family_tokenizer

        return {name: family_tokenizer(config.family) for name, config in
                (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)) if config is not None}

    def plan(self, names: tuple[str, ...] = None, **kwargs):
        """({name: module with jax.ShapeDtypeStruct parameters} for `names` (default: all the variant has), the
        `initializers.Plan` of their values): nothing is computed; `plan.values(states, seed)` gives what
        `build(seed=seed)` initialises, from one small program (see sdjax.initializers)."""
        names = self.modules if names is None else tuple(names)
        return initializers.plan(lambda rngs: self._construct(rngs, names, **kwargs))

    def _construct(self, rngs, names, **kwargs):
        """The modules of `names`, built in `modules` order from one `rngs` (so each draws the keys it does in
        `build`), up to the last of `names`: what comes after draws later and changes nothing before."""
        constructors = {"text_encoder": lambda: clip.CLIPTextEncoder(self.text_encoder, rngs=rngs, **kwargs),
                        "unet": lambda: unet.UNet2DConditionModel(self.unet, rngs=rngs, **kwargs),
                        "vae": lambda: autoencoder.AutoencoderKL(self.vae, rngs=rngs,
                                                                 **autoencoder.vae_kwargs(self.vae, kwargs)),
                        "text_encoder_2": lambda: clip.CLIPTextEncoder(self.text_encoder_2, rngs=rngs, **kwargs)}
        unknown = set(names) - set(self.modules)
        if unknown:
            raise ValueError(f"unknown modules {sorted(unknown)}; this variant has {self.modules}")
        if not names:
            return {}
        last = max(self.modules.index(name) for name in names)
        built = {name: constructors[name]() for name in self.modules[:last + 1]}
        return {name: built[name] for name in names}


_SDXL_VAE = dataclasses.replace(autoencoder.VARIANTS["sd"], scaling_factor=0.13025, sample_size=1024)
_SDXL_BASE_OPTIONS = tuple(sdxl.options(refiner=False).items())

VARIANTS = {
    "sd15": Variant(clip.VARIANTS["sd15"], unet.VARIANTS["sd15"], autoencoder.VARIANTS["sd"], SCHEDULERS["sd1"]),
    "sd15_inpaint": Variant(clip.VARIANTS["sd15"], unet.VARIANTS["sd15_inpaint"], autoencoder.VARIANTS["sd"],
                            SCHEDULERS["sd1"]),
    "sd21_base": Variant(clip.VARIANTS["sd21"], unet.VARIANTS["sd21_base"], autoencoder.VARIANTS["sd"],
                         dict(SCHEDULERS["sd2"], prediction_type="epsilon")),
    "sd21": Variant(clip.VARIANTS["sd21"], unet.VARIANTS["sd21"], autoencoder.VARIANTS["sd"], SCHEDULERS["sd2"]),
    "tiny": Variant(clip.VARIANTS["tiny"], unet.VARIANTS["tiny"], autoencoder.VARIANTS["tiny"], SCHEDULERS["sd1"]),
    # Zero terminal SNR (Lin et al. 2024): with SD's schedule the last step still holds 7% of the latent, enough to
    # find a bright shape in, so the model learns to read position from the noise instead of the prompt.
    "shapes": Variant(clip.VARIANTS["shapes"], unet.VARIANTS["shapes"], autoencoder.VARIANTS["shapes"],
                      dict(SCHEDULERS["sd2"], rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    "sdxl": Variant(clip.VARIANTS["sd15"], unet.VARIANTS["sdxl"], _SDXL_VAE, SCHEDULERS["sdxl"],
                    clip.VARIANTS["sdxl_g"], _SDXL_BASE_OPTIONS),
    "sdxl_refiner": Variant(None, unet.VARIANTS["sdxl_refiner"], _SDXL_VAE, SCHEDULERS["sdxl"],
                            clip.VARIANTS["sdxl_g"], tuple(sdxl.options(refiner=True).items())),
    # tiny's 32-wide ViT-L stand-in + tiny_sdxl_g's 64 (projection 48): 96-wide context, 48 + 6 x 8 added features
    "tiny_sdxl": Variant(clip.VARIANTS["tiny"], dataclasses.replace(unet.VARIANTS["tiny_sdxl"], cross_attention_dim=96,
                                                                    projection_class_embeddings_input_dim=48 + 6 * 8),
                         dataclasses.replace(autoencoder.VARIANTS["tiny"], scaling_factor=0.13025), SCHEDULERS["sdxl"],
                         clip.VARIANTS["tiny_sdxl_g"], _SDXL_BASE_OPTIONS),
}


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[name]
