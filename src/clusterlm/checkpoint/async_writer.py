"""Saving checkpoints while training goes on (``checkpoint.async_save``), or in line.

Asynchronously, a save copies this rank's tensors to host memory (DCP ``async_save`` stages them
before it returns), and a background thread writes them; training continues meanwhile. When the
write is done on every rank, rank 0 finishes the checkpoint exactly as a synchronous save does
(checksums, ``complete.json``, rename): it becomes visible only whole and verified. At most one
save is in flight: the next one, and the end of training, wait for it. The background writes
coordinate through a process group of their own, so they never interleave with the training
loop's collectives.

A save that fails, in line or in the background, removes its temporary directory, so the earlier
checkpoints and ``latest`` are as they were; when the disk refused it (full, over quota,
read-only, not permitted) the error is one line naming the file and the fix.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from clusterlm.checkpoint import dcp_io
from clusterlm.checkpoint.finite import check_finite
from clusterlm.checkpoint.tensor_storage import TensorWriter
from clusterlm.files import DISK_ERRNOS, disk_error

# A single process saves with no process group on purpose; DCP says so from the writer thread,
# where the caller's warning filters do not reach.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class CheckpointWriter:
    def __init__(self, background: bool = False):
        self.background = background
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._group: Any = None
        # Staging copies into the same host buffers every save (one save in flight at most), so
        # only the first save pays for allocating them.
        # Staging is synchronous: training must not change a tensor before its copy is taken.
        cuda = torch.cuda.is_available()
        self._stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=cuda,
                use_shared_memory=False,
                use_async_staging=False,
                use_non_blocking_copy=cuda,
            )
        )
        self.last_write_s = 0.0  # how long the last background save took from start to visible

    def save(
        self,
        root: Path,
        step: int,
        tensors: dict[str, Any],
        trainer_state: dict[str, Any],
        keep_last: int,
        files: dict[str, bytes] | None = None,
    ) -> Path:
        """Save ``root/step_<step>``; returns its final path (already complete unless background).
        State holding NaN or infinities is refused before anything is written (``finite``)."""
        self.wait()
        check_finite(tensors, step)
        with failing_cleanly(root):
            if not self.background:
                return dcp_io.save_checkpoint(root, step, tensors, trainer_state, keep_last, files)
            return self._start(root, step, tensors, trainer_state, keep_last, files)

    def _start(
        self,
        root: Path,
        step: int,
        tensors: dict[str, Any],
        trainer_state: dict[str, Any],
        keep_last: int,
        files: dict[str, bytes] | None,
    ) -> Path:
        """Stage this rank's tensors and hand the writing to the background thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer")
            # Collective, so every rank creates it at the same (first) save.
            self._group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        tmp, final = dcp_io.begin_checkpoint(root, step)
        with dcp_io.single_process_quiet():
            upload = dcp.async_save(
                tensors,
                storage_writer=TensorWriter(tmp),
                process_group=self._group,
                async_stager=self._stager,
                no_dist=not dist.is_initialized(),
            )
        assert isinstance(upload, Future)  # staging is synchronous: no AsyncSaveResponse
        main = not dist.is_initialized() or dist.get_rank() == 0
        self._pending = self._executor.submit(
            self._finish, upload, main, tmp, final, trainer_state, keep_last, files
        )
        return final

    def _finish(
        self, upload: Future, main: bool, tmp: Path, final: Path, *finish_args: Any
    ) -> None:
        started = time.perf_counter()
        with failing_cleanly(final.parent):
            # On rank 0 this returns once every rank's share and DCP's metadata are written.
            upload.result()
            if main:
                dcp_io.finish_checkpoint(tmp, final, *finish_args)
        self.last_write_s = time.perf_counter() - started

    @property
    def writing(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
            self._stager.close()


@contextmanager
def failing_cleanly(root: Path) -> Iterator[None]:
    """A save that fails in the block leaves no temporary directory under ``root`` (rank 0 removes
    it: only one save is ever in flight), and a refusal of the disk is one line."""
    try:
        yield
    except BaseException as err:
        if not dist.is_initialized() or dist.get_rank() == 0:
            for partial in Path(root).glob(".step_*.tmp"):
                shutil.rmtree(partial, ignore_errors=True)
        cause = disk_cause(err)
        mapped = disk_error(cause, root, "training.out_dir") if cause is not None else None
        if mapped is None:
            raise
        raise mapped from err


def disk_cause(err: BaseException) -> OSError | None:
    """The refused write behind a failed save: ``err`` itself, an exception it was raised from,
    or one a rank reported through DCP's ``CheckpointException``."""
    pending: list[BaseException | None] = [err]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            return current
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None
