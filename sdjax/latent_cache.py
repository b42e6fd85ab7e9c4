"""Precomputed VAE latents and text embeddings (config `data.cache_latents`).

When the encoders are frozen, a fine-tuning run can encode every image (and caption) once instead of
every epoch: the train step then starts from the posterior moments and the UNet's context.

    cache = build_cache(dataset, encode, mesh=mesh, batch_size=64, preprocess=prep, tokenizer=tok, ...)
    for batch in cached_batches(cache, batch_size=64 // nproc, seed=0, start_step=step, ...):
        batch  # {"latent_mean", "latent_logvar", "context" | "input_ids"}: this host's rows
               # SDXL: also "pooled" (with "context") and "time_ids" (each image's size ids)

Every host holds the whole cache in memory (N x latent + N x 77 x width floats), so this is for
datasets of up to some tens of thousands of images. Images are encoded once, so the preprocessing
must be deterministic (center crop, no flip); caption dropout still happens per step, by swapping in
the empty caption's embedding. Batches follow the same resumable, host-sharded order as
`sdjax.data.preprocess.iterate_batches` (they are drawn by it). The cache holds the VAE's posterior moments
as `encode` returns them; the loss draws z from them and applies `sdjax.autoencoder.to_latents`, the same
scaling (and shift) as for images encoded in the step and as the pipeline. SDXL: the context of both text
encoders, bigG's pooled embedding and each image's size ids (`sdjax.training.sdxl_time_ids` of its center crop)
are cached with it; a dropped caption gets the empty caption's context and pooled embedding.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from sdjax import sharding
from sdjax.data import preprocess

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LatentCache:
    mean: np.ndarray           # (N, h, w, c) posterior means (the VAE's latents, not yet to_latents)
    logvar: np.ndarray         # (N, h, w, c) posterior log-variances
    text: np.ndarray           # (N, 77, D) text-encoder outputs, or the token ids ((N, 77); SDXL (N, 2, 1, 77)) if
    empty_text: np.ndarray     # the same for the empty caption "" (caption dropout)      the text encoders train
    pooled: np.ndarray | None = None        # SDXL with a frozen bigG: (N, P) pooled text embeddings
    empty_pooled: np.ndarray | None = None  # ... of the empty caption
    time_ids: np.ndarray | None = None      # SDXL: (N, 6) size ids

    @property
    def has_context(self) -> bool:
        return self.text.ndim == 3


def check_config(data_cfg) -> None:
    if data_cfg.get("caption_chunks", 1) != 1 or data_cfg.get("weighted_captions", False):
        raise ValueError("data.cache_latents caches one 77-token text input per caption: it does not take "
                         "data.caption_chunks > 1 or data.weighted_captions=True yet (set cache_latents=False)")
    if not data_cfg.center_crop or data_cfg.random_flip:
        raise ValueError("data.cache_latents encodes every image once, so its preprocessing must not be random: "
                         "set data.center_crop=True and data.random_flip=False (or cache_latents=False)")


def build_cache(dataset, encode, *, mesh, batch_size: int, preprocess_fn, tokenizer, process_index: int,
                process_count: int, time_ids_fn=None) -> LatentCache:
    """Encode all of `dataset` with `encode(batch) -> {"latent_mean", "latent_logvar"[, "context"[, "pooled"]]}`
    (jitted, replicated outputs; batch = {"images", "input_ids"}), `batch_size` global images at a time, each host
    reading its own rows; every host ends up with the whole cache. tokenizer: captions -> ids; time_ids_fn (SDXL):
    a host batch of preprocessed examples -> their size ids."""
    n = len(dataset)
    per_host = batch_size // process_count
    empty_ids = tokenizer([""])
    rows, empty = {}, {"context": empty_ids[0]}
    for start in range(0, n, batch_size):
        indices = (start + np.arange(batch_size)) % n  # the last chunk wraps around
        mine = indices[process_index * per_host:(process_index + 1) * per_host]
        host = preprocess.collate([preprocess_fn(dataset[int(i)], np.random.default_rng(0)) for i in mine])
        local = {"images": host["images"], "input_ids": tokenizer(host["captions"])}
        out = sharding.to_host(encode(sharding.host_batch_to_global(mesh, local)))
        passed = {} if "context" in out else {"input_ids": local["input_ids"]}  # rows kept as they are, gathered
        if time_ids_fn is not None:
            passed["time_ids"] = time_ids_fn(host)
        if passed:
            out.update(sharding.to_host(sharding.host_batch_to_global(mesh, passed)))
        if "context" in out and start == 0:  # the empty caption's encoding, through the same compiled function
            blank = sharding.to_host(encode(sharding.host_batch_to_global(
                mesh, dict(local, input_ids=np.repeat(empty_ids, per_host, axis=0)))))
            empty = {k: blank[k][0] for k in ("context", "pooled") if k in blank}
        keep = min(batch_size, n - start)
        for key, value in out.items():
            rows.setdefault(key, []).append(np.asarray(value)[:keep])
        if start // batch_size % 50 == 0:
            log.info("caching latents: %d / %d images", min(start + batch_size, n), n)
    cat = {key: np.concatenate(value) for key, value in rows.items()}
    cache = LatentCache(cat["latent_mean"], cat["latent_logvar"], cat.get("context", cat.get("input_ids")),
                        np.asarray(empty["context"]), pooled=cat.get("pooled"), empty_pooled=empty.get("pooled"),
                        time_ids=cat.get("time_ids"))
    size = sum(a.nbytes for a in (cache.mean, cache.logvar, cache.text, cache.pooled, cache.time_ids) if a is not None)
    log.info("cached %d latents%s (%.1f MB per host)", n, " and text embeddings" if cache.has_context else "",
             size / 2 ** 20)
    return cache


class _Placeholders:
    """len(N) examples with no pixels: iterate_batches only draws the order and the dropout for the cache."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"image": np.zeros((1, 1, 3), np.uint8), "caption": "x"}


