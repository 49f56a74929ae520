"""The launcher's variables that place a process in its job: RANK, WORLD_SIZE and LOCAL_RANK, as
torchrun, `clusterlm train --nproc N` or mpirun (``mpi_environment``) set them, checked once so
that a wrong value is one line rather than a ValueError or a rank that waits forever for peers
that do not exist. Unset, they describe a single process. Imports nothing heavy."""

from __future__ import annotations

import os

from clusterlm.errors import UserError

LAUNCHERS = "launch with torchrun, mpirun or `clusterlm train --nproc N`, which set them"


def launch_position() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) of this process: (0, 1, 0) when no launcher started it."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name)
        try:
            values.append(default if text is None else int(text))
        except ValueError:
            raise UserError(
                f"{name}={text!r} in the environment is not a whole number; {LAUNCHERS}"
            ) from None
    rank, world_size, local_rank = values
    if world_size < 1:
        raise UserError(
            f"WORLD_SIZE={world_size} in the environment: a job has at least 1 process; {LAUNCHERS}"
        )
    if not 0 <= rank < world_size:
        raise UserError(
            f"RANK={rank} in the environment is outside 0..{world_size - 1} "
            f"(WORLD_SIZE={world_size}); {LAUNCHERS}"
        )
    if local_rank < 0:
        raise UserError(f"LOCAL_RANK={local_rank} in the environment is negative; {LAUNCHERS}")
    return rank, world_size, local_rank
