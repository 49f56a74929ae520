"""Impossible values fail at start with one line naming the key.

Every numeric key is first held to its range (``ranges``: finite, sign, bounds); then each area
of the config has its own check of how keys combine; ``validate`` runs them all in order. A new
feature adds its check to ``CHECKS`` rather than growing one long function.
"""

from __future__ import annotations

from collections.abc import Callable

from clusterlm.config.data_mix import parse_mix
from clusterlm.config.experts import check_experts
from clusterlm.config.ranges import check_ranges
from clusterlm.config.sections import Config
from clusterlm.config.slow_ranks import parse_slow_ranks
from clusterlm.errors import UserError


def _model(cfg: Config) -> None:
    m = cfg.model
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_head ({m.n_head}) must divide model.n_embd ({m.n_embd})")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise UserError(f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    if m.n_kv_head and m.n_kv_head != m.n_head and m.flavour != "llama":
        raise UserError(
            "model.n_kv_head != n_head (grouped-query attention) needs model.flavour = llama"
        )
    if (m.n_embd // m.n_head) % 2 and m.flavour == "llama":
        raise UserError(
            "llama needs an even head size for rotary positions; "
            f"n_embd/n_head = {m.n_embd // m.n_head}"
        )
    if m.decoder_layers and m.flavour != "mbart":
        raise UserError(
            f"model.decoder_layers = {m.decoder_layers} sizes the encoder-decoder's decoder; "
            f"model.flavour = {m.flavour} has no decoder of its own: drop it"
        )
    if cfg.seq_len > m.block_size:
        raise UserError(
            f"training.seq_len ({cfg.training.seq_len}) exceeds the model's context "
            f"model.block_size ({m.block_size})"
        )


def _optim(cfg: Config) -> None:
    o = cfg.optim
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")


def _parallel(cfg: Config) -> None:
    p = cfg.parallel
    if p.sequence_parallel and p.tp == 1:
        raise UserError("parallel.sequence_parallel needs parallel.tp > 1")
    if p.cpu_offload and p.data_parallel not in ("zero3", "hsdp"):
        raise UserError("parallel.cpu_offload needs parallel.data_parallel = zero3 or hsdp")


def _comm(cfg: Config) -> None:
    custom_comm = cfg.comm.allreduce != "native" or cfg.comm.compression != "none"
    if custom_comm and cfg.parallel.data_parallel not in ("ddp", "zero1"):
        raise UserError(
            "comm.allreduce / comm.compression apply to parallel.data_parallel = ddp or zero1 "
            "(FSDP reduces through reduce-scatter)"
        )
    if cfg.comm.reduce_scatter == "ring" and cfg.parallel.data_parallel not in (
        "zero2",
        "zero3",
        "hsdp",
    ):
        raise UserError(
            "comm.reduce_scatter = ring applies to parallel.data_parallel = zero2, zero3 or hsdp "
            "(the others all-reduce; comm.allreduce picks their algorithm)"
        )


def _experiments(cfg: Config) -> None:
    parse_slow_ranks(cfg.training.slow_ranks)


def _async(cfg: Config) -> None:
    p = cfg.parallel
    if p.data_parallel == "ps" and (p.tp > 1 or p.pp > 1):
        raise UserError(
            "parallel.data_parallel = ps keeps a whole model per worker; set parallel.tp = 1 and "
            "parallel.pp = 1"
        )


def _checkpoint(cfg: Config) -> None:
    if cfg.checkpoint.resume not in ("none", "auto") and not cfg.checkpoint.resume:
        raise UserError("checkpoint.resume must be none, auto or a checkpoint path")


def _init_from(cfg: Config) -> None:
    source = cfg.model.init_from
    if source and (not source.startswith("hf:") or len(source) == 3):
        raise UserError(
            "model.init_from must be empty or hf:DIR (a Hugging Face model directory), "
            f"got {source!r}"
        )


def _monitoring(cfg: Config) -> None:
    m, p = cfg.metrics, cfg.parallel
    if m.straggler_ratio and m.straggler_ratio < 1:
        raise UserError(
            "metrics.straggler_ratio compares the slowest rank with the median: "
            f"use >= 1 (or 0 = off), got {m.straggler_ratio}"
        )
    if p.load_balance and (
        p.data_parallel not in ("ddp", "zero1", "zero2", "zero3") or p.tp > 1 or p.pp > 1
    ):
        raise UserError(
            "parallel.load_balance works with parallel.data_parallel = ddp, zero1, zero2 or zero3 "
            "and no tensor or pipeline parallelism (tp = pp = 1)"
        )
    if p.load_balance_counts and not p.load_balance:
        raise UserError("parallel.load_balance_counts needs parallel.load_balance = true")


def _objective(cfg: Config) -> None:
    if cfg.finetune.task:  # fine-tuning has its own objective: the labels' cross-entropy
        return
    encoder, objective = cfg.model.flavour == "bert", cfg.training.objective
    if encoder != (objective == "mlm"):
        raise UserError(
            f"model.flavour = {cfg.model.flavour} trains with training.objective = "
            f"{'mlm' if encoder else 'clm'}, not {objective}"
        )
    p = cfg.parallel
    if cfg.model.flavour == "mbart" and (p.pp > 1 or p.sequence_parallel):
        raise UserError(
            "model.flavour = mbart has no pipeline or sequence-parallel plan; use "
            "parallel.pp = 1 and parallel.sequence_parallel = false "
            "(data and tensor parallelism work)"
        )
    if encoder and (cfg.parallel.pp > 1 or cfg.parallel.sequence_parallel):
        raise UserError(
            "model.flavour = bert has no pipeline or sequence-parallel plan yet; "
            "use parallel.pp = 1 and parallel.sequence_parallel = false "
            "(data and tensor parallelism work)"
        )


def _finetune(cfg: Config) -> None:
    f, p = cfg.finetune, cfg.parallel
    if not f.task:
        if f.init_from:
            raise UserError(
                "finetune.init_from needs finetune.task: "
                "run `clusterlm finetune --task DIR --init-from RUN`"
            )
        return
    if p.tp > 1 or p.pp > 1:
        raise UserError(
            "fine-tuning runs on data-parallel layouts: set parallel.tp = 1 and parallel.pp = 1"
        )
    if f.init_from and cfg.model.init_from:
        raise UserError(
            "give the pretrained model once: finetune.init_from (a run or checkpoint) or "
            "model.init_from (hf:DIR), not both"
        )
    if not 0 <= f.freeze_layers <= cfg.model.n_layer:
        raise UserError(
            f"finetune.freeze_layers must be in 0..{cfg.model.n_layer} (model.n_layer), "
            f"got {f.freeze_layers}"
        )


def _context_parallel(cfg: Config) -> None:
    p, m, seq = cfg.parallel, cfg.model, cfg.seq_len
    if p.cp == 1:
        return
    if m.flavour == "gpt2" and seq > m.block_size:
        raise UserError(
            f"parallel.cp splits sequences of training.seq_len {seq} tokens, whose global "
            f"positions gpt2's learned table must hold, but it has model.block_size "
            f"{m.block_size} rows; raise model.block_size or use model.flavour = llama (rotary)"
        )
    if seq % (2 * p.cp):
        raise UserError(
            f"training.seq_len ({seq}) must be divisible by 2 x parallel.cp = {2 * p.cp}: each "
            "context-parallel rank holds two equal chunks of every sequence (zig-zag)"
        )
    heads = m.n_head // p.tp
    if p.cp_attention == "all_to_all" and heads % p.cp:
        raise UserError(
            f"parallel.cp_attention = all_to_all splits the {heads} attention heads per "
            f"tensor-parallel rank over parallel.cp = {p.cp} ranks; make model.n_head / "
            "parallel.tp divisible by parallel.cp or use parallel.cp_attention = ring"
        )
    if p.cp_attention == "ring" and m.dropout:
        raise UserError(
            "parallel.cp_attention = ring has no attention dropout; set model.dropout = 0 "
            "or use parallel.cp_attention = all_to_all"
        )
    unsupported = {
        "parallel.sequence_parallel": p.sequence_parallel,
        f"parallel.data_parallel = {p.data_parallel}": p.data_parallel
        in ("local_sgd", "diloco", "ps"),
        f"model.flavour = {m.flavour}": m.flavour in ("bert", "mbart"),
        "model.moe_experts > 0": m.moe_experts > 0,
        "finetune.task": bool(cfg.finetune.task),
    }
    _refuse_with(unsupported, "parallel.cp > 1")


def _packing(cfg: Config) -> None:
    if not (cfg.data.document_masking or cfg.model.position_reset):
        return
    p = cfg.parallel
    unsupported = {
        "parallel.sequence_parallel": p.sequence_parallel,
        f"model.flavour = {cfg.model.flavour}": cfg.model.flavour in ("bert", "mbart"),
        "finetune.task": bool(cfg.finetune.task),
    }
    _refuse_with(unsupported, "data.document_masking / model.position_reset")


def _refuse_with(unsupported: dict[str, bool], feature: str) -> None:
    for setting, present in unsupported.items():
        if present:
            raise UserError(f"{feature} does not work with {setting} yet; turn one of them off")


def _data(cfg: Config) -> None:
    parse_mix(cfg.data.mix)  # refuses a malformed mix, a weight <= 0, a dataset named twice
    if cfg.data.mix and cfg.model.flavour == "mbart":
        raise UserError(
            "data.mix mixes language-model corpora; model.flavour = mbart trains on one "
            "translation task in data.dir: drop data.mix"
        )


CHECKS: tuple[Callable[[Config], None], ...] = (
    check_ranges,
    _context_parallel,
    _data,
    _model,
    _packing,
    _optim,
    _parallel,
    _comm,
    _checkpoint,
    _experiments,
    _init_from,
    _monitoring,
    _async,
    _objective,
    _finetune,
    check_experts,
)


def validate(cfg: Config) -> None:
    """Impossible values fail here, at start, with one line naming the key."""
    for check in CHECKS:
        check(cfg)
