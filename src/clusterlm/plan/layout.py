"""A parallel layout: the mesh ``pp x dp_replicate x dp_shard x cp x tp`` and each dimension's use.

The vocabulary is the trainer's: data-parallel strategies, pipeline schedules, stage placement and
stage balancing (``clusterlm.parallel.pipeline``), degree resolution and every layout check
(``clusterlm.config.degrees``, ``clusterlm.config.checks``). ``layout_config`` turns a layout
into the training config that runs it and ``layout_from_config`` reads a config back; a layout is
possible exactly when the trainer accepts its config (``layout_problem``).

Rank placement (what decides whether a group talks over NVLink or the network): ranks are
numbered node by node, and the mesh is laid out with ``tp`` innermost (consecutive ranks, inside a
node), then ``cp``, ``dp_shard``, ``dp_replicate``, and ``pp`` outermost. A group of dimension X
therefore has a stride equal to the product of the degrees inside it, and spans nodes once that
stride times its degree exceeds ``devices_per_node``.

``data_parallel``: ``ddp`` replicates everything over ``dp_replicate`` (``dp_shard`` = 1);
``zero1|zero2|zero3`` shard optimizer state / + gradients / + parameters over ``dp_shard``
(``dp_replicate`` = 1; the trainer's zero1 names that group ``dp_replicate``, since it replicates
the model, and the conversion maps it); ``hsdp`` shards like zero3 within ``dp_shard`` and
replicates across ``dp_replicate``. ``micro_batches`` is the number of micro-batches of
``micro_batch_size`` sequences each data-parallel rank runs per step: gradient-accumulation steps
without pipelining, the pipeline's micro-batches (``pp_microbatches``) with it.

``cp`` splits every sequence over its ranks (``cp_attention``: ``ring`` or ``all_to_all``), which
read the same sequences but, as in the trainer, share weights like data-parallel ranks: DDP over
``dp x cp`` (``dp_cp``), FSDP and ZeRO sharding over ``dp_shard x cp`` (``dp_shard_cp``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypedDict

from clusterlm.config import (
    Config,
    ModelConfig,
    ParallelConfig,
    TrainingConfig,
    grad_accum_steps,
    validate,
)
from clusterlm.config.degrees import check_layout, pipeline_microbatches, resolve_degrees
from clusterlm.errors import UserError
from clusterlm.models.moe import MoeArgs
from clusterlm.parallel.pipeline import (
    SCHEDULES,
    stages_per_rank_for,
)
from clusterlm.plan.cluster import Cluster
from clusterlm.plan.workload import Workload

DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3", "hsdp")
PP_SCHEDULES = tuple(SCHEDULES)  # the trainer's, by name
CHECKPOINTING = ("none", "selective", "full")
ZERO_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "hsdp": 3}


@dataclass(frozen=True)
class Layout:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    cp: int = 1
    cp_attention: str = "ring"
    data_parallel: str = "ddp"
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    pp_stages_per_rank: int = 1
    micro_batch_size: int = 1
    micro_batches: int = 1
    activation_checkpointing: str = "none"
    cpu_offload: bool = False
    # parallel.bucket_mb: DDP's gradient buckets, the least bytes of an FSDP unit
    bucket_mb: float = 25.0
    ep: int = 1  # parallel.ep: routed experts split over ep ranks of dp_shard (innermost)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:  # the ranks holding the same weights (DDP's group)
        return self.dp * self.cp

    @property
    def dp_shard_cp(self) -> int:  # the ranks FSDP and ZeRO shard the states over
        return self.dp_shard * self.cp

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def zero_stage(self) -> int:
        return ZERO_STAGE[self.data_parallel]

    @property
    def uses_fsdp(self) -> bool:  # zero2, zero3 or hsdp over more than one rank
        return self.zero_stage >= 2 and self.dp_shard_cp > 1

    @property
    def stride(self) -> dict[str, int]:
        """Distance between neighbouring ranks of each mesh dimension (tp innermost), and of the
        flattened groups that fold cp into data parallelism (contiguous above tp)."""
        return {
            "tp": 1,
            "cp": self.tp,
            "ep": self.tp * self.cp,
            "dp_shard": self.tp * self.cp,
            "dp_replicate": self.tp * self.cp * self.dp_shard,
            "pp": self.tp * self.cp * self.dp,
            "dp_shard_cp": self.tp,
            "dp_cp": self.tp,
        }

    def describe(self) -> str:
        parts = [f"tp{self.tp}{'+sp' if self.sequence_parallel else ''}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}({self.cp_attention})")
        if self.pp > 1:
            v = f"v{self.pp_stages_per_rank}" if self.pp_stages_per_rank > 1 else ""
            parts.append(f"pp{self.pp}({self.pp_schedule}{v})")
        dp = {
            "ddp": f"ddp{self.dp_replicate}",
            "hsdp": f"hsdp{self.dp_replicate}x{self.dp_shard}",
        }.get(self.data_parallel, f"{self.data_parallel}:{self.dp_shard}")
        parts += [dp] + ([f"ep{self.ep}"] if self.ep > 1 else [])
        parts.append(f"mb{self.micro_batch_size}x{self.micro_batches}")
        if self.activation_checkpointing != "none":
            parts.append(f"ac={self.activation_checkpointing}")
        if self.cpu_offload:
            parts.append("offload")
        return " ".join(parts)


def layout_config(layout: Layout, work: Workload) -> Config:
    """The training config that runs ``layout`` for ``work``: the model, the [training] values the
    layout fixes and the [parallel] section, in the trainer's conventions. Under a pipeline the
    trainer's micro-batch is the rank's whole batch, split by the schedule; otherwise the rest of
    the batch is gradient accumulation. The inverse of ``layout_from_config``."""
    m = work.model
    model = ModelConfig(
        flavour=m.flavour,
        n_layer=m.n_layer,
        decoder_layers=m.decoder_layers,
        n_head=m.n_head,
        n_kv_head=m.n_kv_head,
        n_embd=m.n_embd,
        block_size=m.block_size,
        vocab_size=m.vocab_size,
        ffn_hidden=m.ffn_hidden,
        dropout=m.dropout,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        **{f.name: getattr(m, f.name) for f in dataclasses.fields(MoeArgs)},
    )
    pipelined = layout.pp > 1
    training = TrainingConfig(
        micro_batch_size=layout.micro_batch_size * (layout.micro_batches if pipelined else 1),
        seq_len=work.seq_len,
        tokens_per_step=work.global_batch_tokens,
        precision=work.precision,
        activation_checkpointing=layout.activation_checkpointing,
    )
    replicate, shard = layout.dp_replicate, layout.dp_shard
    if layout.data_parallel == "zero1":  # the trainer's zero1 replicates the model over its group
        replicate, shard = replicate * shard, 1
    parallel = ParallelConfig(
        data_parallel=layout.data_parallel,
        dp_replicate=replicate,
        dp_shard=shard,
        tp=layout.tp,
        cp=layout.cp,
        cp_attention=layout.cp_attention,
        sequence_parallel=layout.sequence_parallel,
        pp=layout.pp,
        pp_schedule=layout.pp_schedule,
        pp_microbatches=layout.micro_batches if pipelined else 0,
        pp_stages_per_rank=layout.pp_stages_per_rank if pipelined else 0,
        cpu_offload=layout.cpu_offload,
        bucket_mb=layout.bucket_mb,
        ep=layout.ep,
    )
    return Config(model=model, training=training, parallel=parallel)


class _Shared(TypedDict):
    """The ``Layout`` fields a config gives alike with and without a pipeline."""

    dp_replicate: int
    dp_shard: int
    tp: int
    cp: int
    cp_attention: str
    data_parallel: str
    sequence_parallel: bool
    activation_checkpointing: str
    cpu_offload: bool
    bucket_mb: float
    ep: int


def layout_from_config(cfg: Config, world_size: int) -> Layout:
    """The layout a training config runs on ``world_size`` processes, with the degrees the trainer
    derives (``resolve_degrees``). The inverse of ``layout_config``."""
    p, t = cfg.parallel, cfg.training
    replicate, shard = resolve_degrees(p, world_size)
    if p.data_parallel == "zero1":
        replicate, shard = 1, replicate * shard
    common: _Shared = {
        "dp_replicate": replicate,
        "dp_shard": shard,
        "tp": p.tp,
        "cp": p.cp,
        "cp_attention": p.cp_attention,
        "data_parallel": p.data_parallel,
        "sequence_parallel": p.sequence_parallel,
        "activation_checkpointing": t.activation_checkpointing,
        "cpu_offload": p.cpu_offload,
        "bucket_mb": p.bucket_mb,
        "ep": p.ep,
    }
    if p.pp == 1:
        return Layout(
            **common,
            micro_batch_size=t.micro_batch_size,
            micro_batches=grad_accum_steps(cfg, replicate * shard),
        )
    micro_batches = pipeline_microbatches(p)
    return Layout(
        **common,
        pp=p.pp,
        pp_schedule=p.pp_schedule,
        pp_stages_per_rank=stages_per_rank_for(p.pp_schedule, p.pp_stages_per_rank or None),
        micro_batch_size=t.micro_batch_size // micro_batches,
        micro_batches=micro_batches,
    )


def layout_problem(layout: Layout, work: Workload, cluster: Cluster) -> str | None:
    """Why this layout cannot run this workload on this cluster, or None when it can: the
    cluster's constraints first, then whatever the trainer refuses in the layout's config."""
    checks = [
        *_setting_checks(layout),
        *_degree_checks(layout, work, cluster),
        *_batch_and_host_checks(layout, work, cluster),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    return problem or trainer_refusal(layout, work)


def _setting_checks(layout: Layout) -> list[tuple[bool, str]]:
    """(passes, message) for the layout's named choices and its degrees and batch counts."""
    smallest = min(
        layout.pp,
        layout.dp_replicate,
        layout.dp_shard,
        layout.tp,
        layout.cp,
        layout.pp_stages_per_rank,
        layout.micro_batch_size,
        layout.micro_batches,
        layout.ep,
    )
    return [
        (
            layout.data_parallel in DATA_PARALLEL,
            f"data_parallel must be one of {', '.join(DATA_PARALLEL)}",
        ),
        (
            layout.pp_schedule in PP_SCHEDULES,
            f"pp_schedule must be one of {', '.join(PP_SCHEDULES)}",
        ),
        (
            layout.activation_checkpointing in CHECKPOINTING,
            f"activation_checkpointing must be one of {', '.join(CHECKPOINTING)}",
        ),
        (smallest >= 1, "every degree and batch count must be >= 1"),
    ]


