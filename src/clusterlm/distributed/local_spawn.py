"""Run a function on N local processes that form one process group, with a hard timeout.

Used by the benchmarks, ``plan --validate`` and the multi-process tests. Each worker gets the
caller's environment and working directory plus a torchrun-like environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE), one intra-op thread, and a process group rendezvoused through a
FileStore in a private temporary directory: no listening socket for the rendezvous and no port
race. Gloo's own connections are pinned to the loopback interface.

Workers are forked from multiprocessing's fork server, which imports the trainer (and with it
torch, FSDP, DTensor and pipelining) once when it starts: a fresh interpreter importing them
takes seconds per worker on a small machine, a fork milliseconds. The server is a fresh
interpreter that has run no kernel (no CUDA or OpenMP state to inherit), the way DataLoader
workers are forked. It starts at the first call, so variables that torch reads only when
imported are the ones set then.
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clusterlm.distributed.listeners import loopback_interface

# After the first failure, how long the other ranks get to report their own error (often the
# consequence, sometimes the cause) before they are killed.
_GRACE_AFTER_FAILURE_S = 2.0
# What the fork server imports, by name (this module does not depend on the trainer), besides
# ``fn``'s own module, which Python 3.11's server skips unless the installed packages hold it.
_PRELOAD = ("clusterlm.train.trainer",)


class SpawnError(RuntimeError):
    """A rank raised, died, or the group did not finish in time; the message holds every report."""


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60.0,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
    result_types: Iterable[type] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return each rank's
    result.

    ``fn`` must be a module-level function. Its result comes back through ``torch.load`` with
    ``weights_only=True``, which runs no code: tensors, numbers, strings and containers of them,
    plus the exact classes named in ``result_types`` (dataclasses of such values, say). When any
    rank raises or dies, returns something else, or ``timeout`` seconds pass, every process
    still running is killed and ``SpawnError`` lists each failed rank's report (or the ranks
    that were still running).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, fn.__module__])  # used when the server starts
    caller = (os.getcwd(), dict(os.environ))
    with tempfile.TemporaryDirectory(prefix="clusterlm-pg-") as tmp:
        store_path = os.path.join(tmp, "store")
        processes, readers = [], []
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(
                    fn,
                    rank,
                    world_size,
                    args,
                    store_path,
                    backend,
                    caller,
                    dict(env or {}),
                    timeout,
                    writer,
                ),
                daemon=True,
            )
            proc.start()
            writer.close()  # the child holds the only write end, so its death reads as EOF
            processes.append(proc)
            readers.append(reader)
        try:
            return _collect(processes, readers, timeout, tuple(result_types))
        finally:
            for proc in processes:
                if proc.is_alive():
                    proc.kill()
                proc.join()
            for reader in readers:
                reader.close()


def _collect(
    processes: list[Any],
    readers: list[Connection],
    timeout: float,
    result_types: tuple[type, ...],
) -> list[Any]:
    deadline = time.monotonic() + timeout
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    pending = dict(enumerate(readers))
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        for ready in wait(list(pending.values()), timeout=deadline - now):
            reader = cast(Connection, ready)  # wait returns some of the connections it was given
            rank = readers.index(reader)
            del pending[rank]
            try:
                message = _decode(reader.recv_bytes(), result_types)
            except EOFError:
                processes[rank].join(timeout=1.0)
                failures[rank] = f"died without a result (exit code {processes[rank].exitcode})"
                continue
            except _Refused as err:
                failures[rank] = str(err)
                continue
            if "error" in message:
                failures[rank] = message["error"]
            else:
                results[rank] = message["ok"]
        if failures:
            deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
    if not failures and not pending:
        return [results[rank] for rank in range(len(readers))]
    report = [f"rank {rank} failed:\n{text}" for rank, text in sorted(failures.items())]
    if pending:
        still_running = sorted(pending)
        if failures:
            report.append(f"ranks still running when killed: {still_running}")
        else:
            report.append(f"timed out after {timeout:g}s, ranks still running: {still_running}")
    raise SpawnError("\n".join(report))


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    args: tuple[Any, ...],
    store_path: str,
    backend: str,
    caller: tuple[str, dict[str, str]],
    env: dict[str, str],
    timeout: float,
    result_pipe: Connection,
) -> None:
    cwd, environ = caller
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME=loopback_interface(),
    )
    os.environ.update(env)
    torch.set_num_threads(1)
    report: dict[str, Any]  # {"ok": the result} or {"error": the traceback}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            report = {"ok": fn(rank, world_size, *args)}
        finally:
            dist.destroy_process_group()
    except BaseException:
        report = {"error": traceback.format_exc()}
    try:
        payload = _encode(report)
    except Exception:  # a result torch.save cannot write
        payload = _encode({"error": traceback.format_exc()})
    result_pipe.send_bytes(payload)
    result_pipe.close()


def _encode(report: dict[str, Any]) -> bytes:
    """The report in torch's format, whole in memory: the parent may read it after this process
    has exited, which rules out torch's shared-memory tensor passing."""
    buffer = io.BytesIO()
    torch.save(report, buffer)
    return buffer.getvalue()


class _Refused(Exception):
    """A rank's result holds a class that ``result_types`` does not allow."""


def _decode(payload: bytes, result_types: tuple[type, ...]) -> dict[str, Any]:
    try:
        with torch.serialization.safe_globals(list(result_types)):
            message = torch.load(io.BytesIO(payload), weights_only=True)
    except pickle.UnpicklingError:
        allowed = {f"{kind.__module__}.{kind.__qualname__}" for kind in result_types}
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(payload))
        refused = ", ".join(name for name in unsafe if name not in allowed)
        raise _Refused(
            f"returned {refused}, which is not in run_local's result_types, so it was not loaded"
        ) from None
    assert isinstance(message, dict)  # what _encode wrote
    return message
