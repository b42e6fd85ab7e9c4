"""Prompt adherence for the shapes demo: read colour, shape and position back from generated pixels.

The analyser is a fixed, deterministic function of the pixels (no learned model), so its
judgement is reproducible and auditable:
  background  the per-channel median of the image border;
  foreground  pixels far from the background, then refined to pixels nearer the foreground's
              median colour than the background (a half-coverage threshold for antialiased edges);
  colour      the named colour (`sdjax.data.shapes.COLORS`) nearest the median foreground colour;
  shape       nearest prototype in (bounding-box fill ratio, top-width / bottom-width):
              square (1, 1), circle (pi/4, 1), upright triangle (1/2, 1/3);
  position    bounding-box centre: "centre" if within 1/8 of the middle on both axes,
              else the side of the dominant axis;
  size        "large" if the bounding box spans more than 30% of the image.

`score(images, captions)` compares the analysis of each image with the caption it was generated
from (parsed by `sdjax.data.shapes.parse_caption`); `format_table(seen, heldout)` renders two
such results as a markdown table. The sampling entry point (`python -m sdjax.eval.shapes
--checkpoint ...`, added with the pipeline) generates images for the seen and held-out caption
sets and calls these two functions.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sdjax.data.shapes import COLORS, parse_caption

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], np.float32)
# (fill ratio, top-width / bottom-width) of each ideal silhouette; fill counts double.
_SHAPE_PROTOTYPES = {"square": (1.0, 1.0), "circle": (np.pi / 4, 1.0), "triangle": (0.5, 1 / 3)}
_FILL_WEIGHT = 2.0
_MIN_FOREGROUND_DISTANCE = 60.0   # RGB distance from the background that counts as "not background"
_MIN_FOREGROUND_FRACTION = 0.004  # fewer foreground pixels than this: no shape found
_CENTRE_RADIUS = 0.125
_LARGE_EXTENT = 0.30


class Analysis(NamedTuple):
    """What the analyser saw; every field is None when it found no foreground."""
    color: str | None
    shape: str | None
    position: str | None
    size: str | None


_NOTHING = Analysis(None, None, None, None)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"analyse expects a uint8 (H, W, 3) image, got {image.dtype} {image.shape}; convert [-1, 1] floats "
            "with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
    return image


def _background(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def _shape_from_coverage(soft: np.ndarray) -> str:
    """Classify a silhouette given as per-pixel coverage in [0, 1], cropped to its bounding box plus a margin.

    Fill ratio uses the antialiased coverage (area / (width * height), where width and height sum each
    column's / row's peak coverage), so it stays unbiased for shapes only ~10 pixels across.
    """
    width, height = soft.max(axis=0).sum(), soft.max(axis=1).sum()
    fill = soft.sum() / max(width * height, 1e-6)
    rows = (soft > 0.5).sum(axis=1)  # width of the silhouette in each row
    filled = np.nonzero(rows)[0]
    if len(filled):
        rows = rows[filled[0]:filled[-1] + 1]
    h = len(rows)
    top = rows[int(0.1 * h):max(int(0.35 * h), int(0.1 * h) + 1)].mean()
    bottom = rows[int(0.65 * h):max(int(0.9 * h), int(0.65 * h) + 1)].mean()
    features = np.array([_FILL_WEIGHT * fill, top / max(bottom, 1e-6)])
    features[1] = min(features[1], 1.5)  # an inverted triangle is not a better square
    distances = {name: np.linalg.norm(features - np.array([_FILL_WEIGHT * proto_fill, proto_ratio]))
                 for name, (proto_fill, proto_ratio) in _SHAPE_PROTOTYPES.items()}
    return min(distances, key=distances.get)


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """How many of each pixel's 3x3 neighbourhood (itself included) are set."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(padded[i:i + h, j:j + w] for i in range(3) for j in range(3))


