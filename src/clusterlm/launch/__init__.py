"""Starting jobs through the field's launchers: torchrun on one or many nodes (``torchrun``),
Slurm's sbatch with requeue (``slurm``, ``jobs``), and mpirun's ranks (``mpi``).

A launcher module turns typed ``LaunchOptions`` into the real launcher's command line and runs
it; the ranks it starts run ``python -m clusterlm <command>`` with the same arguments.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LaunchOptions", "launch"]


def __getattr__(name: str) -> Any:
    """torchrun's names on first use: that module imports the config tree and torch, which
    `clusterlm jobs` and `cancel` (Slurm's commands and a file tail) do without, to answer at
    once."""
    if name in __all__:
        from clusterlm.launch import torchrun

        return getattr(torchrun, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
