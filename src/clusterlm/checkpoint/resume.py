"""Which checkpoint a run starts from: ``checkpoint.resume`` (none, auto, or a path), a restarted
job's own newest checkpoint first, and the newest verified checkpoint of a run for evaluation."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterlm.checkpoint.dcp_io import is_main_rank, verify
from clusterlm.checkpoint.directory import AVERAGED_FROM, TRAINER_STATE, list_complete
from clusterlm.distributed.json_collectives import broadcast_json
from clusterlm.errors import UserError


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
        return Verified(Path(resume), verify(Path(resume)))
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
    ranks read one shared checkpoint, so hashing it once is enough. An average of checkpoints
    (``clusterlm average``) holds weights only: training cannot resume from it."""
    answer: dict[str, Any] = {}
    if is_main_rank():
        try:
            found = resolve_resume(resume, root, own_run)
            if found is not None and AVERAGED_FROM in found.state:
                raise UserError(
                    f"{found.path} averages checkpoints and holds no optimizer state: evaluate, "
                    "translate or export it, and resume from one of the checkpoints it averages"
                )
            if found is not None:
                answer = {"path": str(found.path), "state": found.state}
        except UserError as err:
            answer = {"error": str(err)}
    answer = broadcast_json(answer)
    if "error" in answer:
        raise UserError(answer["error"])
    return Verified(Path(answer["path"]), answer["state"]) if answer else None


def find_checkpoint(run: str, checkpoint_dir: str | None = None) -> Verified:
    """The checkpoint ``checkpoint_dir`` or else the newest complete one of the run, verified."""
    found = resolve_resume(checkpoint_dir or "auto", Path(run) / "checkpoints")
    if found is None:
        raise UserError(
            f"no complete checkpoint in {run}/checkpoints; train first or pass --checkpoint"
        )
    return found
