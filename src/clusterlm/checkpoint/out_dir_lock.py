"""One run per out_dir: the lock file ``<out_dir>/run.lock``.

The file is JSON naming its holder: pid, host, start time, a random token that identifies the
run, and, for a job started by torchrun or Slurm, the job's id, its attempt (restart counts) and
its process group's address. It is created whole or not at all, and by one of two runs starting
together (``clusterlm.files.exclusive_write_json``).

A run that finds the file:

- held by another attempt of its own job (torchrun restarted the group, or Slurm requeued the
  job, perhaps with rank 0 on another node), not running here, takes it over and keeps the
  token, so the job's checkpoint temporaries stay its own;
- held by a live process on this host, or by a process on another host (whose life cannot be
  checked from here), is refused with one line naming the holder;
- held by a process on this host that is gone (its pid is free, or was reused by a process that
  started later) takes it over with a warning.

The token of the lock this process holds (or inherited from its launcher) names its checkpoint
temporaries (``run_token``); a save removes only temporaries carrying it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

from clusterlm.errors import UserError
from clusterlm.files import exclusive_write_json, temporary_sibling

LOCK = "run.lock"
_held_token: str | None = None  # the token of the lock this process holds or inherited


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    job: str | None = None  # torchrun's run id or Slurm's job id: the same across restarts
    attempt: tuple[int, ...] = ()  # the job's restart counts (Slurm requeues, torchrun restarts)
    group: str | None = None  # the process group's store address (MASTER_ADDR:MASTER_PORT)
    pid_start: int | None = None  # the process's start time in clock ticks since boot (Linux)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def this_process(
    job: str | None = None, attempt: tuple[int, ...] = (), group: str | None = None
) -> Holder:
    pid = os.getpid()
    return Holder(
        pid,
        socket.gethostname(),
        datetime.now().astimezone().isoformat(timespec="seconds"),
        job=job,
        attempt=attempt,
        group=group,
        pid_start=_process_start(pid),
    )


def _process_start(pid: int) -> int | None:
    """When ``pid`` started (field 22 of /proc/PID/stat), so that a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(holder: Holder) -> bool | None:
    """Whether the holder's process still runs; None when it runs on another host."""
    if holder.host != socket.gethostname():
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    started = _process_start(holder.pid)
    return holder.pid_start is None or started is None or started == holder.pid_start


def read_holder(path: Path) -> Holder | None:
    """The lock's holder; None when there is no lock. An unreadable lock raises UserError."""
    try:
        data = json.loads(Path(path).read_text())
        data["attempt"] = tuple(data.get("attempt") or ())
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise UserError(
            f"{path} is not a readable lock ({type(err).__name__}); if no run uses this out_dir, "
            "delete it"
        ) from None


@dataclass
class OutDirLock:
    """A lock this process holds (``owned``: released here) or inherited from its launcher."""

    path: Path
    holder: Holder
    owned: bool = True
    replaced: Holder | None = None  # the holder of a stale lock taken over from a run that is gone

    def release(self) -> None:
        """Remove the lock if it is still this run's (idempotent)."""
        global _held_token
        if _held_token == self.holder.token:
            _held_token = None
        if not self.owned:
            return
        self.owned = False
        with contextlib.suppress(UserError):
            current = read_holder(self.path)
            if (
                current is not None
                and current.token == self.holder.token
                and current.pid == self.holder.pid
            ):
                self.path.unlink(missing_ok=True)


def run_token() -> str | None:
    """The token of the lock this process holds or inherited (None: it holds none)."""
    return _held_token


def take(out_dir: str | Path, me: Holder) -> OutDirLock:
    """Take the lock of ``out_dir`` for ``me`` (see the module docstring), or raise UserError."""
    global _held_token
    path = Path(out_dir) / LOCK
    replaced = None
    # Each pass either creates the lock or removes a stale one that was in the way.
    for _ in range(8):
        if exclusive_write_json(path, asdict(me)):
            _held_token = me.token
            return OutDirLock(path, me, replaced=replaced)
        holder = read_holder(path)
        if holder is None:
            continue
        if _earlier_attempt(holder, me):
            me = replace(me, token=holder.token)
        else:
            _refuse_if_alive(holder, out_dir, path)
            print(
                f"warning: taking over {path} from a run that is gone ({holder.describe()})",
                file=sys.stderr,
                flush=True,
            )
            replaced = holder
        _remove_if_unchanged(path, holder)
    raise UserError(f"could not take {path}: other runs keep taking it; start one run per out_dir")


def inherit(out_dir: str | Path, token: str) -> OutDirLock | None:
    """The lock of ``out_dir`` when it holds ``token`` (taken by this job's launcher), else None."""
    global _held_token
    path = Path(out_dir) / LOCK
    holder = read_holder(path)
    if holder is None or holder.token != token:
        return None
    _held_token = token
    return OutDirLock(path, holder, owned=False)


def _earlier_attempt(holder: Holder, me: Holder) -> bool:
    """Whether ``holder`` is another attempt of this job, not running here. The restart counts
    differ between attempts (a node that joins an elastic job later counts from 0), and are
    equal for two jobs that share an id, which are thus not mistaken for one."""
    return (
        holder.job is not None
        and holder.job == me.job
        and holder.attempt != me.attempt
        and alive(holder) is not True
    )


def _refuse_if_alive(holder: Holder, out_dir: str | Path, path: Path) -> None:
    state = alive(holder)
    if state is True:
        raise UserError(
            f"{out_dir} is in use by another run ({holder.describe()}); wait for it to end or "
            "choose another training.out_dir"
        )
    if state is None:
        raise UserError(
            f"{out_dir} is in use by another run ({holder.describe()}); if that run is gone, "
            f"delete {path}, else choose another training.out_dir"
        )


def _remove_if_unchanged(path: Path, holder: Holder) -> None:
    """Remove the lock if it is still ``holder``'s: moved aside first, and put back if another run
    replaced it meanwhile."""
    aside = temporary_sibling(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        moved = read_holder(aside)
    except UserError:
        moved = None
    if moved is not None and moved.token != holder.token:
        with contextlib.suppress(OSError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)
