"""A procedural image–caption dataset: one coloured shape on a plain background.

Every example is a pure function of (seed, split, index), so any image can be regenerated
without storing it:

    ds = ShapesDataset(size=64, seed=0, split="train")
    ex = ds[17]   # {"image": uint8 (64, 64, 3), "caption": "a small green triangle at the top",
                  #  "color": "green", "shape": "triangle", "position": "top", "size": "small",
                  #  "background": "black"}

The caption grammar is small and fixed ("a [small|large] <colour> <shape> <position phrase>"),
and is exposed as data (`COLORS`, `SHAPES`, `POSITIONS`, `SIZES`, `caption_for`, `parse_caption`,
`all_captions`) so the evaluator in `sdjax.eval.shapes` can read the target back from a prompt.

Held-out colour–shape combinations test compositional generalisation: split="train" never draws
them, split="heldout" draws only them, split="all" draws every combination.

`NEW_COLORS` are colours the demo model never sees (its dataset draws `COLORS`): something for an
adapter to teach it (configs/lora_shapes.py), drawn with `ShapesDataset(colors=...)`.

Do not train on this dataset with random horizontal flips: a flip turns "on the left" into a lie.
"""
from __future__ import annotations

import itertools
import re
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from sdjax.cli import names

# Shape colours, far apart from each other (closest pair ~100 in RGB) and from every background (>= ~135).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (240, 230, 40),
    "green": (40, 180, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (150, 50, 190),
    "white": (245, 245, 245),
}
# Colours outside the demo's palette (>= ~109 from every colour above, >= ~145 from the backgrounds).
NEW_COLORS: dict[str, tuple[int, int, int]] = {
    "pink": (255, 50, 160),
}
PALETTE = {**COLORS, **NEW_COLORS}  # every colour the renderer draws and captions name
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (20, 20, 20),
    "dark gray": (75, 75, 75),
    "light gray": (160, 160, 160),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Where each position puts the shape's bounding-box centre, as (x, y) fractions of the image.
POSITION_ANCHORS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
# Bounding-box side (circle diameter, square side, triangle base = height) as a fraction of the image.
SIZE_RANGES = {"small": (0.26, 0.32), "large": (0.38, 0.46)}
POSITION_JITTER = 0.03
DEFAULT_HELDOUT = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))
SPLITS = ("train", "heldout", "all")
_SPLIT_CODE = {"train": 0, "heldout": 1, "all": 2}
_SUPERSAMPLE = 4


class ShapeLabels(NamedTuple):
    color: str
    shape: str
    position: str
    size: str | None  # None when the caption leaves the size out


def caption_for(color: str, shape: str, position: str, size: str | None = None) -> str:
    """The caption of one example, e.g. caption_for("orange", "circle", "left") == "an orange circle on the left"."""
    _check_labels(color, shape, position, size)
    words = ([size] if size else []) + [color, shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)} {POSITION_PHRASES[position]}"


_WORD = re.compile(r"[a-z]+")
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                   "centre": "centre", "center": "centre", "middle": "centre"}


def parse_caption(text: str) -> ShapeLabels:
    """Read (color, shape, position, size|None) back from a caption of the grammar.

    Tolerant of case, punctuation, "center"/"middle" and word order; a caption that names no or
    several colours, shapes or positions is an error.
    """
    words = _WORD.findall(text.lower())

    def one(kind, vocabulary, *, required=True):
        found = sorted({vocabulary[w] for w in words if w in vocabulary})
        if len(found) > 1:
            raise ValueError(f"caption {text!r} names several {kind}s {found}; a shapes caption names one")
        if not found:
            if required:
                raise ValueError(f"caption {text!r} names no {kind}; expected one of {sorted(set(vocabulary.values()))}")
            return None
        return found[0]

    return ShapeLabels(
        color=one("colour", {c: c for c in PALETTE}),
        shape=one("shape", {s: s for s in SHAPES}),
        position=one("position", _POSITION_WORDS),
        size=one("size", {s: s for s in SIZES}, required=False),
    )


def all_combos(colors=COLORS) -> list[tuple[str, str]]:
    """Every (colour, shape) pair of `colors` (default the demo's palette, `COLORS`)."""
    return list(itertools.product(colors, SHAPES))


def all_captions(combos=None) -> list[str]:
    """Every caption the grammar produces for `combos` (default all (colour, shape) pairs), sorted."""
    combos = all_combos() if combos is None else dict.fromkeys(combos)  # a colour listed twice: its captions once
    return sorted(caption_for(c, s, p, z) for (c, s) in combos for p in POSITIONS for z in (None, *SIZES))


