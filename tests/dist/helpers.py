"""Shared helper for multi-process tests: ``run_distributed(fn, world_size, *args)``.

Import it relatively from a test module in this package (``from .helpers import run_distributed``).
``fn`` must be a module-level function taking ``(rank, world_size, *args)``; it runs in a fresh
spawned process with the default process group already initialized (gloo over loopback, one
intra-op thread, torchrun-like RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from clusterlm.distributed.local_spawn import SpawnError, run_local
from clusterlm.train.trainer import TrainSummary


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 60,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
    result_types: Iterable[type] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return every rank's result.

    A rank's exception, a rank's death, or ``timeout`` seconds passing kills all processes and
    fails the test with an AssertionError holding every failed rank's traceback (or the ranks
    still running at the timeout). ``env`` adds environment variables in every worker; results come
    back as ``run_local`` loads them, with ``TrainSummary`` and the classes of ``result_types``
    allowed.
    """
    try:
        return run_local(
            fn,
            world_size,
            *args,
            timeout=timeout,
            backend=backend,
            env=env,
            result_types=(TrainSummary, *result_types),
        )
    except SpawnError as err:
        raise AssertionError(str(err)) from None
