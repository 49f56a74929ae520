"""Atomic, verified checkpoints through ``torch.distributed.checkpoint`` (DCP).

Layout under ``<out_dir>/checkpoints``::

    step_00000040/            one complete checkpoint
        *.distcp, .metadata   model and optimizer tensors, written by DCP (sharded across ranks)
        trainer.json          step, tokens seen, data-loader position, config (plain JSON)
        tokenizer.json        so generation needs nothing but the checkpoint
        complete.json         sha256 of every file above; written last, so its presence means complete
    latest                    name of the newest complete checkpoint; updated after the rename

A checkpoint is written into a hidden temporary directory and renamed when complete, so a crash
leaves the previous checkpoints untouched. Loading verifies every checksum first. Only tensors go
through DCP (its non-tensor values are unpickled on load) and DCP's metadata file is read with an
unpickler that admits only DCP's own metadata classes: nothing in a checkpoint can run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from clusterlm.checkpoint.directory import COMPLETE, TRAINER_STATE, list_complete
from clusterlm.checkpoint.out_dir_lock import run_token
from clusterlm.errors import UserError
from clusterlm.files import atomic_write_json, sha256_file

LATEST = "latest"


class _MetadataUnpickler(pickle.Unpickler):
    """Reads DCP's pickled ``.metadata`` admitting only the plain types it is made of."""

    ALLOWED_MODULES = ("torch.distributed.checkpoint.",)
    ALLOWED = {
        ("torch", "Size"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
        ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "uint8"),
        ("torch", "int8"), ("torch", "int16"), ("torch", "bool"), ("torch", "strided"),
        ("torch", "contiguous_format"), ("torch", "preserve_format"), ("collections", "OrderedDict"),
        ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "getattr"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (
            module.startswith(self.ALLOWED_MODULES) and name.lstrip("_")[:1].isupper()
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank (paths and names chosen once)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(
    root: Path, step: int, tensors: dict[str, Any], trainer_state: dict[str, Any], keep_last: int,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically on every rank; returns its path. ``tensors`` is this
    rank's share of the state (``ParallelModel.state_dict``); ``files`` are extra small files
    (e.g. the tokenizer) that make the checkpoint self-contained."""
    tmp, final = begin_checkpoint(root, step)
    with single_process_quiet():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp),
                 no_dist=not dist.is_initialized())
    if _is_main():
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
    tmp = root / _broadcast(temporary_name(final.name, token))
    if _is_main():
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
    tmp: Path, final: Path, trainer_state: dict[str, Any], keep_last: int, files: dict[str, bytes] | None,
) -> None:
    """Rank 0, once every rank's tensors are in ``tmp``: checksums, complete.json, the rename that
    makes the checkpoint visible, ``latest``, and the rotation of old checkpoints."""
    root = final.parent
    atomic_write_json(tmp / TRAINER_STATE, trainer_state)
    for name, payload in (files or {}).items():
        (tmp / name).write_bytes(payload)
    sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    atomic_write_json(tmp / COMPLETE, {"step": trainer_state["step"], "sha256": sums})
    if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    atomic_write_json(root / LATEST, {"checkpoint": final.name})
    for old in list_complete(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """Check every file against complete.json; returns the trainer state. Raises UserError."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {COMPLETE}); pick another or start fresh")
    try:
        sums = json.loads((path / COMPLETE).read_text())["sha256"]
        for name, expected in sums.items():
            if not (path / name).is_file():
                raise UserError(f"checkpoint {path} is missing {name}; it is damaged, pick another")
            if sha256_file(path / name) != expected:
                raise UserError(f"checkpoint {path} is corrupt ({name} fails its sha256); pick another")
        return json.loads((path / TRAINER_STATE).read_text())
    except (ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {path} has an unreadable {COMPLETE} or {TRAINER_STATE}") from None


@dataclass(frozen=True)
class Verified:
    """A checkpoint whose every file matched its sha256, and its trainer state."""

    path: Path
    state: dict[str, Any]


def resolve_resume(resume: str, root: Path, own_run: str | None = None) -> Verified | None:
    """'none' -> None; 'auto' -> newest checkpoint that verifies (damaged ones are skipped with a
    warning); a path -> that checkpoint, which must verify. Each file is hashed once. With
    ``own_run`` (a restarted job), the newest checkpoint this run saved comes first, whatever
    ``resume`` says: a restart continues where the job was, not where it began."""
    if own_run is not None:
        for candidate in reversed(list_complete(root)):
            if _run_of(candidate) == own_run:
                with contextlib.suppress(UserError):
                    return Verified(candidate, verify(candidate))
    if resume == "none":
        return None
    if resume != "auto":
        return Verified(Path(resume), verify(resume))
    for candidate in reversed(list_complete(root)):
        try:
            return Verified(candidate, verify(candidate))
        except UserError as err:
            print(f"warning: skipping {candidate.name}: {err}", file=sys.stderr)
    return None


def _run_of(path: Path) -> str | None:
    try:
        return json.loads((path / TRAINER_STATE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_resume_once(resume: str, root: Path, own_run: str | None = None) -> Verified | None:
    """``resolve_resume`` run by rank 0 alone, its answer (or its error) given to every rank: the
    ranks read one shared checkpoint, so hashing it once is enough."""
    answer: tuple[str, Any] = ("ok", None)
    if _is_main():
        try:
            answer = ("ok", resolve_resume(resume, root, own_run))
        except UserError as err:
            answer = ("error", str(err))
    kind, value = _broadcast(answer)
    if kind == "error":
        raise UserError(value)
    return value


class CheckpointReader:
    """Reads a verified checkpoint's tensors into a state of this rank's layout (DCP reshards)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def keys(self) -> set[str]:
        """The saved tensors' flattened names ("model.<name>", "optim.<name>.<entry>")."""
        return set(SafeFileSystemReader(self.path).read_metadata().state_dict_metadata)

    def read(self, state: dict[str, Any]) -> None:
        with single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(self.path), no_dist=not dist.is_initialized())

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """The saved model tensors (without the "model." prefix) and their full shapes."""
        metadata = SafeFileSystemReader(self.path).read_metadata().state_dict_metadata
        return {key[len("model."):]: tuple(meta.size) for key, meta in metadata.items() if key.startswith("model.")}

    def model_tensor(self, name: str) -> torch.Tensor:
        """One whole model tensor, assembled from whatever shards the layout saved, in this
        process alone: reading a checkpoint one tensor at a time holds only that tensor."""
        meta = SafeFileSystemReader(self.path).read_metadata().state_dict_metadata[f"model.{name}"]
        tensor = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with single_process_quiet():
            dcp.load({"model": {name: tensor}}, storage_reader=SafeFileSystemReader(self.path), no_dist=True)
        return tensor


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose architecture differs, naming the first differing setting."""
    saved_model, model = saved_config.get("model", {}), config.get("model", {})
    for key in sorted((set(saved_model) | set(model)) - {"init_from"}):  # where the weights began: not architecture
        if saved_model.get(key) != model.get(key):
            raise UserError(
                f"checkpoint {path} was trained with model.{key} = {saved_model.get(key)!r}, this config "
                f"has {model.get(key)!r}; use the same model settings or a new training.out_dir"
            )
