"""The config sections of how a job spreads over its processes: ``ParallelConfig`` (the layout,
the data-parallel strategy, the asynchronous strategies, timeouts and the hang watchdog) and
``CommConfig`` (the algorithms that reduce gradients)."""

from __future__ import annotations

from dataclasses import dataclass

from clusterlm.config.setting import setting


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel: str = setting(
        "ddp",
        "data-parallel strategy: ddp (replicate, all-reduce gradients), zero1 "
        "(+ shard optimizer state), zero2 (+ gradients), zero3 (+ parameters), hsdp "
        "(zero3 inside a group, replicated across groups), local_sgd (average parameters "
        "every local_steps), diloco (outer Nesterov step every local_steps), ps (parameter "
        "server, asynchronous)",
        ("ddp", "zero1", "zero2", "zero3", "hsdp", "local_sgd", "diloco", "ps"),
    )
    dp_replicate: int = setting(
        0, "data-parallel replicas (0 = derive from the world size and strategy)"
    )
    dp_shard: int = setting(
        0, "data-parallel sharding degree (0 = derive from the world size and strategy)"
    )
    tp: int = setting(
        1, "tensor-parallel degree: attention heads and MLP columns split across this many ranks"
    )
    sequence_parallel: bool = setting(
        False,
        "with tp > 1: split norms, dropout and the residual stream along the "
        "sequence too (activation memory / tp)",
    )
    cp: int = setting(
        1,
        "context-parallel degree: every sequence split over this many ranks (zig-zag chunks), "
        "which share the weights like data-parallel ranks",
    )
    cp_attention: str = setting(
        "ring",
        "context-parallel attention: ring (K/V blocks passed around the ranks, merged by "
        "online softmax) or all_to_all (heads scattered, the sequence gathered; needs heads "
        "divisible by cp)",
        ("ring", "all_to_all"),
    )
    ep: int = setting(
        1,
        "expert-parallel degree: each mixture-of-experts block's experts split across this many "
        "ranks of dp_shard (tokens reach them by all-to-all); zero2/zero3/hsdp",
    )
    pp: int = setting(1, "pipeline-parallel degree: the layers cut into stages on this many ranks")
    pp_schedule: str = setting(
        "1f1b",
        "pipeline schedule",
        (
            "gpipe",
            "1f1b",
            "interleaved_1f1b",
            "looped_bfs",
            "interleaved_zero_bubble",
            "zbv_zero_bubble",
            "dualpipev",
        ),
    )
    pp_microbatches: int = setting(
        0, "micro-batches a pipeline step splits the batch into (0 = 2 x pp)"
    )
    pp_stages_per_rank: int = setting(
        0,
        "stages each pipeline rank holds (0 = what the schedule needs: 1, or 2 "
        "for interleaved and V schedules)",
    )
    cpu_offload: bool = setting(
        False, "zero3/hsdp: keep sharded parameters, gradients and optimizer state in CPU memory"
    )
    bucket_mb: float = setting(
        25.0,
        "ddp/zero1: gradient bucket size in MiB (buckets reduce while backward runs); "
        "zero2/zero3/hsdp: consecutive blocks form FSDP units of at least this size",
    )
    timeout_s: float = setting(600.0, "seconds a collective may wait before the job fails as hung")
    load_balance: bool = setting(
        False,
        "ddp/zero1-3: give each data-parallel rank a number of the step's micro-batches "
        "proportional to its measured speed (global batch and losses unchanged)",
    )
    load_balance_counts: str = setting(
        "",
        "with load_balance: fixed micro-batches per rank, e.g. '3,1' (empty = "
        "measure the ranks' speeds every log interval)",
    )
    ps_servers: int = setting(
        1, "ps: parameter-server ranks (the last ranks of the job; the others are workers)"
    )
    ps_staleness: int = setting(
        -1,
        "ps: -1 fully asynchronous; s >= 0 bounded staleness (SSP): a worker at clock c "
        "waits until the slowest has reached c - s; 0 applies each round's mean gradient",
    )
    ps_lease_s: float = setting(
        30.0,
        "ps: seconds a server waits with no worker connected (all lost) before it fails; "
        "a worker that dies is counted lost at once, one that hangs after timeout_s",
    )
    local_steps: int = setting(
        16, "local_sgd/diloco: optimizer steps each replica takes between synchronizations"
    )
    outer_lr: float = setting(
        0.7, "diloco: learning rate of the outer Nesterov SGD on the averaged pseudo-gradient"
    )
    outer_momentum: float = setting(0.9, "diloco: momentum of the outer Nesterov SGD")
    hang_timeout_s: float = setting(
        300.0,
        "watchdog: a rank without progress for this long is reported by phase "
        "and step and the job ends (0 = off); keep it below parallel.timeout_s, whose "
        "collective timeout otherwise ends a hang first, without the report",
    )


@dataclass(frozen=True)
class CommConfig:
    allreduce: str = setting(
        "native",
        "ddp/zero1 gradient all-reduce algorithm (native = the backend's own)",
        (
            "native",
            "ring",
            "tree",
            "halving_doubling",
            "hierarchical",
            "mesh2d",
            "parameter_server",
        ),
    )
    compression: str = setting(
        "none", "ddp/zero1 gradient compression", ("none", "fp16", "bf16", "powersgd", "topk")
    )
    reduce_scatter: str = setting(
        "auto",
        "zero2/zero3/hsdp gradient reduce-scatter: native (the backend's own), ring "
        "(clusterlm.comm.ring), auto (ring on gloo, where it is the faster, else native)",
        ("auto", "native", "ring"),
    )
    powersgd_rank: int = setting(1, "rank of the PowerSGD low-rank approximation")
    topk_ratio: float = setting(0.01, "fraction of gradient entries top-k sparsification sends")
