"""Benchmarks that print figures: `clusterlm bench train` and `clusterlm bench comm`.

``bench train`` runs real training steps of a config (the trainer's own step function) and prints
tokens/s, ms/step, MFU and peak memory. ``--against KEY=VALUE,...`` adds a baseline variant of the
same config; the two are run in alternating rounds in one process, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from clusterlm.config import Config, apply_overrides, validate
from clusterlm.errors import UserError
from clusterlm.launch import run_torchrun


def _variant(cfg: Config, spec: str) -> Config:
    overrides = {}
    for item in filter(None, spec.split(",")):
        if "=" not in item:
            raise UserError(f"--against takes KEY=VALUE[,KEY=VALUE...], got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    variant = apply_overrides(copy.deepcopy(cfg), overrides)
    validate(variant)
    return variant


def _timed_steps(session, steps: int) -> list[float]:
    from clusterlm.train.trainer import train_step

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(session).item()  # .item() waits for the device
        times.append(time.perf_counter() - start)
    return times


def bench_train(argv: list[str]) -> int:
    from clusterlm.train.hardware import cpu_peak_flops, peak_memory_bytes, resolve_device
    from clusterlm.train.precision import DTYPES
    from clusterlm.train.runtime import describe_layout
    from clusterlm.train.trainer import build_session, config_from_argv

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument("--against", default=None, help="baseline variant: KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--breakdown", action="store_true",
                        help="after timing, profile one more round of each variant and split its step by kind of work")
    args, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
    launch = argparse.Namespace()
    cfg = config_from_argv(rest, "clusterlm bench train", "Time training steps of a config.", launch)
    if cfg is None:
        return 0
    if launch.nproc and "WORLD_SIZE" not in os.environ:
        return run_torchrun(launch, ["bench", "train", *argv])
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        raise UserError("--steps and --rounds must be >= 1 and --warmup >= 0")
    if args.breakdown and resolve_device(cfg.training.device).type != "cpu":
        raise UserError("--breakdown splits the host's time and so is for CPU runs; add --training.device cpu, "
                        "or on a GPU read a torch.profiler trace")
    scratch = tempfile.mkdtemp(prefix="clusterlm-bench-")
    cfg.training.out_dir, cfg.checkpoint.resume = scratch, "none"
    variants = {"config": cfg}
    if args.against:
        variants = {"baseline": _variant(cfg, args.against), "config": cfg}
    for variant in variants.values():  # a fresh CPU peak probe: a cached one may have run on a busy machine
        if variant.training.device != "cuda" and not variant.metrics.peak_flops and not torch.cuda.is_available():
            cpu_peak_flops(DTYPES[variant.training.precision], remeasure=True)
    sessions = {}
    for name, variant in variants.items():
        variant.training.steps = 10**9  # keep the LR schedule in its steady middle
        sessions[name] = build_session(variant)
        _timed_steps(sessions[name], args.warmup)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            times[name] += _timed_steps(session, args.steps)
    config = sessions["config"]
    activation = _activation_report(config)  # collective under tensor parallelism: every rank runs it
    bubble = _bubble_report(config, args.steps) if config.pipeline is not None else None
    # Every rank runs the profiled steps (they hold collectives); rank 0's split is printed.
    breakdowns = [_step_breakdown(name, session, args.steps) for name, session in sessions.items()] if args.breakdown else []
    if not config.runtime.is_main:
        return 0
    print(f"{'variant':<10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak TFLOP/s':>13}  settings")
    results = {}
    for name, session in sessions.items():
        seconds = statistics.median(times[name])
        results[name] = tokens_per_s = session.tokens_per_step / seconds
        peak = session.peak_flops
        mfu = tokens_per_s * session.flops_per_token / session.runtime.world_size / peak if peak else float("nan")
        t = session.cfg.training
        layout = describe_layout(session.cfg, session.runtime)
        print(f"{name:<10} {1000 * seconds:>9.2f} {tokens_per_s:>11,.0f} {100 * mfu:>6.2f}% {peak / 1e12 if peak else float('nan'):>13.3f}"
              f"  {layout}, precision={t.precision} compile={t.compile} ac={t.activation_checkpointing} "
              f"fused_adamw={session.cfg.optim.fused} threads={torch.get_num_threads()}")
    device = sessions["config"].runtime.device
    whose = "both variants together" if len(sessions) > 1 else "this process"  # one process holds both
    print(f"device {device}; {session.tokens_per_step:,} tokens/step; median of {args.rounds} x {args.steps} steps; "
          f"peak memory (rank 0, {whose}) {peak_memory_bytes(device) / 2**20:.0f} MiB")
    if "baseline" in results:
        print(f"speed-up over baseline: {results['config'] / results['baseline']:.2f}x")
    for line in [*filter(None, (activation, bubble)), *breakdowns]:
        print(line)
    return 0


# Operators by kind of work, matched on the profiler's names. Each operator's self time counts
# once, so a compiled graph's fused kernels land on the graph's call and its matmuls on aten::mm.
WORK_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"),
    "attention": ("scaled_dot_product",),
    "compiled kernels": ("## Call CompiledFxGraph", "graph_"),
    "optimizer": ("Optimizer.", "adam", "_foreach_", "linalg_vector_norm"),
}


def _work_kind(op_name: str) -> str:
    for kind, patterns in WORK_KINDS.items():
        if any(pattern in op_name for pattern in patterns):
            return kind
    return "other ops"


def _step_breakdown(name: str, session, steps: int) -> str:
    """Where a CPU step's time goes: the self time of every operator, summed by kind of work, and
    the rest of the wall time, spent outside operators (Python, autograd, the compiler's guards).
    Profiling adds overhead to every operator, so the profiled step may read slower than the
    timed one."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        wall = sum(_timed_steps(session, steps)) / steps
    spent = dict.fromkeys([*WORK_KINDS, "other ops"], 0.0)
    for event in profiler.key_averages():
        spent[_work_kind(event.key)] += event.self_cpu_time_total / 1e6 / steps
    spent["outside ops"] = max(0.0, wall - sum(spent.values()))
    parts = " | ".join(f"{kind} {1000 * seconds:.2f} ({100 * seconds / wall:.0f}%)" for kind, seconds in spent.items())
    return f"step breakdown, {name} (profiled, {1000 * wall:.2f} ms/step): {parts}"


def _unwrapped_block(session):
    part = session.parts[0]
    part = getattr(part, "module", part)  # DDP
    return next(iter(part.layers.values()))


def _activation_report(session) -> str | None:
    """Bytes one block keeps for backward per micro-batch on this rank (autograd's saved tensors,
    each storage once, parameters excluded), next to Korthikanti et al. (2022): per layer
    s*b*h*(34 + 5*a*s/h) bytes in 16-bit, 10 + 24/t without and 34/t with sequence parallelism
    under tensor parallel degree t; the 5*a*s/h score term is dropped because SDPA's fused kernels
    keep no score matrix, and the figure is scaled to the element size of the run."""
    if session.pipeline is not None:
        return None
    cfg, runtime = session.cfg, session.runtime
    block = _unwrapped_block(session)
    params = {(p.to_local() if isinstance(p, DTensor) else p).data_ptr() for p in session.parts[0].parameters()}
    saved: dict[int, int] = {}
    measuring = [False]

    def pack(tensor):
        storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
        if measuring[0] and storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    handles = [block.register_forward_pre_hook(lambda *_: measuring.__setitem__(0, True)),
               block.register_forward_hook(lambda *_: measuring.__setitem__(0, False))]
    torch.manual_seed(0)  # the same tokens on every tensor-parallel rank
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.training.micro_batch_size, cfg.seq_len),
                           device=runtime.device)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), session.precision.autocast():
            session.parts[0](tokens)
    finally:
        for handle in handles:
            handle.remove()
    s, b, h, t = cfg.seq_len, cfg.training.micro_batch_size, cfg.model.n_embd, cfg.parallel.tp
    element = 2 if cfg.training.precision != "fp32" else 4
    per_token = 34 / t if cfg.parallel.sequence_parallel else 10 + 24 / t
    formula = s * b * h * per_token * element / 2
    measured = sum(saved.values())
    return (f"activations per layer per micro-batch (rank {runtime.rank}): measured {measured / 2**10:.1f} KiB, "
            f"Korthikanti formula {formula / 2**10:.1f} KiB (tp {t}, sequence parallel "
            f"{cfg.parallel.sequence_parallel}, {element}-byte elements): ratio {measured / formula:.2f}")


