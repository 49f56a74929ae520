"""`clusterlm bench compare-deepspeed`: the same model on the same batches, trained by DeepSpeed's
ZeRO-k and by clusterlm's zero-k, on N local CPU processes (gloo).

Each (framework, stage) first runs as its own job of fresh processes, so peak memory is that
framework's alone; jobs alternate per round (DeepSpeed ZeRO-1, clusterlm zero1, DeepSpeed ZeRO-2,
...). A step is one or more micro-batches per rank (``accumulation``, DeepSpeed's
``gradient_accumulation_steps``). In a job every rank builds the model with the config's seed, runs
``warmup`` untimed steps and ``steps`` timed ones (the slowest rank's time per step), and reports
tokens/s and its resident-memory growth: the peak resident set size minus the size before the model
was built. Jobs seconds apart can still meet a shared machine in different moods (step times move
between rounds: benchmarks/deepspeed-cpu-xeon-amx-2026-12-01.md), so the speed ratio comes from one
more job per stage that builds both frameworks in the same processes and times them in alternating
blocks of steps.

DeepSpeed runs in fp32 with torch's AdamW (``DS_BUILD_OPS=0`` installs it on a CPU machine without
building ops; its first run JIT-compiles its shared-memory collective op into
``~/.cache/torch_extensions``: minutes on a small machine, cached after). clusterlm runs the config
as its trainer would, with ``parallel.data_parallel = zero{k}``. DeepSpeed is an optional
dependency: ``pip install 'clusterlm[compare]'``."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from clusterlm.config import Config, apply_overrides
from clusterlm.data.loader import TokenLoader, TokenStream
from clusterlm.data.manifest import load_manifest
from clusterlm.distributed.local_spawn import SpawnError, run_local
from clusterlm.errors import UserError
from clusterlm.models import create_model
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.loss import next_token_loss
from clusterlm.train.optim import optimizer_recipe
from clusterlm.train.session import build_session
from clusterlm.train.trainer import train_step


@dataclass(frozen=True)
class JobResult:
    framework: str
    stage: int
    seconds_per_step: float  # median over the timed steps, slowest rank
    tokens_per_step: int
    memory_bytes: tuple[int, ...]  # per rank: peak RSS minus RSS before the model

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.seconds_per_step


def _rss() -> int:
    """Resident set size now (Linux: pages from /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_growth(before: int) -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux reports KiB


def _timed(step, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step``, each the slowest rank's."""
    seconds = torch.empty(steps, dtype=torch.float64)
    dist.barrier()
    for i in range(steps):
        start = time.perf_counter()
        step()
        seconds[i] = time.perf_counter() - start
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return statistics.median(seconds.tolist())


def _deepspeed_stepper(
    rank: int, world: int, cfg: Config, stage: int
) -> tuple[Callable[[], object], int]:
    """(one DeepSpeed ZeRO-``stage`` training step, tokens per step)."""
    import deepspeed  # the optional extra: imported only where DeepSpeed runs

    model = create_model(resolve_model_args(cfg, load_manifest(cfg.data.dir).vocab_size))
    model.reset_parameters(cfg.training.seed)  # the values clusterlm's run starts from
    recipe = optimizer_recipe(model, cfg.optim)
    t = cfg.training
    accumulation = t.tokens_per_step // (t.micro_batch_size * cfg.seq_len * world)
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": [cfg.optim.beta1, cfg.optim.beta2],
                "eps": cfg.optim.eps,
                "torch_adam": True,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=recipe.param_groups,
        config=ds_config,
        dist_init_required=False,
    )
    loader = TokenLoader(
        TokenStream(cfg.data.dir, "train"),
        cfg.seq_len,
        t.micro_batch_size,
        accumulation,
        dp_rank=rank,
        dp_size=world,
        seed=t.seed,
    )

    def step() -> None:
        for x, y in loader.next_step():  # DeepSpeed divides each loss by the accumulation itself
            loss = next_token_loss(engine(x), y)
            engine.backward(loss)
            engine.step()  # steps the optimizer after the last micro-batch only
        loss.item()

    return step, t.tokens_per_step


def _clusterlm_stepper(
    rank: int, world: int, cfg: Config, stage: int
) -> tuple[Callable[[], object], int]:
    """(one clusterlm zero``stage`` training step as the trainer runs it, tokens per step)."""
    cfg = apply_overrides(
        cfg,
        {
            "parallel.data_parallel": f"zero{stage}",
            "parallel.dp_replicate": 0,
            "parallel.dp_shard": 0,
        },
    )
    session = build_session(cfg)
    return (lambda: train_step(session).item()), session.tokens_per_step


STEPPERS = {"deepspeed": _deepspeed_stepper, "clusterlm": _clusterlm_stepper}


def _job(
    rank: int, world: int, framework: str, cfg: Config, stage: int, warmup: int, steps: int
) -> tuple[float, int, int]:
    """One framework alone in fresh processes: (seconds per step, tokens per step, memory
    growth)."""
    torch.set_num_threads(cfg.training.threads or 1)
    before = _rss()
    step, tokens_per_step = STEPPERS[framework](rank, world, cfg, stage)
    for _ in range(warmup):
        step()
    return _timed(step, steps), tokens_per_step, _peak_growth(before)


def _paired_job(
    rank: int, world: int, cfg: Config, stage: int, warmup: int, steps: int, rounds: int
) -> list[float]:
    """Both frameworks built in the same processes, timed in alternating blocks of ``steps`` steps
    (the order swapped each round): clusterlm's tokens/s over DeepSpeed's per round. A slower
    spell of a shared machine then falls on both alike, which separate jobs seconds apart cannot
    promise."""
    torch.set_num_threads(cfg.training.threads or 1)
    steppers = {name: build(rank, world, cfg, stage) for name, build in STEPPERS.items()}
    for step, _ in steppers.values():
        for _ in range(warmup):
            step()
    ratios = []
    for index in range(rounds):
        order = list(steppers) if index % 2 == 0 else list(reversed(steppers))
        seconds_per_token = {
            name: _timed(steppers[name][0], steps) / steppers[name][1] for name in order
        }
        ratios.append(seconds_per_token["deepspeed"] / seconds_per_token["clusterlm"])
    return ratios


def compare(
    cfg: Config,
    nproc: int,
    stages: list[int],
    warmup: int,
    steps: int,
    rounds: int,
    timeout: float,
    paired_rounds: int = 6,
    accumulation: int = 1,
) -> tuple[list[JobResult], dict[int, list[float]]]:
    """Per stage, ``rounds`` x a DeepSpeed job then a clusterlm job on ``nproc`` processes (each
    framework's tokens/s and memory alone), then one job timing both in ``paired_rounds`` paired
    rounds (the speed ratio); a step is ``accumulation`` micro-batches per rank. Returns the jobs'
    results and, per stage, the paired ratios."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "DeepSpeed is not installed; install the optional extra: DS_BUILD_OPS=0 pip install "
            "'clusterlm[compare]'"
        ) from None
    cfg = _shared_config(cfg, nproc, accumulation)
    results, paired = [], {}
    for _ in range(rounds):
        for stage in stages:
            for framework in STEPPERS:
                ranks = _spawn(
                    f"{framework} ZeRO-{stage}",
                    _job,
                    nproc,
                    framework,
                    cfg,
                    stage,
                    warmup,
                    steps,
                    timeout=timeout,
                )
                results.append(
                    JobResult(
                        framework, stage, ranks[0][0], ranks[0][1], tuple(r[2] for r in ranks)
                    )
                )
                print(_row(results[-1]), file=sys.stderr, flush=True)
    for stage in stages:
        paired[stage] = _spawn(
            f"paired ZeRO-{stage}",
            _paired_job,
            nproc,
            cfg,
            stage,
            warmup,
            steps,
            paired_rounds,
            timeout=timeout,
        )[0]
    return results, paired


def _shared_config(cfg: Config, nproc: int, accumulation: int) -> Config:
    """``cfg`` as both frameworks run it: fp32, not compiled, not resumed, each step
    ``accumulation`` micro-batches on each of ``nproc`` ranks."""
    tokens_per_step = cfg.training.micro_batch_size * cfg.seq_len * nproc * accumulation
    return apply_overrides(
        cfg,
        {
            "training.precision": "fp32",
            "training.compile": False,  # what both run alike on any CPU
            "checkpoint.resume": "none",
            "training.tokens_per_step": tokens_per_step,
        },
    )


def _spawn(name: str, job: Callable[..., Any], nproc: int, *args: Any, timeout: float) -> list[Any]:
    try:
        return run_local(job, nproc, *args, timeout=timeout)
    except SpawnError as err:
        raise UserError(
            f"{name} on {nproc} processes failed: {str(err).strip().splitlines()[-1]}"
        ) from None


def _row(r: JobResult) -> str:
    memory = " ".join(f"{b / 2**20:7.1f}" for b in r.memory_bytes)
    return (
        f"{r.framework:<10} {r.stage:>4} {r.tokens_per_s:>10,.0f} "
        f"{r.seconds_per_step * 1e3:>8.1f}  {memory}"
    )


def report(
    results: list[JobResult], paired: dict[int, list[float]], nproc: int, accumulation: int = 1
) -> list[str]:
    lines = [
        f"{'framework':<10} {'ZeRO':>4} {'tokens/s':>10} {'ms/step':>8}  "
        "peak memory growth per rank (MiB)"
    ]
    lines += [_row(r) for r in results]
    for stage in sorted({r.stage for r in results}):
        speed = {
            f: statistics.median(
                r.tokens_per_s for r in results if r.stage == stage and r.framework == f
            )
            for f in STEPPERS
        }
        memory = {
            f: max(max(r.memory_bytes) for r in results if r.stage == stage and r.framework == f)
            for f in STEPPERS
        }
        ratios = paired.get(stage, [])
        steps = f", {accumulation} micro-batches a step" if accumulation > 1 else ""
        lines.append(
            f"ZeRO-{stage} on {nproc} processes{steps}: clusterlm / DeepSpeed tokens/s = "
            f"{speed['clusterlm'] / speed['deepspeed']:.2f} (median over separate jobs)"
            + (
                f", {statistics.median(ratios):.2f} "
                f"(median of {len(ratios)} paired rounds in one job: "
                f"{' '.join(f'{r:.2f}' for r in ratios)})"
                if ratios
                else ""
            )
            + f"; peak memory per rank {memory['clusterlm'] / memory['deepspeed']:.2f}x DeepSpeed's"
        )
    return lines
