"""Benchmarks that print figures: `clusterlm bench train` and `clusterlm bench comm`.

``bench train`` runs real training steps of a config (the trainer's own step function) and prints
tokens/s, ms/step, MFU and peak memory. ``--against KEY=VALUE,...`` adds a baseline variant of the
same config; the two are run in alternating rounds in one process, so machine noise hits both.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

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
    from clusterlm.train.hardware import cpu_peak_flops, peak_memory_bytes
    from clusterlm.train.precision import DTYPES
    from clusterlm.train.trainer import build_session, config_from_argv

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, caches)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant")
    parser.add_argument("--against", default=None, help="baseline variant: KEY=VALUE[,KEY=VALUE...]")
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
    if not sessions["config"].runtime.is_main:
        return 0
    print(f"{'variant':<10} {'ms/step':>9} {'tokens/s':>11} {'MFU':>7} {'peak TFLOP/s':>13}  settings")
    results = {}
    for name, session in sessions.items():
        seconds = statistics.median(times[name])
        results[name] = tokens_per_s = session.tokens_per_step / seconds
        peak = session.peak_flops
        mfu = tokens_per_s * session.flops_per_token / session.runtime.world_size / peak if peak else float("nan")
        t, p = session.cfg.training, session.cfg.parallel
        layout = f"{session.runtime.world_size} x {p.data_parallel}" if session.runtime.world_size > 1 else "1 process"
        print(f"{name:<10} {1000 * seconds:>9.2f} {tokens_per_s:>11,.0f} {100 * mfu:>6.2f}% {peak / 1e12 if peak else float('nan'):>13.3f}"
              f"  {layout}, precision={t.precision} compile={t.compile} ac={t.activation_checkpointing} "
              f"fused_adamw={session.cfg.optim.fused} threads={torch.get_num_threads()}")
    device = sessions["config"].runtime.device
    print(f"device {device}; {session.tokens_per_step:,} tokens/step; median of {args.rounds} x {args.steps} steps; "
          f"peak memory (rank 0) {peak_memory_bytes(device) / 2**20:.0f} MiB")
    if "baseline" in results:
        print(f"speed-up over baseline: {results['config'] / results['baseline']:.2f}x")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "comm"):
        print("usage: clusterlm bench train|comm [options]  (clusterlm bench train --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "comm":
        from clusterlm.comm.bench import main as bench_comm

        return bench_comm(argv[1:])
    return bench_train(argv[1:])
