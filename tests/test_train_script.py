"""End-to-end runs of train.py on tiny models, CPU: one device, two CPU devices, a (data=2, fsdp=4) mesh of 8 fake
devices over two processes (gloo), kill and resume, preemption, NaN, fine-tuning a diffusers checkpoint that diffusers
loads back. The two-stage from-scratch recipe (autoencoder, then text encoder + UNet) is tests/test_shapes_demo.py.

Subprocesses share a persistent XLA compilation cache, so a program compiles once per test session.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
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
# Every run: 64 shapes at 32 px, 2 warm-up steps (so runs of different lengths share their first steps), the
# config's AdamW (eps 1e-8).
COMMON = ["--config.log_every=1", "--config.progress_bar=False", "--config.optimizer.warmup_steps=2",
          "--config.data.shapes_length=64", "--config.checkpoint.keep=20", "--config.export.formats=()"]


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
def cache_dir():
    """The session's persistent compilation cache (tests/conftest.py), shared with every subprocess."""
    from tests.conftest import compilation_cache_dir

    return Path(compilation_cache_dir())


def run_env(cache_dir, devices: int | None = None, **extra) -> dict:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_PLATFORMS="cpu", **extra)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory) -> Path:
    """tests.tiny_models' tiny SD 1.x diffusers folder (one layer per block, two resolutions: a train step compiles in
    13 s, not 19 s with three; two channels per GroupNorm group, so that every trained parameter has a gradient
    and one device and several give the same train state at AdamW's eps 1e-8): every fine-tuning and sampling run
    of the plumbing tests starts from it."""
    from tests.tiny_models import tiny_diffusers_folder

    return shared(tmp_path_factory, "sd1", lambda folder: tiny_diffusers_folder(
        folder, "sd1", layers_per_block=1, levels=2, norm_num_groups=16)) / "tiny-sd1"


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
# One device, two devices, two processes
# ---------------------------------------------------------------------------------------------------------

# The tests that compare with `reference` run on one xdist worker: the other need not wait for it to be built.
ON_THE_REFERENCE_WORKER = pytest.mark.xdist_group("reference")


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cache_dir, tiny_sd1):
    """The uninterrupted single-device fine-tuning run: 6 steps, checkpoints after 3 and 6, exported; its log in
    stderr.txt."""
    def run(workdir):
        result = train(workdir, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=6",
                       "--config.checkpoint.every=3", "--config.export.formats=('diffusers', 'single_file')",
                       env=run_env(cache_dir))
        (workdir / "stderr.txt").write_text(result.stderr)

    return shared(tmp_path_factory, "reference", run)


@ON_THE_REFERENCE_WORKER
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


@ON_THE_REFERENCE_WORKER
def test_cpu_devices_splits_the_cpu_and_matches_one_device(tmp_path, cache_dir, tiny_sd1, reference):
    """The README's claim, at the config's AdamW settings: mesh.cpu_devices=2 gives the single-device reference
    run's losses to 1e-6 over 6 steps and its train state (parameters and EMA) to 1e-5 (measured: 1.1e-7 and
    6.5e-7)."""
    two = train(tmp_path, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=6", "--config.mesh.cpu_devices=2",
                "--config.checkpoint.every=6", env=run_env(cache_dir))
    assert "over 2 cpu device(s)" in two.stderr
    assert "over 1 cpu device(s)" in (reference / "stderr.txt").read_text()
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4, 5, 6] and ref[6] < 0.8 * ref[1]  # it trained
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6)
    assert_states_close(checkpoint_state(tmp_path, 6), checkpoint_state(reference, 6), rtol=1e-5)


