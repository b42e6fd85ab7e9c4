"""Prompt adherence for the shapes demo: read colour, shape and position back from generated pixels.

The analyser is a fixed, deterministic function of the pixels (no learned model), so its
judgement is reproducible and auditable:
  background  the per-channel median of the image border;
  foreground  pixels far from the background, then refined to pixels nearer the foreground's
              median colour than the background (a half-coverage threshold for antialiased edges);
  colour      the named colour (`sdjax.data.shapes.PALETTE`: the demo's 8 and the new ones, such as pink)
              nearest the median foreground colour;
  shape       nearest prototype in (bounding-box fill ratio, top-width / bottom-width):
              square (1, 1), circle (pi/4, 1), upright triangle (1/2, 1/3);
  position    bounding-box centre: "centre" if within 1/8 of the middle on both axes,
              else the side of the dominant axis;
  size        "large" if the bounding box spans more than 35% of the image (_LARGE_EXTENT).

`score(images, captions)` compares the analysis of each image with the caption it was generated
from (parsed by `sdjax.data.shapes.parse_caption`); `format_table(seen, heldout)` renders two
such results (and a row per extra colour) as a markdown table. `evaluate(pipe, ...)` generates images for seen and held-out
captions (and for captions of a colour the model never saw: `NEW_COLORS`) and scores them; from the shell:

    python -m sdjax.eval.shapes --checkpoint runs/shapes/ldm/export --num_images 200
    python -m sdjax.eval.shapes --checkpoint runs/shapes/ldm/export --colors=pink \
        --lora=runs/shapes/lora_pink/lora/pink.safetensors         # the adapter that teaches it pink
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sdjax.data.shapes import PALETTE, ShapesDataset, parse_caption

_PALETTE_NAMES = list(PALETTE)
_PALETTE = np.array([PALETTE[c] for c in _PALETTE_NAMES], np.float32)
# (fill ratio, top-width / bottom-width) of each ideal silhouette; fill counts double.
_SHAPE_PROTOTYPES = {"square": (1.0, 1.0), "circle": (np.pi / 4, 1.0), "triangle": (0.5, 1 / 3)}
_FILL_WEIGHT = 2.0
_MIN_FOREGROUND_DISTANCE = 60.0   # RGB distance from the background that counts as "not background"
_MIN_FOREGROUND_FRACTION = 0.004  # fewer foreground pixels than this: no shape found
_CENTRE_RADIUS = 0.125
_LARGE_EXTENT = 0.35


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


def format_table(results_seen: dict, results_heldout: dict | None = None, colors: dict | None = None) -> str:
    """A markdown table of `score` results: seen combinations, held-out combinations, and a row per colour of
    `colors` ({colour: result})."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["| prompts | n | colour | shape | position | all three | size |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("seen combinations", results_seen), ("held-out combinations", results_heldout)]
    rows += [(f"{color} (every shape)", r) for color, r in (colors or {}).items()]
    for name, r in rows:
        if r is None:
            continue
        lines.append(f"| {name} | {r['n']} | {pct(r['color'])} | {pct(r['shape'])} | {pct(r['position'])} "
                     f"| {pct(r['all'])} | {pct(r['size'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Generate and score: `python -m sdjax.eval.shapes --checkpoint ...`
# ---------------------------------------------------------------------------------------------------------

EVAL_SEED = 1_000_003  # caption draws for evaluation, apart from any training seed


def eval_captions(n: int, split: str, *, seed: int = EVAL_SEED) -> list[str]:
    """`n` captions drawn as the shapes dataset draws them: split "train" (colour-shape combinations seen in
    training), "heldout" (combinations never seen) or a colour's name (that colour with every shape, e.g. "pink",
    which the demo model never saw)."""
    if split in PALETTE:
        ds = ShapesDataset(split="all", seed=seed, length=max(n, 1), colors=(split,))
    else:
        ds = ShapesDataset(split=split, seed=seed, length=max(n, 1))
    return [ds.labels(i)["caption"] for i in range(n)]


def evaluate(pipe, *, num_images: int = 200, seed: int = 0, num_inference_steps: int = 25,
             guidance_scale: float = 4.0, sampler: str | None = None, size: int = 64, batch_size: int = 50,
             mesh=None, splits=("train", "heldout"), progress=None) -> dict:
    """Generate `num_images` per split (`eval_captions`' splits) with `pipe` (a `sdjax.pipeline.StableDiffusion`)
    and score them.

    Returns {split: {"captions", "images" (uint8 (N, size, size, 3)), **score(...)}}. Image i of a split uses
    the noise (seed, i). `progress(done, total)` is called after every batch.
    """
    from sdjax import pipeline

    if num_images < 1:
        raise ValueError(f"num_images={num_images}: need at least one image per split")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: need at least 1")
    devices = 1 if mesh is None else mesh.size
    batch_size = -(-batch_size // devices) * devices
    results, done, total = {}, 0, num_images * len(splits)
    for split in splits:
        captions = eval_captions(num_images, split)
        images = []
        for start in range(0, num_images, batch_size):
            chunk = captions[start:start + batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[-1]] * (batch_size - n)  # one batch shape: compiled once
            out = pipeline.generate(pipe, chunk, seed=seed, indices=list(range(start, start + batch_size)),
                                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                    sampler=sampler, height=size, width=size, mesh=mesh)
            images.append(np.asarray(out)[:n])
            done += n
            if progress is not None:
                progress(done, total)
        images = np.concatenate(images)
        results[split] = {"captions": captions, "images": images, **score(images, captions)}
    return results


def argument_parser() -> argparse.ArgumentParser:
    """The command line of `python -m sdjax.eval.shapes`."""
    parser = argparse.ArgumentParser(
        prog="python -m sdjax.eval.shapes",
        description="Generate images for shapes captions (seen and held-out colour-shape combinations, and with "
                    "--colors every shape in those colours) and report how often colour, shape and position match "
                    "the caption.")
    parser.add_argument("--checkpoint", required=True, help="a trained shapes model (diffusers folder or single file)")
    parser.add_argument("--num_images", type=int, default=200, help="images per split (default 200)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--sampler", default="DPM++ 2M", help="scheduler name (default DPM++ 2M); \"\" = the checkpoint's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--colors", default="",
                        help="also score these colours with every shape, e.g. pink (comma-separated; from "
                             "sdjax.data.shapes.PALETTE)")
    parser.add_argument("--lora", default="", help="adapters to apply: PATH[:SCALE],... as sample.py's --config.lora")
    parser.add_argument("--output_dir", default="",
                        help="default: <checkpoint>/../eval, or with --lora the LoRA run's eval folder (<first LoRA "
                             "file>/../../eval when the file is in a train.py workdir's lora/, else beside it)")
    return parser


def _default_output_dir(checkpoint, loras) -> Path:
    """<checkpoint>/../eval; with LoRAs the first one's run: workdir/eval for workdir/lora/<file>, else beside it."""
    if not loras:
        return Path(checkpoint).resolve().parent / "eval"
    first = Path(loras[0][0]).resolve()
    folder = first if first.is_dir() else first.parent
    return (folder.parent if folder.name == "lora" else folder) / "eval"


def _main(argv=None) -> int:
    parser = argument_parser()
    args = parser.parse_args(argv)

    import jax
    from PIL import Image
    from tqdm import tqdm

    from sdjax import cli, jobs, lora, pretrained

    if args.size % 8:
        parser.error(f"--size={args.size} must be a multiple of 8")
    colors = list(dict.fromkeys(cli.names(args.colors)))
    for color in colors:
        if color not in PALETTE:
            parser.error(f"--colors: unknown colour {color!r}; choose from {', '.join(PALETTE)}")
    try:
        pipe = pretrained.load_pretrained(args.checkpoint)
    except (ValueError, FileNotFoundError) as e:
        parser.error(f"--checkpoint={args.checkpoint}: {e}")
    loras = lora.parse_lora_setting(args.lora)
    for path, scale in loras:
        try:
            lora.load_lora(pipe, path, scale=scale)
        except (ValueError, FileNotFoundError) as e:
            parser.error(f"--lora={path}: {e}")
    splits = ("train", "heldout", *colors)
    mesh = None
    if jax.device_count() > 1:
        mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    bar = tqdm(total=len(splits) * args.num_images, unit="img", desc="generating (first batch compiles)", file=sys.stderr)

    def progress(done, total):
        bar.set_description("generating")
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        results = evaluate(pipe, num_images=args.num_images, seed=args.seed, num_inference_steps=args.steps,
                           guidance_scale=args.guidance_scale, sampler=args.sampler or None, size=args.size,
                           batch_size=args.batch_size, mesh=mesh, splits=splits, progress=progress)
    except ValueError as e:
        parser.error(str(e))
    bar.close()
    out = Path(args.output_dir or _default_output_dir(args.checkpoint, loras))
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results["train"], results["heldout"], {c: results[c] for c in colors})
    report = {"checkpoint": str(args.checkpoint), "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
              "seconds": round(time.perf_counter() - start, 1)}
    for split, r in results.items():
        Image.fromarray(jobs.grid(list(r["images"][:64]), columns=8)).save(out / f"grid_{split}.png")
        report[split] = {k: r[k] for k in ("n", "color", "shape", "position", "all", "size", "n_size")}
        report[split]["images"] = [{"caption": c, **a._asdict()} for c, a in zip(r["captions"], r["analyses"])]
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(splits) * args.num_images} images in {report['seconds']:.0f}s; grids, table.md and results.json (every "
          f"caption and what the analyser saw) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
