"""Batch invariance: the same images in batches of 1, 3 and 8 on 1 and 8 (fake CPU) devices; and sample.py started
as documented for several hosts (--config.distributed=True, one process per host under a cluster launcher, here
SLURM's variables on 127.0.0.1 with gloo collectives): the files of a one-process run, and a resumed re-run where
only process 0's disk holds the images already written."""
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tests.test_train_script import tiny_sd1  # noqa: F401 (fixture: the session's tiny SD 1.x folder)

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *, devices: int):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


GENERATE = """
    import jax, numpy as np
    from sdjax import jobs
    from configs import sample
    c = sample.get_config()
    c.checkpoint = "{checkpoint}"  # the tiny SD 1.x folder with one layer per block: quicker to compile than "tiny"
    pipe = jobs.load_model(c)
    prompts = ["a red circle", "a blue square", "a green triangle", "x", "y", "z", "u", "v"]
    for invariant in (True, False):  # the default program: batch 1 against 8, 1 device against 8
        for n, sizes in ((1, (1, 3, 8) if invariant else (1, 8)), (8, (8,))):  # 8 devices pad a batch of 1 or 3 to 8
            mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
            for size in sizes:
                images = []
                for start in range(0, 8, size):
                    idx = list(range(start, min(start + size, 8)))
                    padded = idx + [idx[-1]] * (size - len(idx))  # a fixed batch shape, as sample.py
                    out = pipe.text2img([prompts[i] for i in padded], indices=padded, seeds=[7 + i for i in padded],
                                        num_inference_steps=3,
                                        height=32, width=32, sampler="Euler a", mesh=mesh, batch_invariant=invariant)
                    images.append(out[:len(idx)])
                np.save(f"{out_dir}/{{invariant}}-{{n}}-{{size}}.npy", np.concatenate(images))
    from sdjax import variants
    xl = variants.get("tiny_sdxl").pipeline(seed=0)  # random weights: the same program as a loaded SDXL
    for n in (1, 8):
        mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
        out = xl.text2img(prompts, seeds=[7 + i for i in range(8)], num_inference_steps=2, height=32, width=32,
                          guidance_scale=5.0, mesh=mesh, batch_invariant=True)
        np.save(f"{out_dir}/sdxl-{{n}}.npy", out)
"""


def test_batch_size_and_device_count_do_not_change_the_images(tmp_path, tiny_sd1):
    """Image k is a function of its prompt, seed and index alone (each image has its own seed here):
    batch_invariant=True: bit-identical for batch sizes 1, 3, 8 on 1 and 8 devices. The default batched program: the
    same up to float rounding, at most 1/255 (the README's claim), for batches of 1 and 8 and on 1 and 8 devices.
    SDXL (its two encoders, size ids, zeros as the unconditional context), batch_invariant=True: a batch of 8 on 8
    devices bit-identical to it on 1 (measured without batch_invariant: at most 1/255 too)."""
    run_python(GENERATE.format(out_dir=tmp_path, checkpoint=tiny_sd1), devices=8)
    for invariant in (True, False):
        ref = np.load(tmp_path / f"{invariant}-1-8.npy").astype(int)
        assert ref.shape == (8, 32, 32, 3) and ref.std() > 5
        assert all(not np.array_equal(ref[0], ref[k]) for k in range(1, 8))
        for n, size in ((1, 1), (1, 3), (8, 8)) if invariant else ((1, 1), (8, 8)):
            diff = np.abs(np.load(tmp_path / f"{invariant}-{n}-{size}.npy").astype(int) - ref)
            print(f"batch_invariant={invariant}, {n} device(s), batches of {size}: max diff {diff.max()}, "
                  f"{(diff > 0).mean():.5f} of values differ")
            if invariant:
                assert diff.max() == 0, (n, size)
            else:
                assert diff.max() <= 1, (n, size)
    one, eight = (np.load(tmp_path / f"sdxl-{n}.npy") for n in (1, 8))  # SDXL (tiny, random weights)
    assert one.shape == (8, 32, 32, 3) and one.std() > 5 and not np.array_equal(one[0], one[1])
    np.testing.assert_array_equal(eight, one)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_py(flags, *, devices: int, log: Path, env_extra: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               **(env_extra or {}))
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "sample.py", "--config", "configs/sample.py", *flags], env=env,
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True)


