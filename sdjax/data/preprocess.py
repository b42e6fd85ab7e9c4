"""Preprocessing and the host-sharded, resumable batch iterator.

    prep = make_preprocess(resolution=512, center_crop=False, random_flip=True, caption_dropout=0.1)
    for batch in iterate_batches(FolderDataset(path), batch_size=8, seed=0, start_step=step,
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 preprocess=prep):
        batch["images"]    # float32 (8, 512, 512, 3) in [-1, 1], this host's share of the global batch
        batch["captions"]  # list of 8 str

Global sample s (= step * global_batch + position in the global batch) is dataset index
perm_e[s mod N] with e = s // N and perm_e a permutation drawn from (seed, e); its augmentation
draws from a Generator seeded with (seed, s). Batches therefore depend only on (seed, step):
restarting at start_step=N yields exactly the batches an uninterrupted run yields from step N,
and a host's shard is the same whatever the number of hosts it is split across. Host p of P
gets positions [p * batch_size, (p + 1) * batch_size) of each global batch (process order, as
`jax.make_array_from_process_local_data` expects). Epoch boundaries fall inside batches; no
example is dropped.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
from PIL import Image

RESAMPLE = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
            "nearest": Image.NEAREST}
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


def resize_shorter_side(image: np.ndarray, resolution: int, resample: str = "bicubic") -> np.ndarray:
    """Resize uint8 (H, W, 3) so its shorter side is `resolution`, keeping the aspect ratio."""
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {list(RESAMPLE)}")
    h, w = image.shape[:2]
    if min(h, w) == resolution:
        return image
    scale = resolution / min(h, w)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), RESAMPLE[resample]))


def crop(image: np.ndarray, resolution: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A resolution x resolution crop: centred, or uniformly random when `rng` is given."""
    top, left = crop_corner(image.shape[:2], resolution, rng)
    return image[top:top + resolution, left:left + resolution]


def crop_corner(shape: tuple[int, int], resolution: int, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(top, left) of `crop`'s square in an image of (height, width) `shape`."""
    h, w = shape
    if h < resolution or w < resolution:
        raise ValueError(f"cannot crop {resolution}x{resolution} from a {w}x{h} image; resize it first")
    if rng is None:
        return (h - resolution) // 2, (w - resolution) // 2
    return int(rng.integers(h - resolution + 1)), int(rng.integers(w - resolution + 1))


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image.astype(np.float32) / 127.5 - 1.0


def preprocess_example(example: dict, rng: np.random.Generator, *, resolution: int, center_crop: bool = True,
                       random_flip: bool = False, caption_dropout: float = 0.0,
                       resample: str = "bicubic") -> dict:
    """Resize the shorter side, crop, maybe flip, to [-1, 1]; maybe drop the caption to "".

    Randomness comes only from `rng`, drawn in a fixed order (crop, flip, caption), so the same
    Generator state gives the same result. Do not flip the shapes dataset: it would swap left/right.
    Also returns what SDXL conditions on, as diffusers' SDXL training script computes it: "original_size" (the
    image's (height, width) before resizing) and "crop_top_left" ((top, left) of the crop in the resized image;
    a flip makes left the resized width minus left).
    """
    original = example["image"].shape[:2]
    image = resize_shorter_side(example["image"], resolution, resample)
    top, left = crop_corner(image.shape[:2], resolution, None if center_crop else rng)
    width = image.shape[1]
    image = image[top:top + resolution, left:left + resolution]
    if random_flip and rng.random() < 0.5:
        image = image[:, ::-1]
        left = width - left
    caption = example["caption"]
    if caption_dropout > 0 and rng.random() < caption_dropout:
        caption = ""
    return {"image": to_float(np.ascontiguousarray(image)), "caption": caption,
            "original_size": np.asarray(original, np.int32), "crop_top_left": np.asarray((top, left), np.int32)}


def collate(examples: list[dict]) -> dict:
    """Preprocessed examples as one host batch: {"images": float32 (B, R, R, 3), "captions": list[str]}, with
    "original_size" / "crop_top_left" (B, 2) when the examples have them (`preprocess_example`)."""
    batch = {"images": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False),
             "captions": [e["caption"] for e in examples]}
    for key in ("original_size", "crop_top_left"):
        if key in examples[0]:
            batch[key] = np.stack([e[key] for e in examples])
    return batch


