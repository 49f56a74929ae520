"""The mean of a run's last checkpoints' weights, saved as a checkpoint of its own
(``clusterlm average``).

Averaging the weights of the last few checkpoints smooths the noise of the last steps at no
training cost; Vaswani et al. (2017) evaluated their translation models this way, and the
translation toolkits (fairseq's ``average_checkpoints.py``, Marian's smoothing) keep the practice.
The result holds the model's tensors only, read one tensor at a time from every source in any
layout (DCP reshards) and written for one process; its trainer state is the newest source's,
with the names it was averaged from. It evaluates, translates, generates and exports like any
checkpoint; a training run cannot resume from it, having no optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from clusterlm.checkpoint import (
    AVERAGED_FROM,
    COMPLETE,
    TRAINER_STATE,
    CheckpointReader,
    check_compatible,
    list_complete,
    save_checkpoint,
    verify,
)
from clusterlm.checkpoint.tensor_index import FILE as TENSOR_FILE
from clusterlm.checkpoint.tensor_index import TENSOR_INDEX
from clusterlm.errors import UserError
from clusterlm.files import check_destination, check_output_path


def average_checkpoints(run: str | Path, last: int, out: str | Path) -> Path:
    """Average the model tensors of the ``last`` newest complete checkpoints of ``run`` into a
    checkpoint under ``out`` (a new run directory: ``out/checkpoints/step_<newest step>``);
    returns its path."""
    out = Path(out)
    check_output_path(out, "--out")
    check_destination(out)
    sources = _sources(Path(run), last)
    states = [verify(path) for path in sources]
    newest = states[-1]
    for path, state in zip(sources, states, strict=True):
        check_compatible(state["config"], newest["config"], path)
    readers = [CheckpointReader(path) for path in sources]
    shapes = readers[-1].model_shapes()
    for reader in readers[:-1]:
        if reader.model_shapes() != shapes:
            raise UserError(
                f"{reader.path} holds other model tensors than {readers[-1].path}; average "
                "checkpoints of one model"
            )
    averaged = {name: _mean(name, (r.model_tensor(name) for r in readers)) for name in shapes}
    return save_checkpoint(
        out / "checkpoints",
        newest["step"],
        {"model": averaged},
        {**newest, AVERAGED_FROM: [str(path) for path in sources]},
        keep_last=1,
        files=_plain_files(sources[-1]),
    )


def _sources(run: Path, last: int) -> list[Path]:
    if last < 2:
        raise UserError(f"--last must be at least 2 checkpoints to average, got {last}")
    found = list_complete(run / "checkpoints")
    if len(found) < last:
        raise UserError(
            f"{run} holds {len(found)} complete checkpoints, fewer than --last {last}: average "
            "fewer, or train keeping more (checkpoint.keep_last, checkpoint.interval)"
        )
    return found[-last:]


def _mean(name: str, tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    """The mean of floating-point tensors, accumulated in fp64 and stored in their dtype, read one
    at a time; other tensors (integer counters) must agree, and are kept."""
    first = next(tensors)
    if not first.is_floating_point():
        if any(not torch.equal(first, t) for t in tensors):
            raise UserError(f"the checkpoints' {name} differ and cannot be averaged: not weights")
        return first
    total, count = first.double(), 1
    for tensor in tensors:
        total += tensor.double()
        count += 1
    return (total / count).to(first.dtype)


def _plain_files(checkpoint: Path) -> dict[str, bytes]:
    """The newest source's files that are neither tensors nor written by every save (the
    tokenizer, a task's files): the average is as self-contained as its sources."""
    return {
        path.name: path.read_bytes()
        for path in sorted(checkpoint.iterdir())
        if path.is_file()
        and not TENSOR_FILE.fullmatch(path.name)
        and path.name not in (TENSOR_INDEX, COMPLETE, TRAINER_STATE)
    }
