"""TFDS data (`data.source=tfds`, the `data` extra, which CI installs: a missing TFDS fails here, it is not skipped).

A folder stored as a TFDS dataset by sdjax.data.tfds.folder_to_tfds (a TFDS GeneratorBasedBuilder writing ArrayRecord
files, without TensorFlow) reads back exactly; train.py trains on it (in this process, with the cheap stand-in step),
is stopped by SIGTERM and resumed, and reads the same batches in the same order as an uninterrupted run; importing
sdjax or train.py imports neither TFDS nor TensorFlow.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax.data.folder import FolderDataset
from tests.test_train_script import (  # noqa: F401 (cache_dir, tiny_sd1, train_module: fixtures)
    ROOT, cache_dir, checkpoints, fake_train_step, losses, tiny_config, tiny_sd1, train_module)

pytestmark = pytest.mark.xdist_group("tfds")  # one worker builds the stored dataset once

NAME = "sdjax_test_images"
SMALL = 7  # img_07 is 16x16: stored (converted with min_size=0), skipped when training (data.min_size=32)


def write_folder(folder, n: int = 10):
    """n random RGB images of a few sizes, each with a .txt caption."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (16, 16) if i == SMALL else (32 + 4 * (i % 3), 40 - 2 * (i % 4))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(f"picture number {i}")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(image folder, TFDS data_dir holding it as NAME:1.0.0)."""
    from sdjax.data.tfds import folder_to_tfds

    folder, data_dir = tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("tfds")
    write_folder(folder)
    builder = folder_to_tfds(folder, name=NAME, data_dir=str(data_dir), min_size=0)
    assert builder.data_dir == str(data_dir / NAME / "1.0.0")
    return folder, data_dir


def test_folder_to_tfds_writes_array_record_that_reads_back_exactly(stored):
    from sdjax.data.tfds import TFDSDataset, folder_to_tfds

    folder, data_dir = stored
    written = sorted(p.name for p in (data_dir / NAME / "1.0.0").iterdir())
    assert f"{NAME}-train.array_record-00000-of-00001" in written and "dataset_info.json" in written
    ds, images = TFDSDataset(NAME, data_dir=str(data_dir)), FolderDataset(folder, min_size=0)
    assert len(ds) == len(images) == 10
    for i in range(len(ds)):  # the folder's order, pixels (lossless PNG) and captions
        got, want = ds[i], images[i]
        assert got["image"].dtype == np.uint8 and got["caption"] == want["caption"] == f"picture number {i}"
        np.testing.assert_array_equal(got["image"], want["image"])
    assert ds.skipped == []
    too_small = TFDSDataset(f"{NAME}:1.0.0", data_dir=str(data_dir), min_size=32)
    assert too_small[SMALL]["caption"] == f"picture number {SMALL + 1}" and [j for j, _ in too_small.skipped] == [SMALL]

    with pytest.raises(FileExistsError, match="already exists"):
        folder_to_tfds(folder, name=NAME, data_dir=str(data_dir), min_size=0)
    with pytest.raises(ValueError, match="not found in .*build it first"):
        TFDSDataset("sdjax_no_such_images", data_dir=str(data_dir))
    with pytest.raises(ValueError, match=r"no feature 'text' \(data.caption_key\)"):
        TFDSDataset(NAME, data_dir=str(data_dir), caption_key="text")
    with pytest.raises(ValueError, match=rf"^TFDS dataset '{NAME}' in {data_dir} has no split 'validation' "
                                         r"\(data.tfds_split\)"):
        TFDSDataset(NAME, data_dir=str(data_dir), split="validation")
    with pytest.raises(ValueError, match=r"^TFDS dataset 'mnist' is not built in .*: build it once with `tfds build "
                                         r"mnist --file_format=array_record` \(TFDS's own builders may need TensorFlow"):
        TFDSDataset("mnist", data_dir=str(data_dir))  # registered with TFDS, never built here


def test_train_on_tfds_resumes_with_the_same_data_order(stored, tmp_path, monkeypatch, train_module, tiny_sd1):
    """5 steps of 8 over the 10 stored images (4 epochs, reshuffled each): stopped by SIGTERM during step 2, then
    restarted. Together the two runs read exactly the batches of the uninterrupted order: the same call train.py
    makes to the batch iterator (same dataset, preprocessing and seed), replayed from step 0 without a stop."""
    from sdjax.data.tfds import TFDSDataset

    _, data_dir = stored
    monkeypatch.setattr(train_module.training, "make_train_step", fake_train_step())  # the data is the point here
    calls, read = [], []  # train.py's calls to iterate_batches; (step, indices, captions, image digest) of each batch
    iterate_batches = train_module.preprocess.iterate_batches

    def summary(batch):
        return (batch["step"], batch["indices"].tolist(), list(batch["captions"]),
                hashlib.sha256(np.ascontiguousarray(batch["images"]).tobytes()).hexdigest())

    def recording(dataset, *args, **kwargs):
        assert isinstance(dataset, TFDSDataset)
        calls.append((dataset, args, kwargs))
        for batch in iterate_batches(dataset, *args, **kwargs):
            read.append(summary(batch))
            if batch["step"] == 2 and kwargs["start_step"] == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # read during the 2nd step: train.py saves after it, stops
            yield batch

    monkeypatch.setattr(train_module.preprocess, "iterate_batches", recording)
    config = tiny_config(tmp_path, num_steps=5, **{
        "data.source": "tfds", "data.tfds_name": NAME, "data.tfds_data_dir": str(data_dir),
        "data.caption_dropout": 0.0, "checkpoint.every": 100, "model.init_from": str(tiny_sd1)})
    result = train_module.main(config)
    assert result["preempted"] and result["step"] == 2 and checkpoints(tmp_path) == [2]
    first = read[:]
    read.clear()
    result = train_module.main(config)
    assert not result["preempted"] and result["step"] == 5 and checkpoints(tmp_path) == [2, 5]
    assert losses(tmp_path) == {s: pytest.approx(1 / s) for s in range(1, 6)}
    assert [c[2]["start_step"] for c in calls] == [0, 2]

    dataset, args, kwargs = calls[0]
    whole = [summary(b) for b in iterate_batches(dataset, *args, **{**kwargs, "num_steps": 5})]
    assert first == whole[:3]  # batches 0 and 1 trained; batch 2 read, then SIGTERM
    assert read == whole[2:]  # the restart continues at step 2: the same examples and images, in the same order
    indices = [i for r in whole for i in r[1]]
    assert sorted(indices) == sorted(list(range(10)) * 4)  # every example once an epoch
    assert indices[:10] != list(range(10)) and indices[:10] != indices[10:20]  # shuffled, anew each epoch
    assert whole[:3] != whole[2:]  # (so a restart from step 0 fails the check above)
    for _, idx, captions, _ in whole:  # the stored captions; the 16x16 image is skipped (its next one is read)
        assert captions == [f"picture number {i + (i == SMALL)}" for i in idx]


def test_sdjax_and_train_import_neither_tfds_tensorflow_nor_torch():
    """train.py and the default sources (shapes, folder) stay free of TFDS: it is imported for data.source=tfds only.
    train.py's TensorBoard writer leaves PyTorch out too (tensorboardX imports it when installed, as here: 0.9 s of
    start-up measured), and torch still imports afterwards."""
    code = ("import sys, sdjax, train; from sdjax.data import folder, shapes, tfds; train.summary_writer_class(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'tensorflow_datasets', "
            "'array_record', 'torch'})); import torch; print(torch.tensor([2]).item())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[]", "2"]
