"""The degrees of the device mesh ``pp x dp_replicate x dp_shard x tp`` and every check of a layout
that needs only the config and the world size (the mesh itself: ``clusterlm.distributed.mesh``).

``check_layout`` runs before any worker starts (the launcher calls it with the job's size) and
again in every worker, so a layout that cannot run fails once, in one line, and never as one
traceback per rank.
"""

from __future__ import annotations

from clusterlm.config.derive import grad_accum_steps
from clusterlm.config.parallelism import ParallelConfig
from clusterlm.config.sections import Config
from clusterlm.errors import UserError

# pipeline schedule -> placement of its stages on ranks: one per rank, round-robin loop, or V
# (the classes that run them: ``clusterlm.parallel.pipeline.SCHEDULES``)
SCHEDULE_PLACEMENT = {
    "gpipe": "single",
    "1f1b": "single",
    "interleaved_1f1b": "loop",
    "looped_bfs": "loop",
    "interleaved_zero_bubble": "loop",
    "zbv_zero_bubble": "v",
    "dualpipev": "v",
}


# The strategies that keep a whole copy per data-parallel rank; of them, the last three
# synchronize outside backward (clusterlm.parallel.local_sgd, clusterlm.parallel.ps).
REPLICATING = ("ddp", "zero1", "local_sgd", "diloco", "ps")


