"""Safetensors files written one tensor at a time, sharded with an index past a size.

The ``safetensors`` library writes a file from a dict of tensors that are all in memory at once;
for a model of many gigabytes that is the whole model. The format is simple and fixed (an 8-byte
little-endian header length, a JSON header of dtypes, shapes and byte offsets, then the raw
little-endian bytes), and the shapes are known before any value is read, so the header is written
first and each tensor streamed after it. Files are read back with ``safetensors`` in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from clusterlm.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    stripped = text.strip().upper()
    number = stripped.rstrip("KMGIB")
    unit = stripped[len(number) :]
    try:
        value = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise UserError(
            f"size {text!r} is not understood; write e.g. 5GB, 500MB, 2GiB or a byte count"
        ) from None
    if not value > 0 or math.isinf(value):  # nan compares false both ways
        raise UserError(f"size {text!r} must be a positive, finite number of bytes")
    return int(value)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensors in order, grouped into files of at most ``max_shard_bytes``.

    A tensor larger than that gets a file of its own.
    """
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_file(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    produce: Callable[[str], torch.Tensor],
) -> None:
    """One safetensors file of ``shapes`` (in that order); ``produce(key)`` gives each tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        size = math.prod(shape) * itemsize
        header[key] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape in shapes.items():
            tensor = produce(key).to(dtype).contiguous()
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{key}: produced shape {tuple(tensor.shape)}, planned {shape}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def write_sharded(
    out: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    max_shard_bytes: int,
    produce: Callable[[str], torch.Tensor],
) -> list[str]:
    """``model.safetensors``, or numbered shards and their index when the total exceeds
    ``max_shard_bytes``; returns the file names written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: math.prod(shape) * itemsize for key, shape in shapes.items()}
    groups = plan_shards(sizes, max_shard_bytes)
    if len(groups) == 1:
        write_file(out / SINGLE, shapes, dtype, produce)
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups, strict=True):
        write_file(out / name, {key: shapes[key] for key in keys}, dtype, produce)
    weight_map = {key: name for name, keys in zip(names, groups, strict=True) for key in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, INDEX]
