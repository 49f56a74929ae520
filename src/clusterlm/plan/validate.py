"""Train tiny GPTs on this machine in real parallel layouts and compare with the planner.

Every case is the nano-cpu shape (gpt2, 4 layers x 128, context 64, 12 sequences per step, a
character vocabulary) trained by the real trainer (``build_session`` + ``train_step``) on
``nproc`` spawned gloo processes of one intra-op thread each, on data prepared from a synthetic
text. Per case, on every rank:

- model state: parameters, gradients and optimizer state summed exactly from the tensors right
  after an optimizer step, counting a rank's local shard only (``DTensor.to_local()`` for FSDP and
  tensor-parallel parameters; ``ZeroRedundancyOptimizer`` keeps the AdamW state of the parameters
  its rank owns in ``.optim``); the most loaded rank is reported;
- activations: the peak bytes autograd keeps for backward during one training step, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage from its first save
  to its release; parameters and buffers (also the parameters FSDP gathers for the forward) are
  not activations; under a pipeline schedule this is the micro-batches a stage keeps in flight;
- step time: per step the slowest rank's wall time, median over the timed steps; the cases are
  run in several rounds and each keeps its lowest median (other load only adds time).

The prediction is the planner's own: ``device_memory`` and ``step_time`` for the case's
``Layout`` on a one-node cluster of ``nproc`` devices. A device is one process: its peak is the
one-thread matmul probe times min(1, cores / nproc), since the processes share the cores; its
link is the alpha-beta fit of a gloo all-reduce sweep on ``nproc`` local processes (ring
all-reduce t = 2(n-1) * latency + 2(n-1)/n * bytes / bandwidth, solved for the link). The
calibration (``fit_calibration``) fits the compute efficiency and the host costs (per step, per
FSDP collective call, per tensor-parallel module pass) on a subset of the cases, one case per
term and the 4-process ddp for the core sharing, and the error is reported on all of them.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from clusterlm.comm.bench import fit_alpha_beta
from clusterlm.comm.spawn import run_local
from clusterlm.config import Config, build_config, resolve_model_args
from clusterlm.plan.calibration import HOST_SECONDS, Calibration
from clusterlm.plan.cluster import Cluster, Device, Link
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import activation_bytes, device_memory, logits_gradient_bytes
from clusterlm.plan.report import table
from clusterlm.plan.timing import host_calls, step_time
from clusterlm.plan.workload import Workload

GLOBAL_BATCH = 12  # sequences per optimizer step, as nano-cpu
NANO_MODEL = {"model.flavour": "gpt2", "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128,
              "model.block_size": 64, "model.dropout": 0.0}
SWEEP_BYTES = tuple(4 << (2 * i) for i in range(5, 11))  # 4 KiB .. 4 MiB, all-reduce sweep for the links


@dataclass(frozen=True)
class ValidationCase:
    """One layout of the nano model: ``parallel`` holds ``[parallel]`` config keys."""

    name: str
    nproc: int
    parallel: dict[str, object] = field(default_factory=dict)
    precision: str = "fp32"
    fit: bool = False  # the calibration is fitted on the cases marked here

    @property
    def layout(self) -> Layout:
        p = self.parallel
        tp, pp = int(p.get("tp", 1)), int(p.get("pp", 1))
        strategy = str(p.get("data_parallel", "ddp"))
        dp = self.nproc // (tp * pp)
        if strategy == "ddp":
            replicate = dp
        elif strategy == "hsdp":
            replicate = int(p["dp_replicate"])
        else:  # zero1-3 shard over every data-parallel rank
            replicate = 1
        shard = dp // replicate
        micro_batches = int(p.get("pp_microbatches", 1))
        return Layout(pp=pp, dp_replicate=replicate, dp_shard=shard, tp=tp, data_parallel=strategy,
                      sequence_parallel=bool(p.get("sequence_parallel", False)),
                      pp_schedule=str(p.get("pp_schedule", "1f1b")), micro_batches=micro_batches,
                      micro_batch_size=GLOBAL_BATCH // dp // micro_batches)

    @property
    def batch_per_rank(self) -> int:
        """Sequences per data-parallel rank and step (a pipeline splits them into micro-batches)."""
        return self.layout.micro_batch_size * self.layout.micro_batches


CASES = (
    ValidationCase("1 process fp32", 1, fit=True),
    ValidationCase("1 process bf16", 1, precision="bf16"),
    ValidationCase("2 ddp", 2, {"data_parallel": "ddp"}, fit=True),
    ValidationCase("2 zero1", 2, {"data_parallel": "zero1"}),
    ValidationCase("2 zero2", 2, {"data_parallel": "zero2"}),
    ValidationCase("2 zero3", 2, {"data_parallel": "zero3"}, fit=True),
    ValidationCase("2 tp2", 2, {"tp": 2}, fit=True),
    ValidationCase("2 tp2+sp", 2, {"tp": 2, "sequence_parallel": True}),
    ValidationCase("4 ddp", 4, {"data_parallel": "ddp"}, fit=True),
    ValidationCase("4 zero3", 4, {"data_parallel": "zero3"}),
    ValidationCase("4 hsdp 2x2", 4, {"data_parallel": "hsdp", "dp_replicate": 2, "dp_shard": 2}),
    ValidationCase("4 tp2 x zero3", 4, {"tp": 2, "data_parallel": "zero3"}),
    ValidationCase("2 pp2 gpipe", 2, {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4}),
    ValidationCase("2 pp2 1f1b", 2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}),
    ValidationCase("4 pp2 x zero3", 4, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 3, "data_parallel": "zero3"}),
)


@dataclass(frozen=True)
class Measurement:
    """What the trainer did: most loaded rank's bytes, median step seconds (slowest rank)."""

    state_bytes: int
    activation_bytes: int
    step_seconds: float
    step_times: tuple[float, ...]


