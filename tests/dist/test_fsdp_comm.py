"""The ring reduce-scatter FSDP uses on gloo equals dist.reduce_scatter_tensor, accumulation
micro-steps leave FSDP's gradients sharded, clipping on local shards equals torch's
clip_grad_norm_, and AdamW on local shards equals torch's AdamW, on 4 real gloo processes (one
spawn for all).

Tolerances: reduce-scatter sums 4 terms in another order, within 4 eps of the summed magnitudes
(float32 1e-6 relative, bfloat16 3e-2); clipping differs from torch's only in summation order,
relative 1e-6 on the norm and on every gradient; AdamW is elementwise: bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

from clusterlm.comm.ring_reduce_scatter import RingReduceScatter
from clusterlm.parallel.data_parallel import gradient_sync
from clusterlm.parallel.clipping import clip_grad_norm, reduce_partial_grads
from clusterlm.parallel.local_adamw import LocalAdamW

from .helpers import run_distributed


def _reduce_scatter_mismatches(group: dist.ProcessGroup, seed: int) -> list[str]:
    n, rank = group.size(), group.rank()
    generator = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    comm, failures = RingReduceScatter(), []
    for dtype, tolerance in ((torch.float32, 1e-6), (torch.bfloat16, 3e-2)):
        for numel in (n, 1001 * n):
            for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
                x = torch.randn(numel, generator=generator).to(dtype)
                expected = torch.empty(numel // n, dtype=dtype)
                dist.reduce_scatter_tensor(expected, x.clone(), group=group)
                magnitude = x.float().abs()
                dist.all_reduce(magnitude, group=group)
                if op == dist.ReduceOp.AVG:
                    expected = expected / n
                out = comm.allocate((numel // n,), dtype=dtype, device=x.device)
                comm(out, x.clone(), group, op)
                bound = tolerance * magnitude.chunk(n)[rank] / (n if op == dist.ReduceOp.AVG else 1) + 1e-30
                if ((out.float() - expected.float()).abs() > bound).any():
                    failures.append(f"{dtype} numel {numel} {op} on ranks {dist.get_process_group_ranks(group)}")
    return failures


def _sharded_grads(seed: int) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """Parameters with DTensor gradients on a 2x2 (replicate, shard) mesh, on one of its 1-D
    sub-meshes (sharded and replicated, one left Partial), and plain ones; and the same
    gradients as whole tensors, for torch's clipping."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    generator = torch.Generator().manual_seed(seed)  # the same whole gradients on every rank
    wholes = [torch.randn(shape, generator=generator) for shape in ((8, 3), (6,), (5, 2), (8, 4), (3,), (7,))]
    # FSDP over tensor parallelism shards the tensor-parallel shard again: _StridedShard, not a Shard.
    layouts = [(mesh, [Replicate(), Shard(0)]), (mesh["dp_shard"], [Shard(0)]), (mesh["dp_shard"], [Replicate()]),
               (mesh, [_StridedShard(0, split_factor=2), Shard(0)]), (None, None)]
    params = []
    for whole, (sub, placements) in zip(wholes[:-1], layouts, strict=True):
        if sub is None:
            param, grad = torch.nn.Parameter(torch.zeros_like(whole)), whole.clone()
        else:
            param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(whole), sub, placements))
            grad = distribute_tensor(whole, sub, placements)
        param.grad = grad
        params.append(param)
    # A Partial gradient: each of the 2 shard ranks holds half of the whole.
    param = torch.nn.Parameter(distribute_tensor(torch.zeros_like(wholes[-1]), mesh["dp_shard"], [Replicate()]))
    param.grad = DTensor.from_local(wholes[-1] / 2, mesh["dp_shard"], [Partial()])
    params.append(param)
    return params, wholes


def _clipping_mismatches(seed: int) -> list[str]:
    failures = []
    for max_norm in (1e9, 0.5):
        params, wholes = _sharded_grads(seed)
        reference = [torch.nn.Parameter(torch.zeros_like(w)) for w in wholes]
        for param, whole in zip(reference, wholes, strict=True):
            param.grad = whole.clone()
        expected = torch.nn.utils.clip_grad_norm_(reference, max_norm)
        norm = clip_grad_norm(params, max_norm)
        if not torch.allclose(norm, expected, rtol=1e-6):
            failures.append(f"max_norm {max_norm}: norm {norm.item()} != torch's {expected.item()}")
        for i, (param, ref) in enumerate(zip(params, reference, strict=True)):
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            if not torch.allclose(grad, ref.grad, rtol=1e-6, atol=1e-7):
                failures.append(f"max_norm {max_norm}: gradient {i} differs from torch's")
    return failures