@contextlib.contextmanager
def kill_on_exit(procs):
    """Kill every process still running when the block ends (a failure or time-out of one leaves no orphans)."""
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@ON_THE_REFERENCE_WORKER
def test_fsdp_over_two_processes_matches_one_device(tmp_path, cache_dir, tiny_sd1, reference):
    """A (data=2, fsdp=2) mesh over 4 devices, 2 in each of two processes (gloo): each device holds about half the
    train state (train.py's log), and the losses of steps 1-3 and the train state of step 3 are the single-device
    reference run's (1e-5). (2 devices a process, not 4: the same sharding across and within processes, with half the
    device threads on a 2-core machine.) Single-process data parallelism is
    test_cpu_devices_splits_the_cpu_and_matches_one_device."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = run_env(cache_dir, devices=2)
    workdir = tmp_path / "run"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    # The README's two ways to start: process 0 through the environment, process 1 through the config.
    starts = [(["--config.distributed.cpu_collectives=gloo"],
               {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}),
              (["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
                "--config.distributed.cpu_collectives=gloo"], {})]
    procs = [subprocess.Popen(
        train_command(workdir, f"--config.model.init_from={tiny_sd1}", "--config.num_steps=3", "--config.mesh.data=2",
                      "--config.mesh.fsdp=2", *args),
        env={**env, **extra}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logs[i], "w"))  # files: no pipe stalls
        for i, (args, extra) in enumerate(starts)]
    with kill_on_exit(procs):
        for p in procs:
            p.wait(timeout=400)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    held, whole = map(float, re.search(r"train state: ([\d.]+) MB on each device of ([\d.]+) MB \(mesh.fsdp=2\)",
                                       logs[0].read_text()).groups())
    assert held < 0.6 * whole, (held, whole)  # about half: the arrays too small to split stay whole
    ref, got = losses(reference), losses(workdir)
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    assert_states_close(checkpoint_state(workdir, 3), checkpoint_state(reference, 3), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Kill and resume, preemption, NaN
# ---------------------------------------------------------------------------------------------------------

def wait_for(predicate, proc, what: str, timeout: float = 300):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"train.py exited ({proc.returncode}) before {what}"
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


@ON_THE_REFERENCE_WORKER
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
# Fine-tuning a diffusers checkpoint
# ---------------------------------------------------------------------------------------------------------

@ON_THE_REFERENCE_WORKER
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


# ---------------------------------------------------------------------------------------------------------
# Image folders, gradient accumulation, the batch-size check (in-process: the data and the loop are the point)
# ---------------------------------------------------------------------------------------------------------

def recording(monkeypatch, train_module) -> dict:
    """Wraps train.py's make_dataset and iterate_batches: what it built and every host batch it read."""
    seen = {"datasets": [], "batches": []}
    make_dataset, iterate_batches = train_module.make_dataset, train_module.preprocess.iterate_batches

    def dataset(config):
        seen["datasets"].append(make_dataset(config))
        return seen["datasets"][-1]

    def batches(*args, **kwargs):
        for batch in iterate_batches(*args, **kwargs):
            seen["batches"].append({k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()})
            yield batch

    monkeypatch.setattr(train_module, "make_dataset", dataset)
    monkeypatch.setattr(train_module.preprocess, "iterate_batches", batches)
    return seen


def small_models(config):
    """A stand-in for training.build_models: a 2-layer conv net as the trainable "unet", nothing frozen; a real
    train step for it compiles in a second (for the 2.3M-parameter tiny SD UNet in this process: over a minute)."""
    import types

    from flax import nnx

    from sdjax import training
    from sdjax.tokenizer import default_tokenizer

    class SmallNet(nnx.Module):
        def __init__(self, rngs):
            self.conv_in = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.conv_out = nnx.Conv(8, 4, (3, 3), strides=(2, 2), rngs=rngs)

        def __call__(self, images):
            return self.conv_out(jnp.tanh(self.conv_in(images)))

    graphdefs, states = training.split_modules({"unet": SmallNet(nnx.Rngs(config.seed))})
    return training.Models(graphdefs, states, None, default_tokenizer(), {},
                           types.SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_scaling=(1.0, 0.0)))


def image_mean_train_step(graphdefs, loss_fn, tx, schedules, **kwargs):
    """A cheap stand-in for training.make_train_step whose loss is the mean pixel of the batch it was given."""
    def step(state, frozen, batch):
        assert batch["input_ids"].shape == (batch["images"].shape[0], 77)  # captions were tokenized
        return dict(state, step=state["step"] + 1), {"loss": jnp.mean(batch["images"]), "grad_norm": jnp.float32(1),
                                                     "lr": jnp.float32(0)}
    return step