def _bounds(coords: np.ndarray, n: int) -> tuple[int, int]:
    """Robust [lo, hi) extent of foreground coordinates: drops the outer 1% to ignore stray pixels."""
    if len(coords) > 200:
        lo, hi = np.percentile(coords, [1, 99])
    else:
        lo, hi = coords.min(), coords.max()
    return int(np.floor(lo)), min(int(np.ceil(hi)) + 1, n)


def analyse(image) -> Analysis:
    """Guess (colour, shape, position, size) of the one shape in a uint8 (H, W, 3) image."""
    pixels = _check_image(image).astype(np.float32)
    h, w, _ = pixels.shape
    bg = _background(pixels)
    far = np.linalg.norm(pixels - bg, axis=-1) > _MIN_FOREGROUND_DISTANCE
    if far.sum() < _MIN_FOREGROUND_FRACTION * h * w:
        return _NOTHING
    fg = np.median(pixels[far], axis=0)
    direction = fg - bg
    coverage = (pixels - bg) @ direction / max(float(direction @ direction), 1e-6)
    # A 3x3 majority vote drops speckle (sampling noise) but keeps every pixel of a solid shape's body.
    mask = _neighbour_count(coverage > 0.5) >= 5
    if mask.sum() < _MIN_FOREGROUND_FRACTION * h * w:
        return _NOTHING

    interior = mask & (coverage > 0.8)
    color_pixels = pixels[interior] if interior.sum() >= 4 else pixels[mask]
    color_rgb = np.median(color_pixels, axis=0)
    color = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - color_rgb, axis=-1)))]

    ys, xs = np.nonzero(mask)
    y0, y1 = _bounds(ys, h)
    x0, x1 = _bounds(xs, w)
    soft = np.clip(coverage, 0.0, 1.0) * (_neighbour_count(mask) > 0)
    shape = _shape_from_coverage(soft[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1])

    dx, dy = (x0 + x1) / (2 * w) - 0.5, (y0 + y1) / (2 * h) - 0.5
    if max(abs(dx), abs(dy)) < _CENTRE_RADIUS:
        position = "centre"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    size = "large" if max(x1 - x0, y1 - y0) > _LARGE_EXTENT * max(h, w) else "small"
    return Analysis(color, shape, position, size)


def score(images, captions) -> dict:
    """Accuracy of the analysis of `images` (uint8 (N, H, W, 3) or a list) against their `captions`.

    Returns {"n", "color", "shape", "position", "all" (colour, shape and position all right),
    "size" (over captions that name a size; None if none do), "n_size", "analyses"}.
    """
    images = list(images)
    captions = list(captions)
    if len(images) != len(captions):
        raise ValueError(f"score got {len(images)} images but {len(captions)} captions; pass one caption per image")
    if not images:
        raise ValueError("score needs at least one image")
    hits = {"color": 0, "shape": 0, "position": 0, "all": 0, "size": 0}
    n_size, analyses = 0, []
    for image, caption in zip(images, captions):
        target = parse_caption(caption)
        guess = analyse(image)
        analyses.append(guess)
        right = {k: getattr(guess, k) == getattr(target, k) for k in ("color", "shape", "position")}
        for k, ok in right.items():
            hits[k] += ok
        hits["all"] += all(right.values())
        if target.size is not None:
            n_size += 1
            hits["size"] += guess.size == target.size
    n = len(images)
    result = {k: hits[k] / n for k in ("color", "shape", "position", "all")}
    result.update(n=n, size=hits["size"] / n_size if n_size else None, n_size=n_size, analyses=analyses)
    return result


def format_table(results_seen: dict, results_heldout: dict | None = None) -> str:
    """A markdown table of one or two `score` results (seen combinations, held-out combinations)."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["| prompts | n | colour | shape | position | all three | size |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("seen combinations", results_seen), ("held-out combinations", results_heldout)):
        if r is None:
            continue
        lines.append(f"| {name} | {r['n']} | {pct(r['color'])} | {pct(r['shape'])} | {pct(r['position'])} "
                     f"| {pct(r['all'])} | {pct(r['size'])} |")
    return "\n".join(lines)
