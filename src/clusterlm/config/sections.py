"""The config tree's sections: one dataclass each, every field with its meaning in ``help``.
The sections of how a job spreads over its processes live in ``parallelism.py``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from clusterlm.config.data_mix import MixSource, mix_text, parse_mix
from clusterlm.config.parallelism import CommConfig, ParallelConfig
from clusterlm.config.setting import setting


@dataclass(frozen=True)
class ModelConfig:
    flavour: str = setting(
        "gpt2",
        "architecture family: gpt2 or llama decoders, the bert encoder (needs "
        "training.objective = mlm), or the mbart encoder-decoder (needs a translation task "
        "in data.dir)",
        ("gpt2", "llama", "bert", "mbart"),
    )
    n_layer: int = setting(4, "number of Transformer blocks (mbart: the encoder's)")
    decoder_layers: int = setting(0, "mbart: the decoder's blocks (0 = n_layer, as many)")
    n_head: int = setting(4, "attention heads")
    n_kv_head: int = setting(0, "key/value heads for grouped-query attention (0 = n_head)")
    n_embd: int = setting(128, "model width")
    block_size: int = setting(64, "maximum context length (positions the model knows)")
    vocab_size: int = setting(0, "vocabulary size (0 = take it from the prepared data's tokenizer)")
    ffn_hidden: int = setting(
        0, "MLP hidden width (0 = 4*n_embd for gpt2, 8/3*n_embd rounded up for llama)"
    )
    ffn_multiple_of: int = setting(
        256, "llama: round the default MLP width up to a multiple of this"
    )
    dropout: float = setting(
        0.0, "dropout probability on embeddings, attention and residual outputs"
    )
    norm_eps: float = setting(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = setting(10000.0, "llama: base of the rotary position frequencies")
    position_reset: bool = setting(
        False,
        "restart positions at each document of a packed window (rotary angles for llama, the "
        "learned table's rows for gpt2); documents end at the data's end-of-text token",
    )
    init_from: str = setting(
        "",
        "start from pretrained weights: hf:DIR, a Hugging Face GPT-2, Llama, Mixtral or "
        "BERT directory whose config.json supplies the model.* values not set here "
        "(empty = random init)",
    )
    moe_experts: int = setting(
        0, "llama: routed experts of each mixture-of-experts block (0 = a dense model)"
    )
    moe_top_k: int = setting(2, "experts each token is routed to")
    moe_shared_experts: int = setting(0, "experts every token goes through besides its routed ones")
    moe_ffn_hidden: int = setting(0, "hidden width of each expert (0 = model.ffn_hidden)")
    moe_layers: str = setting(
        "all",
        "which blocks are MoE blocks (from 0): all, every:K (blocks K-1, 2K-1, ...), after:K "
        "(all but the first K) or a list such as 1,3",
    )
    moe_score: str = setting(
        "sigmoid", "router scores: sigmoid (DeepSeek-V3) or softmax", ("sigmoid", "softmax")
    )
    moe_norm_topk: bool = setting(True, "scale each token's chosen experts' weights to sum to 1")
    moe_balance: str = setting(
        "aux_free",
        "load balancing: aux_free (a per-expert routing bias nudged towards even loads after "
        "each step, DeepSeek-V3), aux_loss (Switch's load-balancing loss) or none",
        ("aux_free", "aux_loss", "none"),
    )
    moe_aux_loss_coeff: float = setting(
        0.01, "aux_loss: weight of the load-balancing loss in the training loss"
    )
    moe_bias_rate: float = setting(
        0.001, "aux_free: how far each step moves an expert's routing bias"
    )


@dataclass(frozen=True)
class DataConfig:
    dir: str = setting(
        "data/shakespeare-char", "prepared data directory or fsspec URL (`clusterlm prepare --out`)"
    )
    verify: bool = setting(True, "check every shard's sha256 against the manifest before training")
    document_masking: bool = setting(
        False,
        "keep attention inside each document of a packed window (documents end at the data's "
        "end-of-text token): flex attention's block mask on a GPU, else a boolean mask for "
        "SDPA",
    )
    mix: str = setting(
        "",
        "train on several prepared datasets (same tokenizer), each sample drawn from one of them "
        'in proportion to its weight: "DIR=WEIGHT,DIR=WEIGHT", or in TOML '
        '[{dir = "...", weight = 0.7}, ...]; replaces dir (empty = dir alone)',
        from_list=mix_text,
    )
    cache_dir: str = setting(
        "",
        "local directory that caches shards of a remote data.dir (any fsspec URL not a local "
        "path; empty = $CLUSTERLM_CACHE or ~/.cache/clusterlm)",
    )
    cache_gb: float = setting(
        20.0, "bound of each rank's shard cache for a remote data.dir, in GB (2**30 bytes)"
    )
    retry_s: float = setting(
        300.0,
        "seconds a remote store may fail to answer before the run ends (retried with backoff)",
    )

    @property
    def sources(self) -> tuple[MixSource, ...]:
        """The datasets trained on: the mix's, or ``dir`` alone with weight 1."""
        return parse_mix(self.mix) or (MixSource(self.dir, 1.0),)


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = setting(2000, "optimizer steps to train for")
    micro_batch_size: int = setting(12, "sequences per forward/backward on each data-parallel rank")
    seq_len: int = setting(0, "training sequence length (0 = model.block_size)")
    tokens_per_step: int = setting(
        0,
        "global tokens per optimizer step; gradient accumulation makes up the "
        "difference (0 = one micro-batch per rank)",
    )
    seed: int = setting(1337, "seed of initialization, data order and dropout")
    precision: str = setting(
        "auto",
        "compute precision (fp16 needs CUDA; master weights stay fp32); auto = bf16 where "
        "the device computes it natively (a GPU, a CPU with AVX512-BF16/AMX), else fp32",
        ("auto", "fp32", "bf16", "fp16"),
    )
    compile: bool = setting(
        False,
        "torch.compile: forward and loss as one graph in a single process, each block "
        "separately when the model is split or sharded across processes",
    )
    attention: str = setting(
        "auto",
        "attention kernel: auto (torch picks; on a CPU in bf16 the faster of flash and "
        "math at the run's shape, timed once and cached), flash, efficient, cudnn, or math "
        "(matmuls and softmax; compiled on a CPU, faster than the CPU flash kernel at small head "
        "sizes)",
        ("auto", "flash", "efficient", "cudnn", "math"),
    )
    activation_checkpointing: str = setting(
        "none",
        "recompute activations in backward: full (each block from its "
        "input) or selective (keep matmul and attention outputs, recompute "
        "the rest)",
        ("none", "selective", "full"),
    )
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = setting(250, "evaluate every N steps (0 = only at the end)")
    eval_batches: int = setting(20, "validation batches per evaluation")
    log_interval: int = setting(10, "write metrics every N steps")
    device: str = setting("auto", "cpu, cuda, or auto (cuda when available)")
    threads: int = setting(0, "CPU threads for intra-op parallelism (0 = torch's default)")
    out_dir: str = setting("runs/default", "where checkpoints, metrics and plots go")
    objective: str = setting(
        "clm",
        "clm: next-token prediction (decoders); mlm: masked-language model (bert)",
        ("clm", "mlm"),
    )
    mlm_probability: float = setting(
        0.15, "mlm: share of each sequence's tokens to predict (BERT's 80/10/10 rule)"
    )
    label_smoothing: float = setting(
        0.0,
        "label smoothing of the training loss (every objective): this share of each target's "
        "probability spread evenly over the vocabulary (or the labels); the validation loss "
        "stays plain cross-entropy",
    )
    slow_ranks: str = setting(
        "",
        "make ranks slower for experiments: RANK:FACTOR[,...], e.g. '1:3' (rank 1 takes 3x "
        "its compute time)",
    )
    skip_nonfinite: bool = setting(
        False,
        "skip a step whose loss or gradient norm is not finite (no optimizer step, "
        "gradients zeroed, counted in the metrics as skipped_steps) instead of stopping "
        "the run with an error",
    )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = setting(1e-3, "peak learning rate")
    min_lr: float = setting(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = setting(100, "linear warm-up steps from 0 to lr")
    decay: str = setting(
        "cosine",
        "shape of the decay from lr to min_lr after warm-up",
        ("cosine", "linear", "constant"),
    )
    decay_steps: int = setting(0, "step at which the decay reaches min_lr (0 = training.steps)")
    weight_decay: float = setting(
        0.1, "decoupled weight decay on matrices (not norms, biases, embeddings)"
    )
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eps: float = setting(1e-8, "AdamW epsilon")
    optimizer: str = setting(
        "adamw", "optimizer: adamw, or sgd (with optim.momentum)", ("adamw", "sgd")
    )
    momentum: float = setting(0.0, "sgd: momentum")
    fused: bool = setting(
        True, "fused AdamW kernel: one pass over all parameters instead of one per tensor"
    )


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = setting(500, "save every N steps (0 = only at the end)")
    keep_last: int = setting(2, "complete checkpoints to keep; older ones are deleted")
    resume: str = setting(
        "none", "none, auto (newest complete checkpoint in out_dir), or a checkpoint path"
    )
    async_save: bool = setting(
        False,
        "stage checkpoints in host memory and write them in the background while "
        "training continues",
    )
    preempt_grace_s: float = setting(
        60.0,
        "seconds between a SIGTERM/SIGUSR1 and the kill that follows: the job "
        "saves and exits within them",
    )
    overwrite: bool = setting(
        False,
        "let a fresh run (resume = none) start in an out_dir that holds complete "
        "checkpoints, deleting them first (default: refuse; --resume auto continues them)",
    )


@dataclass(frozen=True)
class MetricsConfig:
    progress: str = setting(
        "auto",
        "progress display: bar, lines, none, or auto (bar on a terminal)",
        ("auto", "bar", "lines", "none"),
    )
    jsonl: bool = setting(True, "write metrics.jsonl in out_dir")
    tensorboard: bool = setting(True, "write TensorBoard event files in out_dir/tensorboard")
    plot: bool = setting(True, "write loss.png (train and val loss against tokens) at the end")
    peak_flops: float = setting(
        0.0, "device peak FLOP/s for MFU (0 = GPU table, or a measured CPU probe)"
    )
    sample_log: bool = setting(
        False,
        "each data-parallel rank writes the sample indices it reads per step to "
        "out_dir/samples/ (data accounting across restarts and elastic changes)",
    )
    prometheus_port: int = setting(
        0, "serve Prometheus metrics on this port from each node's local rank 0 (0 = off)"
    )
    prometheus_host: str = setting(
        "127.0.0.1", "address the Prometheus exporter binds to (loopback by default)"
    )
    system: bool = setting(
        False,
        "sample each rank's CPU %, memory, network and disk bytes (and GPU utilization and "
        "memory) every log interval",
    )
    straggler_ratio: float = setting(
        1.5,
        "report a straggler when the slowest rank's step time exceeds this many "
        "times the median (0 = do not time ranks separately)",
    )


@dataclass(frozen=True)
class FinetuneConfig:
    task: str = setting(
        "",
        "a labelled task directory (`clusterlm prepare --task`): the run fine-tunes a classifier "
        "on it (`clusterlm finetune`)",
    )
    init_from: str = setting(
        "",
        "the pretrained model: a run directory (its newest checkpoint) or a checkpoint "
        "directory, whose config supplies the model.* values (empty = model.init_from, or random)",
    )
    freeze_layers: int = setting(
        0, "freeze the embeddings and this many of the lowest blocks (0 = train everything)"
    )
    head_lr: float = setting(
        0.0,
        "peak learning rate of the classification head (0 = optim.lr); the schedule "
        "scales it like optim.lr",
    )


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model.block_size
