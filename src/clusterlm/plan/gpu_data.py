"""The planner against step times measured on GPUs (``clusterlm plan --validate --gpu-data``).

The measurements are data (``configs/plan/gpu-measurements.toml``): each row names the device it
ran on, the cluster preset that describes that device, the model preset, the batch and the layout
in the planner's terms, and what was measured (ms per step, MFU, and the peak memory where it was
recorded). Each row is predicted on its preset with the preset's calibration, or with a calibration
file, which must come from the same kind of device.

Where a row records ``activations_vs_korthikanti`` (the bytes one block saved for backward per
micro-batch over Korthikanti et al.'s 34*s*b*h for 16-bit activations and a fused attention
kernel), the report sets the planner's itemized count (``layer_activation_bytes``) beside it: the
formula leaves out what these blocks keep beyond GPT-3's (SwiGLU's four f-wide tensors, RMSNorm in
fp32 over autocast's fp32 residual stream, autocast's 16-bit copy of a norm's output per consuming
matmul and of every weight, llama's rotated q), which the planner counts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from clusterlm.errors import UserError
from clusterlm.hardware import device_kind
from clusterlm.plan.calibration import Calibration, check_device
from clusterlm.plan.cluster import load_cluster
from clusterlm.plan.fit import fit_efficiency
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import layer_activation_bytes
from clusterlm.plan.records import DATA_DIR, build, load_rows
from clusterlm.plan.report import table
from clusterlm.plan.search import Candidate, evaluate
from clusterlm.plan.workload import Workload, load_model_args

GPU_MEASUREMENTS = DATA_DIR / "gpu-measurements.toml"
FIELDS = {
    "name": str,
    "device": str,
    "cluster": str,
    "model": str,
    "seq_len": int,
    "global_batch_tokens": int,
    "precision": str,
    "micro_batch_size": int,
    "micro_batches": int,
    "activation_checkpointing": str,
    "step_ms": float,
    "mfu": float,
    "command": str,
    "source": str,
}
OPTIONAL = {"peak_gb": float, "activations_vs_korthikanti": float}
WITHIN = 0.10  # the step-time error the report counts as a good prediction


def _error(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def _case(row: dict) -> tuple[Workload, Layout]:
    layout = build(
        Layout,
        {
            key: row[key]
            for key in ("micro_batch_size", "micro_batches", "activation_checkpointing")
        },
        row["_where"],
    )
    work = Workload(
        load_model_args(row["model"]), row["seq_len"], row["global_batch_tokens"], row["precision"]
    )
    return work, layout


def _predict(row: dict, calibration: Calibration | None = None) -> Candidate:
    cluster = load_cluster(row["cluster"])
    if device_kind(row["device"]) != device_kind(cluster.device.name):
        raise UserError(
            f"{row['_where']}: measured on {row['device']} but cluster {row['cluster']} has "
            f"{cluster.device.name}; name the preset of the device it ran on"
        )
    if calibration is not None:
        cluster = dataclasses.replace(cluster, calibration=calibration)
    return evaluate(*_case(row), cluster)


def activations_vs_korthikanti(row: dict) -> float:
    """The planner's bytes one block saves per micro-batch over 34*s*b*h
    (``activations_vs_korthikanti``)."""
    work, layout = _case(row)
    return layer_activation_bytes(work, layout) / (
        34 * work.seq_len * layout.micro_batch_size * work.model.n_embd
    )


def _activation_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if "activations_vs_korthikanti" in row:
            measured, predicted = row["activations_vs_korthikanti"], activations_vs_korthikanti(row)
            lines.append(
                f"{row['name']}: saved activations per block "
                f"{measured:.2f}x Korthikanti's 34*s*b*h, "
                f"planner {predicted:.2f}x ({_error(predicted, measured):+.1%})"
            )
    return lines


def fit_gpu_efficiency(cluster: str, path: str | Path = GPU_MEASUREMENTS) -> Calibration:
    """The efficiency table of preset ``cluster`` refitted on the step times measured on it."""
    rows = [
        row for row in load_rows(path, "measurement", FIELDS, OPTIONAL) if row["cluster"] == cluster
    ]
    base = load_cluster(cluster).calibration
    return fit_efficiency(
        lambda cal: [row["step_ms"] / 1e3 / _predict(row, cal).time.total for row in rows], base
    )


def compare_gpu_data(
    path: str | Path = GPU_MEASUREMENTS,
    calibration: Calibration | None = None,
    calibration_source: str = "",
) -> str:
    rows, errors, data = [], [], load_rows(path, "measurement", FIELDS, OPTIONAL)
    for row in data:
        if calibration is not None:
            check_device(calibration, row["device"], calibration_source)
        c = _predict(row, calibration)
        measured_s, predicted_s = row["step_ms"] / 1e3, c.time.total
        errors.append(abs(_error(predicted_s, measured_s)))
        memory = (
            (
                f"{row['peak_gb']:.1f}",
                f"{c.memory.total / 1e9:.1f}",
                f"{_error(c.memory.total / 1e9, row['peak_gb']):+.1%}",
            )
            if "peak_gb" in row
            else ("-", f"{c.memory.total / 1e9:.1f}", "-")
        )
        rows.append(
            [
                row["name"],
                row["device"],
                f"{row['step_ms']:.1f}",
                f"{predicted_s * 1e3:.1f}",
                f"{_error(predicted_s, measured_s):+.1%}",
                f"{row['mfu']:.1%}",
                f"{c.mfu:.1%}",
                *memory,
            ]
        )
    header = (
        "measurement",
        "device",
        "step ms",
        "pred.",
        "error",
        "MFU",
        "pred.",
        "peak GB",
        "pred.",
        "error",
    )
    within = sum(e <= WITHIN for e in errors)
    return "\n".join(
        [
            table(rows, header),
            f"step time within {WITHIN:.0%}: {within} of {len(errors)} measurements "
            f"(data: {path}; '-' = not recorded); "
            "a preset calibrated on these rows agrees by construction, "
            "so its independent checks are the rows added after the fit and `plan --published`",
            *_activation_lines(data),
        ]
    )
