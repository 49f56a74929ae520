"""The few measured factors that turn peak figures into predicted times.

- ``compute_efficiency``: achieved / peak FLOP/s of the training step's compute (matmuls plus the
  element-wise kernels around them), without communication or pipeline bubbles. Default 0.55:
  large bf16 Transformer GEMMs on A100/H100 reach 60-75% of dense peak and the element-wise work
  costs some of that back. It is the one free parameter of the time model; ``plan --validate``
  fits it for this machine and writes it to a JSON file that ``--calibration`` loads.
- ``comm_efficiency``: achieved / nominal link bandwidth of large collectives (NCCL bus bandwidth
  is typically 70-85% of the NVLink or NIC line rate).
- ``overlap``: fraction of the backward pass that can hide data-parallel gradient reduction and
  of compute that can hide FSDP parameter gathers (bucketing and prefetch are never perfect).
- ``step_overhead_s``: fixed seconds per optimizer step that no FLOP or byte count explains
  (framework dispatch, hooks, optimizer launch, data loading). Default 0: negligible against the
  steps of large models, but most of a tiny model's step on a CPU, where ``--validate`` fits it.
- ``efficiency_half_width``: the model width d at which half of ``compute_efficiency`` is
  reached (``clusterlm.plan.efficiency``); 0 makes the efficiency one constant.
- ``tp_exposed``: fraction of tensor-parallel collective time on the critical path. 1 for this
  project's DTensor tensor parallelism, which waits for each collective; an implementation that
  overlaps them with the neighbouring GEMMs (async TP, Transformer Engine) lowers it.
- ``device``: the device kind the factors were measured on (empty: not recorded). A calibration
  file from another kind of device is refused: its factors describe other hardware.
- ``fsdp_tensor_s``: host seconds per parameter tensor an FSDP collective passes (copied into and
  out of the flat buffer, viewed and wrapped as a DTensor, one by one).
- ``tp_module_s``: host seconds per tensor-parallel module pass (one DTensor-sharded linear, norm
  or embedding, forward or backward: sharding propagation, redistribution, local-tensor wrapping).
- ``pp_action_s``: host seconds per pipeline action (one stage's forward or backward of one
  micro-batch: the schedule's bookkeeping, posting its sends and receives and waiting on them).
  All three default to 0: on an accelerator the host runs ahead of the device and these costs hide
  behind the kernels of any model worth sharding; on a CPU the host is the device and they add,
  so ``--validate`` fits them.
- ``collective_wait``: the share of those three per-collective costs a process spends waiting for
  its peers rather than on a core, in [0, 1). More processes than cores slow a process by
  1 / its core share, but not while it waits. Default 0; ``--validate`` fits it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterlm.errors import UserError
from clusterlm.files import atomic_write
from clusterlm.hardware import device_kind

HOST_SECONDS = ("step_overhead_s", "fsdp_tensor_s", "tp_module_s", "pp_action_s")  # seconds >= 0
NON_NEGATIVE = (*HOST_SECONDS, "efficiency_half_width")  # the rest but ``device`` are fractions


@dataclass(frozen=True)
class Calibration:
    compute_efficiency: float = 0.55
    comm_efficiency: float = 0.8
    overlap: float = 0.8
    step_overhead_s: float = 0.0
    fsdp_tensor_s: float = 0.0
    tp_module_s: float = 0.0
    pp_action_s: float = 0.0
    efficiency_half_width: float = 0.0
    tp_exposed: float = 1.0
    collective_wait: float = 0.0
    device: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.name == "device":
                if not isinstance(value, str):
                    raise UserError(f"calibration device must be a device name, got {value!r}")
            elif f.name == "collective_wait":
                if not number or not 0.0 <= value < 1.0:
                    raise UserError(
                        f"calibration collective_wait must be a number in [0, 1), got {value!r}"
                    )
            elif f.name in NON_NEGATIVE:
                if not number or not 0.0 <= value < float("inf"):
                    raise UserError(f"calibration {f.name} must be a number >= 0, got {value!r}")
            elif not number or not 0.0 < value <= 1.0:
                raise UserError(f"calibration {f.name} must be a number in (0, 1], got {value!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str) -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(
                f"{source}: unknown calibration key {unknown[0]!r}; "
                f"known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except UserError as err:
            raise UserError(f"{source}: {err}") from None


def load_calibration(path: str | Path) -> Calibration:
    """Read the factors from a JSON file written by ``plan --validate --calibration-out``;
    other keys in the file (the measurements behind the fit) are kept for people, not read."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise UserError(
            f"calibration file {str(path)!r} not found; write one with `clusterlm plan --validate "
            "--calibration-out FILE`"
        ) from None
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    factors = {f.name: data[f.name] for f in dataclasses.fields(Calibration) if f.name in data}
    return Calibration.from_mapping(factors, str(path))


def check_device(calibration: Calibration, device_name: str, source: str) -> None:
    """Refuse factors measured on another kind of device than ``device_name``."""
    if calibration.device and device_kind(calibration.device) != device_kind(device_name):
        raise UserError(
            f"{source} was measured on {calibration.device}, "
            f"not on this cluster's {device_name}: its "
            "factors describe other hardware; calibrate on this kind of device or leave it out"
        )


def save_calibration(path: str | Path, calibration: Calibration, evidence: dict[str, Any]) -> None:
    """Write the factors, then the measurements they were fitted from, atomically."""
    atomic_write(path, json.dumps({**dataclasses.asdict(calibration), **evidence}, indent=2) + "\n")
