"""The layouts ``plan --validate`` trains, what it measured in them, and the comparison with the
planner's predictions.

Every case is the nano-cpu shape (gpt2, 4 layers x 128, context 64, 12 sequences per step, a
character vocabulary) in one parallel layout on ``nproc`` local processes; the mixture-of-experts
cases swap in ``configs/moe-cpu.toml``'s blocks (llama, 16 SwiGLU experts of width 128, top 2, one
shared) at the same size. The measuring lives in
``clusterlm.bench.layout_runs`` and the calibration fit in ``clusterlm.plan.fit``; this module is
arithmetic only. The prediction is the planner's own: ``device_memory`` and ``step_time`` for the
case's ``Layout``, derived from the case's training config by the trainer's rules
(``layout_from_config``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from clusterlm.config import Config
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.plan.calibration import Calibration
from clusterlm.plan.cluster import Cluster, Link
from clusterlm.plan.layout import Layout, layout_from_config
from clusterlm.plan.memory import activation_bytes, device_memory, logits_gradient_bytes
from clusterlm.plan.report import table
from clusterlm.plan.timing import step_time
from clusterlm.plan.workload import Workload

GLOBAL_BATCH = 12  # sequences per optimizer step, as nano-cpu
NANO_MODEL = {
    "model.flavour": "gpt2",
    "model.n_layer": 4,
    "model.n_head": 4,
    "model.n_embd": 128,
    "model.block_size": 64,
    "model.dropout": 0.0,
}
# configs/moe-cpu.toml's mixture of experts on the nano shape.
MOE_MODEL: dict[str, int | str] = {
    "model.flavour": "llama",
    "model.moe_experts": 16,
    "model.moe_top_k": 2,
    "model.moe_shared_experts": 1,
    "model.moe_ffn_hidden": 128,
    "model.moe_score": "sigmoid",
    "model.moe_balance": "aux_free",
}
WITHIN = 0.1  # the step-time error the report counts as a good prediction (the project's target)


@dataclass(frozen=True)
class ValidationCase:
    """One layout of the nano model: ``parallel`` holds ``[parallel]`` config keys."""

    name: str
    nproc: int
    parallel: dict[str, int | str | bool] = field(default_factory=dict)
    precision: str = "fp32"
    fit: bool = False  # the calibration is fitted on the cases marked here
    model: dict[str, int | str] = field(default_factory=dict)  # ``model`` keys over the nano's

    @property
    def batch_per_rank(self) -> int:
        """Sequences per data-parallel rank and step (a pipeline splits them into micro-batches)."""
        model_parallel = (
            int(self.parallel.get("tp", 1))
            * int(self.parallel.get("pp", 1))
            * int(self.parallel.get("cp", 1))
        )
        return GLOBAL_BATCH * model_parallel // self.nproc

    def config(self, settings: dict[str, object] | None = None) -> Config:
        """The trainer's config for this case; ``settings`` adds keys such as ``data.dir``."""
        # Flash attention, torch's CPU choice, is what the planner's fused-attention count and the
        # kernel-rate probe describe; ``auto`` may pick math for bf16 on a CPU
        # (``settle_attention``).
        overrides = {
            **NANO_MODEL,
            **self.model,
            "training.micro_batch_size": self.batch_per_rank,
            "training.precision": self.precision,
            "training.attention": "flash",
        }
        overrides.update({f"parallel.{key}": value for key, value in self.parallel.items()})
        return load_config(None, {**overrides, **(settings or {})})

    @property
    def layout(self) -> Layout:
        return layout_from_config(self.config(), self.nproc)


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
    ValidationCase("4 zero3", 4, {"data_parallel": "zero3"}, fit=True),
    ValidationCase("4 hsdp 2x2", 4, {"data_parallel": "hsdp", "dp_replicate": 2, "dp_shard": 2}),
    ValidationCase("4 tp2 x zero3", 4, {"tp": 2, "data_parallel": "zero3"}, fit=True),
    ValidationCase(
        "2 pp2 gpipe", 2, {"pp": 2, "pp_schedule": "gpipe", "pp_microbatches": 4}, fit=True
    ),
    ValidationCase(
        "2 pp2 1f1b", 2, {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 4}, fit=True
    ),
    ValidationCase(
        "4 pp2 x zero3",
        4,
        {"pp": 2, "pp_schedule": "1f1b", "pp_microbatches": 3, "data_parallel": "zero3"},
    ),
    ValidationCase("2 cp2 ring", 2, {"cp": 2}),
    ValidationCase("2 cp2 all-to-all", 2, {"cp": 2, "cp_attention": "all_to_all"}),
    ValidationCase("4 cp4 ring", 4, {"cp": 4}),
    ValidationCase("4 cp2 x zero3", 4, {"cp": 2, "data_parallel": "zero3"}),
    ValidationCase("1 process moe", 1, model=MOE_MODEL),
    ValidationCase("2 ep2 zero2 moe", 2, {"data_parallel": "zero2", "ep": 2}, model=MOE_MODEL),
    ValidationCase("4 ep2 x zero3 moe", 4, {"data_parallel": "zero3", "ep": 2}, model=MOE_MODEL),
)
CP_CASES = tuple(case for case in CASES if "cp" in case.parallel)
MOE_CASES = tuple(case for case in CASES if case.model)


