"""Enumerate the layouts that can run a workload on a cluster, keep those that fit, rank by time.

The search space: tp over the divisors of a node's device count that divide the query and
key/value heads, with sequence parallelism (in this model it costs the same time as plain tp and
saves memory) unless cp is used or the model is a mixture of experts, which the trainer runs
without it; cp inside the node with tp (its traffic runs every layer), ring attention, and
all-to-all where the heads split (the trainer refuses sequences not divisible by 2cp, sequence
parallelism with cp, and cp with a mixture of experts); pp up to the layer count, with the
trainer's schedules in ``SEARCHED_SCHEDULES`` (the trainer balances uneven stages); the
data-parallel remainder as ddp, zero1, zero2, zero3 or any hsdp split, and for a mixture of
experts, under the strategies that shard its experts (zero2, zero3, hsdp), every expert-parallel
degree ``ep`` > 1 dividing both dp_shard and the expert count; micro-batch sizes up to 64 that
divide each rank's share of the global batch; no, selective (only without a fused attention
kernel, where it saves memory) or full activation checkpointing; with and without optimizer
offload where the cluster has a host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from clusterlm.config.experts import EXPERT_PARALLEL_DATA_PARALLEL
from clusterlm.models.counting import training_flops_per_token
from clusterlm.models.seq2seq import is_seq2seq
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.layout import Layout, layout_problem
from clusterlm.plan.memory import MemoryBreakdown, device_memory
from clusterlm.plan.timing import StepTime, recompute_flops_per_token, step_time
from clusterlm.plan.workload import Workload

MAX_MICRO_BATCH = 64
MAX_NODE_GROWTH = 64  # how far "nothing fits" looks for a cluster size that would do


@dataclass(frozen=True)
class Candidate:
    """One layout with its predicted memory and step time."""

    work: Workload
    cluster: Cluster
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime

    @property
    def tokens_per_s(self) -> float:
        return self.work.global_batch_tokens / self.time.total

    @property
    def model_flops_per_s(self) -> float:
        """Per device, in model FLOPs (no recomputation): what MFU is quoted in."""
        per_token = training_flops_per_token(self.work.model, self.work.seq_len)
        return per_token * self.tokens_per_s / self.cluster.world_size

    @property
    def hardware_flops_per_s(self) -> float:
        """Per device, counting recomputed FLOPs too (Megatron's "achieved TFLOP/s")."""
        extra = recompute_flops_per_token(self.work, self.layout)
        return self.model_flops_per_s + extra * self.tokens_per_s / self.cluster.world_size

    @property
    def mfu(self) -> float:
        return self.model_flops_per_s / self.cluster.device.peak_flops[self.work.precision]

    def fits(self, headroom: float) -> bool:
        """Within ``headroom`` of the device's memory, counting what the runtime reserves, and the
        node's offloaded optimizer state within that of the host's."""
        device, host = self.cluster.device, self.cluster.host
        host_need = self.memory.host_optimizer * self.cluster.devices_per_node
        host_ok = host is None or host_need <= headroom * host.memory_bytes
        return (
            self.memory.total + device.reserved_bytes <= headroom * device.memory_bytes and host_ok
        )


@dataclass(frozen=True)
class SearchResult:
    ranked: list[Candidate]  # fitting layouts, fastest first
    smallest: Candidate | None  # the layout needing the least memory, fitting or not
    considered: int


def evaluate(work: Workload, layout: Layout, cluster: Cluster) -> Candidate:
    return Candidate(
        work, cluster, layout, device_memory(work, layout), step_time(work, layout, cluster)
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _data_parallel_options(dp: int, cp: int) -> Iterator[dict]:
    """The strategies over dp ranks; the cp ranks share the weights too, so with cp the ZeRO
    stages shard even over one data-parallel rank."""
    yield {"data_parallel": "ddp", "dp_replicate": dp, "dp_shard": 1}
    if dp * cp == 1:
        return
    for mode in ("zero1", "zero2", "zero3"):
        yield {"data_parallel": mode, "dp_replicate": 1, "dp_shard": dp}
    for shard in _divisors(dp)[1:-1]:
        yield {"data_parallel": "hsdp", "dp_replicate": dp // shard, "dp_shard": shard}


def _expert_parallel_options(dp: int, cp: int, experts: int) -> Iterator[dict]:
    """Each data-parallel option, then (a mixture of experts under a strategy that shards its
    experts) with every ep > 1 that divides both its dp_shard and the expert count."""
    for option in _data_parallel_options(dp, cp):
        yield option
        if experts and option["data_parallel"] in EXPERT_PARALLEL_DATA_PARALLEL:
            for ep in _divisors(math.gcd(option["dp_shard"], experts))[1:]:
                yield {**option, "ep": ep}


# The trainer's schedules the search tries, with their stages per rank: the one-stage pair, then
# each multi-stage family (round-robin and V). Every other schedule the trainer accepts is in
# SKIPPED_SCHEDULES with the reason; the time and memory models cover them all (``plan
# --published`` and ``--emit-config`` take any), but the search would never rank them first.
SEARCHED_SCHEDULES = (
    ("gpipe", 1),
    ("1f1b", 1),
    ("interleaved_1f1b", 2),
    ("interleaved_zero_bubble", 2),
    ("zbv_zero_bubble", 2),
)
SKIPPED_SCHEDULES = {
    "looped_bfs": (
        "interleaved 1F1B's bubble at GPipe's activation memory "
        "(all m micro-batches of each stage): never better than interleaved_1f1b"
    ),
    "dualpipev": (
        "what it adds to ZBV is overlapping one micro-batch's compute with another's "
        "communication (MoE all-to-all), which the planner does not model (it exposes the "
        "all-to-all); modelled as ZBV it only ties"
    ),
}


def _pipeline_options(pp: int) -> Iterator[dict]:
    if pp == 1:
        yield {"pp_schedule": "1f1b", "pp_stages_per_rank": 1}
        return
    for schedule, per_rank in SEARCHED_SCHEDULES:
        yield {"pp_schedule": schedule, "pp_stages_per_rank": per_rank}


def _model_parallel_options(work: Workload, cluster: Cluster) -> Iterator[dict]:
    """tp (with sequence parallelism, but for a mixture of experts and the encoder-decoder, which
    the trainer runs without it) and cp degrees (for neither of those), cp with each attention its
    heads allow."""
    args, node = work.model, cluster.devices_per_node
    whole_sequence = bool(args.moe_experts) or is_seq2seq(args)
    for tp in _divisors(node):
        if args.n_head % tp or args.n_kv_head % tp or cluster.world_size % tp:
            continue
        yield {"tp": tp, "sequence_parallel": tp > 1 and not whole_sequence}
        if whole_sequence:
            continue
        for cp in _divisors(node // tp)[1:]:
            if work.seq_len % (2 * cp) or cluster.world_size % (tp * cp):
                continue
            yield {"tp": tp, "cp": cp, "cp_attention": "ring"}
            if (args.n_head // tp) % cp == 0:
                yield {"tp": tp, "cp": cp, "cp_attention": "all_to_all"}


def enumerate_layouts(work: Workload, cluster: Cluster) -> Iterator[Layout]:
    """Every layout of the search space that ``layout_problem`` accepts."""
    args, world = work.model, cluster.world_size
    checkpointing = ("none", "full") if work.fused_attention else ("none", "selective", "full")
    offload = (False, True) if cluster.host is not None else (False,)
    for model_parallel in _model_parallel_options(work, cluster):
        split = model_parallel["tp"] * model_parallel.get("cp", 1)
        for pp in _divisors(world // split):
            dp = world // (split * pp)
            if args.n_layer < pp or work.sequences % dp:
                continue
            per_rank = work.sequences // dp
            for micro_batch in (b for b in _divisors(per_rank) if b <= MAX_MICRO_BATCH):
                micro_batches = per_rank // micro_batch
                for data_parallel in _expert_parallel_options(
                    dp, model_parallel.get("cp", 1), args.moe_experts
                ):
                    for pipeline in _pipeline_options(pp):
                        for ac in checkpointing:
                            for off in offload:
                                layout = Layout(
                                    pp=pp,
                                    micro_batch_size=micro_batch,
                                    micro_batches=micro_batches,
                                    activation_checkpointing=ac,
                                    cpu_offload=off,
                                    **model_parallel,
                                    **data_parallel,
                                    **pipeline,
                                )
                                if layout_problem(layout, work, cluster) is None:
                                    yield layout


def search(work: Workload, cluster: Cluster, headroom: float = 0.9) -> SearchResult:
    candidates = [evaluate(work, layout, cluster) for layout in enumerate_layouts(work, cluster)]
    fitting = sorted(
        (c for c in candidates if c.fits(headroom)), key=lambda c: (c.time.total, c.memory.total)
    )
    smallest = min(candidates, key=lambda c: c.memory.total, default=None)
    return SearchResult(fitting, smallest, len(candidates))


def nodes_needed(work: Workload, cluster: Cluster, headroom: float) -> int | None:
    """The smallest multiple of the cluster's node count (doubling) on which some layout fits."""
    nodes = cluster.nodes * 2
    while nodes <= cluster.nodes * MAX_NODE_GROWTH:
        bigger = cluster.with_nodes(nodes)
        for layout in enumerate_layouts(work, bigger):
            if evaluate(work, layout, bigger).fits(headroom):
                return nodes
        nodes *= 2
    return None


def _mesh(layout: Layout) -> tuple:
    return (
        layout.tp,
        layout.cp,
        layout.cp_attention,
        layout.pp,
        layout.dp_replicate,
        layout.dp_shard,
        layout.data_parallel,
        layout.ep,
    )


def runner_up(result: SearchResult) -> Candidate | None:
    """The fastest fitting layout with a different mesh from the best (a more telling comparison
    than the same mesh with another micro-batch size)."""
    best = result.ranked[0]
    return next((c for c in result.ranked[1:] if _mesh(c.layout) != _mesh(best.layout)), None)


def explain(best: Candidate, other: Candidate) -> str:
    """Why ``best`` beats ``other``: the step-time components where it saves most, and memory."""
    gain = other.time.total - best.time.total
    savings = sorted(
        (
            (o - b, name)
            for (name, b), (_, o) in zip(best.time.items(), other.time.items(), strict=True)
        ),
        reverse=True,
    )
    reasons = [
        f"{seconds * 1e3:.0f} ms less {name.replace('_', ' ')}"
        for seconds, name in savings[:2]
        if seconds > 0.01 * gain
    ]
    if (
        other.layout.activation_checkpointing != "none"
        and best.layout.activation_checkpointing == "none"
    ):
        reasons.append("it fits without recomputing activations")
    if best.memory.total < other.memory.total:
        reasons.append(
            f"{(other.memory.total - best.memory.total) / 2**30:.1f} GiB less memory per device"
        )
    percent = 100 * gain / other.time.total
    return (
        f"best `{best.layout.describe()}` is {percent:.1f}% faster than the runner-up "
        f"`{other.layout.describe()}`: {', '.join(reasons) or 'equal components'}."
    )
