"""Elastic jobs (``--nnodes MIN:MAX``): the node range, and the checks that every group size
the job can shrink or grow to can run the same training.

When a node is lost or returns, torchrun's c10d rendezvous re-forms the group and restarts the
workers, which resume from the newest checkpoint (``--resume auto``) on the new world size. The
checkpoint is resharded, and the data loader's state is a global count of samples consumed, so
the next step reads exactly the samples after the last saved one, whatever the size. The global
batch stays ``training.tokens_per_step`` on every size (gradient accumulation makes up the
difference), so the training itself is the same; that is why it must be set and divide evenly on
every size in the range.
"""

from __future__ import annotations

from clusterlm.config import Config
from clusterlm.config.degrees import check_layout
from clusterlm.errors import UserError


def node_range(nnodes: str) -> tuple[int, int]:
    """``"N"`` -> (N, N); ``"MIN:MAX"`` -> (MIN, MAX), refused unless 1 <= MIN <= MAX."""
    low, colon, high = nnodes.partition(":")
    try:
        lowest, highest = int(low), int(high if colon else low)
    except ValueError:
        raise UserError(f"--nnodes takes N or MIN:MAX, got {nnodes!r}") from None
    if lowest < 1:
        raise UserError(f"--nnodes {nnodes}: a job needs at least 1 node; use MIN >= 1")
    if lowest > highest:
        raise UserError(
            f"--nnodes {nnodes}: MIN is larger than MAX; use MIN:MAX with MIN <= MAX, "
            f"e.g. {highest}:{lowest}"
        )
    return lowest, highest


def check_sizes(cfg: Config, nproc: int, nnodes: str) -> list[int]:
    """Check the layout on every world size of the job (each node count times ``nproc``);
    returns those sizes. One line names the first size that cannot run and why."""
    lowest, highest = node_range(nnodes)
    sizes = [nodes * nproc for nodes in range(lowest, highest + 1)]
    if len(sizes) > 1 and not cfg.training.tokens_per_step:
        raise UserError(
            f"an elastic job (--nnodes {nnodes}) needs training.tokens_per_step, so the global "
            "batch stays the same when the group changes size; set it to a multiple of "
            f"micro_batch_size x seq_len x each data-parallel size of {sizes} processes"
        )
    for world_size in sizes:
        try:
            check_layout(cfg, world_size)
        except UserError as exc:
            if len(sizes) == 1:
                raise
            raise UserError(
                f"--nnodes {nnodes} lets the group run on {world_size} processes, where {exc}; "
                "choose a range whose every size fits the layout"
            ) from None
    return sizes