def write_png(path, color, size=(40, 48)):
    from PIL import Image

    Image.fromarray(np.full((*size, 3), color, np.uint8)).save(path)


def truncated_jpeg(path):
    """A JPEG cut in half: its header reads (indexing keeps it), its pixels do not (skipped when first read)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def finetune_config(workdir, data_path, **overrides):
    """configs/finetune_sd15.py (the README's fine-tuning command) on `data_path` at 32 px, 4 images a step."""
    from tests.test_training import load_config

    return load_config("finetune_sd15", **{"workdir": str(workdir), "data.path": str(data_path),
                                           "data.resolution": 32, "batch_size": 4,
                                           "num_steps": 3, "log_every": 1, "progress_bar": False,
                                           "export.formats": (), **overrides})


def test_finetune_on_a_folder_of_pngs_and_txt_captions(tmp_path, monkeypatch, train_module):
    """configs/finetune_sd15.py on a folder: 3 steps read the images and their .txt captions into the compiled
    step; an unreadable PNG is skipped when indexing, a truncated JPEG when first read, and both are counted in
    metrics.jsonl; an image without a caption stops the run (missing_caption='error', the default) or trains with
    caption "" (missing_caption='empty'). The data is the point: small stand-in models and a step whose loss is
    the mean pixel of its batch (the real step on real models: the `reference` run)."""
    data = tmp_path / "images"
    data.mkdir()
    colors = {"a_red": (255, 0, 0), "b_green": (0, 255, 0), "c_blue": (0, 0, 255), "e_gray": (90, 90, 90)}
    for name, color in colors.items():
        write_png(data / f"{name}.png", color)
        (data / f"{name}.txt").write_text(f"a {name[2:]} square\n")
    (data / "d_corrupt.png").write_bytes(b"not a png")
    (data / "d_corrupt.txt").write_text("never read")
    truncated_jpeg(data / "f_truncated.jpg")
    (data / "f_truncated.txt").write_text("never read either")
    write_png(data / "g_uncaptioned.png", (255, 255, 0), size=(48, 40))
    monkeypatch.setattr(train_module.training, "build_models", small_models)
    monkeypatch.setattr(train_module.training, "make_train_step", image_mean_train_step)

    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no caption: g_uncaptioned\.png.*missing_caption"):
        train_module.main(finetune_config(tmp_path / "strict", data))
    assert not (tmp_path / "strict" / "checkpoints").exists()

    seen = recording(monkeypatch, train_module)
    result = train_module.main(finetune_config(tmp_path / "run", data, **{"data.missing_caption": "empty"}))
    assert result["step"] == 3 and checkpoints(tmp_path / "run") == [3]
    (dataset,) = seen["datasets"]
    assert dataset.file_names == ["a_red.png", "b_green.png", "c_blue.png", "e_gray.png", "f_truncated.jpg",
                                  "g_uncaptioned.png"]
    assert dict(dataset.skipped).keys() == {"d_corrupt.png", "f_truncated.jpg"}
    captions = {"": 0, **{f"a {name[2:]} square": 0 for name in colors}}
    for batch in seen["batches"]:
        assert batch["images"].shape == (4, 32, 32, 3)
        for caption in batch["captions"]:
            captions[caption] += 1  # only these captions (or "" from caption_dropout); never the truncated one's
    assert len(seen["batches"]) == 3 and captions[""] >= 1 and sum(captions.values()) == 12
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["skipped_images"] == 2
    for row, batch in zip(rows, seen["batches"]):  # the loss is the mean pixel of the batch the step received
        assert row["loss"] == pytest.approx(float(np.mean(batch["images"])), rel=1e-5, abs=1e-6)


def test_finetune_on_a_metadata_jsonl_folder(tmp_path, monkeypatch, train_module):
    """The metadata.jsonl layout, with data.caption_column: captions come from it; a listed file that is not there
    and an unreadable one are skipped and counted."""
    data = tmp_path / "images"
    (data / "train").mkdir(parents=True)
    rows = []
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        write_png(data / "train" / f"{i}.png", color)
        rows.append({"file_name": f"train/{i}.png", "prompt": f"picture {i}", "text": "not this column"})
    (data / "train" / "bad.png").write_bytes(b"garbage")
    rows += [{"file_name": "train/bad.png", "prompt": "bad"}, {"file_name": "gone.png", "prompt": "gone"}]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(train_module.training, "build_models", small_models)
    monkeypatch.setattr(train_module.training, "make_train_step", image_mean_train_step)
    seen = recording(monkeypatch, train_module)
    train_module.main(finetune_config(tmp_path / "run", data, num_steps=2,
                                      **{"data.caption_column": "prompt", "data.caption_dropout": 0.0}))
    (dataset,) = seen["datasets"]
    assert dataset.file_names == ["train/0.png", "train/1.png", "train/2.png"]
    assert sorted(dict(dataset.skipped)) == ["gone.png", "train/bad.png"]
    for batch in seen["batches"]:
        assert batch["captions"] == [f"picture {i}" for i in batch["indices"]]
        for image, i in zip(batch["images"], batch["indices"]):  # each image is its own file's (a flat colour)
            np.testing.assert_allclose(image[0, 0], np.eye(3)[i] * 2 - 1, atol=1e-6)
    assert [json.loads(line)["skipped_images"] for line in (tmp_path / "run" / "metrics.jsonl").open()] == [2, 2]


def deterministic_loss_fn(config, **kwargs):
    """A loss with no noise and no timestep draw: the mean over the rows of a function of each row, so that the
    same rows split into other batches give the same mean gradient."""
    def loss_fn(modules, batch, rng):
        del rng
        out = modules["unet"](batch["images"])
        return jnp.mean(jnp.mean((out - 0.3) ** 2, axis=(1, 2, 3))), {}
    return loss_fn


def test_grad_accumulation_of_4_batches_of_2_is_one_step_of_8(tmp_path, monkeypatch, train_module):
    """grad_accum_steps=4 at batch_size=2 vs batch_size=8 in one step: micro-batches 4k..4k+3 are the rows of big
    batch k (the data order numbers samples, not batches), and 3 updates (the first at lr 0: warm-up) leave the
    same parameters, EMA (decay 0.99 with warm-up) and logged losses to fp32 round-off; clipping is on
    (grad_clip_norm below the gradient norm: clipping each micro-batch instead of their mean would differ).
    train.py's loop, data, optimizer (the config's AdamW, eps 1e-8, and schedule), train step and EMA, with a small
    net and a deterministic loss: with the diffusion objective train.py draws noise and timesteps per micro-step
    (fold_in(seed, micro-step) over its rows), so there the two differ by their random draws."""
    monkeypatch.setattr(train_module.training, "build_models", small_models)
    monkeypatch.setattr(train_module.training, "make_loss_fn", deterministic_loss_fn)
    seen = recording(monkeypatch, train_module)
    overrides = {"num_steps": 3, "optimizer.grad_clip_norm": 1e-3, "checkpoint.every": 1}
    train_module.main(tiny_config(tmp_path / "accum", batch_size=2, **{"optimizer.grad_accum_steps": 4}, **overrides))
    micro = seen["batches"][:]
    seen["batches"].clear()
    train_module.main(tiny_config(tmp_path / "big", batch_size=8, **overrides))
    big = seen["batches"]
    assert len(micro) == 12 and len(big) == 3
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([b["indices"] for b in micro[4 * k:4 * k + 4]]), big[k]["indices"])
        np.testing.assert_array_equal(np.concatenate([b["images"] for b in micro[4 * k:4 * k + 4]]), big[k]["images"])
    assert len({tuple(b["indices"]) for b in big}) == 3  # three different batches
    assert checkpoints(tmp_path / "accum") == [4, 8, 12] and checkpoints(tmp_path / "big") == [1, 2, 3]
    initial = checkpoint_state(tmp_path / "big", 1)  # update 1 is at lr 0
    for k in (2, 3):  # checkpoints are numbered by micro-step
        accum, one = checkpoint_state(tmp_path / "accum", 4 * k), checkpoint_state(tmp_path / "big", k)
        for key in one:
            if key.startswith(("['params']", "['ema']")):
                assert np.abs(one[key] - initial[key]).max() > 1e-5, key  # it trained
                np.testing.assert_allclose(accum[key], one[key], rtol=1e-5, atol=1e-7, err_msg=key)
    ref, got = losses(tmp_path / "big"), losses(tmp_path / "accum")
    assert sorted(got) == [1, 2, 3] and len(set(ref.values())) == 3
    for step in ref:  # the logged loss of an update is the mean over its micro-batches
        assert got[step] == pytest.approx(ref[step], rel=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "big" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 1e-2 for r in rows)  # clipping (to 1e-3) was active


