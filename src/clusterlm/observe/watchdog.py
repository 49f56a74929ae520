"""Hang detection: every rank reports its phase; a rank without progress ends the job, by name.

Each rank's training code calls ``phase(name, step)`` as it enters data loading, forward and
backward (where the gradient collectives run), the optimizer, a checkpoint or an evaluation. A
thread per rank writes that as a heartbeat file under ``<out_dir>/heartbeat/`` about once a
second. Ranks 0 and 1 also watch every heartbeat, timing changes on their own clock (no clock
sync needed): a rank whose heartbeat stops (a stopped or frozen process) or a job in which no
rank moved on for ``parallel.hang_timeout_s`` is hung. The watcher prints which rank(s) are
stuck, in which phase and step, writes ``hang.json`` (every other rank's thread sees it and
exits), ends the stuck processes on its host, and exits ``EXIT_HUNG``: well before the backend's
collective timeout. On NCCL each exiting rank first dumps its flight recorder
(``nccl_trace_rank<N>.pkl``). Heartbeats carry the run id and restart count, so files left by
an earlier group are ignored; they also tell ``clusterlm chaos`` which processes are the ranks.

The watchdog is never silently off: a heartbeat it cannot write (a full or read-only disk) stops
its thread with the error recorded, and the rank's next ``phase`` call raises it as one line, so
the job fails instead of running unwatched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clusterlm.distributed import restarts
from clusterlm.distributed.launch_variables import launch_position
from clusterlm.errors import UserError
from clusterlm.files import atomic_write_json

EXIT_HUNG = 124  # as timeout(1)
VERDICT = "hang.json"
WATCHERS = 2  # ranks 0 and 1 watch, so a stopped rank 0 is reported too
PHASES = ("setup", "data", "forward_backward", "optimizer", "checkpoint", "eval", "done")
_current: Watchdog | None = None

HEARTBEATS = "heartbeat"  # the directory in out_dir where every rank beats


def phase(name: str, step: int) -> None:
    """Record that this rank entered ``name`` at ``step`` (nothing when the watchdog is off);
    raises the watchdog's failure to write its heartbeat, if it had one."""
    if _current is not None:
        if _current.failure is not None:
            raise _current.failure
        _record(_current, name, step)


def _record(watchdog: Watchdog, name: str, step: int) -> None:
    watchdog.state = (name, step, time.time())
    if watchdog.start_step is None and name != "setup":
        watchdog.start_step = step  # where training (re)started: resumed step or 0


def generation() -> str:
    return f"{restarts.run_id()}:{restarts.restart_count()}"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def all_heartbeats(directory: Path) -> list[dict[str, Any]]:
    """The last heartbeat of every rank file under ``directory``, of whichever group wrote it."""
    return [beat for beat in map(_read, Path(directory).glob("rank_*.json")) if beat]


def read_heartbeats(directory: Path) -> dict[int, dict[str, Any]]:
    """Each rank's last heartbeat written by this process's group."""
    return {
        beat["rank"]: beat
        for beat in all_heartbeats(directory)
        if beat.get("generation") == generation()
    }


