import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdjax.weights.safetensors_io import read_safetensors, write_safetensors


def test_round_trip_with_pytorch_all_dtypes(tmp_path):
    tensors = {"bf16": torch.randn(3, 4).bfloat16(), "f16": torch.randn(5).half(),
               "f32": torch.randn(2, 2, 3), "i64": torch.arange(7)}
    save_file(tensors, tmp_path / "a.safetensors")
    ours = read_safetensors(tmp_path / "a.safetensors")
    for name, t in tensors.items():
        np.testing.assert_array_equal(np.asarray(ours[name]).astype(np.float64), t.double().numpy())
    write_safetensors({k: np.asarray(v) for k, v in ours.items()}, tmp_path / "b.safetensors")
    back = load_file(tmp_path / "b.safetensors")
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_truncated_and_foreign_files_are_named(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tensor w runs past the end"):
        read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "text.safetensors").write_text("this is not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "text.safetensors")
