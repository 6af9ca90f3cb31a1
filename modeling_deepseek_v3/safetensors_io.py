"""Streaming safetensors I/O for the conversion commands: one tensor in memory at a time.

`safetensors.torch.save_file` needs the whole shard in memory and `safe_open` maps the whole file, so a shard
conversion would hold the input and the output shard at once. The format is simple (an 8-byte little-endian header
length, a JSON header with dtype/shape/data_offsets per tensor, then the raw bytes), so the converters read
tensors with plain file reads and write output files header-first, tensor by tensor. Files written here load with
the safetensors library unchanged.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """A safetensors file is truncated or malformed (the message names the file and, where known, the tensor)."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def nbytes_of(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def read_header(path) -> tuple[dict, dict]:
    """Parse and validate the header of `path`: ({name: TensorEntry}, metadata). Checks that every tensor's byte
    range lies inside the file and matches its dtype and shape, so a truncated file is caught before any read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SafetensorsFormatError(f"{path}: header is not valid JSON ({error})") from None
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name} has a malformed header entry {info}") from None
        if end - begin != nbytes_of(dtype, shape):
            raise SafetensorsFormatError(f"{path}: tensor {name}: {end - begin} bytes for {info['dtype']} {list(shape)}")
        if data_start + end > size:
            raise SafetensorsFormatError(
                f"{path}: tensor {name} ends at byte {data_start + end} but the file has {size} bytes (truncated)"
            )
        entries[name] = TensorEntry(dtype, shape, data_start + begin, data_start + end)
    return entries, metadata


def read_tensor(f, path, name: str, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor from the open binary file `f` (of `path`) with a plain read: no memory map stays behind."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return read_bytes(f, path, name, entry, 0, torch.empty(entry.nbytes, dtype=torch.uint8)).view(
        entry.dtype
    ).reshape(entry.shape)


def read_bytes(f, path, name: str, entry: TensorEntry, start: int, buffer: torch.Tensor) -> torch.Tensor:
    """Read bytes [start, start + len(buffer)) of tensor `name` into the uint8 tensor `buffer` and return it."""
    f.seek(entry.begin + start)
    if start + buffer.numel() > entry.nbytes or f.readinto(buffer.numpy()) != buffer.numel():
        raise SafetensorsFormatError(f"{path}: tensor {name}: short read at byte {start} (truncated file?)")
    return buffer


class SafetensorsWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time, in any order.

    `entries` is an ordered {name: (dtype, shape)}; the header goes first and each `write(name, tensor)` lands at
    its offset. `close()` fails unless every tensor was written, so an interrupted writer never leaves a file that
    claims tensors it does not have (callers write to a temporary name and rename after `close()`).
    """

    def __init__(self, path, entries: dict, metadata: dict | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        for name, (dtype, shape) in entries.items():
            nbytes = nbytes_of(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._data_start = 8 + len(encoded)
        self._layout = {name: (entry["data_offsets"][0], entries[name]) for name, entry in header.items() if name != "__metadata__"}
        self._pending = set(self._layout)
        self.nbytes = self._data_start + offset
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        begin, (dtype, shape) = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, start: int, data: torch.Tensor) -> None:
        """Write the bytes of `data` at byte `start` of tensor `name`. A tensor counts as written once its last
        byte is (parts are written in order by the converters)."""
        begin, (dtype, shape) = self._layout[name]
        raw = data.detach().cpu().contiguous().view(-1).view(torch.uint8)
        end = start + raw.numel()
        if end > nbytes_of(dtype, shape):
            raise ValueError(f"{self.path}: tensor {name}: write past its {nbytes_of(dtype, shape)} bytes")
        self._file.seek(self._data_start + begin + start)
        if raw.numel():
            self._file.write(raw.numpy())
        if end == nbytes_of(dtype, shape):
            self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            self._file.close()
            raise ValueError(f"{self.path}: {len(self._pending)} tensors never written, e.g. {sorted(self._pending)[:3]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


__all__ = [
    "DTYPES",
    "SafetensorsFormatError",
    "SafetensorsWriter",
    "TensorEntry",
    "nbytes_of",
    "read_bytes",
    "read_header",
    "read_tensor",
]
