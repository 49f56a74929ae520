"""Measure small single-process training steps on this machine and compare with the model.

For each configuration a real ``Transformer`` is trained with AdamW in fp32 on the CPU:
- model state is counted exactly from the tensors (parameters, ``.grad``, optimizer state);
- activations are the bytes autograd saves for backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks`` and counted once per storage, leaving out
  parameters and buffers (which autograd also saves, but which are not activations);
- the step time (forward, backward, optimizer step) is the median of a few timed steps.
The compute efficiency is fitted as the geometric mean of achieved / peak FLOP/s over the
configurations; the peak is the CPU matmul probe. Multi-process layouts (ddp, zero1-3, tp, pp)
are not measured yet: they need the distributed trainer; each would add a ``ValidationCase`` with
its layout and a launcher, and be compared the same way.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from clusterlm.models.counting import training_flops_per_token
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.plan.calibration import Calibration
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import activation_bytes, device_memory, logits_gradient_bytes
from clusterlm.plan.report import table
from clusterlm.plan.workload import Workload


@dataclass(frozen=True)
class ValidationCase:
    name: str
    model: ModelArgs
    seq_len: int
    micro_batch_size: int


def _model(flavour: str, n_layer: int, n_embd: int, n_head: int, n_kv_head: int, seq: int) -> ModelArgs:
    ffn = 4 * n_embd if flavour == "gpt2" else 8 * n_embd // 3 // 64 * 64
    return ModelArgs(flavour=flavour, vocab_size=512, block_size=seq, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, ffn_hidden=ffn)


CASES = (
    ValidationCase("gpt2 L4 d128", _model("gpt2", 4, 128, 4, 4, 128), 128, 8),
    ValidationCase("gpt2 L4 d256", _model("gpt2", 4, 256, 8, 8, 256), 256, 4),
    ValidationCase("gpt2 L6 d384", _model("gpt2", 6, 384, 6, 6, 128), 128, 4),
    ValidationCase("llama L4 d256", _model("llama", 4, 256, 8, 4, 256), 256, 4),
)


@dataclass(frozen=True)
class ValidationResult:
    case: str
    flops: float  # training FLOPs of one step
    seconds: float  # measured median step time
    peak_flops: float
    state_measured: float
    state_predicted: float
    activations_measured: float
    activations_predicted: float

    def as_dict(self) -> dict:
        return asdict(self)


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward in one forward pass, once per storage, parameters and
    buffers excluded; returns them with the loss (so the caller can run backward)."""
    module_storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in module_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    return sum(saved.values()), loss


def model_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients and optimizer state, summed exactly from the tensors."""
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(case: ValidationCase, peak_flops: float, steps: int = 3) -> ValidationResult:
    torch.manual_seed(0)
    model = Transformer(case.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (case.micro_batch_size, case.seq_len)
    tokens, targets = torch.randint(0, case.model.vocab_size, shape), torch.randint(0, case.model.vocab_size, shape)
    activations, loss = saved_activation_bytes(model, tokens, targets)
    loss.backward()
    optimizer.step()  # creates the optimizer state
    state = model_state_bytes(model, optimizer)
    optimizer.zero_grad(set_to_none=True)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)

    work = Workload(case.model, case.seq_len, case.seq_len * case.micro_batch_size, "fp32")
    layout = Layout(micro_batch_size=case.micro_batch_size)
    predicted = device_memory(work, layout)
    return ValidationResult(
        case=case.name,
        flops=training_flops_per_token(case.model, case.seq_len) * case.seq_len * case.micro_batch_size,
        seconds=statistics.median(times),
        peak_flops=peak_flops,
        state_measured=state,
        state_predicted=predicted.model_state,
        activations_measured=activations,
        activations_predicted=activation_bytes(work, layout, "first") - logits_gradient_bytes(work, layout),
    )


def run_validation(cases: tuple[ValidationCase, ...] = CASES) -> list[ValidationResult]:
    from clusterlm.train.hardware import cpu_peak_flops

    peak = cpu_peak_flops(torch.float32)
    return [measure(case, peak) for case in cases]


def fitted_calibration(results: list[ValidationResult]) -> Calibration:
    """Compute efficiency = geometric mean of achieved / peak over the measured steps."""
    ratios = [r.flops / r.seconds / r.peak_flops for r in results]
    efficiency = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
    return Calibration(compute_efficiency=min(1.0, efficiency))


def validation_report(results: list[ValidationResult], calibration: Calibration) -> str:
    rows = []
    for r in results:
        predicted_s = r.flops / (r.peak_flops * calibration.compute_efficiency)
        rows.append([r.case, f"{r.state_measured / 2**20:.2f}", f"{r.state_predicted / 2**20:.2f}",
                     f"{r.activations_measured / 2**20:.2f}", f"{r.activations_predicted / 2**20:.2f}",
                     f"{r.activations_predicted / r.activations_measured - 1:+.1%}",
                     f"{r.seconds * 1e3:.1f}", f"{predicted_s * 1e3:.1f}", f"{predicted_s / r.seconds - 1:+.0%}"])
    header = ("config (fp32, 1 process)", "state MiB", "pred.", "activ MiB", "pred.", "error", "step ms", "pred.", "error")
    peak = results[0].peak_flops if results else 0.0
    return (table(rows, header, text_columns=1) + f"\nfitted compute efficiency {calibration.compute_efficiency:.3f} "
            f"of the measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
