"""Who takes a run's out_dir, and what a fresh run may find there.

A job takes the lock of its out_dir once (``clusterlm.checkpoint.out_dir_lock``), before anything
is written:

- `clusterlm train --nproc N` on one node: the launcher, for the whole job including torchrun's
  restarts; the ranks it starts find its token in ``CLUSTERLM_OUT_DIR_LOCK`` and do not take it
  again;
- ranks started by torchrun, mpirun or Slurm directly: rank 0, while the other ranks wait until
  the lock names their process group (so they write nothing into another run's out_dir);
- a single process: itself.

Whoever takes it also checks what the out_dir holds: a fresh run (``checkpoint.resume = none``)
into an out_dir with complete checkpoints is refused unless it continues them (``--resume auto``)
or replaces them (``--overwrite``, which deletes them first). A restarted group continues its
own checkpoints, so it is never refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from clusterlm.checkpoint import LATEST, list_complete
from clusterlm.checkpoint.dcp_io import remove_temporaries
from clusterlm.checkpoint.out_dir_lock import (
    LOCK,
    OutDirLock,
    inherit,
    read_holder,
    take,
    this_process,
)
from clusterlm.config import Config
from clusterlm.distributed import restarts
from clusterlm.distributed.mpi_environment import torch_variables
from clusterlm.errors import UserError
from clusterlm.observe.watchdog import HEARTBEATS

ENV_TOKEN = "CLUSTERLM_OUT_DIR_LOCK"  # the launcher's lock token, for the ranks it starts
POLL_S = 0.05


def claim_out_dir(cfg: Config) -> OutDirLock | None:
    """In a training process: the lock it holds or inherited, or None on a rank that waited for
    rank 0 to take it. Raises UserError when the out_dir is another run's or a fresh run may not
    start there."""
    out_dir = cfg.training.out_dir
    token = os.environ.get(ENV_TOKEN)
    inherited = inherit(out_dir, token) if token else None
    if inherited is not None:
        return inherited
    env = {**os.environ, **_mpi_variables()}
    rank = int(env.get("RANK", "0") or 0)
    # The group's store address: the same on all its ranks (their restart counts may differ after an
    # elastic change), and no other live job's.
    group = (
        f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        if "MASTER_ADDR" in env and "MASTER_PORT" in env
        else None
    )
    if rank != 0:
        _wait_for_rank_zero(out_dir, group, rank, cfg.parallel.timeout_s)
        return None
    job = os.environ.get("SLURM_JOB_ID") or restarts.run_id()
    attempt = (int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), restarts.restart_count())
    return _prepared(cfg, take(out_dir, this_process(job, attempt, group)))


@contextlib.contextmanager
def launcher_claim(cfg: Config, env: MutableMapping[str, str]) -> Iterator[None]:
    """The launcher holds the out_dir for the job it runs; ``env`` (the ranks' environment)
    passes its token on. An out_dir it created and the job left empty (bad input) is removed."""
    out_dir = Path(cfg.training.out_dir)
    created = not out_dir.exists()
    lock = _prepared(cfg, take(out_dir, this_process()))
    env[ENV_TOKEN] = lock.holder.token
    try:
        yield
    finally:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()


def untouched(out_dir: str) -> bool:
    """Whether no run has written into ``out_dir``: it does not exist, or it holds only heartbeats
    (of a run that failed to start) and the lock this job's launcher took."""
    path = Path(out_dir)
    if not path.exists():
        return True
    names = {p.name for p in path.iterdir()}
    if not names <= {LOCK, HEARTBEATS}:
        return False
    if LOCK not in names:
        return True
    token = os.environ.get(ENV_TOKEN)
    with contextlib.suppress(UserError):
        holder = read_holder(path / LOCK)
        return bool(token) and holder is not None and holder.token == token
    return False
    with contextlib.suppress(UserError):
        holder = read_holder(path / LOCK)
        return holder is not None and holder.token == token
    return False


def release(lock: OutDirLock | None) -> None:
    if lock is not None:
        lock.release()


def _mpi_variables() -> dict[str, str]:
    try:
        return torch_variables(os.environ)
    except UserError:  # reported, with its fix, when the process group is joined
        return {}


def _wait_for_rank_zero(out_dir: str, group: str | None, rank: int, timeout_s: float) -> None:
    """Return once rank 0 of this process group holds the lock (at once when the group cannot be
    named); rank 0 fails the job meanwhile if the out_dir is another run's."""
    if group is None:
        return
    deadline = time.monotonic() + timeout_s
    path = Path(out_dir) / LOCK
    while time.monotonic() < deadline:
        with contextlib.suppress(UserError):
            holder = read_holder(path)
            if holder is not None and holder.group == group:
                return
        time.sleep(POLL_S)
    raise UserError(
        f"rank {rank}: rank 0 did not take {path} within parallel.timeout_s = {timeout_s:g} s"
    )


def _prepared(cfg: Config, lock: OutDirLock) -> OutDirLock:
    """``lock``, once the out_dir is fit for this run; released when it is not."""
    try:
        _check_fresh_run(cfg, lock)
    except BaseException:
        lock.release()
        raise
    return lock


def _check_fresh_run(cfg: Config, lock: OutDirLock) -> None:
    root = Path(cfg.training.out_dir) / "checkpoints"
    if lock.replaced is not None:  # the unfinished saves of the run that is gone
        remove_temporaries(root, lock.replaced.token)
    if cfg.checkpoint.resume != "none" or restarts.own_run() is not None:
        return
    found = list_complete(root)
    if not found:
        return
    if not cfg.checkpoint.overwrite:
        raise UserError(
            f"{cfg.training.out_dir} holds checkpoints of an earlier run "
            f"(newest: {found[-1].name}); continue it with --resume auto, "
            "replace it with --overwrite (deletes them), or choose another training.out_dir"
        )
    for path in found:
        shutil.rmtree(path)
    (root / LATEST).unlink(missing_ok=True)
    print(
        f"overwrite: deleted {len(found)} checkpoint(s) of an earlier run from {root}",
        file=sys.stderr,
        flush=True,
    )