def test_batch_size_error_names_the_condition_that_failed(tmp_path, monkeypatch, train_module):
    check = train_module.check_batch_size
    check(8, 4, 2)
    with pytest.raises(ValueError, match=r"^batch_size=6 must be a multiple of the 4 devices of the mesh$"):
        check(6, 4, 2)
    with pytest.raises(ValueError, match=r"^batch_size=8 must be a multiple of the 3 processes \(each reads"):
        check(8, 1, 3)
    with pytest.raises(ValueError, match=r"^batch_size=10 .* of the 4 devices of the mesh and of the 3 processes"):
        check(10, 4, 3)
    monkeypatch.setattr(jax, "process_count", lambda: 3)  # main's check: 8 images on this process's device(s)
    with pytest.raises(ValueError, match=r"^batch_size=8 must be a multiple of the 3 processes") as error:
        train_module.main(tiny_config(tmp_path))
    assert "devices" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------
# Faults: a damaged checkpoint, another model's workdir, a re-run with other settings
# ---------------------------------------------------------------------------------------------------------

def test_a_damaged_latest_checkpoint_resumes_from_the_one_before(tmp_path, monkeypatch, train_module, tiny_sd1, caplog):
    """Checkpoint 4's files are cut in half (a crash or a full disk mid-save), and a save of step 5 was killed
    midway (orbax's tmp folder): the re-run resumes from 3 with one warning, keeps the damaged one as 4.unreadable,
    and ends with the uninterrupted run's losses and parameters; the rows the lost step had logged move to
    metrics.superseded.jsonl."""
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    overrides = {"checkpoint.every": 3, "model.init_from": str(tiny_sd1)}  # checkpoints 3 and 4 (the last step)
    train_module.main(tiny_config(tmp_path / "whole", num_steps=4, **overrides))
    run = tmp_path / "run"
    train_module.main(tiny_config(run, num_steps=4, **overrides))
    damaged = [p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size]
    for path in damaged:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    leftover = run / "checkpoints" / "5.orbax-checkpoint-tmp-1733000000" / "state"  # as a kill mid-save leaves it
    leftover.mkdir(parents=True)
    (leftover / "_METADATA").write_text('{"tree_metadata": {')
    with caplog.at_level("WARNING"):
        result = train_module.main(tiny_config(run, num_steps=4, **overrides))
    warnings = [r.getMessage() for r in caplog.records if "does not read back" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("checkpoint 4 does not read back (")
    assert f"moved to {run / 'checkpoints' / '4.unreadable'}, resuming from an older one" in warnings[0]
    assert "\n" not in warnings[0] and result["step"] == 4
    assert (run / "checkpoints" / "4.unreadable").is_dir() and checkpoints(run) == [3, 4]
    assert losses(run) == losses(tmp_path / "whole")
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert [json.loads(line)["step"] for line in (run / "metrics.superseded.jsonl").read_text().splitlines()] == [4]
    whole, resumed = checkpoint_state(tmp_path / "whole", 4), checkpoint_state(run, 4)
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)


