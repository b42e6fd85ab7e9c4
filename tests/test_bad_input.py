"""Bad input and faults: each case is one line of a table (input -> the error and a fragment of its one-line message).

The sampling settings are checked by `sdjax.jobs.run` before the model loads (in this process: quick); the pipeline's
Python API by its calls on the tiny variant (they fail before anything compiles); the command lines by running
sample.py / train.py themselves, for the wiring that turns any of these into one line and exit code 2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import sample as sample_config
from sdjax import cli, jobs

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """Inputs a user might pass: a good image, a mask of another size, a text file, a truncated PNG, a file."""
    out = {"image": tmp_path / "image.png", "small_mask": tmp_path / "mask.png", "text": tmp_path / "notes.png",
           "truncated": tmp_path / "truncated.png", "a_file": tmp_path / "a_file", "prompts": tmp_path / "p.txt"}
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(out["image"])
    Image.fromarray(np.full((16, 32), 255, np.uint8)).save(out["small_mask"])
    out["text"].write_text("not an image\n")
    out["truncated"].write_bytes(out["image"].read_bytes()[:60])
    out["a_file"].write_text("x")
    out["prompts"].write_text("a red circle\n")
    return out


# (settings, fragment of the ConfigError's message); "{name}" is replaced by files[name]
SAMPLE_CASES = [
    ({"seed": -1}, "--config.seed=-1: use 0 or more"),
    ({"attention": "flash"}, "--config.attention='flash': use one of auto, einsum, xla, cudnn"),
    ({"guidance_scale": -3.0}, "--config.guidance_scale=-3.0: use 0 or more"),
    ({"clip_skip": -1}, "--config.clip_skip=-1: use 0"),
    ({"init_image": "{text}"}, "--config.init_image={text} is not an image PIL can read"),
    ({"init_image": "{truncated}"}, "--config.init_image={truncated} is not an image PIL can read"),
    ({"init_image": "{image}", "mask_image": "{small_mask}"}, "--config.mask_image is 32x16, --config.init_image 32x32"),
    ({"mask_image": "{image}"}, "--config.mask_image needs --config.init_image"),
    ({"output_dir": "{a_file}"}, "--config.output_dir={a_file} is a file; give a folder"),
    ({"height": 30}, "--config.height=30 is not a multiple of 8"),
    ({"strength": 1.5, "init_image": "{image}"}, "--config.strength=1.5 must be in (0, 1]"),
    ({"dtype": "float64"}, "--config.dtype='float64': use one of"),
    ({"steps": 0}, "--config.steps, --config.num_images_per_prompt and --config.batch_size must be >= 1"),
    ({"sampler": "Euler b"}, "--config.sampler='Euler b'"),
    ({"prompt": "x", "prompts_file": "{prompts}"}, "give exactly one of --config.prompt"),
    ({"prompts_file": "{image}.missing"}, "--config.prompts_file: prompts file {image}.missing does not exist"),
    ({"checkpoint": "{image}.missing", "variant": ""}, "--config.checkpoint={image}.missing does not exist"),
    ({"checkpoint": "{text}", "variant": ""}, "neither a diffusers folder"),
    ({"variant": "", "checkpoint": ""}, "no model: set --config.checkpoint=PATH"),
]


def sampling_config(files, tmp_path, **settings):
    config = sample_config.get_config()
    config.update(variant="tiny", prompts_file=str(files["prompts"]), output_dir=str(tmp_path / "out"), steps=2,
                  height=32, width=32)
    config.update({k: v.format(**files) if isinstance(v, str) else v for k, v in settings.items()})
    return config


@pytest.mark.parametrize("settings, message", SAMPLE_CASES, ids=[m.split(":")[0][:40] for _, m in SAMPLE_CASES])
def test_sampling_settings_are_checked_before_the_model_loads(files, tmp_path, monkeypatch, settings, message):
    monkeypatch.setattr(jobs, "load_model", lambda config: pytest.fail("the model loaded before the check"))
    with pytest.raises(jobs.ConfigError) as error:
        jobs.run(sampling_config(files, tmp_path, **settings))
    assert message.format(**files) in str(error.value)
    assert "\n" not in str(error.value)


def test_images_of_another_job_in_the_output_folder_stop_the_run(files, tmp_path, monkeypatch):
    """A re-run into a folder whose images record other settings stops before the model loads, naming the image,
    what differs, and the fix; the same settings resume (the image counts as done)."""
    monkeypatch.setattr(jobs, "load_model", lambda config: pytest.fail("the model loaded before the check"))
    config = sampling_config(files, tmp_path, sampler="Euler a")
    slot = jobs.image_slots(["a red circle"])[0]
    params = jobs.a1111_parameters(slot, steps=2, sampler="Euler a", cfg_scale=7.5, width=32, height=32, model="tiny")
    (tmp_path / "out").mkdir()
    jobs.save_png(np.zeros((32, 32, 3), np.uint8), tmp_path / "out" / slot.filename(), params)
    assert jobs.agreed_pending(jobs.image_slots(["a red circle"]), tmp_path / "out", jobs.known_settings(config)) == []
    for change, differs in (({"steps": 3}, "Steps '2' here, '3' now"),
                            ({"sampler": "DDIM"}, "Sampler 'Euler a' here, 'DDIM' now"),
                            ({"guidance_scale": 4.0}, "CFG scale '7.5' here, '4.0' now"),
                            ({"emphasis": "No norm"}, "Emphasis '(none)' here, 'No norm' now")):
        with pytest.raises(jobs.ConfigError) as error:
            jobs.run(sampling_config(files, tmp_path, **{"sampler": "Euler a", **change}))
        assert str(error.value).startswith(f"{tmp_path / 'out' / slot.filename()} was made by another job (")
        assert differs in str(error.value) and "use another --config.output_dir" in str(error.value)
    # a field the image has and this job leaves at its default differs too
    params = jobs.a1111_parameters(slot, steps=2, sampler="Euler a", cfg_scale=7.5, width=32, height=32, model="tiny",
                                   extra={"Clip skip": "2", "Emphasis": "No norm"})
    jobs.save_png(np.zeros((32, 32, 3), np.uint8), tmp_path / "out" / slot.filename(), params)
    with pytest.raises(jobs.ConfigError, match=r"Clip skip '2' here, \(none\) now; Emphasis 'No norm' here"):
        jobs.run(config)
    assert jobs.agreed_pending(jobs.image_slots(["a red circle"]), tmp_path / "out",
                               jobs.known_settings(sampling_config(files, tmp_path, sampler="Euler a", clip_skip=1,
                                                                   emphasis="No norm"))) == []


def test_guidance_up_to_1_is_recorded_as_what_ran():
    """guidance_scale <= 1 runs the prompt alone (no classifier-free guidance): the PNG says CFG scale 1.0."""
    config = sample_config.get_config()
    for scale, recorded in ((0.0, "1.0"), (0.5, "1.0"), (1.0, "1.0"), (7.5, "7.5")):
        config.guidance_scale = scale
        assert jobs.known_settings(config)["CFG scale"] == recorded


@pytest.fixture(scope="module")
def tiny_pipe():
    from sdjax import pipeline, tokenizer, variants

    variant = variants.get("tiny")
    return pipeline.StableDiffusion(*variant.build(), tokenizer.default_tokenizer(), dict(variant.scheduler))


IMAGE = np.zeros((32, 32, 3), np.uint8)
API_CASES = [  # (method, args, kwargs, error type, message fragment)
    ("text2img", (None,), {}, TypeError, "prompts must be a string or a list of strings, got NoneType"),
    ("text2img", (5,), {}, TypeError, "prompts must be a string or a list of strings, got int"),
    ("text2img", (["a", 3],), {}, TypeError, "got a list holding ['int']"),
    ("text2img", ([],), {}, ValueError, "no prompts given"),
    ("text2img", ("a",), {"negative_prompts": 1}, TypeError, "negative_prompts must be a string or a list"),
    ("text2img", ("a",), {"guidance_scale": -1.0}, ValueError, "guidance_scale=-1.0: use 0 or more"),
    ("text2img", ("a",), {"clip_skip": 5}, ValueError, "clip_skip=5: the text encoder has"),
    ("text2img", ("a",), {"height": 33}, ValueError, "height and width must be multiples of"),
    ("img2img", (["a"], []), {}, ValueError, "0 init_images for 1 prompts"),
    ("img2img", (["a"], None), {}, TypeError, "init_images must be a list of PIL images or arrays, got NoneType"),
    ("img2img", (["a"], [IMAGE]), {"strength": 0.0}, ValueError, "strength must be in (0, 1]"),
    ("inpaint", (["a"], [IMAGE], [np.zeros((16, 32), np.uint8)]), {}, ValueError,
     "mask 0 is 32x16, its image 32x32: give masks the size of their images"),
]


@pytest.mark.parametrize("method, args, kwargs, error, message", API_CASES,
                         ids=[f"{c[0]}-{c[4][:30]}" for c in API_CASES])
def test_pipeline_api_says_what_it_expected(tiny_pipe, method, args, kwargs, error, message):
    with pytest.raises(error) as raised:
        getattr(tiny_pipe, method)(*args, **{"height": 32, "width": 32, "num_inference_steps": 1, **kwargs})
    assert message in str(raised.value)


@pytest.mark.parametrize("content, says", [
    (b"hello\n", "is a text file, not a PyTorch checkpoint"),
    (b"", "is an empty file"),
    (b"<!DOCTYPE html><html>", "is an HTML page"),
    (b"version https://git-lfs.github.com/spec/v1\n", "is a Git LFS pointer"),
    (bytes(range(200, 256)), "is not a PyTorch checkpoint (it starts with bytes c8 c9"),
])
def test_a_ckpt_that_is_not_a_pickle_says_what_it_is(tmp_path, content, says):
    import sdjax

    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        sdjax.load_pretrained(path)
    assert f"{path} {says}" in str(error.value)


CLI_CASES = [  # (script, config, flags, the whole stderr line)
    ("sample.py", "configs/sample.py", ["--config.promptz=x"],
     "sample.py: error: --config.promptz: no such field; did you mean --config.prompt or --config.prompts_file or "
     "--config.negative_prompt?"),
    ("sample.py", "configs/sample.py", ["--config.steps=abc"],
     "sample.py: error: flag --config.steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("sample.py", "configs/sample.py", ["--config.variant=tiny", "--config.prompt=x", "--config.seed=-1"],
     "sample.py: error: --config.seed=-1: use 0 or more (image i of the job draws noise (seed, i))"),
    ("sample.py", "configs/nope.py", [],
     "sample.py: error: --config=configs/nope.py: cannot load it (FileNotFoundError: configs/nope.py does not exist)"),
    ("train.py", "configs/tiny.py", ["--config.optimizer.lr=1"],
     "train.py: error: --config.optimizer.lr: no such field; did you mean --config.optimizer.learning_rate?"),
    ("train.py", "configs/tiny.py", ["--config.optimiser.learning_rate=1"],
     "train.py: error: --config.optimiser.learning_rate: no such field; did you mean --config.optimizer?"),
    ("train.py", "configs/tiny.py", ["--config.seed.x=1"],
     "train.py: error: --config.seed.x: --config.seed is a int value, it has no field 'x'"),
    ("train.py", "configs/tiny.py", ["stray"],
     "train.py: error: unexpected arguments ['stray']; settings go in --config.FIELD=VALUE"),
]


def test_command_lines_print_one_line_and_exit_2():
    """Each case in its own process (absl's flags are process-wide)."""
    for script, config, flags, line in CLI_CASES:
        result = subprocess.run([sys.executable, script, "--config", config, *flags], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert (result.returncode, result.stderr.strip()) == (2, line), (script, flags)


def test_unknown_field_suggestions():
    config = sample_config.get_config()
    assert cli.unknown_field(config, "prompt") is None
    assert cli.unknown_field(config, "negative") == ("--config.negative: no such field; did you mean "
                                                     "--config.negative_prompt?")
    assert cli.unknown_field(config, "qqq").startswith("--config.qqq: no such field; --config has attention, ")
