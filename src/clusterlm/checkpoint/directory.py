"""Where a run's checkpoints lie on disk, for the layers that find them without loading them
(the config adopts a pretrained run's model shape; the trainer resumes and fine-tunes)."""

from __future__ import annotations

from pathlib import Path

COMPLETE = "complete.json"  # written last: a checkpoint directory with it finished writing
TRAINER_STATE = "trainer.json"  # step, data position and the run's config, as plain JSON
AVERAGED_FROM = "averaged_from"  # in an average's trainer state: its sources; weights only


def list_complete(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` that finished writing, oldest first (not yet
    checksum-verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_of(path: str | Path) -> Path | None:
    """``path`` itself when it is a complete checkpoint, else the newest complete checkpoint of the
    run directory ``path`` (None when there is none)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    found = list_complete(path / "checkpoints")
    return found[-1] if found else None
