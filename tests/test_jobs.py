"""Sampling jobs: prompts files, image slots, resumable PNG output with A1111 parameters, config errors."""
import numpy as np
import pytest
from PIL import Image

from configs import sample as sample_config
from sdjax import jobs


def test_prompts_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red fox\n\n# a comment\n  a blue bird  \n")
    assert jobs.read_prompts_file(f) == ["a red fox", "a blue bird"]
    f.write_text("\n# only comments\n   \n")
    with pytest.raises(ValueError, match="has no prompts"):
        jobs.read_prompts_file(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jobs.read_prompts_file(tmp_path / "missing.txt")


def test_slots_pending_and_batches(tmp_path):
    slots = jobs.image_slots(["a fox", "A Bird!"], negative_prompt="blurry", num_images_per_prompt=3, seed=7)
    assert [s.index for s in slots] == list(range(6))
    assert [s.prompt for s in slots] == ["a fox"] * 3 + ["A Bird!"] * 3
    assert slots[4].filename() == "00004-a-bird.png"
    assert jobs.ImageSlot(0, "", "", 0).filename() == "00000-empty.png"
    (tmp_path / slots[1].filename()).write_bytes(b"x")
    todo = jobs.pending(slots, tmp_path)
    assert [s.index for s in todo] == [0, 2, 3, 4, 5]
    assert [[s.index for s in b] for b in jobs.batches(todo, 2)] == [[0, 2], [3, 4], [5]]


def test_png_carries_a1111_parameters(tmp_path):
    slot = jobs.ImageSlot(3, "a red fox", "blurry", 42)
    text = jobs.a1111_parameters(slot, steps=20, sampler="Euler a", cfg_scale=7.5, width=512, height=512)
    assert text == ("a red fox\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42, "
                    "Size: 512x512, Image index: 3")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    jobs.save_png(image, tmp_path / "x.png", text)
    with Image.open(tmp_path / "x.png") as img:
        assert img.text["parameters"] == text
        np.testing.assert_array_equal(np.asarray(img), image)
    assert not list(tmp_path.glob("*.tmp.png"))


def test_grid():
    images = [np.full((2, 3, 3), k, np.uint8) for k in range(5)]
    g = jobs.grid(images)
    assert g.shape == (4, 9, 3)
    assert g[0, 3, 0] == 1 and g[2, 3, 0] == 4 and g[3, 8, 0] == 0
    with pytest.raises(ValueError, match="no images"):
        jobs.grid([])


def config(**overrides):
    c = sample_config.get_config()
    c.variant = "tiny"
    c.prompt = "a fox"
    c.update(overrides)
    return c


@pytest.mark.parametrize("overrides,message", [
    (dict(variant=""), "no model: set --config.checkpoint=PATH"),
    (dict(checkpoint="/nonexistent/model.safetensors"), "does not exist"),
    (dict(prompt=""), "exactly one of --config.prompt"),
    (dict(height=500), r"--config.height=500 is not a multiple of 8; use 496 or 504"),
    (dict(strength=1.5), r"--config.strength=1.5 must be in \(0, 1\]"),
    (dict(mask_image="m.png"), "needs --config.init_image"),
    (dict(dtype="fp8"), "use one of float32, bfloat16, float16"),
    (dict(sampler="Euler b"), "--config.sampler='Euler b'"),
    (dict(variant="huge"), "unknown model variant 'huge'"),
])
def test_config_errors_name_the_fix(overrides, message, tmp_path):
    with pytest.raises(jobs.ConfigError, match=message):
        jobs.run(config(output_dir=str(tmp_path), **overrides))


def test_empty_prompts_file_is_a_config_error(tmp_path):
    (tmp_path / "p.txt").write_text("\n")
    with pytest.raises(jobs.ConfigError, match="has no prompts"):
        jobs.run(config(prompt="", prompts_file=str(tmp_path / "p.txt"), output_dir=str(tmp_path)))

