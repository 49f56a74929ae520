"""The config tree's sections: one dataclass each, every field with its meaning in ``help``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    flavour: str = opt("gpt2", "architecture family: gpt2 or llama decoders, or the bert encoder (needs "
                       "training.objective = mlm)", ("gpt2", "llama", "bert"))
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
    init_from: str = opt("", "start from pretrained weights: hf:DIR, a Hugging Face GPT-2, Llama or BERT directory "
                         "whose config.json supplies the model.* values not set here (empty = random init)")


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
    precision: str = opt("auto", "compute precision (fp16 needs CUDA; master weights stay fp32); auto = bf16 where "
                         "the device computes it natively (a GPU, a CPU with AVX512-BF16/AMX), else fp32",
                         ("auto", "fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile: forward and loss as one graph in a single process, each block "
                        "separately when the model is split or sharded across processes")
    attention: str = opt("auto", "attention kernel: auto (torch picks; on a CPU in bf16 the faster of flash and "
                         "math at the run's shape, timed once and cached), flash, efficient, cudnn, or math (matmuls "
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
    objective: str = opt("clm", "clm: next-token prediction (decoders); mlm: masked-language model (bert)",
                         ("clm", "mlm"))
    mlm_probability: float = opt(0.15, "mlm: share of each sequence's tokens to predict (BERT's 80/10/10 rule)")
    slow_ranks: str = opt("", "make ranks slower for experiments: RANK:FACTOR[,...], e.g. '1:3' (rank 1 takes 3x "
                          "its compute time)")
    skip_nonfinite: bool = opt(False, "skip a step whose loss or gradient norm is not finite (no optimizer step, "
                               "gradients zeroed, counted in the metrics as skipped_steps) instead of stopping "
                               "the run with an error")


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
    optimizer: str = opt("adamw", "optimizer: adamw, or sgd (with optim.momentum)", ("adamw", "sgd"))
    momentum: float = opt(0.0, "sgd: momentum")
    fused: bool = opt(True, "fused AdamW kernel: one pass over all parameters instead of one per tensor")


@dataclass
class ParallelConfig:
    data_parallel: str = opt("ddp", "data-parallel strategy: ddp (replicate, all-reduce gradients), zero1 "
                             "(+ shard optimizer state), zero2 (+ gradients), zero3 (+ parameters), hsdp "
                             "(zero3 inside a group, replicated across groups), local_sgd (average parameters "
                             "every local_steps), diloco (outer Nesterov step every local_steps), ps (parameter "
                             "server, asynchronous)",
                             ("ddp", "zero1", "zero2", "zero3", "hsdp", "local_sgd", "diloco", "ps"))
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
    bucket_mb: float = opt(25.0, "ddp/zero1: gradient bucket size in MiB (buckets reduce while backward runs); "
                           "zero2/zero3/hsdp: consecutive blocks form FSDP units of at least this size")
    timeout_s: float = opt(600.0, "seconds a collective may wait before the job fails as hung")
    load_balance: bool = opt(False, "ddp/zero1-3: give each data-parallel rank a number of the step's micro-batches "
                             "proportional to its measured speed (global batch and losses unchanged)")
    load_balance_counts: str = opt("", "with load_balance: fixed micro-batches per rank, e.g. '3,1' (empty = "
                                   "measure the ranks' speeds every log interval)")
    ps_servers: int = opt(1, "ps: parameter-server ranks (the last ranks of the job; the others are workers)")
    ps_staleness: int = opt(-1, "ps: -1 fully asynchronous; s >= 0 bounded staleness (SSP): a worker at clock c "
                            "waits until the slowest has reached c - s; 0 applies each round's mean gradient")
    ps_lease_s: float = opt(30.0, "ps: seconds a server waits with no worker connected (all lost) before it fails; "
                            "a worker that dies is counted lost at once, one that hangs after timeout_s")
    local_steps: int = opt(16, "local_sgd/diloco: optimizer steps each replica takes between synchronizations")
    outer_lr: float = opt(0.7, "diloco: learning rate of the outer Nesterov SGD on the averaged pseudo-gradient")
    outer_momentum: float = opt(0.9, "diloco: momentum of the outer Nesterov SGD")
    hang_timeout_s: float = opt(300.0, "watchdog: a rank without progress for this long is reported by phase "
                                "and step and the job ends (0 = off); keep it below parallel.timeout_s, whose "
                                "collective timeout otherwise ends a hang first, without the report")


@dataclass
class CommConfig:
    allreduce: str = opt("native", "ddp/zero1 gradient all-reduce algorithm (native = the backend's own)",
                         ("native", "ring", "tree", "halving_doubling", "hierarchical", "mesh2d", "parameter_server"))
    compression: str = opt("none", "ddp/zero1 gradient compression", ("none", "fp16", "bf16", "powersgd", "topk"))
    reduce_scatter: str = opt("auto", "zero2/zero3/hsdp gradient reduce-scatter: native (the backend's own), ring "
                              "(clusterlm.comm.ring), auto (ring on gloo, where it is the faster, else native)",
                              ("auto", "native", "ring"))
    powersgd_rank: int = opt(1, "rank of the PowerSGD low-rank approximation")
    topk_ratio: float = opt(0.01, "fraction of gradient entries top-k sparsification sends")


@dataclass
class CheckpointConfig:
    interval: int = opt(500, "save every N steps (0 = only at the end)")
    keep_last: int = opt(2, "complete checkpoints to keep; older ones are deleted")
    resume: str = opt("none", "none, auto (newest complete checkpoint in out_dir), or a checkpoint path")
    async_save: bool = opt(False, "stage checkpoints in host memory and write them in the background while "
                           "training continues")
    preempt_grace_s: float = opt(60.0, "seconds between a SIGTERM/SIGUSR1 and the kill that follows: the job "
                                 "saves and exits within them")
    overwrite: bool = opt(False, "let a fresh run (resume = none) start in an out_dir that holds complete "
                          "checkpoints, deleting them first (default: refuse; --resume auto continues them)")


@dataclass
class MetricsConfig:
    progress: str = opt("auto", "progress display: bar, lines, none, or auto (bar on a terminal)",
                        ("auto", "bar", "lines", "none"))
    jsonl: bool = opt(True, "write metrics.jsonl in out_dir")
    tensorboard: bool = opt(True, "write TensorBoard event files in out_dir/tensorboard")
    plot: bool = opt(True, "write loss.png (train and val loss against tokens) at the end")
    peak_flops: float = opt(0.0, "device peak FLOP/s for MFU (0 = GPU table, or a measured CPU probe)")
    sample_log: bool = opt(False, "each data-parallel rank writes the sample indices it reads per step to "
                                  "out_dir/samples/ (data accounting across restarts and elastic changes)")
    prometheus_port: int = opt(0, "serve Prometheus metrics on this port from each node's local rank 0 (0 = off)")
    prometheus_host: str = opt("127.0.0.1", "address the Prometheus exporter binds to (loopback by default)")
    system: bool = opt(False, "sample each rank's CPU %, memory, network and disk bytes (and GPU utilization and "
                       "memory) every log interval")
    straggler_ratio: float = opt(1.5, "report a straggler when the slowest rank's step time exceeds this many "
                                 "times the median (0 = do not time ranks separately)")


@dataclass
class FinetuneConfig:
    task: str = opt("", "a labelled task directory (`clusterlm prepare --task`): the run fine-tunes a classifier "
                    "on it (`clusterlm finetune`)")
    init_from: str = opt("", "the pretrained model: a run directory (its newest checkpoint) or a checkpoint "
                         "directory, whose config supplies the model.* values (empty = model.init_from, or random)")
    freeze_layers: int = opt(0, "freeze the embeddings and this many of the lowest blocks (0 = train everything)")
    head_lr: float = opt(0.0, "peak learning rate of the classification head (0 = optim.lr); the schedule "
                         "scales it like optim.lr")


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @property
    def seq_len(self) -> int:
        return self.training.seq_len or self.model.block_size