def test_a_workdir_of_another_model_is_one_line(tmp_path, monkeypatch, train_module, tiny_sd1):
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    train_module.main(tiny_config(tmp_path, num_steps=1, **{"checkpoint.every": 1, "model.init_from": str(tiny_sd1)}))
    monkeypatch.setattr(train_module.training, "build_models", small_models)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'checkpoints'} holds checkpoints of a different model \(\d+ "
                                         r"arrays, [\d,]+ values; this config's train state has \d+ arrays, [\d,]+ "
                                         r"values; first difference: .*\): use another --config.workdir, or move .* away"):
        train_module.main(tiny_config(tmp_path, num_steps=2))
    assert checkpoints(tmp_path) == [1]


def test_the_first_config_is_kept_and_a_resume_with_others_is_recorded_beside_it(tmp_path, monkeypatch,
                                                                                  train_module, tiny_sd1):
    """A run that fails its checks writes no config; a resumed run with other settings adds config.step_N.json."""
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    with pytest.raises(ValueError, match=r"^export.formats=\('diffusers', 'onnx'\): 'onnx' is not a format; choose "
                                         r"from diffusers, single_file, vae$"):
        train_module.main(tiny_config(tmp_path, **{"export.formats": ("diffusers", "onnx")}))
    with pytest.raises(ValueError, match=r"an autoencoder run trains only the VAE; export it with"):
        train_module.main(tiny_config(tmp_path, stage="autoencoder", **{"export.formats": ("diffusers",)}))
    assert not (tmp_path / "config.json").exists()
    overrides = {"checkpoint.every": 1, "model.init_from": str(tiny_sd1)}
    train_module.main(tiny_config(tmp_path, num_steps=2, **overrides))
    train_module.main(tiny_config(tmp_path, num_steps=3, **overrides))
    assert json.loads((tmp_path / "config.json").read_text())["num_steps"] == 2
    assert json.loads((tmp_path / "config.step_0000002.json").read_text())["num_steps"] == 3
    train_module.main(tiny_config(tmp_path, num_steps=3, **overrides))  # the same settings again: nothing new
    assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json", "config.step_0000002.json"]