def _degree_checks(layout: Layout, work: Workload, cluster: Cluster) -> list[tuple[bool, str]]:
    """(passes, message) for the degrees against the cluster's devices, the data-parallel
    strategy and the model's attention heads."""
    return [
        (
            layout.world_size == cluster.world_size,
            f"pp x dp_replicate x dp_shard x cp x tp = {layout.world_size}, "
            f"but the cluster has {cluster.world_size} devices",
        ),
        (
            layout.data_parallel != "ddp" or layout.dp_shard == 1,
            "ddp does not shard: dp_shard must be 1",
        ),
        (
            layout.data_parallel not in ("zero1", "zero2", "zero3") or layout.dp_replicate == 1,
            "zero1-3 shard over all data-parallel ranks: dp_replicate must be 1 "
            "(use hsdp to replicate)",
        ),
        (
            work.model.n_head % layout.tp == 0 and work.model.n_kv_head % layout.tp == 0,
            f"tp {layout.tp} must divide n_head {work.model.n_head} "
            f"and n_kv_head {work.model.n_kv_head}",
        ),
        (
            cluster.devices_per_node % layout.tp == 0,
            f"tp {layout.tp} must stay inside a node of {cluster.devices_per_node} devices",
        ),
    ]


def _batch_and_host_checks(
    layout: Layout, work: Workload, cluster: Cluster
) -> list[tuple[bool, str]]:
    """(passes, message) for the global batch the layout runs and the host memory it needs."""
    batch = layout.dp * layout.micro_batch_size * layout.micro_batches
    return [
        (
            batch == work.sequences,
            f"dp x micro_batch_size x micro_batches = {batch} "
            f"must equal the global batch of {work.sequences} sequences",
        ),
        (
            not layout.cpu_offload or cluster.host is not None,
            "cpu_offload needs a [host] in the cluster",
        ),
    ]


def trainer_refusal(layout: Layout, work: Workload) -> str | None:
    """The trainer's own one-line refusal of the layout's config, or None when it would run it."""
    cfg = layout_config(layout, work)
    try:
        validate(cfg)
        check_layout(cfg, layout.world_size)
        if layout.pp > 1:
            stages_per_rank_for(layout.pp_schedule, layout.pp_stages_per_rank)
    except UserError as err:
        return str(err)
    return None
