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
import hashlib
import json
import os
import pickle
import shutil
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from clusterlm.errors import UserError

COMPLETE = "complete.json"
TRAINER_STATE = "trainer.json"
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
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes one process when no process group exists; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _part_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """One model part's tensors and its optimizer's state, keyed by parameter name."""
    if optimizer is None:
        return get_state_dict(model, [])[0], {}
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return get_state_dict(model, [])[0], _owned_optimizer_state(model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    return model_state, optim_state["state"]


def _tensor_state(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None) -> dict[str, Any]:
    """Model and optimizer tensors keyed by parameter name (DCP reshards these across layouts).
    ``parts`` are this rank's pieces of the model (pipeline stages, or the one whole model), each
    with its optimizer; their names are the full model's, so the pieces of all ranks form one
    state any layout can read. Optimizer hyper-parameters are left out: they come from the config
    and the step."""
    model_state, optim_state = {}, {}
    for part, optimizer in zip(parts, optimizers or [None] * len(parts), strict=True):
        part_model, part_optim = _part_state(part, optimizer)
        model_state.update(part_model)
        optim_state.update(part_optim)
    return {"model": model_state, "optim": optim_state} if optimizers else {"model": model_state}


def _owned_optimizer_state(model: nn.Module, optimizer: ZeroRedundancyOptimizer) -> dict[str, Any]:
    """ZeRO-1: this rank's AdamW state, for the parameters it owns, under the parameters' names.
    Ranks own disjoint parameters, so DCP writes each entry once and any layout can read it.
    Missing state (before the first step) is created as zeros so it can be loaded into."""
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    names = {id(param): name for name, param in unwrapped.named_parameters()}
    local = optimizer.optim
    owned = {}
    for group in local.param_groups:
        for param in group["params"]:
            if not local.state[param]:
                local.state[param].update(
                    step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(param),
                    exp_avg_sq=torch.zeros_like(param),
                )
            owned[names[id(param)]] = local.state[param]
    return owned


def save_checkpoint(
    root: Path, step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any], keep_last: int, files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically on every rank; returns its path. ``files`` are
    extra small files (e.g. the tokenizer) that make the checkpoint self-contained."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / _broadcast(f".{final.name}.{uuid.uuid4().hex}.tmp")
    if _is_main():
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(_tensor_state(parts, optimizers), storage_writer=dcp.FileSystemWriter(tmp),
                 no_dist=not dist.is_initialized())
    if _is_main():
        _write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        for name, payload in (files or {}).items():
            (tmp / name).write_bytes(payload)
        sums = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _write_json_atomic(tmp / COMPLETE, {"step": step, "sha256": sums})
        if final.exists():  # the same step saved again (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_json_atomic(root / LATEST, {"checkpoint": final.name})
        for old in list_complete(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_complete(root: Path) -> list[Path]:
    """Checkpoint directories that finished writing, oldest first (not yet checksum-verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


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
            if _sha256(path / name) != expected:
                raise UserError(f"checkpoint {path} is corrupt ({name} fails its sha256); pick another")
        return json.loads((path / TRAINER_STATE).read_text())
    except (ValueError, KeyError, TypeError):
        raise UserError(f"checkpoint {path} has an unreadable {COMPLETE} or {TRAINER_STATE}") from None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """'none' -> None; 'auto' -> newest checkpoint that verifies (damaged ones are skipped with a
    warning); a path -> that checkpoint, which must verify."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        verify(path)
        return path
    for candidate in reversed(list_complete(root)):
        try:
            verify(candidate)
            return candidate
        except UserError as err:
            print(f"warning: skipping {candidate.name}: {err}", file=sys.stderr)
    return None


def load_checkpoint(
    path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None = None
) -> dict[str, Any]:
    """Load tensors into the model ``parts`` (and their ``optimizers``), resharding to the current
    layout; returns the trainer state. Call ``verify`` (or ``resolve_resume``) first."""
    path = Path(path)
    state = _tensor_state(parts, optimizers)
    aliased = _read_tied_copies_from_their_source(state, path)
    with _single_process_quiet():
        dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=not dist.is_initialized())
    for section, copy_name, source_name, value in aliased:
        loaded = state[section].get(source_name)
        if value is None:  # the copy's tensors were loaded under the source's name
            state[section][copy_name] = state[section].pop(source_name)
        else:  # this rank holds both: the source was loaded, the copy takes its values
            torch.utils._pytree.tree_map(lambda dst, src: dst.copy_(src), value, loaded)
            state[section][copy_name] = value
    for part, optimizer in zip(parts, optimizers or [None] * len(parts), strict=True):
        part_model, _ = _part_state(part, None)
        model_state = {name: state["model"][name] for name in part_model}
        if optimizer is None or isinstance(optimizer, ZeroRedundancyOptimizer):  # ZeRO-1 loaded in place
            set_state_dict(part, [], model_state_dict=model_state, optim_state_dict={})
            continue
        _, template = get_state_dict(part, optimizer)
        set_state_dict(
            part, optimizer, model_state_dict=model_state,
            optim_state_dict={"state": {name: state["optim"][name] for name in template["state"]},
                              "param_groups": template["param_groups"]},
        )
    return json.loads((path / TRAINER_STATE).read_text())


# A checkpoint of a whole gpt2 model stores its tied matrix once, as the token table; a last
# pipeline stage holds a copy of it as its output projection (see clusterlm.parallel.pipeline).
TIED_COPIES = {"output.weight": "tok_embeddings.weight"}


def _read_tied_copies_from_their_source(state: dict[str, Any], path: Path) -> list[tuple]:
    """Point each tied copy the checkpoint lacks at its source's entry before loading; returns
    (section, copy, source, value-if-this-rank-also-holds-the-source) to undo it afterwards."""
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    aliased = []
    for section in ("model", "optim"):
        entries = state.get(section, {})
        for copy_name, source_name in TIED_COPIES.items():
            if copy_name not in entries or any(key.startswith(f"{section}.{copy_name}") for key in saved):
                continue
            value = entries.pop(copy_name)
            if source_name in entries:
                aliased.append((section, copy_name, source_name, value))
            else:
                entries[source_name] = value
                aliased.append((section, copy_name, source_name, None))
    return aliased


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose architecture differs, naming the first differing setting."""
    saved_model, model = saved_config.get("model", {}), config.get("model", {})
    for key in sorted(set(saved_model) | set(model)):
        if saved_model.get(key) != model.get(key):
            raise UserError(
                f"checkpoint {path} was trained with model.{key} = {saved_model.get(key)!r}, this config "
                f"has {model.get(key)!r}; use the same model settings or a new training.out_dir"
            )
