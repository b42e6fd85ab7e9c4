"""Read and write .safetensors files with numpy, bfloat16 included, memory-mapped on read.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian tensor bytes. safetensors.numpy cannot represent bfloat16, which real
checkpoints use, so sdjax reads the format itself (ml_dtypes, a JAX dependency, supplies bfloat16).
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _read_header(path: str) -> tuple[int, dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100_000_000):
            raise ValueError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            return header_len, json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (unreadable JSON header: {e})") from None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's `__metadata__` string map (empty if it has none)."""
    return _read_header(os.fspath(path))[1].get("__metadata__") or {}


def data_offset(path: str | os.PathLike) -> int:
    """Where the tensor bytes start: after the 8-byte length and the JSON header (checked as read_metadata does)."""
    return 8 + _read_header(os.fspath(path))[0]


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors file; arrays are read-only views of a memory map (read ahead: the kernel
    starts reading the whole file at once, so a load is not one page fault per 4 KB)."""
    path = os.fspath(path)
    header_len, header = _read_header(path)
    header.pop("__metadata__", None)
    with open(path, "rb") as f:  # _read_header has checked that the file is not empty
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_WILLNEED"):  # read ahead the whole file rather than fault in 4 KB at a time
        mapped.madvise(mmap.MADV_WILLNEED)
    data = np.frombuffer(mapped, dtype=np.uint8, offset=8 + header_len)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > data.size:
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def write_safetensors(tensors: dict[str, np.ndarray], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write {name: array} as .safetensors (tensors sorted by name, 8-byte aligned header)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    os.replace(tmp, path)