@contextlib.contextmanager
def _pipeline_timer(pipeline) -> Iterator[dict[str, float]]:
    """Seconds this rank spends in the schedule's ``step`` (entered together: a barrier precedes
    it) and, inside it, computing: its stages' forward and backward chunks. The rest of the
    schedule's time is idle or communicating. Instance attributes shadow the methods, so the
    schedule calls the timed versions and nothing outside this context changes."""
    spent = {"schedule": 0.0, "busy": 0.0}

    def timed(function, key):
        @functools.wraps(function)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        return run

    schedule = pipeline.schedule
    names = ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk")
    targets = [(stage, name) for stage in pipeline.stages for name in names if hasattr(stage, name)]
    step = schedule.step

    def synchronized_step(*args, **kwargs):
        dist.barrier()
        return timed(step, "schedule")(*args, **kwargs)

    for stage, name in targets:
        setattr(stage, name, timed(getattr(stage, name), "busy"))
    schedule.step = synchronized_step
    try:
        yield spent
    finally:
        for stage, name in targets:
            delattr(stage, name)
        del schedule.step


def _bubble_report(session, steps: int) -> str:
    """The pipeline bubble measured inside pipelined steps, next to the formula. Per step, T is the
    slowest rank's time in the schedule and B the most loaded rank's compute (its stages' forward
    and backward chunks); the bubble is (T - B) / B, compared with (p - 1) / m for one stage per
    rank and (p - 1) / (v * m) with v stages per rank (Narayanan et al. 2021), a third of that for
    the zero-bubble schedules (Qi et al. 2023, ZB-H1; ZB-V aims lower). Point-to-point
    transfers and the schedule's own work count as bubble: the formula assumes them free."""
    from clusterlm.train.trainer import train_step

    cfg = session.cfg
    p, m = cfg.parallel.pp, session.pipeline.schedule._n_microbatches
    v = len(session.pipeline.stages)
    fractions, spans = [], []
    with _pipeline_timer(session.pipeline) as spent:
        for _ in range(steps):
            spent.update(schedule=0.0, busy=0.0)
            train_step(session).item()
            times = torch.tensor([spent["schedule"], spent["busy"]], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
            span, busy = times.tolist()
            fractions.append((span - busy) / busy)
            spans.append((span, busy))
    measured = statistics.median(fractions)
    span, busy = sorted(spans)[len(spans) // 2]
    if "zero_bubble" in cfg.parallel.pp_schedule:
        # Qi et al. 2023: splitting the weight gradient off cuts 1F1B's bubble to at most a third.
        name, formula = "(p-1)/(3*v*m), the ZB-H1 bound", (p - 1) / (3 * v * m)
    else:
        name, formula = "(p-1)/(v*m)", (p - 1) / (v * m)
    return (f"pipeline bubble ({cfg.parallel.pp_schedule}, p={p}, m={m}, v={v}): measured {measured:.3f} "
            f"(median of {steps} steps; schedule {1000 * span:.1f} ms, compute {1000 * busy:.1f} ms), "
            f"formula {name} = {formula:.3f}, ratio {measured / formula:.2f}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "comm"):
        print("usage: clusterlm bench train|comm [options]  (clusterlm bench train --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "comm":
        from clusterlm.comm.bench import main as bench_comm

        return bench_comm(argv[1:])
    return bench_train(argv[1:])
