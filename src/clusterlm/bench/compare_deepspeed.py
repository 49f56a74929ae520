"""`clusterlm bench compare-deepspeed`: the same model on the same batches, trained by DeepSpeed's
ZeRO-k and by clusterlm's zero-k, on N local CPU processes (gloo).

Each (framework, stage) is its own job of fresh processes, so peak memory is that framework's
alone; jobs alternate per round (DeepSpeed ZeRO-1, clusterlm zero1, DeepSpeed ZeRO-2, ...), so a
busy machine slows both alike. In a job every rank builds the model with the config's seed, runs
``warmup`` untimed steps and ``steps`` timed ones (the slowest rank's time per step), and reports
tokens/s and its resident-memory growth: the peak resident set size minus the size before the model
was built. DeepSpeed runs in fp32 with torch's AdamW (``DS_BUILD_OPS=0`` installs it on a CPU
machine without building ops; its first run JIT-compiles its shared-memory collective op into
``~/.cache/torch_extensions``: minutes on a small machine, cached after). clusterlm runs the config
as its trainer would, with ``parallel.data_parallel = zero{k}``. DeepSpeed is an optional dependency: ``pip install
'clusterlm[compare]'``.
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from clusterlm.comm.spawn import SpawnError, run_local
from clusterlm.config import Config, resolve_model_args
from clusterlm.data.loader import TokenLoader
from clusterlm.data.manifest import load_manifest
from clusterlm.errors import UserError
from clusterlm.models import create_model
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


def _deepspeed_job(rank: int, world: int, cfg: Config, stage: int, warmup: int, steps: int) -> tuple[float, int, int]:
    import deepspeed  # the optional extra: imported only in a DeepSpeed job

    torch.set_num_threads(cfg.training.threads or 1)
    before = _rss()
    model = create_model(resolve_model_args(cfg, load_manifest(cfg.data.dir).vocab_size))
    model.reset_parameters(cfg.training.seed)  # the values clusterlm's run starts from
    recipe = optimizer_recipe(model, cfg.optim)
    t = cfg.training
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": 1,
        "gradient_clipping": t.grad_clip, "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2],
                                                  "eps": cfg.optim.eps, "torch_adam": True}},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=recipe.param_groups, config=ds_config,
                                      dist_init_required=False)
    loader = TokenLoader(cfg.data.dir, "train", cfg.seq_len, t.micro_batch_size, 1, dp_rank=rank, dp_size=world,
                         seed=t.seed)

    def step() -> None:
        (x, y), = loader.next_step()
        loss = next_token_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        loss.item()

    for _ in range(warmup):
        step()
    return _timed(step, steps), t.micro_batch_size * cfg.seq_len * world, _peak_growth(before)


def _clusterlm_job(rank: int, world: int, cfg: Config, stage: int, warmup: int, steps: int) -> tuple[float, int, int]:
    torch.set_num_threads(cfg.training.threads or 1)
    before = _rss()
    cfg = copy.deepcopy(cfg)
    cfg.parallel.data_parallel = f"zero{stage}"
    cfg.parallel.dp_replicate = cfg.parallel.dp_shard = 0
    session = build_session(cfg)
    for _ in range(warmup):
        train_step(session)
    seconds = _timed(lambda: train_step(session).item(), steps)
    return seconds, session.tokens_per_step, _peak_growth(before)


JOBS = {"deepspeed": _deepspeed_job, "clusterlm": _clusterlm_job}


def compare(cfg: Config, nproc: int, stages: list[int], warmup: int, steps: int, rounds: int,
            timeout: float) -> list[JobResult]:
    """``rounds`` x, per stage, a DeepSpeed job then a clusterlm job on ``nproc`` processes."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError("DeepSpeed is not installed; install the optional extra: DS_BUILD_OPS=0 pip install "
                        "'clusterlm[compare]'") from None
    cfg = copy.deepcopy(cfg)
    cfg.training.precision, cfg.training.compile = "fp32", False  # what both run alike on any CPU
    cfg.checkpoint.resume = "none"
    results = []
    for _ in range(rounds):
        for stage in stages:
            for framework, job in JOBS.items():
                try:
                    ranks = run_local(job, nproc, cfg, stage, warmup, steps, timeout=timeout)
                except SpawnError as err:
                    raise UserError(f"{framework} ZeRO-{stage} on {nproc} processes failed: "
                                    f"{str(err).strip().splitlines()[-1]}") from None
                results.append(JobResult(framework, stage, ranks[0][0], ranks[0][1], tuple(r[2] for r in ranks)))
                print(_row(results[-1]), file=sys.stderr, flush=True)
    return results


def _row(r: JobResult) -> str:
    memory = " ".join(f"{b / 2**20:7.1f}" for b in r.memory_bytes)
    return f"{r.framework:<10} {r.stage:>4} {r.tokens_per_s:>10,.0f} {r.seconds_per_step * 1e3:>8.1f}  {memory}"


def report(results: list[JobResult], nproc: int) -> list[str]:
    lines = [f"{'framework':<10} {'ZeRO':>4} {'tokens/s':>10} {'ms/step':>8}  peak memory growth per rank (MiB)"]
    lines += [_row(r) for r in results]
    for stage in sorted({r.stage for r in results}):
        speed = {f: statistics.median(r.tokens_per_s for r in results if r.stage == stage and r.framework == f)
                 for f in JOBS}
        lines.append(f"ZeRO-{stage} on {nproc} processes: clusterlm / DeepSpeed tokens/s = "
                     f"{speed['clusterlm'] / speed['deepspeed']:.2f} (median over rounds)")
    return lines
