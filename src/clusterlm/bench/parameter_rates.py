"""The rates of a training step's passes over every parameter, measured on one thread for the
planner (``clusterlm.plan.elementwise``): the optimizer step, and FSDP's copies of weights and
gradients through its flat buffers. Both grow with the parameters' bytes rather than with the
FLOPs or the link.
"""

from __future__ import annotations

import torch

from clusterlm.bench.probe_timing import best_seconds, one_thread
from clusterlm.config import OptimConfig
from clusterlm.models import create_model
from clusterlm.plan.layout import Layout
from clusterlm.plan.workload import Workload
from clusterlm.train.optim import optimizer_recipe


def optimizer_rate(work: Workload) -> dict[str, float]:
    """{"optimizer": parameters/s} of one thread on the trainer's optimizer step (gradient
    clipping, then its AdamW with its parameter groups) over the whole model's parameters: a few
    element-wise passes over each parameter's weights, gradient and moments, and calls per
    tensor."""
    model = create_model(work.model)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer = optimizer_recipe(model, OptimConfig()).build()
    params = list(model.parameters())

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    with one_thread():
        seconds = best_seconds(step)
    return {"optimizer": sum(p.numel() for p in params) / seconds}


def fsdp_buffer_rate(work: Workload, layout: Layout) -> dict[str, float]:
    """{"fsdp_buffers": bytes/s} of one thread on FSDP2's copies through its flat buffers
    (``torch.distributed.fsdp``'s collectives) for one block's parameters over the ``dp_shard``
    ranks: a gather copies the shards into its input and splits its output into the parameters, a
    reduce-scatter chunks the gradients into its input and divides them, and the shard once more.
    The bytes are counted as ``clusterlm.plan.fsdp.buffer_bytes`` counts them: the block's weights
    once for the gather and its gradients once for the reduction."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = create_model(work.model)
    world = layout.dp_shard_cp
    sizes = [
        -(-p.numel() // world) * world  # FSDP pads each parameter to a multiple of the ranks
        for name, p in model.named_parameters()
        if name.startswith("layers.0.")
    ]
    chunks = [n // world for n in sizes]
    shards = [torch.randn(n) for n in chunks]
    gather_in, gathered = torch.empty(sum(chunks)), torch.empty(world, sum(chunks))
    params = [torch.empty(world, n) for n in chunks]
    grads = [torch.randn(n) for n in sizes]
    reduce_in = torch.empty(world, sum(chunks))

    def run() -> None:
        torch._foreach_copy_(list(gather_in.split(chunks)), shards)
        torch.split_with_sizes_copy(gathered, chunks, dim=1, out=params)
        torch._chunk_cat(grads, dim=0, num_chunks=world, out=reduce_in)
        reduce_in.div_(world)
        reduce_in[0].div_(world)

    with one_thread():
        seconds = best_seconds(run, calls=20)
    return {"fsdp_buffers": 2 * 4 * sum(sizes) / seconds}
