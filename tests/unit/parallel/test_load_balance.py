"""Load balancing's arithmetic: counts that minimize the slowest rank, micro-batches dealt once,
and a balancer that moves only for a clear gain."""

from __future__ import annotations

from clusterlm.data.loader import micro_batch_slots
from clusterlm.parallel.load_balance import LoadBalancer, balanced_counts, restore_counts


def test_balanced_counts_minimize_the_slowest_rank():
    assert balanced_counts([1.0, 0.5], 16) == [11, 5]
    assert balanced_counts([1.0, 1.0], 8) == [4, 4]
    assert balanced_counts([1.0, 1e-9], 8) == [7, 1]  # every rank keeps one
    assert sum(balanced_counts([3.0, 1.0, 2.0], 13)) == 13


def test_dealt_micro_batches_cover_the_step_once():
    assert [micro_batch_slots([2, 2], r) for r in (0, 1)] == [
        [0, 2],
        [1, 3],
    ]  # the unbalanced layout
    slots = [micro_batch_slots([5, 2, 1], r) for r in range(3)]
    assert sorted(s for rank in slots for s in rank) == list(range(8))


def test_balancer_moves_only_for_a_clear_gain_and_restores_saved_counts():
    assigned = []
    balancer = LoadBalancer(
        assigned.append, [4, 4], interval=2, fixed=False, gather=lambda mine: [0.04, mine]
    )
    for _ in range(2):
        balancer.observe(0.041)  # rank 1 within noise of rank 0: stays
    assert balancer.counts == [4, 4]
    for _ in range(2):
        balancer.observe(0.08)  # rank 1 half as fast
    assert balancer.counts == assigned[-1] == [6, 2]
    restore_counts(balancer, [5, 3])
    assert balancer.counts == [5, 3]
    restore_counts(balancer, [3, 3, 2])  # saved by a job of another size: measured afresh instead
    assert balancer.counts == [5, 3]
