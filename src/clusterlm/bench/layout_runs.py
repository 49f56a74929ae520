"""Train the ``plan --validate`` cases (``clusterlm.plan.validation.CASES``) on this machine and
measure what the planner predicts.

Every case is trained by the real trainer (``build_session`` + ``train_step``) on ``nproc``
spawned gloo processes of one intra-op thread each, on data prepared from a synthetic text. Per
case, on every rank:

- model state: parameters, gradients and optimizer state right after an optimizer step
  (``state_after_next_step``); the most loaded rank is reported;
- activations: the peak bytes autograd keeps for backward during one training step
  (``step_activation_bytes``); the most loaded rank is reported;
- step time: per step the slowest rank's wall time, median over the timed steps; the cases are
  run in several rounds and each keeps its lowest median (other load only adds time).

This machine is then described as the planner's cluster: a device is one process, its rates one
thread's on the case's linear layers and attention core at the case's shapes and precision,
relative to fp32's linear layers at the one-thread matmul peak (``clusterlm.bench.kernels``),
times min(1, cores / nproc), since the processes share the cores; its
link the alpha-beta fit of a gloo all-reduce sweep on ``nproc`` local processes
(``measure_link``), with the waits ring hops and all-to-alls add between blocks of work on as many
(``measure_exchange_waits``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from clusterlm.bench.collective_sweep import measure_link
from clusterlm.bench.exchange_probe import measure_exchange_waits
from clusterlm.bench.kernels import relative_kernel_rates
from clusterlm.bench.probes import state_after_next_step, step_activation_bytes
from clusterlm.bench.timer import time_steps
from clusterlm.config import Config
from clusterlm.data.manifest import load_manifest
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.distributed.local_spawn import run_local
from clusterlm.hardware import cpu_peak_flops
from clusterlm.models.from_config import resolve_model_args
from clusterlm.plan.calibration import Calibration
from clusterlm.plan.cluster import Cluster, Device, Link
from clusterlm.plan.moe_cost import rank_imbalance
from clusterlm.plan.validation import (
    CASES,
    GLOBAL_BATCH,
    Measurement,
    ValidationCase,
    ValidationResult,
)
from clusterlm.plan.workload import Workload
from clusterlm.train.session import build_session
from clusterlm.train.trainer import train_step


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: words of 2-9 letters, some capitalized, lines with punctuation;
    about 60 distinct characters, like a small character-level corpus."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    lines, size = [], 0
    while size < chars:
        words = [
            "".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(4, 12))
        ]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] = rng.choice(["I", "O", "A", "KING", "QUEEN", "LORD"])
        line = (
            " ".join(words)
            + rng.choice(".,;:!?-'")
            + ("" if rng.random() < 0.7 else str(rng.randint(0, 9)))
        )
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def prepare_data(root: Path, chars: int = 200_000) -> str:
    """A character-level dataset in ``root/data``, prepared by the project's own pipeline."""
    source = root / "text.txt"
    source.write_text(synthetic_text(chars))
    out = str(root / "data")
    prepare(PrepareOptions(inputs=(str(source),), out=out, tokenizer="char", shard_tokens=1 << 20))
    return out


def case_config(case: ValidationCase, data_dir: str, out_dir: str, peak_flops: float) -> Config:
    """The trainer's config for a case; ``peak_flops`` only spares every rank its own probe."""
    return case.config(
        {
            "data.dir": data_dir,
            "training.out_dir": out_dir,
            "training.steps": 10**9,
            "training.threads": 1,
            "metrics.peak_flops": peak_flops,
            "optim.warmup_steps": 1,
        }
    )


def measure_rank(
    rank: int, world_size: int, cfg: Config, warmup: int, steps: int
) -> tuple[int, int, list[float], float]:
    """Run on every rank: (model-state bytes, activation bytes, per-step seconds of the slowest
    rank, a mixture of experts' expert-parallel imbalance over those steps)."""
    session = build_session(cfg)
    activations = step_activation_bytes(session)
    state = state_after_next_step(session)
    for _ in range(max(0, warmup - 1)):
        train_step(session)
    if session.experts is not None:
        session.experts.metrics()  # the warm-up's loads are not the timed steps'
    times = time_steps(session, steps, slowest_rank=True) if steps else []
    imbalance = 1.0
    if session.experts is not None and steps:
        loads = session.experts.metrics()["moe_tokens_per_expert"].values()
        imbalance = rank_imbalance(list(loads), cfg.parallel.ep)
    return state, activations, times, imbalance


