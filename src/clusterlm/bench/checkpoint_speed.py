"""`clusterlm bench checkpoint`: how long a checkpoint stops training, in line against async.

A session of the config trains a step (so the optimizer state exists), then saves ``saves``
times with ``steps`` training steps between saves, once writing in line and once in the
background (``checkpoint.async_save``). The stall of a save is the time the training loop spends
inside ``save``: the whole write in line; staging to host memory, plus any wait for the previous
save, in the background. The wait for the last background save at the end is counted too.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from clusterlm.checkpoint.dcp_io import list_complete
from clusterlm.config import Config, apply_overrides
from clusterlm.train.session import build_session, save
from clusterlm.train.trainer import train_step


def _stalls(
    cfg: Config, background: bool, saves: int, steps: int
) -> tuple[list[float], float, float, int]:
    """(stall of each save, seconds per training step, background write seconds, checkpoint
    bytes)."""
    s = build_session(cfg)
    s.writer.background = background
    train_step(s)
    save(s)  # warm-up: first-time costs (the writer's process group, allocations) are not a save's
    s.writer.wait()
    stalls, step_s, write_s = [], [], []
    for _ in range(saves):
        start = time.perf_counter()
        save(s)
        stalls.append(time.perf_counter() - start)
        for _ in range(steps):
            start = time.perf_counter()
            train_step(s)
            step_s.append(time.perf_counter() - start)
        write_s.append(s.writer.last_write_s)
    start = time.perf_counter()
    s.writer.close()
    stalls[-1] += time.perf_counter() - start
    size = sum(p.stat().st_size for p in list_complete(s.checkpoints)[-1].iterdir())
    return stalls, statistics.mean(step_s) if step_s else 0.0, statistics.mean(write_s), size


def bench_checkpoint(cfg: Config, saves: int, steps: int) -> list[str]:
    lines, sync_stall = [], None
    for background in (False, True):
        with tempfile.TemporaryDirectory(prefix="clusterlm-bench-ckpt-") as scratch:
            variant = apply_overrides(
                cfg,
                {
                    "training.out_dir": scratch,
                    "checkpoint.resume": "none",
                    "checkpoint.interval": 0,
                    "checkpoint.keep_last": 2,
                },
            )
            stalls, step_s, write_s, size = _stalls(variant, background, saves, steps)
        mean = statistics.mean(stalls)
        if sync_stall is None:
            sync_stall = mean
            lines.append(
                f"checkpoint {size / 2**20:.0f} MiB per save, {saves} saves, "
                f"{steps} training steps of {step_s:.2f} s between saves"
            )
            lines.append(
                f"synchronous:  stall per save {mean:.2f} s "
                f"(min {min(stalls):.2f}, max {max(stalls):.2f})"
            )
        else:
            lines.append(
                f"asynchronous: stall per save {mean:.2f} s "
                f"(min {min(stalls):.2f}, max {max(stalls):.2f})"
                f" = {100 * mean / sync_stall:.0f}% of synchronous; written in the background in "
                f"{write_s:.2f} s"
            )
    return lines
