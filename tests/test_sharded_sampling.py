"""Sharded sampling: the same images on 1 and 8 (fake CPU) devices, and a sampling job run as two processes
(jax.distributed on 127.0.0.1, gloo collectives) writes the same files as one process."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *, devices: int, env_extra: dict | None = None, background: bool = False):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), **(env_extra or {}))
    cmd = [sys.executable, "-c", textwrap.dedent(code)]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


GENERATE = """
    import jax, numpy as np
    from sdjax import jobs
    from configs import sample
    c = sample.get_config()
    c.variant = "tiny"
    pipe = jobs.load_model(c)
    for sampler, invariant in (("DDIM", True), ("Euler a", True), ("Euler a", False)):
        for n in (1, 8):
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            images = pipe.text2img(["a red circle", "a blue square", "a green triangle", "x", "y", "z", "u"],
                                   num_inference_steps=3, height=32, width=32, sampler=sampler, mesh=mesh,
                                   batch_invariant=invariant)
            np.save(f"{out}/{{sampler}}-{{invariant}}-{{n}}.npy", images)
"""


def test_one_and_eight_devices_give_the_same_images(tmp_path):
    """batch_invariant: bit-identical. Batched (the default): the same up to float rounding, 1/255 at most."""
    run_python(GENERATE.format(out=tmp_path), devices=8)
    for sampler, invariant in (("DDIM", True), ("Euler a", True), ("Euler a", False)):
        one, eight = (np.load(tmp_path / f"{sampler}-{invariant}-{n}.npy") for n in (1, 8))
        assert one.shape == (7, 32, 32, 3) and one.std() > 5
        if invariant:
            np.testing.assert_array_equal(one, eight)
        else:
            diff = np.abs(one.astype(int) - eight.astype(int))
            assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


JOB = """
    import jax
    {init}
    from sdjax import jobs
    from configs import sample
    c = sample.get_config()
    c.variant, c.prompts_file, c.output_dir = "tiny", "{prompts}", "{out}"
    c.steps, c.height, c.width, c.batch_size, c.num_images_per_prompt = 2, 32, 32, 8, 2
    c.batch_invariant = True
    jobs.run(c)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_job_writes_the_same_files_as_one(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a shape number {k}" for k in range(5)) + "\n")
    run_python(JOB.format(init="", prompts=prompts, out=tmp_path / "one"), devices=8)
    port = free_port()
    procs = []
    for pid in range(2):
        init = (f'jax.config.update("jax_cpu_collectives_implementation", "gloo"); '
                f'jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id={pid})')
        procs.append(run_python(JOB.format(init=init, prompts=prompts, out=tmp_path / "two"), devices=4,
                                background=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    one = sorted(f.name for f in (tmp_path / "one").glob("*.png"))
    assert len(one) == 11  # 10 images + grid
    assert sorted(f.name for f in (tmp_path / "two").glob("*.png")) == one
    for name in one:
        a = np.asarray(Image.open(tmp_path / "one" / name))
        b = np.asarray(Image.open(tmp_path / "two" / name))
        np.testing.assert_array_equal(a, b)
        if name != "grid.png":
            assert Image.open(tmp_path / "two" / name).text["parameters"].startswith("a shape number")