def test_sigterm_while_compiling_saves_the_first_step(tmp_path, monkeypatch, train_module, tiny_sd1):
    """A preemption notice while the step compiles (minutes on a large model) is not lost: the first step runs,
    is saved, and the run stops; the restart continues."""
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    barrier = train_module.sharding.barrier

    def sigterm_after_compiling(name):
        if name == "compiled":
            os.kill(os.getpid(), signal.SIGTERM)
        return barrier(name)

    monkeypatch.setattr(train_module.sharding, "barrier", sigterm_after_compiling)
    handler = signal.getsignal(signal.SIGTERM)
    config = tiny_config(tmp_path, num_steps=3, **{"checkpoint.every": 100, "model.init_from": str(tiny_sd1)})
    result = train_module.main(config)
    assert result["preempted"] and result["step"] == 1 and checkpoints(tmp_path) == [1]
    monkeypatch.setattr(train_module.sharding, "barrier", barrier)
    assert train_module.main(config)["step"] == 3 and checkpoints(tmp_path) == [1, 3]
    assert signal.getsignal(signal.SIGTERM) is handler  # train.py's handler is gone after the run


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, train_module,
                                                                               tiny_sd1):
    """The error orbax raises when the disk fills (measured on a 300 KB tmpfs: ValueError RESOURCE_EXHAUSTED ...
    No space left on device [os_error_code='28']), raised by the save of step 4: an OSError that says so and names
    the intact checkpoint; a restart resumes from it."""
    import errno

    import orbax.checkpoint as ocp

    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())
    save = ocp.CheckpointManager.save

    def save_until_full(self, step, *args, **kwargs):
        if step == 4:
            raise ValueError(f"RESOURCE_EXHAUSTED: Error writing \"a/0\" in OCDBT database at local file "
                             f"\"{self.directory}/4.orbax-checkpoint-tmp/\": Failed to write 486567 bytes to file 4: "
                             f"No space left on device [os_error_code='28']")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
    config = tiny_config(tmp_path, num_steps=4, **{"checkpoint.every": 2, "model.init_from": str(tiny_sd1)})
    with pytest.raises(OSError) as error:
        train_module.main(config)
    assert error.value.errno == errno.ENOSPC
    assert error.value.strerror == (f"a checkpoint could not be written to {tmp_path / 'checkpoints'}: no space left "
                                    "on device; free some space (or lower checkpoint.keep) and restart: the run "
                                    "resumes from checkpoint 2, which is intact")
    assert checkpoints(tmp_path) == [2]
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    assert train_module.main(config)["step"] == 4 and checkpoints(tmp_path) == [2, 4]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