@dataclass(frozen=True)
class Measurement:
    """What the trainer did: most loaded rank's bytes, median step seconds (slowest rank), and a
    mixture of experts' ``expert_imbalance`` over the timed steps (``moe_cost.rank_imbalance``)."""

    state_bytes: int
    activation_bytes: int
    step_seconds: float
    step_times: tuple[float, ...]
    expert_imbalance: float = 1.0


@dataclass(frozen=True)
class ValidationResult:
    case: ValidationCase
    work: Workload
    cluster: (
        Cluster  # with the default calibration; the fitted one is applied by ``predicted_seconds``
    )
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
            return activation_bytes(
                self.work, layout, stage
            ) - holds_logits * logits_gradient_bytes(self.work, layout)

        return max(saved("first"), saved("last"))

    def predicted_seconds(self, calibration: Calibration) -> float:
        cluster = replace(self.cluster, calibration=calibration)
        return step_time(self.work, self.case.layout, cluster).total

    def as_dict(self, calibration: Calibration) -> dict:
        return {
            "case": self.case.name,
            "nproc": self.case.nproc,
            "layout": self.case.layout.describe(),
            "precision": self.case.precision,
            "fitted_on": self.case.fit,
            **asdict(self.measured),
            "state_predicted": self.state_predicted,
            "activations_predicted": self.activations_predicted,
            "step_seconds_predicted": self.predicted_seconds(calibration),
        }


def _error(predicted: float, measured: float) -> str:
    return f"{predicted / measured - 1:+.1%}" if measured else "n/a"


def _row(result: ValidationResult, seconds: float) -> list[str]:
    m = result.measured
    return [
        result.case.name + (" *" if result.case.fit else ""),
        result.case.layout.describe(),
        f"{m.state_bytes / 2**20:.3f}",
        f"{result.state_predicted / 2**20:.3f}",
        _error(result.state_predicted, m.state_bytes),
        f"{m.activation_bytes / 2**20:.2f}",
        f"{result.activations_predicted / 2**20:.2f}",
        _error(result.activations_predicted, m.activation_bytes),
        f"{m.step_seconds * 1e3:.1f}",
        f"{seconds * 1e3:.1f}",
        _error(seconds, m.step_seconds),
    ]


def _imbalance_lines(results: list[ValidationResult]) -> list[str]:
    """The expert-parallel cases' measured imbalance, which their predictions take as given."""
    measured = [r for r in results if r.case.layout.ep > 1]
    if not measured:
        return []
    cases = ", ".join(f"{r.case.name} {r.work.expert_imbalance:.2f}" for r in measured)
    return [
        "routed tokens on the busiest expert-parallel rank over the mean, measured over the "
        f"timed steps and given to the planner: {cases}"
    ]


def validation_report(
    results: list[ValidationResult], calibration: Calibration, links: dict[int, Link]
) -> str:
    """Measured against predicted per case, how many step times are within 10%, the fitted
    calibration and the measured links."""
    predicted = [r.predicted_seconds(calibration) for r in results]
    within = sum(
        abs(seconds / r.measured.step_seconds - 1) <= WITHIN
        for r, seconds in zip(results, predicted, strict=True)
    )
    header = (
        "config",
        "layout",
        "state MiB",
        "pred.",
        "error",
        "activ MiB",
        "pred.",
        "error",
        "step ms",
        "pred.",
        "error",
    )
    link_text = ", ".join(
        f"{n} processes {link.latency * 1e6:.0f} us + bytes / {link.bandwidth / 1e9:.2f} GB/s"
        + (
            f" (a ring hop {w.posted * 1e6:.0f} us posted before the work, {w.after * 1e6:.0f} us"
            f" after it, {w.chained * 1e6:.0f} us right after another, an all-to-all"
            f" {w.all_to_all * 1e6:.0f} us)"
        )
        for n, link in links.items()
        for w in [link.exchange_waits(n)]
        if n > 1
    )
    return "\n".join(
        [
            table(
                [_row(r, seconds) for r, seconds in zip(results, predicted, strict=True)],
                header,
                text_columns=2,
            ),
            f"step time within {WITHIN:.0%}: {within} of {len(results)} configurations "
            "(* = fitted on)",
            f"fitted: compute efficiency {calibration.compute_efficiency:.3f} of the measured "
            "kernel rates (fp32 linear layers at the one-thread matmul peak); host "
            f"{calibration.step_overhead_s * 1e3:.1f} ms per step, "
            f"{calibration.fsdp_tensor_s * 1e6:.0f} us per tensor through FSDP's collectives, "
            f"{calibration.tp_module_s * 1e3:.2f} ms per tensor-parallel module pass, "
            f"{calibration.pp_action_s * 1e3:.2f} ms per pipeline action (one core), "
            f"{calibration.collective_wait:.0%} of the per-collective ones waiting for peers",
            f"gloo loopback links (ring all-reduce fit): {link_text}",
            *_imbalance_lines(results),
        ]
    )
