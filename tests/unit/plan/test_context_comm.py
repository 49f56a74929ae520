"""The planner's context parallelism: activations split over cp, states sharded over dp_shard x cp,
the ring's traffic behind the attention it feeds, and the search over cp degrees."""

import dataclasses

import pytest

from clusterlm.models.gpt import ModelArgs
from clusterlm.plan import context_comm
from clusterlm.plan.cluster import ExchangeWaits, load_cluster
from clusterlm.plan.layout import Layout, layout_problem
from clusterlm.plan.memory import device_memory, layer_activation_bytes
from clusterlm.plan.search import enumerate_layouts
from clusterlm.plan.timing import step_time
from clusterlm.plan.workload import Workload

LLAMA = ModelArgs(
    flavour="llama",
    vocab_size=32000,
    block_size=65536,
    n_layer=8,
    n_head=16,
    n_kv_head=4,
    n_embd=2048,
    ffn_hidden=5632,
    dropout=0.0,
)


def _work(seq: int = 65536, precision: str = "fp32") -> Workload:
    return Workload(LLAMA, seq, 2 * seq, precision)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_activations_per_rank_fall_as_one_over_cp(cp):
    work = _work()
    one, split = Layout(micro_batch_size=2), Layout(micro_batch_size=2, cp=cp)
    assert layer_activation_bytes(work, split) == pytest.approx(
        layer_activation_bytes(work, one) / cp
    )
    assert device_memory(work, split).activations == pytest.approx(
        device_memory(work, one).activations / cp
    )


def test_fsdp_shards_the_state_over_dp_shard_and_cp():
    work = _work()
    zero3 = device_memory(work, Layout(data_parallel="zero3", dp_shard=2, micro_batch_size=1))
    with_cp = device_memory(
        work, Layout(data_parallel="zero3", dp_shard=2, cp=4, micro_batch_size=1)
    )
    assert with_cp.model_state == pytest.approx(zero3.model_state / 4)


