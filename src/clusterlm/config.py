"""One typed config tree: dataclass sections, loaded from TOML, overridden by dotted CLI keys.

    clusterlm train --config configs/nano-cpu.toml --training.steps 200 --optim.lr 3e-4

Every field carries its meaning in ``help`` metadata, which ``--help`` prints with the default.
Unknown keys fail with the closest valid key; impossible values fail in ``validate`` with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlm.errors import UserError
from clusterlm.models.gpt import ModelArgs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    flavour: str = opt("gpt2", "architecture family", ("gpt2", "llama"))
    n_layer: int = opt(4, "number of Transformer blocks")
    n_head: int = opt(4, "attention heads")
    n_kv_head: int = opt(0, "key/value heads for grouped-query attention (0 = n_head)")
    n_embd: int = opt(128, "model width")
    block_size: int = opt(64, "maximum context length (positions the model knows)")
    vocab_size: int = opt(0, "vocabulary size (0 = take it from the prepared data's tokenizer)")
    ffn_hidden: int = opt(0, "MLP hidden width (0 = 4*n_embd for gpt2, 8/3*n_embd rounded up for llama)")
    ffn_multiple_of: int = opt(256, "llama: round the default MLP width up to a multiple of this")
    dropout: float = opt(0.0, "dropout probability on embeddings, attention and residual outputs")
    norm_eps: float = opt(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = opt(10000.0, "llama: base of the rotary position frequencies")


@dataclass
class DataConfig:
    dir: str = opt("data/shakespeare-char", "prepared data directory or fsspec URL (`clusterlm prepare --out`)")
    verify: bool = opt(True, "check every shard's sha256 against the manifest before training")


@dataclass
class TrainingConfig:
    steps: int = opt(2000, "optimizer steps to train for")
    micro_batch_size: int = opt(12, "sequences per forward/backward on each data-parallel rank")
    seq_len: int = opt(0, "training sequence length (0 = model.block_size)")
    tokens_per_step: int = opt(0, "global tokens per optimizer step; gradient accumulation makes up the "
                               "difference (0 = one micro-batch per rank)")
    seed: int = opt(1337, "seed of initialization, data order and dropout")
    precision: str = opt("fp32", "compute precision (fp16 needs CUDA; master weights stay fp32)",
                         ("fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile: forward and loss as one graph in a single process, each block "
                        "separately when the model is split or sharded across processes")
    attention: str = opt("auto", "attention kernel: auto (torch picks), flash, efficient, cudnn, or math (matmuls "
                         "and softmax; compiled on a CPU, faster than the CPU flash kernel at small head sizes)",
                         ("auto", "flash", "efficient", "cudnn", "math"))
    activation_checkpointing: str = opt("none", "recompute activations in backward: full (each block from its "
                                        "input) or selective (keep matmul and attention outputs, recompute "
                                        "the rest)", ("none", "selective", "full"))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = opt(250, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "validation batches per evaluation")
    log_interval: int = opt(10, "write metrics every N steps")
    device: str = opt("auto", "cpu, cuda, or auto (cuda when available)")
    threads: int = opt(0, "CPU threads for intra-op parallelism (0 = torch's default)")
    out_dir: str = opt("runs/default", "where checkpoints, metrics and plots go")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = opt(100, "linear warm-up steps from 0 to lr")
    decay: str = opt("cosine", "shape of the decay from lr to min_lr after warm-up",
                     ("cosine", "linear", "constant"))
    decay_steps: int = opt(0, "step at which the decay reaches min_lr (0 = training.steps)")
    weight_decay: float = opt(0.1, "decoupled weight decay on matrices (not norms, biases, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW epsilon")
    fused: bool = opt(True, "fused AdamW kernel: one pass over all parameters instead of one per tensor")


@dataclass
class ParallelConfig:
    data_parallel: str = opt("ddp", "data-parallel strategy: ddp (replicate, all-reduce gradients), zero1 "
                             "(+ shard optimizer state), zero2 (+ gradients), zero3 (+ parameters), hsdp "
                             "(zero3 inside a group, replicated across groups)",
                             ("ddp", "zero1", "zero2", "zero3", "hsdp"))
    dp_replicate: int = opt(0, "data-parallel replicas (0 = derive from the world size and strategy)")
    dp_shard: int = opt(0, "data-parallel sharding degree (0 = derive from the world size and strategy)")
    tp: int = opt(1, "tensor-parallel degree: attention heads and MLP columns split across this many ranks")
    sequence_parallel: bool = opt(False, "with tp > 1: split norms, dropout and the residual stream along the "
                                  "sequence too (activation memory / tp)")
    pp: int = opt(1, "pipeline-parallel degree: the layers cut into stages on this many ranks")
    pp_schedule: str = opt("1f1b", "pipeline schedule", ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs",
                                                         "interleaved_zero_bubble", "zbv_zero_bubble", "dualpipev"))
    pp_microbatches: int = opt(0, "micro-batches a pipeline step splits the batch into (0 = 2 x pp)")
    pp_stages_per_rank: int = opt(0, "stages each pipeline rank holds (0 = what the schedule needs: 1, or 2 "
                                  "for interleaved and V schedules)")
    cpu_offload: bool = opt(False, "zero3/hsdp: keep sharded parameters, gradients and optimizer state in CPU memory")
    bucket_mb: float = opt(25.0, "ddp/zero1: gradient bucket size in MiB (buckets reduce while backward runs)")
    timeout_s: float = opt(600.0, "seconds a collective may wait before the job fails as hung")


@dataclass
class CommConfig:
    allreduce: str = opt("native", "ddp/zero1 gradient all-reduce algorithm (native = the backend's own)",
                         ("native", "ring", "tree", "halving_doubling", "hierarchical", "mesh2d", "parameter_server"))
    compression: str = opt("none", "ddp/zero1 gradient compression", ("none", "fp16", "bf16", "powersgd", "topk"))
    powersgd_rank: int = opt(1, "rank of the PowerSGD low-rank approximation")
    topk_ratio: float = opt(0.01, "fraction of gradient entries top-k sparsification sends")


@dataclass
class CheckpointConfig:
    interval: int = opt(500, "save every N steps (0 = only at the end)")
    keep_last: int = opt(2, "complete checkpoints to keep; older ones are deleted")
    resume: str = opt("none", "none, auto (newest complete checkpoint in out_dir), or a checkpoint path")


@dataclass
class MetricsConfig:
    progress: str = opt("auto", "progress display: bar, lines, none, or auto (bar on a terminal)",
                        ("auto", "bar", "lines", "none"))
    jsonl: bool = opt(True, "write metrics.jsonl in out_dir")
    tensorboard: bool = opt(True, "write TensorBoard event files in out_dir/tensorboard")
    plot: bool = opt(True, "write loss.png (train and val loss against tokens) at the end")
    peak_flops: float = opt(0.0, "device peak FLOP/s for MFU (0 = GPU table, or a measured CPU probe)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model.block_size


def all_keys() -> dict[str, dataclasses.Field]:
    """Every dotted key ('training.steps') with its dataclass field."""
    keys = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            keys[f"{section.name}.{f.name}"] = f
    return keys


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; `clusterlm train --help` lists every key"
    return UserError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, or fail naming the key."""
    kind = type(f.default)
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif not isinstance(value, bool):
                raise ValueError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")
        raise UserError(f"{key} must be {expected}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
    return value


def apply_overrides(cfg: Config, values: dict[str, Any]) -> Config:
    keys = all_keys()
    for key, value in values.items():
        if key not in keys:
            raise _unknown_key(key)
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, _coerce(key, keys[key], value))
    return cfg


