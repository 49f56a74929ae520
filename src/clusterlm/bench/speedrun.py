"""`clusterlm bench speedrun`: wall time to a target validation loss, a config against a baseline.

Each run is the trainer's own steps (``build_session`` + ``train_step``) in this process, timed
from before the session is built (so model build and compilation count) until the evaluation that
first scores at or below the target; every evaluation counts too. Both runs are scored on the same
fixed validation windows (``evaluate`` over the baseline's number of windows, at the shared
sequence length), so their losses are directly comparable. The runs go one after the other, and
with ``rounds`` > 1 alternate, so a busy machine slows both alike.
"""

from __future__ import annotations

import math
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clusterlm.config import Config, apply_overrides
from clusterlm.errors import UserError
from clusterlm.hardware import cpu_model_name, kernel_instruction_sets
from clusterlm.train.evaluate import eval_windows, evaluate
from clusterlm.train.session import build_session
from clusterlm.train.trainer import train_step


@dataclass
class Run:
    """One run to the target: seconds to it (None when ``steps`` ran out first) and each
    evaluation."""

    name: str
    settings: str
    seconds: float | None = None
    step: int = 0
    tokens: int = 0
    evaluations: list[tuple[int, float, float]] = field(
        default_factory=list
    )  # (step, seconds, val loss)


def run_to_target(name: str, cfg: Config, target: float, windows: int, scratch: str) -> Run:
    cfg = apply_overrides(cfg, {"training.out_dir": scratch, "checkpoint.resume": "none"})
    start = time.perf_counter()
    session = build_session(cfg)
    t = session.cfg.training
    run = Run(
        name,
        f"{t.precision}, compile={t.compile}, attention={t.attention}, "
        f"batch {session.tokens_per_step} tokens, lr {cfg.optim.lr:g}, {t.steps} steps max",
    )
    interval = t.eval_interval or t.steps
    while session.step < t.steps:
        try:
            train_step(session)
        except UserError as err:  # a step gone non-finite: say which of the runs it was
            raise UserError(f"{name}: {err}") from None
        if session.step % interval and session.step != t.steps:
            continue
        val, _ = evaluate(session.model, session.cfg, session.runtime, windows)
        run.evaluations.append((session.step, time.perf_counter() - start, val))
        print(
            f"{name}: step {session.step}, val loss {val:.4f} at {run.evaluations[-1][1]:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if not math.isfinite(val):
            raise UserError(
                f"{name}: validation loss became {val} at step {session.step}; lower its optim.lr"
            )
        if val <= target:
            run.seconds, run.step, run.tokens = run.evaluations[-1][1], session.step, session.tokens
            break
    return run


def speedrun(cfg: Config, baseline: Config, target: float, rounds: int) -> list[Run]:
    """``rounds`` x (baseline, config) runs to ``target``, alternating."""
    if cfg.seq_len != baseline.seq_len:
        raise UserError(
            f"both runs are scored on the same validation windows: give the config the baseline's "
            f"sequence length ({baseline.seq_len}), not {cfg.seq_len}"
        )
    windows = eval_windows(baseline, 1)
    runs = []
    with tempfile.TemporaryDirectory(prefix="clusterlm-speedrun-") as scratch:
        for r in range(rounds):
            for name, variant in (("baseline", baseline), ("config", cfg)):
                runs.append(run_to_target(name, variant, target, windows, f"{scratch}/{name}-{r}"))
    return runs


def cpu_description() -> str:
    """The CPU model and whether it has native bf16 instructions, from /proc/cpuinfo, and the
    instruction set torch's kernels use (narrower than the flags where ``ATEN_CPU_CAPABILITY`` or
    ``ONEDNN_MAX_CPU_ISA`` restrict it, as when emulating an AVX2-only CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    flags = sorted(
        {f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if re.search(rf"\b{f}\b", info)}
    )
    aten, onednn = kernel_instruction_sets()
    used = aten + (f", oneDNN {onednn}" if onednn else "")
    return (
        f"{cpu_model_name()} (flags: {', '.join(flags) or 'none of avx2/avx512'}; kernels: {used})"
    )


def report(runs: list[Run], target: float) -> list[str]:
    lines = [
        f"time to val loss <= {target} (same {len(runs) and 'fixed'} validation windows), "
        f"CPU: {cpu_description()}"
    ]
    for run in runs:
        reached = (
            f"{run.seconds:7.1f} s at step {run.step} ({run.tokens:,} tokens)"
            if run.seconds is not None
            else f"not reached (best {min(v for _, _, v in run.evaluations):.4f})"
        )
        lines.append(f"  {run.name:<9} {reached}  [{run.settings}]")
        lines.append(
            "            evals: "
            + ", ".join(f"{s}:{v:.3f}@{t:.0f}s" for s, t, v in run.evaluations)
        )
    times = {
        name: [r.seconds for r in runs if r.name == name and r.seconds is not None]
        for name in ("baseline", "config")
    }
    if times["baseline"] and times["config"]:
        ratio = statistics.median(times["config"]) / statistics.median(times["baseline"])
        lines.append(f"config / baseline wall time: {ratio:.2f} (median over rounds)")
    return lines