def measure_case(
    case: ValidationCase,
    data_dir: str,
    peak_flops: float,
    warmup: int,
    steps: int,
    timeout: float = 300,
) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="clusterlm-validate-") as out:
        cfg = case_config(case, data_dir, out, peak_flops)
        ranks = run_local(measure_rank, case.nproc, cfg, warmup, steps, timeout=timeout)
    times = ranks[0][2]
    return Measurement(
        state_bytes=max(r[0] for r in ranks),
        activation_bytes=max(r[1] for r in ranks),
        step_seconds=statistics.median(times) if times else 0.0,
        step_times=tuple(times),
        expert_imbalance=ranks[0][3],
    )


def one_thread_peaks() -> dict[str, float]:
    """Matmul probe peaks of one thread (what each spawned process uses), per precision."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = cpu_peak_flops(torch.float32), cpu_peak_flops(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    return {"fp32": fp32, "bf16": bf16, "fp16": bf16}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cluster(
    nproc: int,
    peaks: dict[str, float],
    link: Link,
    cores: int,
    rates: dict[str, dict[str, float]] | None = None,
) -> Cluster:
    """``nproc`` processes on this machine as one node of ``nproc`` devices sharing ``cores``;
    ``rates``: one thread's measured kernel rates per precision (``clusterlm.bench.kernels``)."""
    share = min(1.0, cores / nproc)
    shared_rates = {
        precision: {kind: rate * share for kind, rate in kinds.items()}
        for precision, kinds in (rates or {}).items()
    }
    device = Device(
        name=f"1-thread CPU process ({cores} cores shared by {nproc})",
        memory_bytes=float("inf"),
        peak_flops={k: v * share for k, v in peaks.items()},
        host_share=share,
        kernel_rates=shared_rates,
    )
    return Cluster(
        name=f"{nproc} local processes",
        nodes=1,
        devices_per_node=nproc,
        device=device,
        intra_node=link,
        inter_node=link,
    )


def run_validation(
    cases: tuple[ValidationCase, ...] = CASES,
    warmup: int = 3,
    steps: int = 15,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[ValidationResult], dict[int, Link]]:
    """Measure every case in ``rounds`` rounds, the order reversed every other round; returns the
    results and the measured link per process count. Other work on the machine only ever adds
    time, so each case keeps its least disturbed round: the lowest median step time."""
    peaks, cores = one_thread_peaks(), available_cores()
    links = {n: local_link(n) for n in sorted({c.nproc for c in cases})}
    rounds_measured: dict[str, list[Measurement]] = {case.name: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="clusterlm-validate-data-") as root:
        data_dir = prepare_data(Path(root))
        vocab_size = load_manifest(data_dir).vocab_size
        for round_index in range(rounds):
            for case in cases if round_index % 2 == 0 else cases[::-1]:
                measured = measure_case(case, data_dir, peaks[case.precision], warmup, steps)
                rounds_measured[case.name].append(measured)
                if progress:
                    progress(
                        f"round {round_index + 1}: {case.name} "
                        f"{measured.step_seconds * 1e3:.1f} ms/step"
                    )
    results, rates = [], {}
    for case in cases:
        args = resolve_model_args(case.config(), vocab_size)
        least_disturbed = min(rounds_measured[case.name], key=lambda m: m.step_seconds)
        work = Workload(
            args,
            args.block_size,
            GLOBAL_BATCH * args.block_size,
            case.precision,
            expert_imbalance=least_disturbed.expert_imbalance,
        )
        layout = case.layout
        shape = (layout.micro_batch_size, layout.cp, layout.cp_attention, str(case.model))
        key = (case.precision, *shape)
        if key not in rates:
            rates[key] = relative_kernel_rates(work, layout, peaks["fp32"])
        cluster = local_cluster(
            case.nproc, peaks, links[case.nproc], cores, {case.precision: rates[key]}
        )
        results.append(ValidationResult(case, work, cluster, least_disturbed))
    return results, links


def local_link(nproc: int) -> Link:
    """The link between ``nproc`` local gloo processes, as measured here."""
    if nproc == 1:
        return Link(bandwidth=math.inf, latency=0.0)
    return dataclasses.replace(measure_link(nproc), waits=measure_exchange_waits(nproc))


def evidence(
    results: list[ValidationResult], calibration: Calibration, links: dict[int, Link]
) -> dict:
    """What the calibration was fitted from, saved beside it for people to check."""
    return {
        "device": f"{available_cores()} CPU cores, one thread per process",
        "one_thread_peak_flops": one_thread_peaks(),
        "kernel_rates": {r.case.name: r.cluster.device.kernel_rates for r in results},
        "gloo_links": {
            str(n): {
                "latency_us": link.latency * 1e6,
                "bandwidth_gb_s": link.bandwidth / 1e9,
                "exchange_waits_us": {
                    k: v * 1e6 for k, v in dataclasses.asdict(link.exchange_waits(n)).items()
                },
            }
            for n, link in links.items()
            if n > 1
        },
        "fitted_on": [r.case.name for r in results if r.case.fit],
        "points": [r.as_dict(calibration) for r in results],
    }
