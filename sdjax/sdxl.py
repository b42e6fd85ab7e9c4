"""SDXL's conditioning in one place: both text encoders' context and pooled embedding for tokenized prompts
(`encode`, the pipeline's and train.py's), the size ids the UNet adds to its time embedding (`size_ids`: how many;
`time_ids`: the pipeline's micro-conditioning arguments as diffusers builds them), and the pipeline options SDXL's
model_index.json carries (`options`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sdjax.clip import sdxl_conditioning
from sdjax.prompts import apply_emphasis


def options(refiner: bool) -> dict:
    """The model_index.json settings (StableDiffusion.options) of diffusers' SDXL base or refiner pipeline."""
    return {"force_zeros_for_empty_prompt": not refiner, "requires_aesthetics_score": refiner}


OPTIONS = options(refiner=False)  # the defaults of a model_index.json that leaves them out


def size_ids(unet_config, pooled_width: int) -> int:
    """The size ids an SDXL UNet adds beside the pooled text embedding: 6 (base: original size, crop, target size)
    or 5 (refiner: the aesthetic score in place of the target size)."""
    c = unet_config
    n, left = divmod(c.projection_class_embeddings_input_dim - pooled_width, c.addition_time_embed_dim)
    if left:
        raise ValueError(f"this SDXL UNet's added conditioning ({c.projection_class_embeddings_input_dim} features) "
                         f"is not the pooled embedding ({pooled_width}) + whole size ids of "
                         f"{c.addition_time_embed_dim}")
    return n


def encode(encoders, ids, weights, *, clip_skip: int = 0, normalize: bool = True):
    """SDXL: ids, weights (B, encoders, chunks, 77) -> context (B, 77 chunks, 768 + 1280), pooled (B, 1280).
    Each chunk is encoded alone (`sdjax.clip.sdxl_conditioning`) and each encoder's part gets the emphasis apart,
    as A1111 does; the pooled embedding is the first chunk's."""
    B, n, k, length = ids.shape
    context, pooled = sdxl_conditioning(encoders, [ids[:, e].reshape(-1, length) for e in range(n)],
                                        clip_skip=clip_skip)
    widths = np.cumsum([e.config.hidden_size for e in encoders])[:-1].tolist()
    flat_weights = weights[:, 0].reshape(-1, length)
    context = jnp.concatenate([apply_emphasis(part, flat_weights, normalize=normalize)
                               for part in jnp.split(context, widths, axis=-1)], axis=-1)
    return context.reshape(B, k * length, -1), pooled.reshape(B, k, -1)[:, 0]


def encode_modules(modules: dict, ids, weights=None, *, clip_skip: int = 0):
    """`encode` with the text encoders of a {name: module} dict (train.py's modules: "text_encoder" (the base's) and
    "text_encoder_2"); weights None: every token's weight is 1."""
    encoders = [modules[k] for k in ("text_encoder", "text_encoder_2") if modules.get(k) is not None]
    return encode(encoders, ids, jnp.ones(ids.shape, jnp.float32) if weights is None else weights, clip_skip=clip_skip)


def check_no_micro_conditioning(*values) -> None:
    """A ValueError if any micro-conditioning argument is given to a model that is not SDXL."""
    if any(v is not None and v != (0, 0) for v in values):
        raise ValueError("original_size, crops_coords_top_left, target_size and their negative_* are SDXL's "
                         "micro-conditioning; this is not an SDXL model")


def time_ids(pipe, B: int, height: int, width: int, original_size, crops, target_size, negative_original_size,
             negative_crops, negative_target_size, aesthetic_score, negative_aesthetic_score) -> np.ndarray:
    """(B, 2, n) float32: the negative's and the prompt's size ids, as diffusers' _get_add_time_ids builds them:
    original size + crop top-left + target size (base, 6), or + aesthetic score (refiner, 5)."""
    n = size_ids(pipe.unet.config, pipe.text_encoder_2.config.projection_dim)
    original = tuple(original_size or (height, width))
    target = tuple(target_size or (height, width))
    if n == 6:
        tail, negative_tail = target, tuple(negative_target_size or target)
    elif n == 5:
        tail, negative_tail = (aesthetic_score,), (negative_aesthetic_score,)
    else:
        raise ValueError(f"this SDXL UNet takes {n} size ids; sdjax knows the base's 6 and the refiner's 5")
    positive = [*original, *crops, *tail]
    negative = [*(negative_original_size or original), *(negative_crops or crops), *negative_tail]
    return np.tile(np.asarray([negative, positive], np.float32)[None], (B, 1, 1))
