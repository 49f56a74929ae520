"""The index of a checkpoint's tensors, ``tensors.json``: what DCP keeps in its pickled
``.metadata``, as plain JSON that is parsed into exact types.

One entry per flattened state key ("model.<name>", "optim.<name>.<entry>", ...)::

    {"format": "clusterlm-tensors/1", "byteorder": "little", "tensors": {
        "model.norm.weight": {"kind": "tensor", "dtype": "float32", "size": [64], "chunks": [
            {"offsets": [0], "sizes": [64], "file": "__0_0.distcp", "offset": 0, "length": 256}]}}}

Each chunk is a block of the tensor saved by one rank, stored in ``file`` (a plain file name in
the checkpoint directory) as ``length`` raw bytes from byte ``offset``, in C order. ``decode``
builds DCP's ``Metadata`` from it, constructing only DCP's tensor metadata classes from values
it has checked: a dtype from a fixed table, non-negative bounded integers, chunks inside their
tensor that cover it, disjoint byte ranges inside their file of exactly the chunk's size.
Anything else (another kind of entry, an unknown field, a path out of the directory) raises
``TensorIndexError``.
"""

from __future__ import annotations

import re
import sys
from math import prod
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

TENSOR_INDEX = "tensors.json"
FORMAT = "clusterlm-tensors/1"
DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_DIMS = 8
MAX_INT = 2**48  # bounds every size, offset and length: far above any real one, far below overflow
MAX_CHUNKS = 1 << 16
KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,499}")
FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}\.distcp")
ENTRY_FIELDS = {"kind", "dtype", "size", "chunks"}
CHUNK_FIELDS = {"offsets", "sizes", "file", "offset", "length"}


class TensorIndexError(ValueError):
    """``tensors.json`` is not an index this module wrote; the message says where."""


def encode(metadata: Metadata, storage: dict[MetadataIndex, Any]) -> dict[str, Any]:
    """``tensors.json``'s content for DCP's ``metadata`` and the ``storage`` of each chunk (what
    the writer returned). Raises TypeError for an entry that is not a tensor: a checkpoint
    holds only tensors, the rest of the trainer's state goes into trainer.json."""
    tensors = {}
    for key, meta in sorted(metadata.state_dict_metadata.items()):
        if not isinstance(meta, TensorStorageMetadata):
            raise TypeError(
                f"checkpoint entry {key} is not a tensor; save it in trainer.json instead"
            )
        if meta.properties.dtype not in DTYPE_NAMES:
            raise TypeError(
                f"checkpoint entry {key} has dtype {meta.properties.dtype}, which is not saved"
            )
        chunks = []
        for chunk in meta.chunks:
            info = storage[MetadataIndex(key, chunk.offsets)]
            if info.transform_descriptors:
                raise TypeError(f"checkpoint entry {key} was written through a stream transform")
            chunks.append(
                {
                    "offsets": list(chunk.offsets),
                    "sizes": list(chunk.sizes),
                    "file": info.relative_path,
                    "offset": info.offset,
                    "length": info.length,
                }
            )
        tensors[key] = {
            "kind": "tensor",
            "dtype": DTYPE_NAMES[meta.properties.dtype],
            "size": list(meta.size),
            "chunks": chunks,
        }
    return {"format": FORMAT, "byteorder": sys.byteorder, "tensors": tensors}


def decode(payload: Any, directory: Path) -> Metadata:
    """DCP's ``Metadata`` for ``tensors.json``'s parsed ``payload``, whose chunk files lie in
    ``directory``. Raises ``TensorIndexError`` naming the first thing that is not as written."""
    _fields(payload, {"format", "byteorder", "tensors"}, "the index")
    if payload["format"] != FORMAT:
        raise TensorIndexError(
            f"its tensor index has format {_show(payload['format'])}, not {FORMAT}"
        )
    if payload["byteorder"] != sys.byteorder:
        raise TensorIndexError(
            f"its tensors are {_show(payload['byteorder'])}-endian, this machine is {sys.byteorder}"
        )
    if not isinstance(payload["tensors"], dict):
        raise TensorIndexError("its tensor index has no table of tensors")
    entries: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    file_sizes: dict[str, int] = {}
    for key, entry in payload["tensors"].items():
        if not isinstance(key, str) or not KEY.fullmatch(key):
            raise TensorIndexError(
                f"its tensor index has an entry named {_show(key)}, which is not a state key"
            )
        entries[key] = _tensor(key, entry)
        for chunk, stored in zip(entries[key].chunks, entry["chunks"], strict=True):
            storage[MetadataIndex(key, chunk.offsets)] = _storage(
                key, stored, chunk, entries[key], directory, file_sizes
            )
    _disjoint(storage.values())
    return Metadata(
        state_dict_metadata=entries,
        storage_data=storage,
        storage_meta=StorageMeta(),
        version=CURRENT_DCP_VERSION,
    )


