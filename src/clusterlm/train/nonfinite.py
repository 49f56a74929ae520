"""A step whose loss or gradient norm is not finite is never applied.

``step_is_finite`` looks at the step's loss and gradient norm before the optimizer runs. The
ranks that step together agree on the answer (one scalar all-reduce), so they all stop or all
skip; replicas that step alone (local SGD, DiLoCo, a parameter server's workers) decide for
themselves. A non-finite step stops the run with one line naming the step and the values, or,
with ``training.skip_nonfinite``, is skipped: no optimizer step, its gradients zeroed by the
caller, and counted in ``Session.skipped_steps``. Under fp16 the loss scaler already skips steps
whose gradients overflowed, so only the loss is checked there.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from clusterlm.errors import UserError
from clusterlm.train.session import Session

INDEPENDENT_REPLICAS = ("local_sgd", "diloco", "ps")


def _agreed(session: Session, probe: torch.Tensor) -> torch.Tensor:
    """``probe`` summed over the ranks that step together: a NaN or infinity anywhere stays one."""
    if (
        dist.is_initialized()
        and dist.get_world_size() > 1
        and session.runtime.lockstep
        and session.cfg.parallel.data_parallel not in INDEPENDENT_REPLICAS
    ):
        probe = probe.clone()
        dist.all_reduce(probe)
    return probe


def step_is_finite(session: Session, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
    """True when the step may be applied; False when it is to be skipped.

    Raises UserError to stop the run.
    """
    values = [loss.detach().float().reshape(())]
    if (
        session.model.precision.scaler is None
    ):  # fp16: overflowing gradients are the scaler's to skip
        values.append(grad_norm.detach().float().reshape(()).to(values[0].device))
    probe = _agreed(session, torch.stack(values)).tolist()
    if all(math.isfinite(value) for value in probe):
        return True
    step = session.step + 1
    if session.cfg.training.skip_nonfinite:
        session.skipped_steps += 1
        return False
    names = ("loss", "gradient norm")
    found = ", ".join(
        f"{name} {value}"
        for name, value in zip(names, probe, strict=False)
        if not math.isfinite(value)
    )
    raise UserError(
        f"training stopped at step {step}: {found}; the step was not applied "
        "and the checkpoints saved so far hold finite weights; lower optim.lr, "
        "or set training.skip_nonfinite = true to skip such steps"
    )