def _partial_reduction_failures(seed: int) -> list[str]:
    """Partial gradients (sequence parallelism's norms and biases) are reduced together and left
    replicated, equal to their whole values; the others are left as they were."""
    params, wholes = _sharded_grads(seed)
    mesh = params[0].grad.device_mesh
    whole = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed + 1))
    split = whole.chunk(2)[mesh.get_local_rank(0)] / 2  # sharded over dp_replicate, half a sum on dp_shard
    params.append(torch.nn.Parameter(distribute_tensor(torch.zeros_like(whole), mesh, [Shard(0), Replicate()])))
    params[-1].grad = DTensor.from_local(split, mesh, [Shard(0), Partial()])
    wholes.append(whole)
    before = [param.grad for param in params]
    reduce_partial_grads(params)
    failures = []
    for i, (param, whole, old) in enumerate(zip(params, wholes, before, strict=True)):
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            failures.append(f"gradient {i} is still partial: {grad.placements}")
        elif not torch.allclose(grad.full_tensor() if isinstance(grad, DTensor) else grad, whole, rtol=1e-6):
            failures.append(f"gradient {i} differs from its whole value")
        was_partial = isinstance(old, DTensor) and any(p.is_partial() for p in old.placements)
        if not was_partial and grad is not old:
            failures.append(f"gradient {i} was not partial but was replaced")
    return failures


def _local_adamw_mismatches(seed: int) -> list[str]:
    """Two fused AdamW steps on sharded, strided, replicated and plain parameters give torch's
    AdamW's parameters and state bit for bit; with a partial gradient among them too (where the
    step is torch's own)."""
    failures = []
    for with_partial in (False, True):
        stepped = []
        for optimizer_class in (torch.optim.AdamW, LocalAdamW):
            params = _sharded_grads(seed)[0][:None if with_partial else -1]
            with torch.no_grad():
                for param in params:
                    param.add_(0.5)
            # torch's fused AdamW takes one mesh (or plain tensors only) per group.
            by_mesh = [[params[0], params[3]], params[1:3], [params[4]], params[5:]]
            optimizer = optimizer_class([{"params": group, "weight_decay": 0.1 * (i % 2 == 0)}
                                         for i, group in enumerate(by_mesh) if group], lr=0.1, fused=True)
            for _ in range(2):
                optimizer.step()
            states = [optimizer.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq", "step")]
            stepped.append([*params, *states])
        for i, (expected, got) in enumerate(zip(*stepped, strict=True)):
            same_kind = type(expected) is type(got) and getattr(expected, "placements", None) == getattr(
                got, "placements", None)
            local = [t.to_local() if isinstance(t, DTensor) else t for t in (expected, got)]
            if not same_kind or not torch.equal(*local):
                failures.append(f"partial={with_partial}: tensor {i} differs from torch's AdamW")
    return failures


def _accumulation_failures() -> list[str]:
    """A micro-step outside gradient sync leaves FSDP's gradients reduce-scattered into shards
    (ZeRO-2 holds no whole gradient), unless ranks are uneven, where they wait whole for the end."""
    failures = []
    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("dp_shard",))
    for even in (True, False):
        model = fully_shard(torch.nn.Linear(8, 8), mesh=mesh)
        with gradient_sync(model, enabled=False, even=even):
            model(torch.randn(2, 8)).sum().backward()
        sharded = model.weight.grad is not None and model.weight.grad.to_local().shape == (2, 8)
        if sharded != even:
            failures.append(f"even={even}: gradient after a micro-step is {model.weight.grad!r:.60}")
    return failures


def _check(rank: int, world_size: int) -> list[str]:
    failures = _reduce_scatter_mismatches(dist.group.WORLD, seed=1) + _accumulation_failures()
    pair = dist.new_group([1, 3])  # global ranks that are not the group's own numbering
    if rank in (1, 3):
        failures += _reduce_scatter_mismatches(pair, seed=2)
    return (failures + _clipping_mismatches(seed=3) + _partial_reduction_failures(seed=4)
            + _local_adamw_mismatches(seed=5))


def test_ring_reduce_scatter_local_shard_clipping_adamw_and_partial_reduction_match_torch():
    results = run_distributed(_check, 4, timeout=90)
    assert results == [[]] * 4, results
