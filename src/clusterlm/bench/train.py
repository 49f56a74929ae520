"""`clusterlm bench train`: time real training steps of a config and report tokens/s, ms/step, MFU
and peak memory, with the probes that explain them.

The steps are the trainer's own (``build_session`` + ``train_step``). A baseline variant of the
same config, when given, is built in the same process and the two are timed in alternating
rounds, so machine noise hits both. Then, on the config: without a pipeline, the bytes the first
block saves for backward per micro-batch next to the planner's ``layer_activation_bytes`` for the
same layout; with one, the bubble measured inside the schedule next to (p-1)/(v*m); and, when
asked, where each variant's CPU step goes by kind of work.
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from clusterlm.bench.breakdown import step_breakdown
from clusterlm.bench.probes import BubbleSample, block_activation_bytes, pipeline_bubble
from clusterlm.bench.timer import time_steps
from clusterlm.checkpoint.directory import checkpoint_of
from clusterlm.config import Config, apply_overrides
from clusterlm.distributed.runtime import describe_layout
from clusterlm.errors import UserError
from clusterlm.hardware import cpu_peak_flops, peak_memory_bytes
from clusterlm.models.from_config import resolve_model_args
from clusterlm.parallel.attention_traffic import recording
from clusterlm.parallel.expert_parallel import AllToAllTimer
from clusterlm.parallel.precision import DTYPES, resolve_precision
from clusterlm.plan.layout import layout_from_config
from clusterlm.plan.memory import layer_activation_bytes
from clusterlm.plan.moe_cost import rank_imbalance
from clusterlm.plan.workload import Workload
from clusterlm.train.session import Session, build_session

HEADER = (
    f"{'variant':<10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak TFLOP/s':>13}  settings"
)


def bench_train(
    cfg: Config,
    steps: int,
    warmup: int,
    rounds: int,
    against: Config | None = None,
    breakdown: bool = False,
) -> list[str]:
    """Time ``rounds`` x ``steps`` training steps of ``cfg`` (and of the baseline ``against``,
    alternating) after ``warmup`` untimed ones, from the checkpoint ``checkpoint.resume`` names
    (``none`` or a checkpoint directory: ``start_from`` resolves the others), then probe the
    config; ``breakdown`` also profiles ``steps`` more steps of each variant (CPU only). Every
    rank of a job runs it, since steps and probes hold collectives; rank 0 gets the report's
    lines, the other ranks none."""
    variants = {"config": cfg} if against is None else {"baseline": against, "config": cfg}
    with tempfile.TemporaryDirectory(prefix="clusterlm-bench-") as scratch:
        sessions = {
            name: _warm_session(variant, scratch, warmup) for name, variant in variants.items()
        }
        times: dict[str, list[float]] = {name: [] for name in sessions}
        exchanges = dict.fromkeys(sessions, 0.0)  # seconds in the experts' all-to-all
        for _ in range(rounds):
            for name, session in sessions.items():
                AllToAllTimer.take()
                times[name] += time_steps(session, steps)
                exchanges[name] += AllToAllTimer.take()
        probes = _probe_lines(sessions, steps, breakdown)
    if not sessions["config"].runtime.is_main:
        return []
    lines = _timing_lines(sessions, times, steps, rounds)
    if sessions["config"].resumed_from:
        lines.append(f"timed from the checkpoint {sessions['config'].resumed_from}")
    return [*lines, *_exchange_lines(times, exchanges), *probes]


def _exchange_lines(times: dict[str, list[float]], exchanges: dict[str, float]) -> list[str]:
    """The all-to-all time of the variants that run expert parallelism (rank 0's; it includes
    waiting for the slowest rank of the exchange)."""
    return [
        f"all-to-all ({name}): {1000 * seconds / len(times[name]):.2f} ms/step, "
        f"{seconds / sum(times[name]):.0%} of the step (expert dispatch and combine, rank 0)"
        for name, seconds in exchanges.items()
        if seconds > 0
    ]


def start_from(cfg: Config) -> str:
    """The checkpoint the timed steps start from: the one ``checkpoint.resume`` names (``auto``:
    the newest of the config's own run), so that a trained state is timed, such as a mixture of
    experts' routing once balanced; ``none``: fresh weights."""
    resume = cfg.checkpoint.resume
    if resume == "none":
        return resume
    run = cfg.training.out_dir if resume == "auto" else resume
    found = checkpoint_of(run)
    if found is None:
        raise UserError(
            f"bench train --resume {resume}: {run} holds no complete checkpoint; give a "
            "checkpoint or a run directory that has one, or leave --resume out to time fresh "
            "weights"
        )
    return str(found)


def _warm_session(cfg: Config, scratch: str, warmup: int) -> Session:
    """A session of a copy of ``cfg`` that writes nothing outside ``scratch`` (it reads the
    checkpoint it starts from), after ``warmup`` steps (compilation, caches)."""
    cfg = apply_overrides(
        cfg, {"training.out_dir": scratch, "training.steps": 10**9}
    )  # the LR schedule in its steady middle
    if (
        cfg.training.device != "cuda"
        and not cfg.metrics.peak_flops
        and not torch.cuda.is_available()
    ):
        # A fresh CPU peak for the MFU: a cached one may have been measured on a busy machine.
        cpu_peak_flops(
            DTYPES[resolve_precision(cfg.training.precision, torch.device("cpu"))[0]],
            remeasure=True,
        )
    session = build_session(cfg)
    time_steps(session, warmup)
    return session


def _probe_lines(sessions: dict[str, Session], steps: int, breakdown: bool) -> list[str]:
    """Run on every rank: the probes hold collectives. Rank 0's figures are reported."""
    config = sessions["config"]
    if config.model.pipeline is None:
        lines = [_activation_line(config, block_activation_bytes(config))]
        if config.cfg.parallel.cp > 1:
            lines.append(_attention_traffic_line(config, steps))
    else:
        lines = [_bubble_line(config, pipeline_bubble(config, steps))]
    if breakdown:
        lines += [
            _breakdown_line(name, *step_breakdown(session, steps))
            for name, session in sessions.items()
        ]
    return lines


def _timing_lines(
    sessions: dict[str, Session], times: dict[str, list[float]], steps: int, rounds: int
) -> list[str]:
    lines, tokens_per_s = [HEADER], {}
    for name, session in sessions.items():
        seconds = statistics.median(times[name])
        tokens_per_s[name] = session.tokens_per_step / seconds
        lines.append(_timing_row(name, session, seconds))
    config = sessions["config"]
    device = config.runtime.device
    whose = (
        "both variants together" if len(sessions) > 1 else "this process"
    )  # one process holds both
    lines.append(
        f"device {device}; {config.tokens_per_step:,} tokens/step; "
        f"median of {rounds} x {steps} steps; "
        f"peak memory (rank 0, {whose}) {peak_memory_bytes(device) / 2**20:.0f} MiB"
    )
    for name, session in sessions.items():
        if session.balancer is not None:
            counts = ",".join(map(str, session.balancer.counts))
            lines.append(f"load balance ({name}): micro-batches per rank {counts}")
    for name, session in sessions.items():
        if session.experts is not None:  # the loads of every step the variant ran
            moe = session.experts.metrics()
            line = (
                f"experts ({name}): load imbalance {moe['moe_load_imbalance']:.2f} (max over mean "
                f"tokens per expert, worst block), balance loss {moe['moe_aux_loss']:.3f}"
            )
            ep = session.cfg.parallel.ep
            if ep > 1:
                busiest = rank_imbalance(list(moe["moe_tokens_per_expert"].values()), ep)
                line += f"; busiest of ep {ep} ranks {busiest:.2f}x the mean"
            lines.append(line)
    if "baseline" in tokens_per_s:
        lines.append(
            f"speed-up over baseline: {tokens_per_s['config'] / tokens_per_s['baseline']:.2f}x"
        )
    return lines


def _timing_row(name: str, session: Session, seconds: float) -> str:
    tokens_per_s = session.tokens_per_step / seconds
    peak = session.peak_flops or float("nan")
    mfu = tokens_per_s * session.flops_per_token / session.runtime.world_size / peak
    t = session.cfg.training
    return (
        f"{name:<10} {1000 * seconds:>9.2f} {tokens_per_s:>11,.0f} {100 * mfu:>6.2f}% "
        f"{peak / 1e12:>13.3f}  {describe_layout(session.cfg, session.runtime)}, "
        f"precision={t.precision} compile={t.compile} attention={t.attention} "
        f"ac={t.activation_checkpointing} fused_adamw={session.cfg.optim.fused} "
        f"threads={torch.get_num_threads()}"
    )


def _activation_line(session: Session, measured: int) -> str:
    """The first block's saved bytes per micro-batch next to the planner's
    ``layer_activation_bytes`` for the layout the trainer derived from the config
    (``layout_from_config``)."""
    cfg, runtime = session.cfg, session.runtime
    layout = layout_from_config(cfg, runtime.world_size)
    work = Workload(
        resolve_model_args(cfg, cfg.model.vocab_size),
        cfg.seq_len,
        session.tokens_per_step,
        cfg.training.precision,
        fused_attention=cfg.training.attention != "math",
    )
    first_is_moe = 0 in work.model.moe_blocks(work.model.n_layer)
    predicted = layer_activation_bytes(work, layout, moe=first_is_moe)
    return (
        f"activations per layer per micro-batch (rank {runtime.rank}): "
        f"measured {measured / 2**10:.1f} KiB, "
        f"planner {predicted / 2**10:.1f} KiB ({layout.describe()}, {cfg.training.precision}): "
        f"ratio {measured / predicted:.2f}"
    )


def _attention_traffic_line(session: Session, steps: int) -> str:
    """Rank 0's attention communication over ``steps`` more steps: the seconds it spent posting
    and waiting on the ring's K/V and dK/dV transfers or Ulysses' all-to-alls (what compute did
    not hide), and the bytes it sent, per step."""
    with recording() as traffic:
        wall = sum(time_steps(session, steps)) / steps
    p = session.cfg.parallel
    return (
        f"attention communication ({p.cp_attention}, cp={p.cp}, rank {session.runtime.rank}): "
        f"{1000 * traffic.seconds / steps:.2f} ms/step exposed of {1000 * wall:.2f} ms/step "
        f"({100 * traffic.seconds / steps / wall:.1f}%), "
        f"{traffic.bytes_sent / steps / 2**20:.2f} MiB sent/step in "
        f"{traffic.exchanges // steps} transfers"
    )


def _bubble_line(session: Session, samples: list[BubbleSample]) -> str:
    """The bubble (T - B) / B per step, T the slowest rank's time in the schedule and B the most
    loaded rank's compute, next to (p - 1) / m for one stage per rank and (p - 1) / (v * m) with v
    stages per rank (Narayanan et al. 2021), a third of that for the zero-bubble schedules (Qi et
    al. 2023, ZB-H1; ZB-V aims lower). Point-to-point transfers and the schedule's own work count
    as bubble: the formula assumes them free."""
    schedule, p = session.cfg.parallel.pp_schedule, session.cfg.parallel.pp
    pipeline = session.model.pipeline
    assert pipeline is not None  # a pipelined run
    m, v = pipeline.n_microbatches, len(pipeline.stages)
    if "zero_bubble" in schedule:
        # Qi et al. 2023: splitting the weight gradient off cuts 1F1B's bubble to at most a third.
        name, formula = "(p-1)/(3*v*m), the ZB-H1 bound", (p - 1) / (3 * v * m)
    else:
        name, formula = "(p-1)/(v*m)", (p - 1) / (v * m)
    measured = statistics.median(sample.bubble for sample in samples)
    middle = sorted(samples, key=lambda s: (s.schedule_s, s.compute_s))[len(samples) // 2]
    return (
        f"pipeline bubble ({schedule}, p={p}, m={m}, v={v}): measured {measured:.3f} "
        f"(median of {len(samples)} steps; schedule {1000 * middle.schedule_s:.1f} ms, "
        f"compute {1000 * middle.compute_s:.1f} ms), formula {name} = {formula:.3f}, "
        f"ratio {measured / formula:.2f}"
    )


def _breakdown_line(name: str, wall: float, spent: dict[str, float]) -> str:
    parts = " | ".join(
        f"{kind} {1000 * seconds:.2f} ({100 * seconds / wall:.0f}%)"
        for kind, seconds in spent.items()
    )
    return f"step breakdown, {name} (profiled, {1000 * wall:.2f} ms/step): {parts}"
