"""Probes of what a rank does while it trains: the bytes it keeps, and how long its pipeline waits.

- ``saved_activation_bytes``: the peak bytes autograd keeps for backward while a function runs,
  seen through ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage from its
  first save to its release; parameters and buffers (also the parameters FSDP gathers for the
  forward) are not activations. Under a pipeline schedule this is the micro-batches a stage keeps
  in flight.
- ``model_state_bytes``: parameters, gradients and optimizer state, counting a rank's local shard
  only (``DTensor.to_local()`` for FSDP and tensor-parallel parameters;
  ``ZeroRedundancyOptimizer`` keeps the AdamW state of the parameters its rank owns in ``.optim``).
- ``pipeline_bubble``: per pipelined step, the slowest rank's time in the schedule and the most
  loaded rank's compute (its stages' forward and backward chunks).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from clusterlm.models import model_layers
from clusterlm.models.gpt import attention_kernel
from clusterlm.parallel.parallelize import Pipeline
from clusterlm.train.session import Session
from clusterlm.train.trainer import train_step


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
        tensors += [
            v for entry in state.values() for v in entry.values() if isinstance(v, torch.Tensor)
        ]
    return sum(tensor_bytes(t) for t in tensors)


def _storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage a tensor lives in (stable while the storage is alive)."""
    with torch.no_grad():
        return local(tensor).untyped_storage()._cdata


def _module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


@contextmanager
def _parameter_storages(models: list[torch.nn.Module]) -> Iterator[set[int]]:
    """Storages of the parameters and buffers, including those a wrapper (FSDP) swaps in for the
    forward: each module's own parameters are recorded as it starts its forward."""
    modules = [m for model in models for m in model.modules()]
    keys = {_storage_key(t) for m in modules for t in _module_tensors(m)}

    def record(module: torch.nn.Module, _inputs: object) -> None:
        keys.update(_storage_key(t) for t in _module_tensors(module))

    handles = [m.register_forward_pre_hook(record) for m in modules]
    try:
        yield keys
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _inside_forward(module: torch.nn.Module | None) -> Iterator[list[bool]]:
    """A flag that is true while ``module``'s forward runs (always true without a module)."""
    inside = [module is None]
    handles = (
        []
        if module is None
        else [
            module.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True)),
            module.register_forward_hook(lambda *_: inside.__setitem__(0, False)),
        ]
    )
    try:
        yield inside
    finally:
        for handle in handles:
            handle.remove()


class _Saved:
    """What autograd holds instead of a saved tensor while activations are counted: it dies when
    autograd releases the tensor (after the backward that used it), which ends its count."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


_Returned = TypeVar("_Returned")


def saved_activation_bytes(
    model: torch.nn.Module | list[torch.nn.Module],
    run: Callable[[], _Returned],
    within: torch.nn.Module | None = None,
) -> tuple[int, _Returned]:
    """The peak bytes autograd keeps for backward while ``run()`` runs ``model`` (forward, or whole
    training steps), once per storage, parameters and buffers excluded; returns it with what
    ``run`` returned. A storage counts from its first save until autograd releases its last saved
    tensor, so pipeline schedules show the micro-batches they really keep in flight. With
    ``within`` (a submodule), only what is saved during that module's forward counts."""
    live: dict[int, list[int]] = {}  # storage -> [bytes, saved tensors alive]
    total = peak = 0

    def release(key: int) -> None:
        nonlocal total
        live[key][1] -= 1
        if live[key][1] == 0:
            total -= live.pop(key)[0]

    with (
        _parameter_storages(model if isinstance(model, list) else [model]) as params,
        _inside_forward(within) as inside,
    ):

        def pack(tensor: torch.Tensor) -> torch.Tensor | _Saved:
            nonlocal total, peak
            key = _storage_key(tensor)
            if key in params or not inside[0]:
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

        def unpack(saved: torch.Tensor | _Saved) -> torch.Tensor:
            return saved.tensor if isinstance(saved, _Saved) else saved

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            result = run()
    return peak, result


def step_activation_bytes(session: Session) -> int:
    """Peak saved-tensor bytes of one training step through the trainer's model parts (every
    micro-batch of a pipeline schedule)."""
    peak, loss = saved_activation_bytes(session.model.parts, lambda: train_step(session))
    loss.item()
    return peak


def block_activation_bytes(session: Session) -> int:
    """Bytes the first block keeps for backward from the forward of one micro-batch. The forward
    runs on the module inside a DDP wrapper, so no gradient reduction waits for a backward that
    never comes; under tensor parallelism it is collective: every rank runs it. Not for pipelines,
    whose stages take activations from their neighbours."""
    cfg, model = session.cfg, session.model
    part = getattr(model.parts[0], "module", model.parts[0])
    first_block = next(iter(model_layers(part).values()))
    torch.manual_seed(0)  # the same tokens on every tensor-parallel rank
    tokens = torch.randint(
        0,
        cfg.model.vocab_size,
        (cfg.training.micro_batch_size, cfg.seq_len),
        device=session.runtime.device,
    )

    # This rank's share of the window under context parallelism, with its positions and mask.
    x, _, inputs = model.inputs(tokens, tokens)

    def forward() -> None:
        with model.precision.autocast(), attention_kernel(cfg.training.attention):
            part(x, **inputs)

    return saved_activation_bytes(part, forward, within=first_block)[0]


def state_after_next_step(session: Session) -> int:
    """Model state right after the next optimizer step, before the gradients are dropped."""
    optimizers, parts = session.optimizers, session.model.parts
    stepped: list[int] = []
    state: list[int] = []

    def measure(*_: object) -> None:
        stepped.append(1)
        if len(stepped) == len(optimizers):  # the last optimizer of this step
            state.append(model_state_bytes(parts, optimizers))

    handles = [optimizer.register_step_post_hook(measure) for optimizer in optimizers]
    try:
        train_step(session)
    finally:
        for handle in handles:
            handle.remove()
    return state[0]


@contextmanager
def _pipeline_timer(pipeline: Pipeline) -> Iterator[dict[str, float]]:
    """Seconds this rank spends in the schedule's ``step`` (entered together: a barrier precedes
    it) and, inside it, computing: its stages' forward and backward chunks. The rest of the
    schedule's time is idle or communicating. Instance attributes shadow the methods, so the
    schedule calls the timed versions and nothing outside this context changes."""
    spent = {"schedule": 0.0, "busy": 0.0}

    def timed(function: Callable, key: str) -> Callable:
        @functools.wraps(function)
        def run(*args: object, **kwargs: object) -> object:
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

    def synchronized_step(*args: object, **kwargs: object) -> object:
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


@dataclass(frozen=True)
class BubbleSample:
    """One pipelined step: the slowest rank's seconds in the schedule, and the most loaded rank's
    seconds computing (its stages' forward and backward chunks)."""

    schedule_s: float
    compute_s: float

    @property
    def bubble(self) -> float:
        """Idle and communication time per unit of compute."""
        return (self.schedule_s - self.compute_s) / self.compute_s


def pipeline_bubble(session: Session, steps: int) -> list[BubbleSample]:
    """Time ``steps`` pipelined training steps inside the schedule; collective, every rank runs
    it."""
    samples = []
    pipeline = session.model.pipeline
    assert pipeline is not None  # a pipelined run
    with _pipeline_timer(pipeline) as spent:
        for _ in range(steps):
            spent.update(schedule=0.0, busy=0.0)
            train_step(session).item()
            seconds = torch.tensor([spent["schedule"], spent["busy"]], dtype=torch.float64)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
            samples.append(BubbleSample(*seconds.tolist()))
    return samples
