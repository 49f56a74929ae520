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
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from clusterlm.config import Config, apply_overrides, validate
from clusterlm.errors import UserError
from clusterlm.launch import run_torchrun
from clusterlm.parallel.tensor_parallel import loss_context


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
    from clusterlm.train.runtime import describe_layout
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
    config = sessions["config"]
    activation = _activation_report(config)  # collective under tensor parallelism: every rank runs it
    bubble = _bubble_report(config, times["config"]) if config.pipeline is not None else None
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
    print(f"device {device}; {session.tokens_per_step:,} tokens/step; median of {args.rounds} x {args.steps} steps; "
          f"peak memory (rank 0) {peak_memory_bytes(device) / 2**20:.0f} MiB")
    if "baseline" in results:
        print(f"speed-up over baseline: {results['config'] / results['baseline']:.2f}x")
    for line in filter(None, (activation, bubble)):
        print(line)
    return 0


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


def _bubble_report(session, step_times: list[float]) -> str:
    """Measured pipeline bubble next to the formula. The busy time of a rank is its stages'
    forward and backward over all micro-batches run back to back with no pipeline; the bubble is
    the rest of the pipelined step relative to that: (T_step - T_busy) / T_busy, compared with
    (p - 1) / m for one stage per rank and (p - 1) / (v * m) with v stages per rank (Narayanan et
    al. 2021). The step time includes the optimizer, timed here too and subtracted."""
    cfg, runtime = session.cfg, session.runtime
    p, m = cfg.parallel.pp, session.pipeline.schedule._n_microbatches
    v = len(session.pipeline.stages)
    micro = cfg.training.micro_batch_size // m
    busy = []
    for _ in range(5):
        start = time.perf_counter()
        for stage in session.pipeline.stages:
            module = stage.submod
            for _ in range(m):
                if module.tok_embeddings is not None:
                    x = torch.randint(0, cfg.model.vocab_size, (micro, cfg.seq_len), device=runtime.device)
                else:
                    width = cfg.seq_len // (cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
                    x = torch.randn(micro, width, cfg.model.n_embd, device=runtime.device, requires_grad=True)
                with session.precision.autocast():
                    out = module(x)
                if module.output is not None:
                    y = torch.randint(0, cfg.model.vocab_size, (micro, cfg.seq_len), device=runtime.device)
                    with loss_context(cfg.parallel.tp):
                        F.cross_entropy(out.flatten(0, 1).float(), y.flatten()).backward()
                else:
                    out.backward(torch.randn_like(out))
        for optimizer in session.optimizers:
            optimizer.zero_grad(set_to_none=True)
        busy.append(time.perf_counter() - start)
    optimizer_time = []
    for _ in range(5):
        for part in session.parts:
            for param in part.parameters():
                param.grad = torch.zeros_like(param)
        start = time.perf_counter()
        session.precision.step(session.optimizers)
        optimizer_time.append(time.perf_counter() - start)
    local = torch.tensor([statistics.median(busy) + statistics.median(optimizer_time)])
    dist.all_reduce(local, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    step = statistics.median(step_times)
    measured = (step - local.item()) / local.item()
    formula = (p - 1) / (v * m)
    return (f"pipeline bubble ({cfg.parallel.pp_schedule}, p={p}, m={m}, v={v}): measured {measured:.3f} "
            f"(step {1000 * step:.1f} ms, busy {1000 * local.item():.1f} ms), formula (p-1)/(v*m) = {formula:.3f}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "comm"):
        print("usage: clusterlm bench train|comm [options]  (clusterlm bench train --help)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "comm":
        from clusterlm.comm.bench import main as bench_comm

        return bench_comm(argv[1:])
    return bench_train(argv[1:])