def test_ring_sends_two_kv_rounds_and_the_gradients_home():
    """Per layer and micro-batch: (cp-1) K/V blocks forward, (cp-1) backward, cp fp32 gradient
    blocks; a block is k and v of this rank's s/cp tokens, K/V heads only."""
    work, cp = _work(precision="bf16"), 4
    layout = Layout(cp=cp, micro_batch_size=2)
    block = 2 * (65536 // cp) * 2 * LLAMA.n_kv_head * LLAMA.head_dim
    assert context_comm.kv_block_bytes(work, layout) == (2 * block, 4 * block)
    assert context_comm.sent_bytes_per_layer(work, layout) == 2 * (cp - 1) * 2 * block + cp * (
        4 * block
    )


def test_all_to_all_repeats_kv_heads_that_do_not_split():
    work = _work()
    eight = Layout(cp=8, cp_attention="all_to_all", micro_batch_size=2)  # 4 K/V heads over 8
    four = dataclasses.replace(eight, cp=4)
    q_elements = lambda layout: 2 * 65536 / layout.cp * LLAMA.n_head * LLAMA.head_dim  # noqa: E731
    assert context_comm.sent_bytes_per_layer(work, eight) == pytest.approx(
        2 * 4 * q_elements(eight) * 4 * 7 / 8
    )
    assert context_comm.sent_bytes_per_layer(work, four) == pytest.approx(
        2 * (2 + 2 * 4 / 16) * q_elements(four) * 4 * 3 / 4
    )


def test_ring_hops_bytes_hide_behind_attention_but_waits_and_gradient_hops_do_not():
    """A K/V hop's bytes travel while the rank computes; the gradient hops do not. Each hop waits
    for the neighbour: the latency, or where measured (processes sharing cores) the wait left
    after the work a K/V hop is posted before, and the whole wait of a gradient hop."""
    work, cluster = _work(), load_cluster("8xH100")
    layout = Layout(cp=4, micro_batch_size=2)
    link = cluster.intra_node
    kv, grads = (
        size / (link.bandwidth * cluster.calibration.comm_efficiency)
        for size in context_comm.kv_block_bytes(work, layout)
    )
    forward, backward = context_comm.exposed_seconds_per_layer(work, layout, cluster, 1e3)
    assert forward == pytest.approx(3 * link.latency)
    assert backward == pytest.approx(4 * grads + 7 * link.latency)
    exposed, _ = context_comm.exposed_seconds_per_layer(work, layout, cluster, 0.0)
    assert exposed == pytest.approx(3 * (kv + link.latency))
    waits = ExchangeWaits(posted=1e-4, after=1e-3, all_to_all=0.0, chained=2e-4)
    shared_cores = dataclasses.replace(cluster, intra_node=dataclasses.replace(link, waits=waits))
    forward, backward = context_comm.exposed_seconds_per_layer(work, layout, shared_cores, 1e3)
    assert forward == pytest.approx(3e-4)  # K/V hops: the wait left after the posted-over work
    # Gradient hops: three chained right after a K/V hop's wait, the last after the work.
    assert backward == pytest.approx(4 * grads + 3e-4 + 3 * 2e-4 + 1e-3)
    forward, _ = context_comm.exposed_seconds_per_layer(work, layout, shared_cores, 2e-3)
    assert kv < 0.8 * 5e-4
    assert forward == pytest.approx(3 * 5e-4)  # a block of 0.5 ms hides 0.5 ms of the wait
    assert step_time(work, layout, cluster).context_parallel > 0


def test_the_search_tries_cp_where_the_trainer_allows_it():
    cluster = load_cluster("8xH100")
    layouts = list(enumerate_layouts(_work(seq=65536), cluster))
    kinds = {(layout.cp, layout.cp_attention) for layout in layouts if layout.cp > 1}
    assert {(2, "ring"), (8, "ring"), (2, "all_to_all"), (8, "all_to_all")} <= kinds
    assert not any(layout.cp > 1 and layout.sequence_parallel for layout in layouts)
    for layout in layouts:
        assert layout.world_size == 8 and layout_problem(layout, _work(), cluster) is None


def test_the_search_skips_cp_the_sequence_or_heads_refuse():
    cluster = load_cluster("8xH100")
    six_heads = dataclasses.replace(LLAMA, n_head=6, n_kv_head=2, n_embd=768)

    def tried(seq: int) -> set[tuple[int, str]]:
        work = Workload(six_heads, seq, 2 * seq, "fp32")
        return {(layout.cp, layout.cp_attention) for layout in enumerate_layouts(work, cluster)}

    whole = tried(65536)
    assert {(2, "all_to_all"), (4, "ring")} <= whole and (4, "all_to_all") not in whole
    uneven = tried(65532)  # a multiple of 4, not of 8
    assert (2, "ring") in uneven and not any(cp == 4 for cp, _ in uneven)


def test_ring_exchanges_per_layer_are_its_kv_and_gradient_hops():
    ring = Layout(cp=4, micro_batch_size=2)
    assert context_comm.exchanges_per_layer(ring) == 3 + 3 + 4
    full = dataclasses.replace(ring, activation_checkpointing="full")
    assert context_comm.exchanges_per_layer(full) == 3 + 3 + 3 + 4  # the forward reruns
    assert context_comm.exchanges_per_layer(Layout(micro_batch_size=2)) == 0
    ulysses = dataclasses.replace(ring, cp_attention="all_to_all")
    assert context_comm.exchanges_per_layer(ulysses) == 0


def test_ring_merge_kernels_are_counted_per_step_and_their_bytes_grow_with_the_tokens():
    work = _work(seq=4096)
    two = Layout(cp=2, micro_batch_size=1)
    calls, nbytes = context_comm.merge_kernels(work, two)
    assert calls == (13 * 2 + 6) + (8 * 2 + 6)
    o = 4096 // 2 * LLAMA.n_head * LLAMA.head_dim * 4  # the rank's fp32 output
    assert nbytes > 2 * 9 * o  # at least the output's merges, both steps
    doubled = context_comm.merge_kernels(work, dataclasses.replace(two, micro_batch_size=2))
    assert doubled == (calls, pytest.approx(2 * nbytes))
    four = context_comm.merge_kernels(_work(seq=8192), Layout(cp=4, micro_batch_size=1))
    assert four[0] == (13 * 4 + 6) + (8 * 4 + 6)
    assert context_comm.merge_kernels(work, Layout(micro_batch_size=1)) == (0.0, 0.0)


def test_counted_kernels_take_time_at_measured_rates_only():
    from clusterlm.bench.layout_runs import local_cluster
    from clusterlm.plan.cluster import Link

    work, layout = _work(seq=4096), Layout(cp=2, micro_batch_size=1)
    rates = {"fp32": {"linear": 1e11, "attention": 1e11, "launch": 1e5, "elementwise": 1e10}}
    cluster = local_cluster(2, {"fp32": 1e11}, Link(1e9, 1e-4), cores=2, rates=rates)
    calls, nbytes = context_comm.merge_kernels(work, layout)
    assert step_time(work, layout, cluster).element_wise == pytest.approx(
        LLAMA.n_layer * (calls / 1e5 + nbytes / 1e10)
    )
    assert step_time(work, layout, load_cluster("8xH100")).element_wise == 0.0