@dataclass(frozen=True)
class ValidationResult:
    case: ValidationCase
    work: Workload
    cluster: Cluster  # with the default calibration; the fitted one is applied by ``predicted_seconds``
    measured: Measurement

    @property
    def state_predicted(self) -> float:
        return device_memory(self.work, self.case.layout).model_state

    @property
    def activations_predicted(self) -> float:
        """The most loaded stage's saved tensors: the logits' gradient is part of the planner's
        peak, not a saved tensor."""
        layout = self.case.layout

        def saved(stage: str) -> float:
            holds_logits = stage == "last" or layout.pp == 1
            return activation_bytes(self.work, layout, stage) - holds_logits * logits_gradient_bytes(self.work, layout)

        return max(saved("first"), saved("last"))

    def predicted_seconds(self, calibration: Calibration) -> float:
        cluster = replace(self.cluster, calibration=calibration)
        return step_time(self.work, self.case.layout, cluster).total

    def as_dict(self, calibration: Calibration) -> dict:
        return {"case": self.case.name, "nproc": self.case.nproc, "layout": self.case.layout.describe(),
                "precision": self.case.precision, "fitted_on": self.case.fit, **asdict(self.measured),
                "state_predicted": self.state_predicted, "activations_predicted": self.activations_predicted,
                "step_seconds_predicted": self.predicted_seconds(calibration)}


# ---------------------------------------------------------------- data and config


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: words of 2-9 letters, some capitalized, lines with punctuation;
    about 60 distinct characters, like a small character-level corpus."""
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    lines, size = [], 0
    while size < chars:
        words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(rng.randint(4, 12))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.3:
            words[rng.randrange(len(words))] = rng.choice(["I", "O", "A", "KING", "QUEEN", "LORD"])
        line = " ".join(words) + rng.choice(".,;:!?-'") + ("" if rng.random() < 0.7 else str(rng.randint(0, 9)))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def prepare_data(root: Path, chars: int = 200_000) -> str:
    """A character-level dataset in ``root/data``, prepared by the project's own pipeline."""
    from clusterlm.data.prepare import PrepareOptions, prepare

    source = root / "text.txt"
    source.write_text(synthetic_text(chars))
    out = str(root / "data")
    prepare(PrepareOptions(inputs=(str(source),), out=out, tokenizer="char", shard_tokens=1 << 20))
    return out


