"""End-to-end runs of train.py on tiny models, CPU: one device, a (data=2, fsdp=4) mesh on 8 fake devices,
two processes (gloo), kill and resume, preemption, NaN, fine-tuning a diffusers checkpoint that diffusers
loads back, and the two-stage from-scratch recipe (autoencoder, then text encoder + UNet).

Subprocesses share a persistent XLA compilation cache, so a program compiles once per test session.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every run: 64 shapes at 32 px, 2 warm-up steps (so runs of different lengths share their first steps).
# Adam's eps is raised from 1e-8: some parameters of the tiny UNet have analytically zero gradients (a conv
# bias followed by a one-channel-per-group GroupNorm), and Adam turns their round-off into +-lr steps, which
# a change of device layout (reduction order) changes; at 1e-4 round-off stays round-off.
COMMON = ["--config.log_every=1", "--config.progress_bar=False", "--config.optimizer.warmup_steps=2",
          "--config.optimizer.kwargs.eps=1e-4", "--config.data.shapes_length=64", "--config.checkpoint.keep=20",
          "--config.export.formats=()"]
# Unoptimised XLA code: compiles ~30% faster, which is what these short runs spend their time on.
XLA_FLAGS = "--xla_backend_optimization_level=0"


def shared_root(tmp_path_factory) -> Path:
    """A folder all pytest-xdist workers of this session share (the session's base temp dir otherwise)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared(tmp_path_factory, name: str, make) -> Path:
    """`make(folder)` once per session, whichever xdist worker asks first; the others wait and reuse it."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / "DONE").exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            (folder / "DONE").touch()
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = shared_root(tmp_path_factory) / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


def run_env(cache_dir, devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_PLATFORMS="cpu", **extra)
    env["XLA_FLAGS"] = XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    return env


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """tests.tiny_models' tiny SD 1.x diffusers folder: every fine-tuning run here starts from it."""
    from tests.tiny_models import tiny_diffusers_folder

    return shared(tmp_path_factory, "sd1", lambda folder: tiny_diffusers_folder(folder, "sd1")) / "tiny-sd1"


def train_command(workdir, *args, config: str = "tiny") -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{config}.py"),
            f"--config.workdir={workdir}", *COMMON, *args]


def train(workdir, *args, env, config: str = "tiny", timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(workdir, *args, config=config), env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run logs some steps twice: the last one counts)."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def checkpoint_state(workdir, step: int) -> dict[str, np.ndarray]:
    """The saved train state of `step` as {path: numpy array}, whatever devices wrote it."""
    path = Path(workdir) / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    restored = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


def assert_states_close(a: dict, b: dict, rtol: float):
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("['params']") or key.startswith("['ema']"):
            scale = max(float(np.max(np.abs(b[key]))), 1e-6)
            err = float(np.max(np.abs(a[key].astype(np.float64) - b[key]))) / scale
            assert err <= rtol, f"{key}: max relative error {err:.2e}"


def checkpoints(workdir) -> list[int]:
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------------------------
# One device, 8 devices, two processes
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir, tiny_sd1):
    """The uninterrupted single-device fine-tuning run: 6 steps, checkpoints after 3 and 6, exported."""
    return shared(tmp_path_factory, "reference", lambda workdir: train(
        workdir, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=6", "--config.checkpoint.every=3",
        "--config.export.formats=('diffusers', 'single_file')", env=run_env(cache_dir)))


@pytest.fixture(scope="session")
def mesh8(tmp_path_factory, cache_dir, tiny_sd1):
    """3 steps on a (data=2, fsdp=4) mesh of 8 fake CPU devices, one process."""
    return shared(tmp_path_factory, "mesh8", lambda workdir: train(
        workdir, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=3", "--config.mesh.data=2",
        "--config.mesh.fsdp=4", env=run_env(cache_dir, devices=8)))


def test_tiny_run_writes_metrics_checkpoints_and_tensorboard(reference):
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert {"loss", "lr", "grad_norm", "images_per_s", "step_time_s"} <= set(row)
        assert np.isfinite(row["loss"]) and row["images_per_s"] > 0
    assert rows[0]["lr"] == 0 and rows[-1]["lr"] == pytest.approx(1e-3)  # linear warm-up over 2 steps
    assert checkpoints(reference) == [3, 6]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((reference / "config.json").read_text())
    assert config["model"]["init_from"].endswith("tiny-sd1") and config["num_steps"] == 6


def test_fsdp_mesh_on_8_devices_matches_one_device(reference, mesh8):
    ref, got = losses(reference), losses(mesh8)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    assert_states_close(checkpoint_state(mesh8, 3), checkpoint_state(reference, 3), rtol=1e-5)