def _flatten_toml(tree: dict[str, Any], source: str) -> dict[str, Any]:
    flat = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise UserError(f"{source}: top-level key {section!r} must be a [section] table")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found; presets live in configs/*.toml")
    try:
        return _flatten_toml(tomllib.loads(path.read_text()), str(path))
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML ({err})") from None


def build_config(config_path: str | None, overrides: dict[str, Any]) -> Config:
    cfg = Config()
    if config_path:
        apply_overrides(cfg, load_toml(config_path))
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a config saved with ``to_dict`` (e.g. inside a checkpoint)."""
    return apply_overrides(Config(), _flatten_toml(tree, "saved config"))


def validate(cfg: Config) -> None:
    """Impossible values fail here, at start, with one line naming the key."""
    m, t, o, c = cfg.model, cfg.training, cfg.optim, cfg.checkpoint
    positive = {
        "model.n_layer": m.n_layer, "model.n_head": m.n_head, "model.n_embd": m.n_embd,
        "model.block_size": m.block_size, "training.steps": t.steps,
        "training.micro_batch_size": t.micro_batch_size, "training.eval_batches": t.eval_batches,
        "training.log_interval": t.log_interval, "optim.lr": o.lr, "checkpoint.keep_last": c.keep_last,
        "model.ffn_multiple_of": m.ffn_multiple_of, "model.norm_eps": m.norm_eps,
        "parallel.bucket_mb": cfg.parallel.bucket_mb, "parallel.timeout_s": cfg.parallel.timeout_s,
        "parallel.tp": cfg.parallel.tp, "parallel.pp": cfg.parallel.pp,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    non_negative = {
        "model.n_kv_head": m.n_kv_head, "model.vocab_size": m.vocab_size, "model.ffn_hidden": m.ffn_hidden,
        "training.seq_len": t.seq_len, "training.tokens_per_step": t.tokens_per_step,
        "training.grad_clip": t.grad_clip, "training.eval_interval": t.eval_interval,
        "training.threads": t.threads, "optim.min_lr": o.min_lr, "optim.warmup_steps": o.warmup_steps,
        "optim.decay_steps": o.decay_steps, "optim.weight_decay": o.weight_decay,
        "checkpoint.interval": c.interval, "metrics.peak_flops": cfg.metrics.peak_flops,
        "parallel.dp_replicate": cfg.parallel.dp_replicate, "parallel.dp_shard": cfg.parallel.dp_shard,
        "parallel.pp_microbatches": cfg.parallel.pp_microbatches,
        "parallel.pp_stages_per_rank": cfg.parallel.pp_stages_per_rank,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"{key} must be >= 0, got {value}")
    if m.n_embd % m.n_head:
        raise UserError(f"model.n_head ({m.n_head}) must divide model.n_embd ({m.n_embd})")
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise UserError(f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    if m.n_kv_head and m.n_kv_head != m.n_head and m.flavour != "llama":
        raise UserError("model.n_kv_head != n_head (grouped-query attention) needs model.flavour = llama")
    if (m.n_embd // m.n_head) % 2 and m.flavour == "llama":
        raise UserError(f"llama needs an even head size for rotary positions; n_embd/n_head = {m.n_embd // m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if cfg.seq_len > m.block_size:
        raise UserError(f"training.seq_len ({t.seq_len}) exceeds the model's context model.block_size ({m.block_size})")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr ({o.min_lr}) must not exceed optim.lr ({o.lr})")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:
            raise UserError(f"{key} must be in [0, 1), got {beta}")
    if cfg.parallel.sequence_parallel and cfg.parallel.tp == 1:
        raise UserError("parallel.sequence_parallel needs parallel.tp > 1")
    custom_comm = cfg.comm.allreduce != "native" or cfg.comm.compression != "none"
    if custom_comm and cfg.parallel.data_parallel not in ("ddp", "zero1"):
        raise UserError("comm.allreduce / comm.compression apply to parallel.data_parallel = ddp or zero1 "
                        "(FSDP reduces through reduce-scatter)")
    if cfg.comm.powersgd_rank < 1 or not 0 < cfg.comm.topk_ratio <= 1:
        raise UserError("comm.powersgd_rank must be >= 1 and comm.topk_ratio in (0, 1]")
    if cfg.parallel.cpu_offload and cfg.parallel.data_parallel not in ("zero3", "hsdp"):
        raise UserError("parallel.cpu_offload needs parallel.data_parallel = zero3 or hsdp")
    if c.resume not in ("none", "auto") and not c.resume:
        raise UserError("checkpoint.resume must be none, auto or a checkpoint path")


def resolve_model_args(cfg: Config, vocab_size: int) -> ModelArgs:
    """Fill the config's 'derive it' zeros (vocabulary, KV heads, MLP width) and build ModelArgs."""
    m = cfg.model
    if m.vocab_size == 0:
        m.vocab_size = vocab_size
    elif m.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer's {vocab_size}; "
                        "set it to 0 to take the tokenizer's")
    m.n_kv_head = m.n_kv_head or m.n_head
    if m.ffn_hidden == 0:
        if m.flavour == "llama":
            m.ffn_hidden = m.ffn_multiple_of * math.ceil(8 * m.n_embd / 3 / m.ffn_multiple_of)
        else:
            m.ffn_hidden = 4 * m.n_embd
    return ModelArgs(
        flavour=m.flavour, vocab_size=m.vocab_size, block_size=m.block_size, n_layer=m.n_layer,
        n_head=m.n_head, n_kv_head=m.n_kv_head, n_embd=m.n_embd, ffn_hidden=m.ffn_hidden,
        dropout=m.dropout, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
    )


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    per_micro_step = cfg.training.micro_batch_size * cfg.seq_len * dp_size
    target = cfg.training.tokens_per_step or per_micro_step
    if target % per_micro_step:
        raise UserError(
            f"training.tokens_per_step ({target}) must be a multiple of micro_batch_size x seq_len x "
            f"data-parallel ranks = {per_micro_step}"
        )
    return target // per_micro_step
