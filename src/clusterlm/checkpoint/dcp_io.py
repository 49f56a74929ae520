"""Atomic, verified checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout under ``<out_dir>/checkpoints``::

    step_00000040/            one complete checkpoint
        __<rank>_0.distcp     model and optimizer tensors: each rank's chunks as raw bytes
        tensors.json          the index of those tensors: dtype, shape, chunks, byte ranges
        trainer.json          step, tokens seen, data-loader position, config (plain JSON)
        tokenizer.json        so generation needs nothing but the checkpoint
        complete.json         sha256 of every file above; written last, so its presence
                              means complete
    latest                    name of the newest complete checkpoint; updated after the rename

A checkpoint is written into a hidden temporary directory and renamed when complete, so a crash
leaves the previous checkpoints untouched. Loading verifies every checksum first.

What loading trusts: nothing in the checkpoint. Its files are data, and a checksum only detects
damage (whoever can write a checkpoint can write its complete.json too). Nothing is unpickled:
no ``pickle`` and no ``torch.load`` reads any of its files. The JSON files are parsed into plain
values; ``tensors.json`` becomes DCP's metadata by constructing only DCP's tensor metadata
classes from values checked against an allow-list (``tensor_index``): dtypes from a
fixed table, bounded non-negative integers, chunks inside their tensor, byte ranges inside plain
files of the checkpoint directory, exactly as long as their chunk. Only tensors are saved and
loaded (every non-tensor state is in trainer.json); before any tensor is read, each tensor to
load must be in the index with its shape and dtype, and a whole state must account for every
saved tensor of its sections. DCP then copies the bytes into the tensors allocated for the
model and optimizers (``tensor_storage``). A checkpoint whose index is DCP's pickled
``.metadata`` (written before this format) is refused. The refusals are ``UserError``s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from clusterlm.checkpoint.directory import COMPLETE, TRAINER_STATE, list_complete
from clusterlm.checkpoint.out_dir_lock import run_token
from clusterlm.checkpoint.tensor_index import tensor_entries
from clusterlm.checkpoint.tensor_storage import (
    CheckedLoadPlanner,
    SafeFileSystemReader,
    TensorWriter,
    read_index,
)
from clusterlm.distributed.json_collectives import broadcast_json
from clusterlm.errors import UserError
from clusterlm.files import atomic_write, atomic_write_json, sha256_file

LATEST = "latest"


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically on every rank; returns its path. ``tensors`` is this
    rank's share of the state (``ParallelModel.state_dict``); ``files`` are extra small files
    (e.g. the tokenizer) that make the checkpoint self-contained."""
    tmp, final = begin_checkpoint(root, step)
    with single_process_quiet():
        dcp.save(tensors, storage_writer=TensorWriter(tmp), no_dist=not dist.is_initialized())
    if is_main_rank():
        finish_checkpoint(tmp, final, trainer_state, keep_last, files)
    _barrier()
    return final


def begin_checkpoint(root: Path, step: int) -> tuple[Path, Path]:
    """The temporary directory every rank writes into and the final name it is renamed to. Rank 0
    also removes what an interrupted save of this run left behind (only one save is ever in
    flight): the temporaries carrying its out_dir lock's token, never another run's."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    token = run_token()
    tmp = root / broadcast_json(temporary_name(final.name, token))
    if is_main_rank():
        if token:
            remove_temporaries(root, token)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp, final


def temporary_name(name: str, token: str | None) -> str:
    """The hidden directory a checkpoint ``name`` is written into: it carries the run's token."""
    return f".{name}.{token}.{uuid.uuid4().hex}.tmp" if token else f".{name}.{uuid.uuid4().hex}.tmp"


