"""Which run this process belongs to, and whether the launcher restarted it after a failure.

torchrun gives every worker of a job the same ``TORCHELASTIC_RUN_ID`` and counts the group's
restarts in ``TORCHELASTIC_RESTART_COUNT``. Checkpoints record the run id, so a restarted group
resumes from the newest checkpoint its own job saved, with no flag from the user.
"""

from __future__ import annotations

import os


def run_id() -> str | None:
    return os.environ.get("TORCHELASTIC_RUN_ID")


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def own_run() -> str | None:
    """The run id when this group is a restart (its checkpoints come first on resume), else None."""
    return run_id() if restart_count() > 0 else None
