"""sdjax.eval.shapes: the pixel analyser reads ground-truth images right and pure noise at chance."""
import numpy as np
import pytest

from sdjax.data import shapes
from sdjax.data.shapes import ShapesDataset, caption_for, parse_caption
from sdjax.eval.shapes import Analysis, analyse, format_table, score


def _ground_truth(n_per_split=100, seed=0):
    images, captions, examples = [], [], []
    for split in shapes.SPLITS:
        ds = ShapesDataset(split=split, seed=seed)
        for i in range(n_per_split):
            ex = ds[i]
            images.append(ex["image"])
            captions.append(ex["caption"])
            examples.append(ex)
    return images, captions, examples


def test_ground_truth_accuracy():
    images, captions, examples = _ground_truth()
    pink = ShapesDataset(split="all", seed=0, colors=("pink",))  # a new colour reads right too
    for i in range(100):
        examples.append(pink[i])
        images.append(examples[-1]["image"])
        captions.append(examples[-1]["caption"])
    result = score(images, captions)
    assert result["n"] == 400
    for key in ("color", "shape", "position", "all"):
        assert result[key] >= 0.99, (key, result[key])
    assert result["size"] >= 0.95 and result["n_size"] > 50
    sizes = [a.size == ex["size"] for a, ex in zip(result["analyses"], examples)]
    assert np.mean(sizes) >= 0.95


def test_noise_is_near_chance():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (200, 64, 64, 3), dtype=np.uint8)
    captions = [caption_for(rng.choice(list(shapes.COLORS)), rng.choice(shapes.SHAPES), rng.choice(shapes.POSITIONS))
                for _ in range(200)]
    result = score(noise, captions)  # chance: colour 1/9 (the palette has pink too), shape 1/3, position 1/5
    assert result["color"] < 0.3 and result["shape"] < 0.55 and result["position"] < 0.4 and result["all"] < 0.1


def test_blank_image_finds_nothing():
    blank = np.full((64, 64, 3), 40, np.uint8)
    assert analyse(blank) == Analysis(None, None, None, None)
    assert score([blank], ["a red square on the left"])["all"] == 0


def test_wrong_caption_is_marked_wrong():
    ex = ShapesDataset(split="all", seed=4)[0]
    color = next(c for c in shapes.COLORS if c != ex["color"])
    shape = next(s for s in shapes.SHAPES if s != ex["shape"])
    position = next(p for p in shapes.POSITIONS if p != ex["position"])
    right = score([ex["image"]], [ex["caption"]])
    assert right["color"] == right["shape"] == right["position"] == right["all"] == 1
    wrong_color = score([ex["image"]], [caption_for(color, ex["shape"], ex["position"])])
    assert (wrong_color["color"], wrong_color["shape"], wrong_color["position"], wrong_color["all"]) == (0, 1, 1, 0)
    wrong_shape = score([ex["image"]], [caption_for(ex["color"], shape, ex["position"])])
    assert (wrong_shape["color"], wrong_shape["shape"], wrong_shape["position"]) == (1, 0, 1)
    wrong_position = score([ex["image"]], [caption_for(ex["color"], ex["shape"], position)])
    assert (wrong_position["color"], wrong_position["shape"], wrong_position["position"]) == (1, 1, 0)


def test_format_table_and_input_errors():
    images, captions, _ = _ground_truth(n_per_split=4)
    seen, heldout = score(images[:8], captions[:8]), score(images[8:], captions[8:])
    table = format_table(seen, heldout, {"pink": seen})
    lines = table.splitlines()
    assert lines[-1].startswith("| pink (every shape) | 8 | 100.0% |")
    table = format_table(seen, heldout)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| prompts | n | colour | shape | position |")
    assert "| seen combinations | 8 | 100.0% |" in table and "| held-out combinations | 4 |" in table
    assert len(format_table(seen).splitlines()) == 3
    with pytest.raises(ValueError, match="uint8"):
        analyse(images[0].astype(np.float32) / 127.5 - 1)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        score(images[:2], captions[:1])


def test_eval_captions_split_seen_and_held_out_combinations():
    from sdjax.data.shapes import DEFAULT_HELDOUT
    from sdjax.eval.shapes import eval_captions

    seen, heldout = eval_captions(300, "train"), eval_captions(50, "heldout")
    assert len(seen) == 300 and len(set(seen)) > 100
    assert eval_captions(300, "train") == seen  # deterministic
    pairs = {(p.color, p.shape) for p in map(parse_caption, seen)}
    assert not pairs & set(DEFAULT_HELDOUT) and len(pairs) == 21
    assert {(p.color, p.shape) for p in map(parse_caption, heldout)} == set(DEFAULT_HELDOUT)
    pink = eval_captions(60, "pink")
    assert {(p.color, p.shape) for p in map(parse_caption, pink)} == {("pink", s) for s in shapes.SHAPES}