def _tensor(key: str, entry: Any) -> TensorStorageMetadata:
    where = f"entry {key}"
    if isinstance(entry, dict) and entry.get("kind") != "tensor":
        raise TensorIndexError(
            f"{where} is of kind {_show(entry.get('kind'))}; only tensors are loaded"
        )
    _fields(entry, ENTRY_FIELDS, where)
    if not isinstance(entry["dtype"], str) or entry["dtype"] not in DTYPES:
        raise TensorIndexError(
            f"{where} has dtype {_show(entry['dtype'])}, which is not one of {', '.join(DTYPES)}"
        )
    size = _ints(entry["size"], f"{where}'s size", None)
    if not isinstance(entry["chunks"], list) or not 0 < len(entry["chunks"]) <= MAX_CHUNKS:
        raise TensorIndexError(f"{where} has no list of chunks")
    chunks, seen = [], set()
    for chunk in entry["chunks"]:
        _fields(chunk, CHUNK_FIELDS, f"a chunk of {where}")
        offsets = _ints(chunk["offsets"], f"a chunk offset of {where}", len(size))
        sizes = _ints(chunk["sizes"], f"a chunk size of {where}", len(size))
        if any(o + s > whole for o, s, whole in zip(offsets, sizes, size, strict=True)):
            raise TensorIndexError(f"{where} has a chunk that reaches past its size {size}")
        if offsets in seen:
            raise TensorIndexError(f"{where} has two chunks at {offsets}")
        seen.add(offsets)
        chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
    if sum(prod(chunk.sizes) for chunk in chunks) != prod(size):
        raise TensorIndexError(f"{where}'s chunks do not add up to its size {size}")
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=DTYPES[entry["dtype"]]),
        size=torch.Size(size),
        chunks=chunks,
    )


def _storage(
    key: str,
    stored: dict[str, Any],
    chunk: ChunkStorageMetadata,
    meta: TensorStorageMetadata,
    directory: Path,
    file_sizes: dict[str, int],
) -> _StorageInfo:
    """Where one chunk's bytes are: a plain file of the checkpoint, a range inside it, exactly as
    long as the chunk."""
    name = stored["file"]
    if not isinstance(name, str) or not FILE.fullmatch(name):
        raise TensorIndexError(
            f"entry {key} is stored in {_show(name)}, which is not a file name of the checkpoint"
        )
    if name not in file_sizes:
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise TensorIndexError(
                f"entry {key} is stored in {name}, which is not a file of the checkpoint"
            )
        file_sizes[name] = path.stat().st_size
    offset, length = _ints(
        [stored["offset"], stored["length"]], f"the byte range of entry {key}", 2
    )
    if length != prod(chunk.sizes) * meta.properties.dtype.itemsize:
        raise TensorIndexError(
            f"entry {key} has a chunk of {length} bytes, its shape needs "
            f"{prod(chunk.sizes) * meta.properties.dtype.itemsize}"
        )
    if offset + length > file_sizes[name]:
        raise TensorIndexError(f"entry {key} reaches past the end of {name}")
    return _StorageInfo(relative_path=name, offset=offset, length=length)


def _disjoint(infos: Any) -> None:
    """No two chunks share bytes (as written): what a tensor may be read into stays bounded by
    the size of the files."""
    ranges = sorted((info.relative_path, info.offset, info.length) for info in infos if info.length)
    for (name, offset, length), (next_name, next_offset, _) in zip(
        ranges, ranges[1:], strict=False
    ):
        if name == next_name and offset + length > next_offset:
            raise TensorIndexError(f"two of its chunks share bytes {next_offset}.. of {name}")


def _fields(value: Any, fields: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise TensorIndexError(f"{where} is not a JSON object")
    if set(value) != fields:
        odd = sorted(map(str, set(value) ^ fields))
        raise TensorIndexError(
            f"{where} has unexpected or missing fields: {', '.join(_show(f) for f in odd)}"
        )


def _ints(value: Any, what: str, length: int | None) -> tuple[int, ...]:
    """A list of plain integers in [0, MAX_INT) (of ``length`` when given) as a tuple."""
    if (
        not isinstance(value, list)
        or len(value) > MAX_DIMS
        or (length is not None and len(value) != length)
    ):
        raise TensorIndexError(
            f"{what} is not a list of {length if length is not None else 'at most 8'} integers"
        )
    if not all(type(v) is int and 0 <= v < MAX_INT for v in value):
        raise TensorIndexError(
            f"{what} {_show(value)} holds a value that is not an integer in [0, 2**48)"
        )
    return tuple(value)


def _show(value: Any) -> str:
    """A value from the file as one short line: ``ascii`` escapes newlines and control
    characters."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_entries(metadata: Metadata | None) -> dict[str, TensorStorageMetadata]:
    """The entries of an index ``decode`` read: tensors alone, which it admits and nothing else."""
    if metadata is None or not all(
        isinstance(m, TensorStorageMetadata) for m in metadata.state_dict_metadata.values()
    ):
        raise TypeError("a checkpoint index holds tensors alone, read through read_index")
    return cast(dict[str, TensorStorageMetadata], metadata.state_dict_metadata)