class Watchdog(threading.Thread):
    def __init__(self, directory: Path, rank: int, world_size: int, timeout_s: float):
        super().__init__(name="watchdog", daemon=True)
        self.directory, self.rank, self.world_size, self.timeout_s = (
            directory,
            rank,
            world_size,
            timeout_s,
        )
        self.state: tuple[str, int, float] = ("setup", 0, time.time())
        self.start_step: int | None = None
        self.started = time.time()
        self.interval = min(1.0, timeout_s / 4)
        self._stopping = threading.Event()
        self._seen: dict[
            int, tuple[Any, Any, float, float]
        ] = {}  # rank -> (beat, progress, changed at, moved at)
        self.failure: UserError | None = (
            None  # why the heartbeat stopped, raised by the next ``phase``
        )

    def run(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            while not self._stopping.wait(self.interval):
                self._beat()
                verdict = _read(self.directory / VERDICT)
                if (
                    verdict.get("generation") == generation()
                    and verdict.get("time", 0) >= self.started
                ):
                    self._end({}, [])
                if self.rank < WATCHERS:
                    self._watch()
            self._beat()  # the last one says "done": a finished rank is not a silent one
        except Exception as err:  # the training thread raises it: never a silent end of the watch
            self.failure = self._failure(err)

    def _failure(self, err: Exception) -> UserError:
        off = "or set parallel.hang_timeout_s = 0 to run without the watchdog"
        if isinstance(
            err, (OSError, UserError)
        ):  # UserError: a full or read-only disk (atomic_write)
            return UserError(
                f"the hang watchdog of rank {self.rank} cannot write its heartbeat in "
                f"{self.directory} ({err}); fix that disk, {off}"
            )
        return UserError(
            f"the hang watchdog of rank {self.rank} stopped ({type(err).__name__}: {err}); {off}"
        )

    def _beat(self) -> None:
        name, step, since = self.state
        atomic_write_json(
            self.directory / f"rank_{self.rank:05d}.json",
            {
                "rank": self.rank,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "phase": name,
                "step": step,
                "since": since,
                "beat": time.time(),
                "generation": generation(),
                "start_step": self.start_step,
            },
            setting="training.out_dir",
        )

    def _watch(self) -> None:
        # Files of an earlier run in this out_dir (same ranks, or more) are old: ignored.
        now = time.monotonic()
        beats = {
            r: b
            for r, b in read_heartbeats(self.directory).items()
            if r < self.world_size and b["beat"] >= self.started
        }
        for rank, beat in beats.items():
            progress = (beat["phase"], beat["step"], beat["since"])
            old = self._seen.get(rank)
            changed = now if old is None or old[0] != beat["beat"] else old[2]
            moved = now if old is None or old[1] != progress else old[3]
            self._seen[rank] = (beat["beat"], progress, changed, moved)
        running = {
            r: seen for r, seen in self._seen.items() if r in beats and beats[r]["phase"] != "done"
        }
        silent = [r for r, seen in running.items() if now - seen[2] > self.timeout_s]
        still = [r for r, seen in running.items() if now - seen[3] > self.timeout_s]
        if not silent and (not still or len(still) < len(running)):
            return
        if silent:
            stuck = silent
        else:  # everyone waits: the laggards are the ones the others wait for
            order = {r: (beats[r]["step"], PHASES.index(beats[r]["phase"])) for r in still}
            stuck = [r for r in still if order[r] == min(order.values())]
        if self.rank != min(r for r in range(min(WATCHERS, self.world_size)) if r not in silent):
            return  # the lowest responsive watcher reports
        print(describe_hang(beats, stuck, silent, self.timeout_s), file=sys.stderr, flush=True)
        # The other ranks' threads see it and exit; if it cannot be written, this rank still ends
        # the job.
        try:
            atomic_write_json(
                self.directory / VERDICT,
                {"generation": generation(), "time": time.time(), "stuck": stuck},
            )
        except (OSError, UserError) as err:
            print(
                f"hang: cannot write {self.directory / VERDICT} ({err})",
                file=sys.stderr,
                flush=True,
            )
        self._end(beats, stuck)

    def _end(self, beats: dict[int, dict[str, Any]], stuck: list[int]) -> None:
        dump_flight_recorder(self.directory, self.rank)
        host = socket.gethostname()
        for rank in stuck:  # a stopped process ignores the launcher's SIGTERM: end it here
            if beats[rank]["host"] == host:
                with contextlib.suppress(OSError):
                    os.kill(beats[rank]["pid"], signal.SIGKILL)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)

    def stop(self) -> None:
        self._stopping.set()


def describe_hang(
    beats: dict[int, dict[str, Any]], stuck: list[int], silent: list[int], timeout_s: float
) -> str:
    where = "; ".join(
        f"rank {r} in phase {beats[r]['phase']} at step {beats[r]['step']} (pid {beats[r]['pid']} "
        f"on {beats[r]['host']}{', not responding' if r in silent else ''})"
        for r in sorted(stuck)
    )
    waiting = sorted(set(beats) - set(stuck))
    others = f"; ranks {', '.join(map(str, waiting))} wait for it" if waiting else ""
    return (
        f"hang: no progress for {timeout_s:g} s (parallel.hang_timeout_s): {where}{others}; "
        f"ending the job with status {EXIT_HUNG}"
    )


def dump_flight_recorder(directory: Path, rank: int) -> None:
    """NCCL's record of recent collectives (TORCH_NCCL_TRACE_BUFFER_SIZE), for the post-mortem."""
    if not (dist.is_initialized() and dist.get_backend() == "nccl"):
        return
    dump = getattr(torch._C._distributed_c10d, "_dump_nccl_trace", None)
    if dump is not None:
        with contextlib.suppress(Exception):
            (directory / f"nccl_trace_rank{rank}.pkl").write_bytes(dump())


def start(out_dir: str, timeout_s: float) -> Watchdog | None:
    """Start this rank's watchdog (before the process group, so NCCL records collectives)."""
    global _current
    if timeout_s <= 0:
        return None
    if torch.cuda.is_available():
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    rank, world_size, _ = launch_position()
    _current = Watchdog(Path(out_dir) / HEARTBEATS, rank, world_size, timeout_s)
    _current.start()
    return _current


def holds_only_heartbeats(out_dir: str) -> bool:
    """Whether ``out_dir`` is absent or holds nothing but heartbeats: a run that fails to start
    there may then remove them (``remove_heartbeats``). The other ranks of a job that start at the
    same time find one another's heartbeats, so they decide alike."""
    path = Path(out_dir)
    return not path.exists() or (path.is_dir() and {p.name for p in path.iterdir()} <= {HEARTBEATS})


def remove_heartbeats(out_dir: str) -> None:
    """Remove the heartbeat directory, and ``out_dir`` when nothing else is in it."""
    shutil.rmtree(Path(out_dir) / HEARTBEATS, ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(out_dir).rmdir()


def stop() -> None:
    global _current
    if _current is not None:
        _record(_current, "done", _current.state[1])
        _current.stop()
        _current.join()
        _current = None
