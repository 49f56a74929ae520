"""Starting jobs through the field's launchers: torchrun on one or many nodes (``torchrun``),
Slurm's sbatch with requeue (``slurm``, ``jobs``), and mpirun's ranks (``mpi``).

A launcher module turns typed ``LaunchOptions`` into the real launcher's command line and runs
it; the ranks it starts run ``python -m clusterlm <command>`` with the same arguments.
"""

from clusterlm.launch.torchrun import LaunchOptions, launch

__all__ = ["LaunchOptions", "launch"]
