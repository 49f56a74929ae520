"""A parallel layout: the mesh ``pp x dp_replicate x dp_shard x tp`` and how each dimension is used.

Rank placement (what decides whether a group talks over NVLink or the network): ranks are
numbered node by node, and the mesh is laid out with ``tp`` innermost (consecutive ranks, inside a
node), then ``dp_shard``, then ``dp_replicate``, then ``pp`` outermost. A group of dimension X
therefore has a stride equal to the product of the degrees inside it, and spans nodes once that
stride times its degree exceeds ``devices_per_node``.

``data_parallel``: ``ddp`` replicates everything over ``dp_replicate`` (``dp_shard`` = 1);
``zero1|zero2|zero3`` shard optimizer state / + gradients / + parameters over ``dp_shard``
(``dp_replicate`` = 1); ``hsdp`` shards like zero3 within ``dp_shard`` and replicates across
``dp_replicate``. ``micro_batches`` is the number of micro-batches of ``micro_batch_size``
sequences each data-parallel rank runs per step: gradient-accumulation steps without pipelining,
the pipeline's micro-batches (``pp_microbatches``) with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterlm.config import Config, grad_accum_steps
from clusterlm.parallel.mesh import pipeline_microbatches, resolve_degrees
from clusterlm.parallel.pipeline import stages_per_rank_for
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.workload import Workload

DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3", "hsdp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
CHECKPOINTING = ("none", "selective", "full")
ZERO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hsdp": 3}
# The trainer's pipeline schedules as the planner models them: a breadth-first loop keeps every
# micro-batch in flight like GPipe, and the zero-bubble family is modelled as ZB-H1.
PLANNED_SCHEDULE = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved_1f1b": "interleaved_1f1b", "looped_bfs": "gpipe",
                    "interleaved_zero_bubble": "zero_bubble", "zbv_zero_bubble": "zero_bubble",
                    "dualpipev": "zero_bubble"}


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    data_parallel: str = "ddp"
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    micro_batch_size: int = 1
    micro_batches: int = 1
    activation_checkpointing: str = "none"
    cpu_offload: bool = False

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def zero_stage(self) -> int:
        return ZERO_STAGE[self.data_parallel]

    @property
    def stride(self) -> dict[str, int]:
        """Distance between neighbouring ranks of each mesh dimension (tp innermost)."""
        return {"tp": 1, "dp_shard": self.tp, "dp_replicate": self.tp * self.dp_shard, "pp": self.tp * self.dp}

    def describe(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sequence_parallel else ''}"]
        if self.pp > 1:
            v = f"v{self.pp_stages_per_rank}" if self.pp_schedule == "interleaved_1f1b" else ""
            parts.append(f"pp{self.pp}({self.pp_schedule}{v})")
        dp = {"ddp": f"ddp{self.dp_replicate}", "hsdp": f"hsdp{self.dp_replicate}x{self.dp_shard}"}.get(
            self.data_parallel, f"{self.data_parallel}:{self.dp_shard}")
        parts += [dp, f"mb{self.micro_batch_size}x{self.micro_batches}"]
        if self.activation_checkpointing != "none":
            parts.append(f"ac={self.activation_checkpointing}")
        if self.cpu_offload:
            parts.append("offload")
        return " ".join(parts)


def layout_problem(layout: Layout, work: Workload, cluster: Cluster) -> str | None:
    """Why this layout cannot run this workload on this cluster, or None when it can."""
    args = work.model
    checks = [
        (layout.data_parallel in DATA_PARALLEL, f"data_parallel must be one of {', '.join(DATA_PARALLEL)}"),
        (layout.pp_schedule in PP_SCHEDULES, f"pp_schedule must be one of {', '.join(PP_SCHEDULES)}"),
        (layout.activation_checkpointing in CHECKPOINTING,
         f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}"),
        (min(layout.pp, layout.dp_replicate, layout.dp_shard, layout.tp, layout.pp_stages_per_rank,
             layout.micro_batch_size, layout.micro_batches) >= 1, "every degree and batch count must be >= 1"),
        (layout.world_size == cluster.world_size,
         f"pp x dp_replicate x dp_shard x tp = {layout.world_size}, but the cluster has {cluster.world_size} devices"),
        (layout.data_parallel != "ddp" or layout.dp_shard == 1, "ddp does not shard: dp_shard must be 1"),
        (layout.data_parallel not in ("zero1", "zero2", "zero3") or layout.dp_replicate == 1,
         "zero1-3 shard over all data-parallel ranks: dp_replicate must be 1 (use hsdp to replicate)"),
        (args.n_head % layout.tp == 0 and args.n_kv_head % layout.tp == 0,
         f"tp {layout.tp} must divide n_head {args.n_head} and n_kv_head {args.n_kv_head}"),
        (cluster.devices_per_node % layout.tp == 0, f"tp {layout.tp} must stay inside a node of "
         f"{cluster.devices_per_node} devices"),
        (not layout.sequence_parallel or layout.tp > 1, "sequence_parallel needs tp > 1"),
        (args.n_layer % (layout.pp * layout.pp_stages_per_rank) == 0,
         f"pp x stages per rank = {layout.pp * layout.pp_stages_per_rank} must divide n_layer {args.n_layer}"),
        (layout.pp_stages_per_rank == 1 or layout.pp_schedule == "interleaved_1f1b",
         "pp_stages_per_rank > 1 needs pp_schedule interleaved_1f1b"),
        (layout.pp_schedule != "interleaved_1f1b" or layout.micro_batches % layout.pp == 0,
         f"interleaved_1f1b needs micro-batches ({layout.micro_batches}) divisible by pp ({layout.pp})"),
        (layout.dp * layout.micro_batch_size * layout.micro_batches == work.sequences,
         f"dp x micro_batch_size x micro_batches = {layout.dp * layout.micro_batch_size * layout.micro_batches} "
         f"must equal the global batch of {work.sequences} sequences"),
        (not layout.cpu_offload or cluster.host is not None, "cpu_offload needs a [host] in the cluster"),
    ]
    return next((message for ok, message in checks if not ok), None)


def layout_from_config(cfg: Config, world_size: int) -> Layout:
    """The layout a training config runs on ``world_size`` processes, with the degrees the trainer
    derives (``resolve_degrees``). The trainer's zero1 replicates the model over its data-parallel
    group and shards only the optimizer; the planner names that group ``dp_shard``. Under a
    pipeline the trainer's micro-batch is the rank's whole batch, split into the schedule's
    micro-batches; without one, ``micro_batches`` is the gradient-accumulation steps."""
    p, t = cfg.parallel, cfg.training
    replicate, shard = resolve_degrees(p, world_size)
    if p.data_parallel == "zero1":
        replicate, shard = 1, replicate * shard
    common = {"dp_replicate": replicate, "dp_shard": shard, "tp": p.tp, "data_parallel": p.data_parallel,
              "sequence_parallel": p.sequence_parallel, "activation_checkpointing": t.activation_checkpointing,
              "cpu_offload": p.cpu_offload}
    if p.pp == 1:
        return Layout(**common, micro_batch_size=t.micro_batch_size,
                      micro_batches=grad_accum_steps(cfg, replicate * shard))
    micro_batches = pipeline_microbatches(p)
    return Layout(**common, pp=p.pp, pp_schedule=PLANNED_SCHEDULE[p.pp_schedule],
                  pp_stages_per_rank=stages_per_rank_for(p.pp_schedule, p.pp_stages_per_rank or None),
                  micro_batch_size=t.micro_batch_size // micro_batches, micro_batches=micro_batches)