def make_preprocess(resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                    caption_dropout: float = 0.0, resample: str = "bicubic") -> Callable[[dict, np.random.Generator], dict]:
    """`preprocess_example` with its options bound: a (example, rng) -> example function for `iterate_batches`."""
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout={caption_dropout} must be a probability in [0, 1]")
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; choose one of {list(RESAMPLE)}")
    return functools.partial(preprocess_example, resolution=int(resolution), center_crop=center_crop,
                             random_flip=random_flip, caption_dropout=caption_dropout, resample=resample)


def as_float(example: dict, rng: np.random.Generator) -> dict:
    """The default preprocessing: pixels to [-1, 1], nothing else (for datasets already at resolution)."""
    del rng
    return {"image": to_float(example["image"]), "caption": example["caption"]}


def global_indices(num_examples: int, *, seed: int, step: int, global_batch_size: int,
                   shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset indices, global sample numbers) of global batch `step`; a pure function of its arguments."""
    samples = step * global_batch_size + np.arange(global_batch_size, dtype=np.int64)
    epochs, positions = np.divmod(samples, num_examples)
    indices = np.empty_like(samples)
    for e in np.unique(epochs):
        order = _permutation(num_examples, seed, int(e)) if shuffle else np.arange(num_examples)
        sel = epochs == e
        indices[sel] = order[positions[sel]]
    return indices, samples


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, _ORDER_STREAM, epoch]).permutation(n)


def iterate_batches(dataset, batch_size: int, *, seed: int, start_step: int = 0, num_steps: int | None = None,
                    process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                    preprocess: Callable[[dict, np.random.Generator], dict] | None = None,
                    num_threads: int = 0) -> Iterator[dict]:
    """This host's batches from step `start_step` on (forever, or `num_steps` of them).

    `dataset` needs `len()` and `dataset[i] -> {"image": uint8 (H, W, 3), "caption": str}`;
    `batch_size` is per host (global batch = batch_size * process_count). `preprocess(example, rng)`
    (default `as_float`) must return {"image": float32 (R, R, 3), "caption": str}. `num_threads` > 0
    reads and preprocesses a batch's examples in a thread pool (PIL decoding releases the GIL); the
    result is identical. Yields {"images": float32 (B, R, R, 3), "captions": list[str],
    "indices": int64 (B,) dataset indices, "step": int}, and "original_size" / "crop_top_left" (B, 2) when
    `preprocess` gives them (`preprocess_example`).
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("iterate_batches got an empty dataset")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed={seed} and start_step={start_step} must be >= 0")
    preprocess = as_float if preprocess is None else preprocess
    global_batch = batch_size * process_count
    mine = slice(process_index * batch_size, (process_index + 1) * batch_size)

    def load(index_and_sample):
        index, sample = index_and_sample
        rng = np.random.default_rng([seed, _AUGMENT_STREAM, int(sample)])
        return preprocess(dataset[int(index)], rng)

    pool = ThreadPoolExecutor(num_threads) if num_threads > 0 else None
    try:
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            indices, samples = global_indices(n, seed=seed, step=step, global_batch_size=global_batch, shuffle=shuffle)
            work = list(zip(indices[mine], samples[mine]))
            examples = list(pool.map(load, work)) if pool else [load(w) for w in work]
            shapes = {e["image"].shape for e in examples}
            if len(shapes) > 1:
                raise ValueError(f"images in batch {step} have different shapes {sorted(shapes)}; "
                                 "pass preprocess=make_preprocess(resolution=...) to resize and crop them")
            yield {**collate(examples), "indices": indices[mine], "step": step}
            step += 1
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)
