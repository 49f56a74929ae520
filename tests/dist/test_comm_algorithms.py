"""Every all-reduce algorithm equals dist.all_reduce, on real gloo process groups.

Each world size spawns its processes once and checks every algorithm, size, dtype and op there
(process start-up dominates the cost). Tolerances, per element, against dist.all_reduce:
integers exact; floating point |ours - ref| <= 2 (n + 1) eps sum_i |x_i| (divided by n for avg),
where eps is the dtype's machine epsilon: both results are sums of the same n terms in different
orders, each within about n eps sum|x_i| of the exact sum (for float32 at n = 8 that is ~2e-6
of the magnitude).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from clusterlm.comm import ALGORITHMS, all_reduce

from .helpers import run_distributed

SIZES = (0, 1, 7, 1001)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)
# (algorithm, options) checked at every world size; tiny chunks force the ring's pipeline, and
# small_bytes=0 halving-doubling where the default takes recursive doubling
DEFAULT_CASES = [(name, {}) for name in ALGORITHMS] + [
    ("ring", {"chunk_bytes": 128, "pipeline_depth": 3}),
    ("halving_doubling", {"small_bytes": 0}),  # the sizes here are small: force halving-doubling too
    ("parameter_server", {"num_servers": 2}),
]
# cases that need a particular world size: 2x2 groups / meshes at 4, 4x2 and 2x4 at 8
EXTRA_CASES = {
    4: [("hierarchical", {"local_size": 2}), ("mesh2d", {"rows": 2})],
    8: [("hierarchical", {"local_size": 2}), ("hierarchical", {"local_size": 4}), ("mesh2d", {"rows": 4})],
}
# on the 6-rank subgroup of 8 ranks: 2x3 and 3x2 groups and meshes
SUBGROUP_OF_8_CASES = [
    ("hierarchical", {"local_size": 3}),
    ("hierarchical", {"local_size": 2}),
    ("mesh2d", {"rows": 2}),
    ("mesh2d", {"rows": 3}),
]


def _mismatches(cases, group, seed: int) -> list[str]:
    """Run every case on ``group``; describe each result outside the tolerance."""
    n = dist.get_world_size(group)
    generator = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    failures = []
    for dtype in DTYPES:
        for size in SIZES:
            if dtype.is_floating_point:
                x = torch.randn(size, generator=generator).to(dtype)
            else:
                x = torch.randint(-1000, 1000, (size,), generator=generator, dtype=dtype)
            total = x.clone()
            dist.all_reduce(total, group=group)
            magnitude = x.double().abs()
            dist.all_reduce(magnitude, group=group)
            for op in ("sum", "avg") if dtype.is_floating_point else ("sum",):
                divisor = n if op == "avg" else 1
                expected = total.double() / divisor
                bound = 2 * (n + 1) * torch.finfo(dtype).eps * magnitude / divisor if dtype.is_floating_point else 0
                for algorithm, options in cases:
                    got = all_reduce(x.clone(), op, algorithm, group, **options)
                    error = (got.double() - expected).abs()
                    if got.dtype != dtype or (error > bound).any():
                        failures.append(
                            f"{algorithm} {options} {dtype} size={size} {op}: got {got.dtype}, "
                            f"max error {error.max().item():.3g} vs bound {torch.as_tensor(bound).max().item():.3g}"
                        )
    return failures


def _noncontiguous_ok(algorithm: str) -> bool:
    x = torch.arange(12.0).reshape(3, 4).t() * (dist.get_rank() + 1)
    expected = x.clone()
    dist.all_reduce(expected)
    return torch.equal(all_reduce(x, "sum", algorithm), expected)


def _differ_across_ranks(cases) -> list[str]:
    """Data-parallel replicas stay in step only if every rank gets the same bits."""
    x = torch.randn(1001, generator=torch.Generator().manual_seed(dist.get_rank())).to(torch.bfloat16)
    failures = []
    for algorithm, options in cases:
        got = all_reduce(x.clone(), "sum", algorithm, **options)
        first = got.clone()
        dist.broadcast(first, src=0)
        if not torch.equal(got, first):
            failures.append(f"{algorithm} {options}: ranks disagree")
    return failures


def _check_world(rank: int, world_size: int) -> list[str]:
    failures = _mismatches(DEFAULT_CASES + EXTRA_CASES.get(world_size, []), None, seed=0)
    failures += _differ_across_ranks(DEFAULT_CASES + EXTRA_CASES.get(world_size, []))
    failures += [f"{name}: non-contiguous input" for name in ALGORITHMS if not _noncontiguous_ok(name)]
    if world_size >= 4:
        # a subgroup without rank 0: group ranks differ from global ranks, rank 0 stays out
        members = list(range(1, world_size)) if world_size == 4 else list(range(2, world_size))
        subgroup = dist.new_group(members)
        if rank in members:
            subgroup_cases = DEFAULT_CASES + (SUBGROUP_OF_8_CASES if world_size == 8 else [])
            failures += [f"subgroup {members}: {f}" for f in _mismatches(subgroup_cases, subgroup, seed=1)]
    dist.barrier()
    return failures


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5, 8])
def test_all_algorithms_match_native_all_reduce(world_size):
    failures = run_distributed(_check_world, world_size, timeout=150)
    assert failures == [[]] * world_size


def _check_topology_groups(rank: int, world_size: int) -> list[str]:
    return _mismatches([("hierarchical", {})], None, seed=2)


def test_hierarchical_takes_nodes_from_local_world_size():
    # 4 ranks on 2 "nodes" of 2: the default hierarchical grouping comes from the launch topology
    failures = run_distributed(_check_topology_groups, 4, env={"LOCAL_WORLD_SIZE": "2"})
    assert failures == [[]] * 4


def _argument_errors(rank: int, world_size: int) -> list[str]:
    calls = [
        lambda: all_reduce(torch.ones(3), algorithm="carrier_pigeon"),
        lambda: all_reduce(torch.ones(3), op="max"),
        lambda: all_reduce(torch.ones(3, dtype=torch.int64), op="avg"),
        lambda: all_reduce(torch.ones(3), algorithm="ring", chunk_size=4),
        lambda: all_reduce(torch.ones(3), algorithm="parameter_server", num_servers=0),
    ]
    messages = []
    for call in calls:
        try:
            call()
        except (ValueError, TypeError) as error:
            messages.append(str(error))
    return messages


def test_bad_arguments_are_refused_with_a_clear_message():
    messages = run_distributed(_argument_errors, 1)[0]
    assert len(messages) == 5
    assert "choose one of: native, ring" in messages[0] and "'max'" in messages[1]
    assert "floating-point" in messages[2] and "chunk_size" in messages[3] and "num_servers" in messages[4]
