"""sample.py end to end: images with parameters and a grid, a resumed re-run, one-line config errors."""
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def sample(*flags):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "sample.py", "--config", "configs/sample.py", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sample_writes_pngs_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\na blue square at the top\n")
    flags = ["--config.variant=tiny", f"--config.prompts_file={prompts}", "--config.num_images_per_prompt=2",
             "--config.steps=2", "--config.height=32", "--config.width=32", "--config.sampler=Euler a",
             f"--config.output_dir={tmp_path / 'out'}"]
    first = sample(*flags)
    assert first.returncode == 0, first.stderr
    pngs = sorted(p.name for p in (tmp_path / "out").glob("0*.png"))
    assert pngs == ["00000-a-red-circle-on-the-left.png", "00001-a-red-circle-on-the-left.png",
                    "00002-a-blue-square-at-the-top.png", "00003-a-blue-square-at-the-top.png"]
    text = Image.open(tmp_path / "out" / pngs[2]).text["parameters"]
    assert text.startswith("a blue square at the top\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 0, Size: 32x32")
    assert Image.open(tmp_path / "out" / "grid.png").size == (64, 64)
    assert f"images: {(tmp_path / 'out').resolve()}" in first.stdout
    (tmp_path / "out" / pngs[3]).unlink()  # as if the job had been killed before the last image
    second = sample(*flags)
    assert second.returncode == 0, second.stderr
    assert "4 images (3 already in" in second.stdout
    assert (tmp_path / "out" / pngs[3]).exists()


def test_config_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    result = sample("--config.variant=tiny", f"--config.prompts_file={empty}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"sample.py: error: --config.prompts_file: prompts file {empty} "
                                                      "has no prompts (one per line; # starts a comment)")
    typo = sample("--config.variant=tiny", "--config.promt=x")
    assert typo.returncode != 0 and "promt" in typo.stderr
    alone = sample("--config.variant=tiny", "--config.prompt=x", "--config.distributed=True")  # no cluster around
    assert alone.returncode == 2
    last = alone.stderr.strip().splitlines()[-1]
    assert last.startswith("sample.py: error: --config.distributed=True: ") and "SLURM, Open MPI" in last