def test_cpu_devices_splits_the_cpu_and_matches_one_device(tmp_path, cache_dir, tiny_sd1, reference):
    result = train(tmp_path / "cpu2", f"--config.model.init_from={tiny_sd1}", "--config.num_steps=2",
                   "--config.mesh.cpu_devices=2", env=run_env(cache_dir))
    assert "over 2 cpu device(s)" in result.stderr
    ref, got = losses(reference), losses(tmp_path / "cpu2")
    for step in (1, 2):
        assert got[step] == pytest.approx(ref[step], rel=1e-5)


def test_two_processes_match_one_process_on_8_devices(tmp_path, cache_dir, tiny_sd1, mesh8):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = run_env(cache_dir, devices=4)
    workdir = tmp_path / "run"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = [subprocess.Popen(
        train_command(workdir, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=3", "--config.mesh.data=2",
                      "--config.mesh.fsdp=4",
                      "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                      "--config.distributed.cpu_collectives=gloo"),
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logs[i], "w")) for i in range(2)]  # files: no pipe stalls
    for p in procs:
        p.wait(timeout=400)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    ref, got = losses(mesh8), losses(workdir)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    assert_states_close(checkpoint_state(workdir, 3), checkpoint_state(mesh8, 3), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Kill and resume, preemption, NaN
# ---------------------------------------------------------------------------------------------------------

def wait_for(predicate, proc, what: str, timeout: float = 300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}"
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_killed_run_resumes_with_the_same_losses_and_parameters(tmp_path, cache_dir, tiny_sd1, reference):
    env = run_env(cache_dir)
    args = (f"--config.model.init_from={tiny_sd1}", "--config.num_steps=6", "--config.checkpoint.every=2")
    proc = subprocess.Popen(train_command(tmp_path, *args), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "metrics.jsonl"
        wait_for(lambda: (tmp_path / "checkpoints" / "2").is_dir() and metrics.exists() and max(losses(tmp_path)) >= 3,
                 proc, "checkpoint 2 and step 3")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(tmp_path))
    assert killed_at < 6, "the run finished before it could be killed"
    result = train(tmp_path, *args, env=env)
    assert "resumed from" in result.stderr
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-6)
    assert_states_close(checkpoint_state(tmp_path, 6), checkpoint_state(reference, 6), rtol=1e-6)


@pytest.fixture
def train_module(monkeypatch, cache_dir):
    """train.py imported in this process, with the persistent compilation cache on."""
    from jax._src import compilation_cache

    monkeypatch.syspath_prepend(str(ROOT))
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    compilation_cache.reset_cache()
    import train

    yield train
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()


def tiny_config(workdir, **overrides):
    from tests.test_training import load_config

    return load_config("tiny", **{"workdir": str(workdir), "log_every": 1, "progress_bar": False,
                                  "optimizer.warmup_steps": 2, "data.shapes_length": 64, "checkpoint.keep": 20,
                                  "export.formats": (), **overrides})


def fake_train_step(nan_at: int | None = None):
    """A stand-in for training.make_train_step: cheap to compile; loss 1/step, NaN at step `nan_at`."""
    def make(graphdefs, loss_fn, tx, schedules, **kwargs):
        def step(state, frozen, batch):
            n = state["step"] + 1
            loss = 1.0 / n.astype(jnp.float32)
            if nan_at is not None:
                loss = jnp.where(n == nan_at, jnp.nan, loss)
            params = jax.tree.map(lambda p: p + 1e-3, state["params"])
            return dict(state, step=n, params=params), {"loss": loss, "grad_norm": jnp.float32(1), "lr": jnp.float32(0)}
        return step
    return make


def test_nan_loss_stops_with_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch, train_module, tiny_sd1):
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step(nan_at=3))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 .*learning_rate"):
        train_module.main(tiny_config(tmp_path, num_steps=6, **{"checkpoint.every": 1, "model.init_from": str(tiny_sd1)}))
    assert checkpoints(tmp_path) == [1, 2]
    assert sorted(losses(tmp_path)) == [1, 2]


