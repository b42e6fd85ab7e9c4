"""A local folder of image–caption pairs, without TensorFlow.

Two layouts, the same as diffusers' `imagefolder`:
  captions in files    photo_001.png + photo_001.txt (the caption file sits next to its image);
  metadata.jsonl       one JSON object a line in the folder root: {"file_name": "photo_001.png", "text": "..."}
                       (file_name relative to the folder; `caption_column` picks another key than "text").

    ds = FolderDataset("/data/pokemon", min_size=64)
    ex = ds[0]        # {"image": uint8 (H, W, 3), "caption": str, "file_name": "photo_001.png"}
    ds.skipped        # [("broken.jpg", "cannot read image: ..."), ...]

The folder is indexed once, in sorted order, so index i means the same file on every host and
every run. Images in any PIL mode become 8-bit RGB (grayscale, palette, 16-bit, CMYK; transparency is
composited on white; EXIF rotation applied). Files that are not readable images, or smaller than
`min_size` on the shorter side, are skipped: logged and listed in `ds.skipped`. With check="header"
(default) only headers are read at index time; an image whose pixels turn out to be truncated or
corrupt is skipped when first read, and `ds[i]` returns the next readable example instead, so a
training run never stops on a bad file. check="full" decodes everything up front instead.
"""
from __future__ import annotations

import json
import logging
import os
import threading

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image as uint8 (H, W, 3): 16-bit and float scaled to 8 bits, alpha composited on white."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8)  # 16-bit range -> 8-bit
        return np.repeat(a[..., None], 3, axis=-1)
    if mode == "F":
        a = np.asarray(img, np.float64)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return np.repeat(np.clip(np.round(a), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return np.asarray(img.convert("RGB"))


def load_rgb(path: str) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class FolderDataset:
    """Image–caption pairs from a folder (see the module docstring for the layouts).

    Args:
      path: the folder; searched recursively, hidden files and folders ignored.
      min_size: images whose shorter side is below this are skipped.
      missing_caption: "error" (default: index-time error naming the files) or "empty" (caption "").
      check: "header" (read image headers when indexing) or "full" (decode every image when indexing).
      caption_column: the metadata.jsonl key holding the caption.
    """

    def __init__(self, path, *, min_size: int = 32, missing_caption: str = "error", check: str = "header",
                 caption_column: str = "text"):
        if missing_caption not in ("error", "empty"):
            raise ValueError(f"missing_caption={missing_caption!r}; choose 'error' or 'empty'")
        if check not in ("header", "full"):
            raise ValueError(f"check={check!r}; choose 'header' or 'full'")
        self.root = os.fspath(path)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder {self.root!r} does not exist or is not a directory")
        self.min_size, self.check = int(min_size), check
        self.skipped: list[tuple[str, str]] = []
        self._bad: set[int] = set()
        self._lock = threading.Lock()

        on_disk = self._list_images()
        metadata_path = os.path.join(self.root, METADATA_FILE)
        if os.path.exists(metadata_path):
            captions = self._read_metadata(metadata_path, caption_column)
            for name in sorted(set(captions) - set(on_disk)):
                self._note_skipped(name, f"listed in {METADATA_FILE} but not found")
            how = f"a line in {METADATA_FILE}"
        else:
            captions = self._read_caption_files(on_disk)
            how = "a same-named .txt caption file"
        if not on_disk:
            raise ValueError(
                f"no images found in {self.root!r}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                f"with same-named .txt captions, or a {METADATA_FILE}")
        missing = [name for name in on_disk if name not in captions]
        if missing and missing_caption == "error":
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} image(s) in {self.root!r} have no caption: {shown}. "
                             f"Add {how}, or pass missing_caption='empty' to train on them with an empty caption.")

        self.file_names, self.captions = [], []
        for name in on_disk:
            reason = self._check_file(os.path.join(self.root, name))
            if reason:
                self._note_skipped(name, reason)
                continue
            self.file_names.append(name)
            self.captions.append(captions.get(name, ""))
        if not self.file_names:
            raise ValueError(f"no usable images in {self.root!r}: all {len(on_disk)} were skipped "
                             f"(first: {self.skipped[0][0]}: {self.skipped[0][1]})")
        if self.skipped:
            log.warning("%s: skipped %d file(s); see FolderDataset.skipped", self.root, len(self.skipped))

    def _list_images(self) -> list[str]:
        names = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = os.path.relpath(dirpath, self.root)
            for f in filenames:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/"))
        return sorted(names)

    def _read_metadata(self, metadata_path: str, caption_column: str) -> dict[str, str]:
        captions = {}
        with open(metadata_path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{metadata_path}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
                    raise ValueError(f"{metadata_path}:{lineno}: each line needs 'file_name' and {caption_column!r} "
                                     f"keys (pass caption_column=... if the caption has another name); got {line.strip()[:200]}")
                captions[os.path.normpath(row["file_name"]).replace(os.sep, "/")] = str(row[caption_column])
        return captions

    def _read_caption_files(self, names: list[str]) -> dict[str, str]:
        captions = {}
        for name in names:
            txt = os.path.join(self.root, os.path.splitext(name)[0] + ".txt")
            if os.path.exists(txt):
                with open(txt, encoding="utf-8") as fh:
                    captions[name] = fh.read().strip()
        return captions

    def _check_file(self, path: str) -> str | None:
        """None if the file is usable, else why it is skipped."""
        try:
            if self.check == "full":
                size = load_rgb(path).shape[1::-1]
            else:
                with Image.open(path) as img:
                    size = img.size
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            return f"cannot read image: {type(e).__name__}: {e}"
        if min(size) < self.min_size:
            return f"too small ({size[0]}x{size[1]}; min_size={self.min_size})"
        return None

    def _note_skipped(self, name: str, reason: str):
        log.warning("skipping %s: %s", name, reason)
        self.skipped.append((name, reason))

    def __len__(self) -> int:
        return len(self.file_names)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a FolderDataset of {n} images")
        for k in range(n):
            j = (index + k) % n
            if j in self._bad:
                continue
            try:
                image = load_rgb(os.path.join(self.root, self.file_names[j]))
                if min(image.shape[:2]) < self.min_size:
                    raise ValueError(f"too small ({image.shape[1]}x{image.shape[0]}; min_size={self.min_size})")
            except Exception as e:  # noqa: BLE001 - a bad file mid-run is skipped, never fatal
                with self._lock:
                    if j not in self._bad:
                        self._bad.add(j)
                        self._note_skipped(self.file_names[j], f"cannot read image: {type(e).__name__}: {e}")
                continue
            return {"image": image, "caption": self.captions[j], "file_name": self.file_names[j]}
        raise RuntimeError(f"none of the {n} images in {self.root!r} could be read; see FolderDataset.skipped")