def _check_labels(color, shape, position, size):
    if color not in PALETTE:
        raise ValueError(f"unknown colour {color!r}; choose one of {list(PALETTE)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; choose one of {list(POSITIONS)}")
    if size is not None and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {list(SIZES)} or None")


def render(color: str, shape: str, center: tuple[float, float], extent: float, background: str,
           size: int = 64) -> np.ndarray:
    """Draw one shape: `center` (x, y) and `extent` (bounding-box side) are fractions of the image.

    Rendered at 4x and box-downsampled, so edges are lightly antialiased and interiors stay flat.
    """
    s = size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    cx, cy, half = center[0] * s, center[1] * s, extent * s / 2
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    fill = PALETTE[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")
    return np.asarray(img.reduce(_SUPERSAMPLE))


class ShapesDataset:
    """Deterministic procedural dataset; `len(ds)` is nominal (`length`), every index renders on demand.

    Args:
      size: image side in pixels.
      seed: base seed; example i of a split is a pure function of (seed, split, i).
      split: "train" (held-out combinations excluded), "heldout" (only them) or "all".
      heldout: (colour, shape) pairs kept out of the training split.
      length: what `len()` reports (and the index range `__getitem__` accepts).
      size_word_prob: probability that a caption names the size.
      colors: the colours drawn (default `COLORS`; names from `PALETTE`; a string is comma-separated). Each
        (colour, shape) pair of the split is equally likely, so in the "train" and "all" splits a colour listed k
        times is drawn k times as often: ("pink",) * 8 + tuple(COLORS) makes about half the images pink.
    """

    def __init__(self, size: int = 64, seed: int = 0, split: str = "train", heldout=DEFAULT_HELDOUT,
                 length: int = 100_000, size_word_prob: float = 0.5, colors=None):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if size < 16:
            raise ValueError(f"size={size} is too small to draw recognisable shapes; use size >= 16")
        heldout = tuple((str(c), str(s)) for c, s in heldout)
        for c, s in heldout:
            _check_labels(c, s, "centre", None)
        if split == "heldout" and not heldout:
            raise ValueError("split='heldout' needs at least one held-out (colour, shape) pair in `heldout`")
        self.size, self.seed, self.split, self.heldout = size, int(seed), split, heldout
        self.length, self.size_word_prob = int(length), float(size_word_prob)
        colors = names(colors or ()) or tuple(COLORS)  # "pink,red" and ("pink,red",) too: a command line's ways
        for c in colors:
            _check_labels(c, "circle", "centre", None)
        if split == "train":
            self.combos = [c for c in all_combos(colors) if c not in set(heldout)]
        elif split == "heldout":
            self.combos = [c for c in heldout if c[0] in colors]
        else:
            self.combos = all_combos(colors)
        if not self.combos:
            raise ValueError(f"split={split!r} with colors={colors} draws no (colour, shape) pair (held-out pairs: "
                             f"{heldout}): choose other colours or another split")

    def __len__(self) -> int:
        return self.length

    def labels(self, index: int) -> dict:
        """Everything about example `index` except its pixels (cheap)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], int(index)])
        color, shape = self.combos[rng.integers(len(self.combos))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        size = SIZES[rng.integers(len(SIZES))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        extent = rng.uniform(*SIZE_RANGES[size])
        ax, ay = POSITION_ANCHORS[position]
        jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        caption = caption_for(color, shape, position, size if rng.random() < self.size_word_prob else None)
        return {"caption": caption, "color": color, "shape": shape, "position": position, "size": size,
                "background": background, "center": (ax + jx, ay + jy), "extent": extent}

    def __getitem__(self, index: int) -> dict:
        ex = self.labels(int(index))
        image = render(ex["color"], ex["shape"], ex.pop("center"), ex.pop("extent"), ex["background"], self.size)
        return {"image": image, **ex}

    def all_captions(self) -> list[str]:
        """Every caption this split can produce."""
        return all_captions(self.combos)

    def batch(self, indices) -> dict:
        """Stacked examples: images uint8 (B, H, W, 3), captions list[str], labels as lists."""
        examples = [self[i] for i in indices]
        out = {"images": np.stack([e["image"] for e in examples]), "captions": [e["caption"] for e in examples]}
        for key in ("color", "shape", "position", "size", "background"):
            out[key] = [e[key] for e in examples]
        return out

    def batches(self, batch_size: int, *, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
        """Sequential batches (step k holds indices k*B ... k*B+B-1, modulo len); uint8, no preprocessing.

        For shuffled, host-sharded float batches use `sdjax.data.preprocess.iterate_batches(ds, ...)`.
        """
        step = start_step
        while num_steps is None or step < start_step + num_steps:
            yield self.batch([(step * batch_size + j) % self.length for j in range(batch_size)])
            step += 1