def cached_batches(cache: LatentCache, *, batch_size: int, seed: int, start_step: int, process_index: int,
                   process_count: int, caption_dropout: float, shuffle: bool = True):
    """This host's cached batches from `start_step` on, in iterate_batches' order."""
    def drop(example, rng):
        dropped = caption_dropout > 0 and rng.random() < caption_dropout
        return {"image": preprocess.to_float(example["image"]), "caption": "" if dropped else example["caption"]}

    for batch in preprocess.iterate_batches(_Placeholders(len(cache.mean)), batch_size, seed=seed,
                                            start_step=start_step, process_index=process_index,
                                            process_count=process_count, shuffle=shuffle, preprocess=drop):
        idx = batch["indices"]
        dropped = np.array([c == "" for c in batch["captions"]])
        text = cache.text[idx].copy()
        text[dropped] = cache.empty_text
        out = {"latent_mean": cache.mean[idx], "latent_logvar": cache.logvar[idx],
               ("context" if cache.has_context else "input_ids"): text}
        if cache.pooled is not None:
            out["pooled"] = cache.pooled[idx].copy()
            out["pooled"][dropped] = cache.empty_pooled
        if cache.time_ids is not None:
            out["time_ids"] = cache.time_ids[idx]
        yield out


def make_encode_fn(graphdefs: dict, *, with_context: bool, clip_skip: int = 0):
    """encode(frozen_states, batch) -> the cache rows of a batch (jit it with replicated out_shardings)."""
    import jax.numpy as jnp

    from sdjax.training import merge_modules

    def encode(states, batch):
        modules = merge_modules(graphdefs, states)
        mean, logvar = modules["vae"].encode(batch["images"])
        out = {"latent_mean": mean.astype(jnp.float32), "latent_logvar": logvar.astype(jnp.float32)}
        if with_context and "text_encoder_2" in modules:  # SDXL: ids (B, encoders, 1, 77), as the step encodes them
            from sdjax import sdxl

            context, pooled = sdxl.encode_modules(modules, batch["input_ids"], clip_skip=clip_skip)
            out.update(context=context.astype(jnp.float32), pooled=pooled.astype(jnp.float32))
        elif with_context:
            out["context"] = modules["text_encoder"](batch["input_ids"], clip_skip=clip_skip).astype(jnp.float32)
        return out

    return encode