def remove_temporaries(root: Path, token: str) -> None:
    """Remove the unfinished saves of the run whose lock token is ``token``."""
    for stale in Path(root).glob(f".step_*.{token}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def finish_checkpoint(
    tmp: Path,
    final: Path,
    trainer_state: dict[str, Any],
    keep_last: int,
    files: dict[str, bytes] | None,
) -> None:
    """Rank 0, once every rank's tensors are in ``tmp``: checksums, complete.json, the rename that
    makes the checkpoint visible, ``latest``, and the rotation of old checkpoints."""
    root = final.parent
    atomic_write_json(tmp / TRAINER_STATE, trainer_state)
    for name, payload in (files or {}).items():
        atomic_write(tmp / name, payload)  # durable, like every file the checksums cover
    sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / COMPLETE, {"step": trainer_state["step"], "sha256": sums})
    if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_json(root / LATEST, {"checkpoint": final.name})
    for old in list_complete(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """Check every file against complete.json; returns the trainer state. Raises UserError. The
    names in complete.json must be plain file names of the checkpoint, trainer.json among them."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError(
            f"{path} is not a complete checkpoint (no {COMPLETE}); pick another or start fresh"
        )
    unreadable = UserError(f"checkpoint {path} has an unreadable {COMPLETE} or {TRAINER_STATE}")
    try:
        sums = json.loads((path / COMPLETE).read_text())["sha256"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise unreadable from None
    if not isinstance(sums, dict) or TRAINER_STATE not in sums:
        raise unreadable
    for name, expected in sums.items():
        if (
            name in ("", ".", "..")
            or "\0" in name
            or Path(name).name != name
            or not isinstance(expected, str)
        ):
            raise UserError(
                f"checkpoint {path} lists {ascii(name)[:60]} in {COMPLETE}, "
                "which is not a file name; it is damaged or not a clusterlm checkpoint"
            )
        if not (path / name).is_file():
            raise UserError(f"checkpoint {path} is missing {name}; it is damaged, pick another")
        if sha256_file(path / name) != expected:
            raise UserError(f"checkpoint {path} is corrupt ({name} fails its sha256); pick another")
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (ValueError, RecursionError):
        raise unreadable from None
    if not isinstance(state, dict):
        raise unreadable
    return state


class CheckpointReader:
    """Reads a verified checkpoint's tensors into a state of this rank's layout (DCP reshards),
    after checking its tensor index against that state (``CheckedLoadPlanner``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._metadata: Metadata | None = None

    @property
    def metadata(self) -> Metadata:
        """The checked tensor index, parsed once."""
        if self._metadata is None:
            self._metadata = read_index(self.path)
        return self._metadata

    @property
    def keys(self) -> set[str]:
        """The saved tensors' flattened names ("model.<name>", "optim.<name>.<entry>")."""
        return set(self.metadata.state_dict_metadata)

    def read(self, state: dict[str, Any]) -> None:
        """Fill ``state``, which with the other ranks' states is a whole training state: each
        tensor must be saved with its shape and dtype, and nothing else saved in its sections."""
        self._load(state, whole=True, no_dist=not dist.is_initialized())

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """The saved model tensors (without the "model." prefix) and their full shapes."""
        saved = tensor_entries(self.metadata)
        return {
            key[len("model.") :]: tuple(meta.size)
            for key, meta in saved.items()
            if key.startswith("model.")
        }

    def model_tensor(self, name: str) -> torch.Tensor:
        """One whole model tensor, assembled from whatever shards the layout saved, in this
        process alone: reading a checkpoint one tensor at a time holds only that tensor."""
        meta = tensor_entries(self.metadata).get(f"model.{name}")
        if meta is None:
            raise UserError(
                f"checkpoint {self.path} has no tensor {name}; it is not a complete model"
            )
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        self._load({"model": {name: tensor}}, whole=False, no_dist=True)
        return tensor

    def _load(self, state: dict[str, Any], whole: bool, no_dist: bool) -> None:
        reader = SafeFileSystemReader(self.path, self.metadata)
        try:
            with single_process_quiet():
                dcp.load(
                    state,
                    storage_reader=reader,
                    planner=CheckedLoadPlanner(self.path, whole),
                    no_dist=no_dist,
                )
        except (
            CheckpointException
        ) as err:  # raised on every rank when one rank refused the checkpoint
            refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UserError)]
            if refused:
                raise UserError(str(refused[0])) from None
            raise


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose architecture differs, naming the first differing setting."""
    saved_model, model = saved_config.get("model", {}), config.get("model", {})
    # init_from is where the weights began: not architecture.
    for key in sorted((set(saved_model) | set(model)) - {"init_from"}):
        if saved_model.get(key) != model.get(key):
            raise UserError(
                f"checkpoint {path} was trained with model.{key} = {saved_model.get(key)!r}, "
                f"this config has {model.get(key)!r}; use the same model settings or a new "
                "training.out_dir"
            )