def case_config(case: ValidationCase, data_dir: str, out_dir: str, peak_flops: float) -> Config:
    """The trainer's config for a case; ``peak_flops`` only spares every rank its own probe."""
    overrides = {
        **NANO_MODEL, "data.dir": data_dir, "training.micro_batch_size": case.batch_per_rank,
        "training.precision": case.precision, "training.steps": 10**9, "training.threads": 1,
        "training.out_dir": out_dir, "metrics.peak_flops": peak_flops, "optim.warmup_steps": 1,
    }
    overrides.update({f"parallel.{k}": v for k, v in case.parallel.items()})
    return build_config(None, overrides)


# ---------------------------------------------------------------- what one rank measures


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank stores: a DTensor's local shard, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensor_bytes(tensor: torch.Tensor) -> int:
    shard = local(tensor)
    return shard.numel() * shard.element_size()


def model_state_bytes(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> int:
    """Parameters, gradients and optimizer state this rank stores, summed exactly from the tensors.
    ``ZeroRedundancyOptimizer`` holds its rank's AdamW in ``.optim``: only the owned parameters'
    state."""
    params = [p for part in parts for p in part.parameters()]
    tensors = params + [p.grad for p in params if p.grad is not None]
    for optimizer in optimizers:
        state = getattr(optimizer, "optim", optimizer).state
        tensors += [v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    return sum(tensor_bytes(t) for t in tensors)


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage a tensor lives in (stable while the storage is alive)."""
    with torch.no_grad():
        return local(tensor).untyped_storage()._cdata


@contextmanager
def _parameter_storages(models: list[torch.nn.Module]) -> Iterator[set[int]]:
    """Storages of the parameters and buffers, including those a wrapper (FSDP) swaps in for the
    forward: each module's own parameters are recorded as it starts its forward."""
    modules = [m for model in models for m in model.modules()]
    keys = {_storage_key(t) for m in modules for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}

    def record(module: torch.nn.Module, _inputs: object) -> None:
        keys.update(_storage_key(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])

    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        yield keys
    finally:
        for handle in handles:
            handle.remove()


class _Saved:
    """What autograd holds instead of a saved tensor while activations are counted: it dies when
    autograd releases the tensor (after the backward that used it), which ends its count."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def saved_activation_bytes(model: torch.nn.Module | list[torch.nn.Module], run: Callable[[], object]) -> tuple[int, object]:
    """The peak bytes autograd keeps for backward while ``run()`` runs ``model`` (forward, or whole
    training steps), once per storage, parameters and buffers excluded; returns it with what
    ``run`` returned. A storage counts from its first save until autograd releases its last saved
    tensor, so pipeline schedules show the micro-batches they really keep in flight."""
    live: dict[int, list[int]] = {}  # storage -> [bytes, saved tensors alive]
    total = peak = 0

    def release(key: int) -> None:
        nonlocal total
        live[key][1] -= 1
        if live[key][1] == 0:
            total -= live.pop(key)[0]

    with _parameter_storages(model if isinstance(model, list) else [model]) as params:
        def pack(tensor: torch.Tensor) -> object:
            nonlocal total, peak
            key = _storage_key(tensor)
            if key in params:
                return tensor
            if key not in live:
                with torch.no_grad():
                    live[key] = [local(tensor).untyped_storage().nbytes(), 0]
                total += live[key][0]
                peak = max(peak, total)
            live[key][1] += 1
            # Detached: a saved output holding its own grad_fn would form a cycle through the
            # autograd node, released only by the garbage collector, not by the backward.
            saved = _Saved(tensor.detach())
            weakref.finalize(saved, release, key)
            return saved

        def unpack(saved: object) -> torch.Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            result = run()
    return peak, result


def _step_activations(session) -> int:
    """Peak saved-tensor bytes of one training step through the trainer's wrapped model parts
    (every micro-batch of a pipeline schedule)."""
    from clusterlm.train.trainer import train_step

    peak, loss = saved_activation_bytes(session.parts, lambda: train_step(session))
    loss.item()
    return peak


def _state_after_next_step(session) -> int:
    """Model state right after an optimizer step, before the gradients are dropped."""
    from clusterlm.train.trainer import train_step

    seen: list[int] = []
    handles = [opt.register_step_post_hook(lambda *_: seen.append(1)) for opt in session.optimizers]
    state: list[int] = []

    def measure(*_: object) -> None:
        if len(seen) == len(session.optimizers) and not state:
            state.append(model_state_bytes(session.parts, session.optimizers))

    handles += [opt.register_step_post_hook(measure) for opt in session.optimizers]
    train_step(session)
    for handle in handles:
        handle.remove()
    return state[0]


def _timed_steps(session, steps: int) -> list[float]:
    """Per step, the slowest rank's seconds."""
    from clusterlm.train.trainer import train_step

    times = torch.empty(steps, dtype=torch.float64)
    dist.barrier()
    for i in range(steps):
        start = time.perf_counter()
        train_step(session).item()
        times[i] = time.perf_counter() - start
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times.tolist()


def measure_rank(rank: int, world_size: int, cfg: Config, warmup: int, steps: int) -> tuple[int, int, list[float]]:
    """Run on every rank: (model-state bytes, activation bytes, per-step seconds)."""
    from clusterlm.train.trainer import build_session, train_step

    session = build_session(cfg)
    activations = _step_activations(session)
    state = _state_after_next_step(session)
    for _ in range(max(0, warmup - 1)):
        train_step(session)
    return state, activations, _timed_steps(session, steps) if steps else []


def measure_case(case: ValidationCase, data_dir: str, peak_flops: float, warmup: int, steps: int,
                 timeout: float = 300) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="clusterlm-validate-") as out:
        cfg = case_config(case, data_dir, out, peak_flops)
        ranks = run_local(measure_rank, case.nproc, cfg, warmup, steps, timeout=timeout)
    times = ranks[0][2]
    return Measurement(state_bytes=max(r[0] for r in ranks), activation_bytes=max(r[1] for r in ranks),
                       step_seconds=statistics.median(times) if times else 0.0, step_times=tuple(times))


# ---------------------------------------------------------------- this machine as a cluster


def _all_reduce_sweep(rank: int, world_size: int, sizes: tuple[int, ...], iters: int) -> list[tuple[int, float]]:
    """(bytes, median seconds of the slowest rank) of ``dist.all_reduce`` per size."""
    points = []
    for size in sizes:
        buffer = torch.zeros(size // 4)
        dist.all_reduce(buffer)
        elapsed = torch.empty(iters, dtype=torch.float64)
        for i in range(iters):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            elapsed[i] = time.perf_counter() - start
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        points.append((size, statistics.median(elapsed.tolist())))
    return points


def measure_link(nproc: int, iters: int = 10) -> Link:
    """The link of ``nproc`` local gloo processes, from an all-reduce sweep fitted as alpha + beta * n:
    a ring all-reduce takes 2(n-1) latencies and moves 2(n-1)/n of the buffer over each link, so
    latency = alpha / (2(n-1)) and bandwidth = 2(n-1)/n / beta."""
    points = run_local(_all_reduce_sweep, nproc, SWEEP_BYTES, iters, timeout=120)[0]
    alpha, beta, _ = fit_alpha_beta(points)
    steps = 2 * (nproc - 1)
    return Link(bandwidth=steps / nproc / max(beta, 1e-15), latency=max(alpha, 0.0) / steps)


def one_thread_peaks() -> dict[str, float]:
    """Matmul probe peaks of one thread (what each spawned process uses), per precision."""
    from clusterlm.train.hardware import cpu_peak_flops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = cpu_peak_flops(torch.float32), cpu_peak_flops(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    return {"fp32": fp32, "bf16": bf16, "fp16": bf16}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cluster(nproc: int, peaks: dict[str, float], link: Link, cores: int) -> Cluster:
    """``nproc`` processes on this machine as one node of ``nproc`` devices sharing ``cores``."""
    share = min(1.0, cores / nproc)
    device = Device(name=f"1-thread CPU process ({cores} cores shared by {nproc})", memory_bytes=float("inf"),
                    peak_flops={k: v * share for k, v in peaks.items()}, host_share=share)
    return Cluster(name=f"{nproc} local processes", nodes=1, devices_per_node=nproc, device=device,
                   intra_node=link, inter_node=link)


# ---------------------------------------------------------------- the whole run


def run_validation(cases: tuple[ValidationCase, ...] = CASES, warmup: int = 3, steps: int = 15, rounds: int = 2,
                   progress: Callable[[str], None] | None = None) -> tuple[list[ValidationResult], dict[int, Link]]:
    """Measure every case in ``rounds`` rounds, the order reversed every other round; returns the
    results and the measured link per process count. Other work on the machine only ever adds
    time, so each case keeps its least disturbed round: the lowest median step time."""
    peaks, cores = one_thread_peaks(), available_cores()
    links = {n: measure_link(n) if n > 1 else Link(bandwidth=math.inf, latency=0.0)
             for n in sorted({c.nproc for c in cases})}
    rounds_measured: dict[str, list[Measurement]] = {case.name: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="clusterlm-validate-data-") as root:
        data_dir = prepare_data(Path(root))
        vocab_size = _vocab_size(data_dir)
        for round_index in range(rounds):
            for case in cases if round_index % 2 == 0 else cases[::-1]:
                measured = measure_case(case, data_dir, peaks[case.precision], warmup, steps)
                rounds_measured[case.name].append(measured)
                if progress:
                    progress(f"round {round_index + 1}: {case.name} {measured.step_seconds * 1e3:.1f} ms/step")
    results = []
    for case in cases:
        args = resolve_model_args(case_config(case, "", "", 1.0), vocab_size)
        work = Workload(args, args.block_size, GLOBAL_BATCH * args.block_size, case.precision)
        cluster = local_cluster(case.nproc, peaks, links[case.nproc], cores)
        least_disturbed = min(rounds_measured[case.name], key=lambda m: m.step_seconds)
        results.append(ValidationResult(case, work, cluster, least_disturbed))
    return results, links


def _vocab_size(data_dir: str) -> int:
    from clusterlm.data.manifest import load_manifest

    return load_manifest(data_dir).vocab_size


# ---------------------------------------------------------------- calibration and report


MEASURED_LINKS = Calibration(comm_efficiency=1.0)  # the links are fitted to measured collectives


def fit_calibration(results: list[ValidationResult], base: Calibration = MEASURED_LINKS) -> Calibration:
    """Compute efficiency and the host costs (per step, per FSDP collective call, per tensor-parallel
    module pass) minimizing the squared relative step-time error over the cases marked ``fit``.
    The step time is linear in the host costs, so for each efficiency on a log grid they are the
    non-negative least-squares solution; the best efficiency wins."""
    fitted = [r for r in results if r.case.fit] or results
    measured = np.array([r.measured.step_seconds for r in fitted])
    # Host seconds each case spends per unit of each term (divided by its processes' core share).
    features = np.array([host_calls(r.work, r.case.layout).counts() for r in fitted])
    features /= np.array([[r.cluster.device.host_share] for r in fitted])
    best = None
    for efficiency in np.geomspace(0.02, 1.0, 200):
        calibration = replace(base, compute_efficiency=float(efficiency), **dict.fromkeys(HOST_SECONDS, 0.0))
        predicted = np.array([r.predicted_seconds(calibration) for r in fitted])
        costs = _nonnegative_least_squares(features / measured[:, None], 1 - predicted / measured)
        error = float(np.sum(((predicted + features @ costs) / measured - 1) ** 2))
        if best is None or error < best[0]:
            best = (error, replace(calibration, **dict(zip(HOST_SECONDS, map(float, costs), strict=True))))
    return best[1]


def _nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a x - b|| over x >= 0, by trying every set of free columns (there are three)."""
    best_x, best_error = np.zeros(a.shape[1]), float(np.sum(b**2))
    for free in itertools.chain.from_iterable(itertools.combinations(range(a.shape[1]), k)
                                              for k in range(1, a.shape[1] + 1)):
        solution, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        if (solution < 0).any():
            continue
        x = np.zeros(a.shape[1])
        x[list(free)] = solution
        error = float(np.sum((a @ x - b) ** 2))
        if error < best_error:
            best_x, best_error = x, error
    return best_x


def _error(predicted: float, measured: float) -> str:
    return f"{predicted / measured - 1:+.1%}" if measured else "n/a"


def validation_report(results: list[ValidationResult], calibration: Calibration, links: dict[int, Link]) -> str:
    rows = []
    within = 0
    for r in results:
        m, seconds = r.measured, r.predicted_seconds(calibration)
        within += abs(seconds / m.step_seconds - 1) <= 0.2
        rows.append([r.case.name + (" *" if r.case.fit else ""), r.case.layout.describe(),
                     f"{m.state_bytes / 2**20:.3f}", f"{r.state_predicted / 2**20:.3f}",
                     _error(r.state_predicted, m.state_bytes),
                     f"{m.activation_bytes / 2**20:.2f}", f"{r.activations_predicted / 2**20:.2f}",
                     _error(r.activations_predicted, m.activation_bytes),
                     f"{m.step_seconds * 1e3:.1f}", f"{seconds * 1e3:.1f}", _error(seconds, m.step_seconds)])
    header = ("config", "layout", "state MiB", "pred.", "error", "activ MiB", "pred.", "error",
              "step ms", "pred.", "error")
    link_text = ", ".join(f"{n} processes {link.latency * 1e6:.0f} us + bytes / {link.bandwidth / 1e9:.2f} GB/s"
                          for n, link in links.items() if n > 1)
    return "\n".join([
        table(rows, header, text_columns=2),
        f"step time within 20%: {within} of {len(results)} configurations (* = fitted on)",
        f"fitted: compute efficiency {calibration.compute_efficiency:.3f} of the one-thread matmul peak; host "
        f"{calibration.step_overhead_s * 1e3:.1f} ms per step, {calibration.fsdp_call_s * 1e3:.2f} ms per FSDP "
        f"collective call, {calibration.tp_module_s * 1e3:.2f} ms per tensor-parallel module pass (one core)",
        f"gloo loopback links (ring all-reduce fit): {link_text}",
    ])


def evidence(results: list[ValidationResult], calibration: Calibration, links: dict[int, Link]) -> dict:
    """What the calibration was fitted from, saved beside it for people to check."""
    return {
        "device": f"{available_cores()} CPU cores, one thread per process",
        "one_thread_peak_flops": one_thread_peaks(),
        "gloo_links": {str(n): {"latency_us": link.latency * 1e6, "bandwidth_gb_s": link.bandwidth / 1e9}
                       for n, link in links.items() if n > 1},
        "fitted_on": [r.case.name for r in results if r.case.fit],
        "points": [r.as_dict(calibration) for r in results],
    }