def resolve_degrees(cfg: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) for the strategy; zeros are derived so that
    pp x dp_replicate x dp_shard x tp is the world size."""
    model_parallel = cfg.pp * cfg.tp * cfg.cp
    if cfg.data_parallel == "ps":
        # the servers hold no model replica: the mesh spans the workers
        world_size -= cfg.ps_servers
        if world_size < 1:
            raise UserError(
                f"parallel.data_parallel = ps with parallel.ps_servers = {cfg.ps_servers} leaves "
                f"no worker among the {world_size + cfg.ps_servers} processes; "
                "launch more processes"
            )
    if world_size % model_parallel:
        raise UserError(
            f"parallel.pp x parallel.tp x parallel.cp ({cfg.pp} x {cfg.tp} x {cfg.cp}) does not "
            f"divide the {world_size} processes of the job"
        )
    data_parallel = world_size // model_parallel
    replicate, shard = _data_parallel_degrees(cfg, data_parallel)
    if replicate * shard != data_parallel:
        raise UserError(
            f"parallel.pp ({cfg.pp}) x dp_replicate ({replicate}) x dp_shard ({shard}) "
            f"x cp ({cfg.cp}) x tp ({cfg.tp}) = {replicate * shard * model_parallel} "
            f"but the job has {world_size} processes; make the degrees multiply to the world size"
        )
    # Context-parallel ranks reduce gradients like data-parallel ranks.
    reducing = replicate * shard * cfg.cp > 1
    if cfg.pp * cfg.tp > 1 and reducing and cfg.data_parallel in REPLICATING:
        raise UserError(
            f"parallel.tp or parallel.pp > 1 composes with zero2, zero3 or hsdp data parallelism "
            f"(and with parallel.cp > 1, whose ranks reduce gradients alike), not "
            f"{cfg.data_parallel}"
        )
    return replicate, shard


def _data_parallel_degrees(cfg: ParallelConfig, ranks: int) -> tuple[int, int]:
    replicate, shard, strategy = cfg.dp_replicate, cfg.dp_shard, cfg.data_parallel
    if strategy in REPLICATING:
        replicate, shard = replicate or ranks // max(shard, 1), shard or 1
        if shard != 1:
            raise UserError(
                f"parallel.data_parallel = {strategy} replicates only; set parallel.dp_shard = 1 "
                "or use zero2/zero3/hsdp"
            )
    elif strategy in ("zero2", "zero3"):
        replicate, shard = replicate or 1, shard or ranks // max(replicate, 1)
        if replicate != 1:
            raise UserError(
                f"parallel.data_parallel = {strategy} shards only; use hsdp to also replicate"
            )
    else:  # hsdp
        if not replicate and not shard:
            raise UserError(
                "parallel.data_parallel = hsdp needs parallel.dp_replicate or parallel.dp_shard"
            )
        replicate = replicate or ranks // shard
        shard = shard or ranks // replicate
    return replicate, shard


def check_layout(cfg: Config, world_size: int) -> tuple[int, int]:
    """Every check of ``cfg``'s layout on ``world_size`` processes that needs no process group:
    degrees, strategy combinations, head, layer and batch divisibility. Returns
    (dp_replicate, dp_shard)."""
    replicate, shard = resolve_degrees(cfg.parallel, world_size)
    p, m = cfg.parallel, cfg.model
    for name, heads in (("model.n_head", m.n_head), ("model.n_kv_head", m.n_kv_head or m.n_head)):
        if heads % p.tp:
            raise UserError(
                f"parallel.tp ({p.tp}) must divide {name} ({heads}): each tensor-parallel rank "
                "computes whole heads"
            )
    if shard % p.ep:
        raise UserError(
            f"parallel.ep ({p.ep}) must divide the data-parallel sharding degree dp_shard "
            f"({shard}): expert parallelism borrows its ranks from it"
        )
    accumulation = grad_accum_steps(cfg, replicate * shard)
    if p.pp > 1:
        _check_pipeline(cfg, accumulation)
    return replicate, shard


def _check_pipeline(cfg: Config, accumulation: int) -> None:
    p = cfg.parallel
    stages = p.pp * stages_per_rank_for(p.pp_schedule, p.pp_stages_per_rank or None)
    if cfg.model.n_layer < stages:
        raise UserError(
            f"a pipeline of {stages} stages needs at least {stages} layers but model.n_layer = "
            f"{cfg.model.n_layer}; use fewer stages or more layers"
        )
    if accumulation > 1:
        raise UserError(
            "with parallel.pp > 1 the pipeline splits each batch into parallel.pp_microbatches; "
            "leave training.tokens_per_step at one micro-batch per data-parallel rank"
        )
    micro_batches = pipeline_microbatches(p)
    check_microbatches(p.pp_schedule, p.pp, micro_batches)
    if cfg.training.micro_batch_size % micro_batches:
        raise UserError(
            f"training.micro_batch_size ({cfg.training.micro_batch_size}) does not split into "
            f"parallel.pp_microbatches ({micro_batches}) equal micro-batches; make it a multiple"
        )


def pipeline_microbatches(p: ParallelConfig) -> int:
    return p.pp_microbatches or 2 * p.pp


def schedule_placement(schedule: str) -> str:
    if schedule not in SCHEDULE_PLACEMENT:
        raise UserError(
            f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULE_PLACEMENT)}"
        )
    return SCHEDULE_PLACEMENT[schedule]


def stages_per_rank_for(schedule: str, stages_per_rank: int | None = None) -> int:
    """The number of stages each rank holds (default: 1, or 2 for multi-stage schedules), checked
    against what the schedule needs."""
    placement = schedule_placement(schedule)
    wanted = stages_per_rank or (1 if placement == "single" else 2)
    if placement == "single" and wanted != 1:
        raise UserError(
            f"pipeline schedule {schedule} runs one stage per rank, not {wanted}; "
            "use interleaved_1f1b, looped_bfs or interleaved_zero_bubble for more"
        )
    if placement == "loop" and wanted < 2:
        raise UserError(
            f"pipeline schedule {schedule} needs at least 2 stages per rank; "
            "use gpipe or 1f1b for 1"
        )
    if placement == "v" and wanted != 2:
        raise UserError(
            f"pipeline schedule {schedule} needs exactly 2 stages per rank (a V), not {wanted}"
        )
    return wanted


def check_microbatches(schedule: str, pp: int, n_microbatches: int) -> None:
    """What the schedule classes require of the micro-batch count, checked before any rank starts:
    1F1B at least one per stage, DualPipeV one per stage of its V, the interleaved schedules whole
    rounds of ``pp``."""
    rounds = max(1, n_microbatches // pp)
    needs = {
        "1f1b": (n_microbatches >= pp, f"at least pp = {pp}"),
        "dualpipev": (n_microbatches >= 2 * pp, f"at least 2 x pp = {2 * pp}"),
        "interleaved_1f1b": (
            n_microbatches % rounds == 0,
            f"a multiple of {rounds} rounds of pp = {pp}",
        ),
        "interleaved_zero_bubble": (
            n_microbatches % rounds == 0,
            f"a multiple of {rounds} rounds of pp = {pp}",
        ),
    }
    ok, wanted = needs.get(schedule, (True, ""))
    if not ok:
        raise UserError(
            f"pipeline schedule {schedule} needs parallel.pp_microbatches {wanted}, "
            f"got {n_microbatches}"
        )