def wait_all(procs: list, logs: list, *, timeout: float = 600, rc: int = 0) -> list[str]:
    """Wait for every process to exit with `rc`; on another exit code or the timeout kill the others (no
    orphans) and fail."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, rc) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [Path(log).read_text() for log in logs]
    for k, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == rc, f"process {k}: rc {p.returncode} (-9: killed: a sibling failed, or timeout)\n{out}"
    return outputs


def two_hosts(flags, tmp_path: Path, run: str, *, devices: int = 2, rc: int = 0) -> list[str]:
    """sample.py as on two hosts, each with its own (unshared) disk: --config.distributed=True with SLURM's
    variables as srun sets them (one task per host); process k writes under host{k}/ and keeps its compiled
    programs in cache{k}/ (a re-run loads them); returns their logs."""
    port = free_port()
    procs, logs = [], []
    try:
        for k in range(2):
            env = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2", SLURM_PROCID=str(k),
                       SLURM_LOCALID="0", JAX_COORDINATOR_PORT=str(port), JAX_COMPILATION_CACHE_DIR=str(
                           tmp_path / f"cache{k}"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
            logs.append(tmp_path / f"{run}-{k}.log")
            host_flags = flags[k] if isinstance(flags, tuple) else flags
            procs.append(sample_py([*host_flags, "--config.distributed=True",
                                    f"--config.output_dir={tmp_path / f'host{k}'}"], devices=devices, log=logs[-1],
                                   env_extra=env))
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return wait_all(procs, logs, rc=rc)


def pngs(folder: Path) -> dict:
    return {f.name: np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))}


def test_two_hosts_write_the_one_process_files_and_resume_from_process_0s_disk(tmp_path, tiny_sd1):
    """The re-run also has process 0 load its program from its compilation cache while process 1 compiles: the
    pipeline waits for every process before running a new program. With a tiny diffusers folder: loading it is
    quicker than initialising --config.variant=tiny at random in each of the 4 processes."""
    checkpoint = tiny_sd1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a shape number {k}" for k in range(5)) + "\n")
    flags = [f"--config.checkpoint={checkpoint}", f"--config.prompts_file={prompts}", "--config.steps=2",
             "--config.height=32", "--config.width=32", "--config.batch_size=8", "--config.num_images_per_prompt=2",
             "--config.batch_invariant=True"]
    from configs import sample as sample_config
    from sdjax import jobs

    config = sample_config.get_config()  # the one-process run, here in-process on 1 device: with batch_invariant
    config.update(checkpoint=str(checkpoint), prompts_file=str(prompts), steps=2, height=32, width=32, batch_size=8,
                  num_images_per_prompt=2, batch_invariant=True, output_dir=str(tmp_path / "one"))
    jobs.run(config)  # the images of any device count (test above), so those of 4 devices in 2 processes
    one = pngs(tmp_path / "one")
    assert len(one) == 11  # 10 images + grid

    first = two_hosts(flags, tmp_path, "first")
    assert "10 images (0 already in" in first[0] and "batches of 8 on 4 device(s)" in first[0]
    assert not (tmp_path / "host1").exists()  # process 0 alone writes
    two = pngs(tmp_path / "host0")
    assert two.keys() == one.keys()
    for name in one:
        np.testing.assert_array_equal(two[name], one[name])
        if name != "grid.png":
            assert Image.open(tmp_path / "host0" / name).text["parameters"].startswith("a shape number")

    # Killed after 8 images: process 0's disk has them, process 1's has none. Both must run the 2 left, together.
    missing = sorted(name for name in one if name != "grid.png")[3::5]
    for name in missing:
        (tmp_path / "host0" / name).unlink()
    second = two_hosts(flags, tmp_path, "second")
    assert "10 images (8 already in" in second[0]
    assert pngs(tmp_path / "host0").keys() == one.keys() and not (tmp_path / "host1").exists()
    for name in missing:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "host0" / name)), one[name])


def test_hosts_given_different_jobs_stop_with_a_config_error(tmp_path):
    """Checked before the model is built: every process names the mismatch, none waits in a collective."""
    (tmp_path / "p.txt").write_text("a red circle\n")
    flags = ["--config.variant=tiny", f"--config.prompts_file={tmp_path / 'p.txt'}"]
    logs = two_hosts(tuple([*flags, f"--config.seed={k}"] for k in range(2)), tmp_path, "run", devices=1, rc=2)
    for log in logs:
        assert log.strip().splitlines()[-1] == ("sample.py: error: the 2 processes were given different jobs "
                                                "(prompts, num_images_per_prompt, seed or negative prompt differ "
                                                "between hosts)")
