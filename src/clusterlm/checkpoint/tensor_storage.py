"""How DCP writes and reads a checkpoint's tensors here: raw bytes and a JSON index, no pickle.

DCP's own ``FileSystemWriter`` stores each tensor with ``torch.save`` and its metadata with
``pickle``, and its reader unpickles both (and non-tensor entries with no restriction).
``TensorWriter`` writes each rank's tensor chunks as their raw bytes, one file per rank, and the
coordinator writes ``tensors.json`` (``clusterlm.checkpoint.tensor_index``) in place of
``.metadata``.
``SafeFileSystemReader`` reads that index and copies each chunk's bytes into the tensors being
loaded. ``CheckedLoadPlanner`` compares the index with the state being loaded before anything
is read: every tensor wanted must be saved with its shape and dtype, and, for a whole state,
every saved tensor of the sections read (``model``, ``optim``, ...) must be wanted by some rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from clusterlm.checkpoint.tensor_index import (
    TENSOR_INDEX,
    TensorIndexError,
    decode,
    encode,
    tensor_entries,
)
from clusterlm.errors import UserError
from clusterlm.files import atomic_write_json

PICKLED_METADATA = ".metadata"  # what DCP's own writer leaves, and older clusterlm checkpoints hold


class TensorWriter(dcp.FileSystemWriter):
    """Each rank's chunks as raw bytes in ``__<rank>_0.distcp``; the index as ``tensors.json``."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(Path(self.path) / name, "wb") as stream:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise TypeError(
                        f"checkpoint entry {item.index.fqn} is not a tensor; "
                        "save it in trainer.json"
                    )
                data = planner.resolve_data(item)
                assert isinstance(data, torch.Tensor)  # a BYTE_IO item is refused above
                tensor = data.detach().cpu().contiguous()
                offset = stream.tell()
                stream.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                length = stream.tell() - offset
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=length,
                        storage_data=_StorageInfo(name, offset, length),
                    )
                )
            if self.sync_files:
                stream.flush()
                os.fsync(stream.fileno())
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator, once every rank's chunks are written: the index, and no pickle."""
        storage = {result.index: result.storage_data for rank in results for result in rank}
        atomic_write_json(Path(self.path) / TENSOR_INDEX, encode(metadata, storage), indent=None)


def read_index(path: Path) -> Metadata:
    """The checkpoint's ``tensors.json`` as DCP's ``Metadata``. Raises UserError (one line)."""
    index = path / TENSOR_INDEX
    if not index.is_file():
        if (path / PICKLED_METADATA).exists():
            raise UserError(
                f"checkpoint {path} predates clusterlm's pickle-free checkpoint format "
                "(its tensor index is a pickle, which is never opened); use a newer checkpoint "
                "or train anew"
            )
        raise UserError(
            f"checkpoint {path} has no {TENSOR_INDEX}; it is damaged or not a clusterlm checkpoint"
        )
    try:
        payload = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise UserError(
            f"checkpoint {path} has an unreadable {TENSOR_INDEX}; it is damaged, pick another"
        ) from None
    try:
        return decode(payload, path)
    except TensorIndexError as err:
        raise UserError(f"checkpoint {path} is refused: {err}") from None


class SafeFileSystemReader(dcp.FileSystemReader):
    """Reads ``tensors.json`` (or takes it parsed) and each chunk's raw bytes into the tensors
    being loaded; never ``torch.load`` or ``pickle``."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata | None = None):
        super().__init__(path)
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.metadata is None:
            self.metadata = read_index(Path(self.path))
        self.metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return self.metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        saved = tensor_entries(self.read_metadata())
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise UserError(
                    f"checkpoint {self.path}: entry {item.storage_index.fqn} is not a tensor"
                )
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(
                item
            )
        for name, items in per_file.items():
            with open(Path(self.path) / name, "rb") as stream:
                for item in items:
                    meta = saved[item.storage_index.fqn]
                    sizes = next(
                        c.sizes for c in meta.chunks if c.offsets == item.storage_index.offset
                    )
                    chunk = self._chunk(
                        stream, self.storage_data[item.storage_index], meta.properties.dtype, sizes
                    )
                    chunk = narrow_tensor_by_index(chunk, item.storage_offsets, item.lengths)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != chunk.size():
                        raise UserError(
                            f"checkpoint {self.path}: entry {item.storage_index.fqn} does not fit "
                            f"the tensor it is loaded into"
                        )
                    target.copy_(chunk)
                    planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _chunk(
        self, stream: Any, info: _StorageInfo, dtype: torch.dtype, sizes: torch.Size
    ) -> torch.Tensor:
        """One saved chunk, from exactly the byte range the (checked) index gives."""
        if info.length == 0:
            return torch.empty(sizes, dtype=dtype)
        buffer = bytearray(info.length)
        stream.seek(info.offset)
        if stream.readinto(buffer) != info.length:
            raise UserError(
                f"checkpoint {self.path} has a truncated {info.relative_path}; it is damaged"
            )
        return torch.frombuffer(buffer, dtype=dtype).reshape(sizes)


class CheckedLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, refusing a checkpoint that does not match the state being loaded before any
    tensor is read: ``whole`` says that the ranks together load all of each section they read."""

    def __init__(self, path: Path, whole: bool):
        super().__init__()
        self.path, self.whole = path, whole

    def create_local_plan(self) -> LoadPlan:
        saved = tensor_entries(self.metadata)
        for key, value in self.state_dict.items():
            meta = saved.get(key)
            if meta is None:
                raise UserError(
                    f"checkpoint {self.path} has no {key}, which this model needs; "
                    "it is a checkpoint of another model or training setup"
                )
            if not isinstance(value, torch.Tensor):
                raise UserError(
                    f"checkpoint {self.path}: this model's {key} is not a tensor, "
                    "which is never loaded"
                )
            if tuple(value.size()) != tuple(meta.size) or value.dtype != meta.properties.dtype:
                saved_as = _describe(meta.properties.dtype, meta.size)
                raise UserError(
                    f"checkpoint {self.path} holds {key} as {saved_as}, this model needs "
                    f"{_describe(value.dtype, value.size())}; it is a checkpoint "
                    "of another architecture"
                )
        return dataclasses.replace(
            super().create_local_plan(), planner_data=sorted(self.state_dict)
        )

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        if self.whole:
            wanted = {key for plan in global_plan for key in plan.planner_data or ()}
            sections = {key.split(".", 1)[0] for key in wanted}
            extra = sorted(
                key
                for key in tensor_entries(self.metadata)
                if key.split(".", 1)[0] in sections and key not in wanted
            )
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise UserError(
                    f"checkpoint {self.path} holds {extra[0]}{more}, "
                    "which this model does not have; "
                    "it is a checkpoint of another model or training setup"
                )
        plans = [dataclasses.replace(plan, planner_data=None) for plan in global_plan]
        return super().create_global_plan(plans)


def _describe(dtype: torch.dtype, size: Any) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(size)}"
