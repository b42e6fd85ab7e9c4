"""TFDS datasets (random access), and turning a local folder into one. Needs `pip install sdjax[data]`.

    ds = TFDSDataset("my_images:1.0.0", data_dir="/data/tfds", split="train", image_key="image", caption_key="caption")
    ex = ds[0]       # {"image": uint8 (H, W, 3), "caption": str}, like FolderDataset and ShapesDataset
    iterate_batches(ds, ...)   # the same host-sharded, resumable batches as for a folder

    folder_to_tfds("/data/my_images", name="my_images", data_dir="/data/tfds")   # once, then train from it

TFDS datasets are read through `tfds.data_source`, i.e. random access to ArrayRecord files: index i is
the same example on every host and every run, which is what makes batches resumable and host-sharded
(see sdjax.data.preprocess). Datasets prepared as TFRecord must be rebuilt once with
`tfds build NAME --file_format=array_record`; nothing is downloaded or built when training starts.

Neither reading ArrayRecord files nor folder_to_tfds needs TensorFlow (the `data` extra installs TFDS
without it); `tfds build` of a TFDS catalogue dataset usually does (`pip install tensorflow-cpu`).
TFDS itself is imported only when one of these is used.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from sdjax.cli import one_line

log = logging.getLogger(__name__)

INSTALL_HINT = "reading or writing TFDS datasets needs TensorFlow Datasets: pip install 'sdjax[data]'"


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from None
    return tfds


def _to_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)


def _to_rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image (H, W, 1|3|4), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:  # composite on white, as FolderDataset does
        rgb, alpha = image[..., :3].astype(np.float32), image[..., 3:].astype(np.float32) / 255.0
        image = np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return image


class TFDSDataset:
    """A TFDS split as a map-style dataset of {"image": uint8 (H, W, 3), "caption": str}.

    Examples that fail to decode (or are smaller than `min_size`) are skipped: `ds[i]` returns the next
    readable example instead, and `ds.skipped` lists (index, reason), as FolderDataset does.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                 caption_key: str = "caption", min_size: int = 0):
        tfds = _import_tfds()
        try:  # download=False: a training run reads a prepared dataset; it never downloads or builds one
            self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"TFDS dataset {name!r} not found in {data_dir or 'the default TFDS data_dir'}: build it "
                             f"first (sdjax.data.tfds.folder_to_tfds, or `tfds build {name} "
                             f"--file_format=array_record`), and pass its data_dir") from None
        except NotImplementedError as e:  # TFDS says this both of a TFRecord-only build and of no build at all
            if data_dir and not (Path(data_dir) / name.split(":")[0]).is_dir():
                raise ValueError(self._not_built(name, data_dir)) from None
            raise ValueError(f"TFDS dataset {name!r} has no random-access (ArrayRecord) files: rebuild it once with "
                             f"`tfds build {name} --file_format=array_record` ({one_line(e)})") from None
        except (KeyError, ValueError) as e:  # a registered dataset that is not built here, or an unknown split
            where = data_dir or "the default TFDS data_dir"
            if isinstance(e, ValueError) and "split" not in str(e).lower():
                raise
            if "is empty" in str(e):
                raise ValueError(self._not_built(name, data_dir)) from None
            raise ValueError(f"TFDS dataset {name!r} in {where} has no split {split!r} (data.tfds_split): "
                             f"{one_line(e)}") from None
        self.name, self.image_key, self.caption_key, self.min_size = name, image_key, caption_key, int(min_size)
        self.skipped: list[tuple[int, str]] = []
        self._bad: set[int] = set()
        if len(self.source) == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
        first = self.source[0]
        for key, what in ((image_key, "image_key"), (caption_key, "caption_key")):
            if key not in first:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} (data.{what}); its features are "
                                 f"{sorted(first)}")

    @staticmethod
    def _not_built(name: str, data_dir: str | None) -> str:
        return (f"TFDS dataset {name!r} is not built in {data_dir or 'the default TFDS data_dir'}: build it once with "
                f"`tfds build {name} --file_format=array_record` (TFDS's own builders may need TensorFlow: pip "
                f"install tensorflow-cpu), or pass the data_dir that holds it")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        for k in range(n):
            j = (int(index) + k) % n
            if j in self._bad:
                continue
            try:
                example = self.source[j]
                image = _to_rgb(example[self.image_key])
                if min(image.shape[:2]) < self.min_size:
                    raise ValueError(f"too small ({image.shape[1]}x{image.shape[0]}; min_size={self.min_size})")
            except Exception as e:  # noqa: BLE001 - a bad example is skipped, never fatal
                self._bad.add(j)
                self.skipped.append((j, f"{type(e).__name__}: {e}"))
                log.warning("skipping example %d of %s: %s", j, self.name, e)
                continue
            return {"image": image, "caption": _to_text(example[self.caption_key])}
        raise RuntimeError(f"none of the {n} examples of {self.name!r} could be read; see TFDSDataset.skipped")


def _folder_builder_class(tfds):
    """A TFDS GeneratorBasedBuilder for image-caption pairs whose name, version and examples are given per
    instance (TFDS builders are otherwise one class per dataset). Writing with it needs no TensorFlow: the
    images arrive as PIL images, which TFDS encodes with PIL."""

    class ImageCaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        def __init__(self, *, name: str, version: str, splits: dict, description: str, **kwargs):
            self.name = name
            self.VERSION = tfds.core.Version(version)
            self._splits, self._description = splits, description
            super().__init__(version=version, **kwargs)

        def _info(self):
            features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "caption": tfds.features.Text()})
            # disable_shuffling: index i of the split is the i-th example written (the folder's order)
            return tfds.core.DatasetInfo(builder=self, description=self._description, features=features,
                                         disable_shuffling=True)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(examples) for split, examples in self._splits.items()}

        def _generate_examples(self, examples):
            yield from examples

    return ImageCaptionBuilder


def folder_to_tfds(folder: str | os.PathLike, *, name: str, data_dir: str | None = None, version: str = "1.0.0",
                   split: str = "train", **folder_kwargs):
    """Store a local image folder (sdjax.data.folder.FolderDataset layouts) as a TFDS dataset, once.

    Images are decoded to RGB (unreadable files skipped) and stored losslessly as PNG with their captions, in
    the folder's order, in ArrayRecord files that `TFDSDataset(name, data_dir=data_dir)` reads at random: its
    index i is the folder's i-th readable image. TensorFlow is not needed. Returns the TFDS builder.
    """
    tfds = _import_tfds()
    from PIL import Image

    from sdjax.data.folder import FolderDataset

    dataset = FolderDataset(folder, **folder_kwargs)

    def examples():
        for i in range(len(dataset)):
            example = dataset[i]
            if example["file_name"] != dataset.file_names[i]:
                continue  # unreadable: FolderDataset handed us the next readable image instead
            yield example["file_name"], {"image": Image.fromarray(example["image"]), "caption": example["caption"]}

    builder = _folder_builder_class(tfds)(
        name=name, version=version, splits={split: examples()}, data_dir=data_dir or None,
        file_format="array_record",
        description=f"Images and captions from {os.fspath(folder)} (sdjax.data.tfds.folder_to_tfds).")
    if builder.is_prepared():
        raise FileExistsError(f"TFDS dataset {name}:{version} already exists in {builder.data_dir}: delete that "
                              f"folder, or pass another name or version")
    builder.download_and_prepare()
    if dataset.skipped:
        log.warning("folder_to_tfds: skipped %d unreadable file(s) of %s", len(dataset.skipped), folder)
    return builder