def test_sigterm_saves_the_current_step_and_the_restart_continues(tmp_path, monkeypatch, train_module, tiny_sd1):
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    calls = []
    host_batch_to_global = train_module.sharding.host_batch_to_global

    def batch_then_sigterm(mesh, local):  # the 3rd batch read: the loop is in step 2
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return host_batch_to_global(mesh, local)

    monkeypatch.setattr(train_module.sharding, "host_batch_to_global", batch_then_sigterm)
    config = tiny_config(tmp_path, num_steps=5, **{"checkpoint.every": 100, "model.init_from": str(tiny_sd1)})
    result = train_module.main(config)
    assert result["preempted"] and result["step"] == 2
    assert checkpoints(tmp_path) == [2]  # saved on SIGTERM, not by the schedule
    monkeypatch.setattr(train_module.sharding, "host_batch_to_global", host_batch_to_global)
    sampled = []

    def sample_fn(modules, prompts, seed):  # previews get the EMA modules
        sampled.append(sorted(modules))
        return np.full((len(prompts), 8, 8, 3), 200, np.uint8)

    config.preview_every = 2
    result = train_module.main(config, sample_fn=sample_fn)
    assert not result["preempted"] and result["step"] == 5 and checkpoints(tmp_path) == [2, 5]
    assert losses(tmp_path) == {s: pytest.approx(1 / s) for s in range(1, 6)}
    assert sampled == [["text_encoder", "unet", "vae"]]  # step 4
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["step_0000004.png"]


def test_benchmark_reports_speed_and_memory(train_module, tmp_path, monkeypatch, tiny_sd1):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "_train_module", lambda: train_module)  # with the cheap step: the plumbing is tested
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    config = tiny_config(tmp_path / "bench", **{"model.init_from": str(tiny_sd1)})
    result = bench.benchmark(config, steps=2, warmup=1)
    assert result["timed_steps"] == 2 and result["images_per_s"] > 0 and result["step_time_s"] > 0
    assert result["peak_host_memory_gib"] > 0 and result["batch_size"] == 8


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning a diffusers checkpoint; the two-stage from-scratch recipe
# ---------------------------------------------------------------------------------------------------------

def test_finetune_diffusers_checkpoint_lowers_the_loss_and_exports_for_diffusers(reference, tiny_sd1):
    got = losses(reference)
    assert np.mean([got[5], got[6]]) < 0.75 * np.mean([got[1], got[2]]), got

    import torch
    from diffusers import StableDiffusionPipeline

    export = reference / "export"
    pipe = StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None, requires_safety_checker=False)
    original = StableDiffusionPipeline.from_pretrained(str(tiny_sd1), safety_checker=None,
                                                       requires_safety_checker=False)
    trained_w, original_w = pipe.unet.conv_in.weight.detach(), original.unet.conv_in.weight.detach()
    assert trained_w.shape == original_w.shape and not torch.allclose(trained_w, original_w)
    torch.testing.assert_close(pipe.vae.encoder.conv_in.weight, original.vae.encoder.conv_in.weight)  # frozen
    original_text = original.text_encoder.state_dict()
    for key, value in pipe.text_encoder.state_dict().items():  # frozen too
        torch.testing.assert_close(value, original_text[key])
    ema = checkpoint_state(reference, 6)["['ema']['unet']['conv_in']['kernel']"]  # the export is the EMA
    np.testing.assert_allclose(trained_w.numpy().transpose(2, 3, 1, 0), ema, rtol=1e-6, atol=1e-7)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()

    import sdjax

    single = sdjax.load_pretrained(export / "model.safetensors")
    np.testing.assert_allclose(np.asarray(single.unet.conv_in.kernel), ema, rtol=1e-6, atol=1e-7)


def test_autoencoder_then_text_encoder_and_unet_from_scratch(tmp_path, cache_dir):
    import sdjax
    from sdjax.weights import diffusers_folder
    from sdjax.weights.safetensors_io import read_safetensors

    env = run_env(cache_dir)
    train(tmp_path / "ae", "--config.num_steps=2", "--config.checkpoint.every=0", "--config.export.formats=('vae',)",
          config="train_autoencoder", env=env)
    vae_dir = tmp_path / "ae" / "export" / "vae"
    vae_config = diffusers_folder.read_json(vae_dir / "config.json")
    assert vae_config["_class_name"] == "AutoencoderKL" and vae_config["scaling_factor"] != 0.18215
    train(tmp_path / "ldm", f"--config.model.init_from={tmp_path / 'ae'}", "--config.num_steps=2",
          "--config.checkpoint.every=0", "--config.export.formats=('diffusers',)", config="train_scratch", env=env)
    rows = losses(tmp_path / "ldm")
    assert sorted(rows) == [1, 2] and all(np.isfinite(v) for v in rows.values())
    pipe = sdjax.load_pretrained(tmp_path / "ldm" / "export")
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_config["scaling_factor"])
    trained_vae = read_safetensors(vae_dir / "diffusion_pytorch_model.safetensors")
    exported_vae = read_safetensors(tmp_path / "ldm" / "export" / "vae" / "diffusion_pytorch_model.safetensors")
    for key in trained_vae:  # the VAE stays frozen in stage 2
        np.testing.assert_array_equal(exported_vae[key], trained_vae[key])
