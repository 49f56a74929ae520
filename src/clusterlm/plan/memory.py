"""Bytes per device: model state (ZeRO), activations (Korthikanti et al.), communication buffers.

Model state, from ZeRO (Rajbhandari et al. 2020, section 3 and Figure 1). Training with Adam in
mixed precision keeps 2 bytes/param of 16-bit weights, 2 of 16-bit gradients and K = 12 of fp32
optimizer state (master weights, momentum, variance): 16 bytes/param. Sharding over N ranks:

    stage 0 (ddp):  2 + 2 + 12        stage 2:  2 + (2 + 12) / N
    stage 1:        2 + 2 + 12 / N    stage 3:  (2 + 2 + 12) / N      (zero3, hsdp)

fp32 training keeps 4 (weights) + 4 (gradients) + K = 8 (momentum, variance): also 16 bytes/param,
split 4 + 4 + 8 and sharded the same way. This project's zero2 is FSDP2 without resharding after
forward (``clusterlm.parallel.data_parallel``): its parameters rest sharded as in stage 3 and are
held gathered, in the weight dtype, from each unit's forward to its backward; ``device_memory``
counts them so (model state as stage 3, the gathered weights as buffers), not as DeepSpeed's
replicated 16-bit weights: the same peak within 2/N bytes/param, matching the bytes it stores.
CPU offload (ZeRO-Offload, Ren et al. 2021) moves the optimizer state (K bytes/param) to host
memory; weights and gradients stay on the device.
Parameters are split over tensor-parallel ranks (every weight, including the vocabulary-parallel
embedding and head; the norm weights that Megatron replicates are <0.1% and are split too) and over
pipeline stages as the trainer splits them (stages balanced by parameter count, placed by the
schedule; the embedding on the first stage, the head on the last).

Activations, per layer and micro-batch of b sequences of s tokens, width h, a heads, tp degree t.
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eqs. 1-4)
give, in bytes with 16-bit activations, for GPT-3-style blocks with dropout:

    no parallelism:   s*b*h * (34 + 5*a*s/h)
    tensor parallel:  s*b*h * (10 + 24/t + 5*a*s/(h*t))
    tp + sequence p.: s*b*h/t * (34 + 5*a*s/h)
    selective recompute drops the 5*a*s/h term; full recompute keeps 2*s*b*h (the block input).

We count the same tensors, itemized for the blocks this project builds (``layer_activation_bytes``
lists them), so gpt2 and llama (SwiGLU width f, RMSNorm computed in fp32) are both covered. With a
fused attention kernel (FlashAttention, ``F.scaled_dot_product_attention``; the default) the s x s
scores are never stored: the kernel keeps q, k, v and its output, and the a*s/h term disappears, so
selective recompute saves nothing there. For the gpt2 block, unfused and with dropout, the itemized
count is exactly Korthikanti's, plus 16*s*b for the norms' fp32 statistics; fused and without
dropout it is 34*s*b*h + 2*a*s*b (the log-sum-exp) + 16*s*b, checked against the bytes autograd
really saves (``clusterlm.bench.probes``). Activations are 16-bit under mixed precision with
16-bit weights (Megatron, FSDP's param_dtype); under torch.autocast over fp32 weights (this
project's other layouts) the residual stream and norm inputs stay fp32, every matmul keeps its
own 16-bit copy of its input and weight, and both are counted. Terms scale with 1/t when the
tensor is split over tp ranks; the norm inputs and outputs are replicated under plain tp and
split under sequence parallelism, except the matmuls' inputs: torch's sequence parallelism gathers
the norm's output along the sequence before the column-parallel matmuls and autograd keeps the
gathered tensor, 2*e*s*b*h*(1 - 1/t) per layer more than Korthikanti's count, which assumes
Megatron's re-gather in backward (measured:
benchmarks/planner-validation-cpu-epyc-zen4-2026-12-01.md#activations-under-sequence-parallelism).

Pipeline schedules hold several micro-batches' activations at once on the first stage (the
worst): GPipe all m; 1F1B min(p, m) (Narayanan et al. 2021, section 2.2); interleaved 1F1B with v
chunks per rank p * (1 + (p-1)/(p*v)) (Korthikanti et al. 2022, section 4.2.3); zero bubble is
modelled as ZB-H1 (Qi et al. 2023), which keeps 1F1B's peak activation memory; looped BFS keeps all
m of each of its v stages, like GPipe. The last stage
holds one micro-batch (m for GPipe) plus the output-layer activations.

Context parallelism divides every per-token term by cp (a rank keeps its share of each sequence;
the ring's fused blocks keep the same q, k, v, output and log-sum-exp per token as one kernel) and
shards the model state over ``dp_shard x cp`` where FSDP or ZeRO shards it.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterlm.models.counting import embedding_params, head_params, layer_params
from clusterlm.plan.context_comm import local_tokens
from clusterlm.plan.layout import Layout
from clusterlm.plan.moe_cost import (
    expert_shard_degree,
    mlp_params_on_device,
    moe_block_params_on_device,
    moe_blocks_held,
    moe_mlp_activation_bytes,
    rank_param_split,
)
from clusterlm.plan.stages import rank_share
from clusterlm.plan.workload import Workload

TOKEN_ID_BYTES = 8  # int64 token ids (embedding input) and targets (loss input)
LOSS_BYTES = 4  # the loss's log-probabilities are kept in fp32


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes on one device (the stage that needs the most) and bytes moved to its host."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    buffers: float
    host_optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def model_state(self) -> float:
        return self.parameters + self.gradients + self.optimizer


def state_bytes_per_param(
    zero_stage: int, shard_degree: int, mixed_precision: bool
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per parameter on one rank, per ZeRO stage."""
    weights, grads, optimizer = (2.0, 2.0, 12.0) if mixed_precision else (4.0, 4.0, 8.0)
    n = shard_degree
    return (
        weights / n if zero_stage >= 3 else weights,
        grads / n if zero_stage >= 2 else grads,
        optimizer / n if zero_stage >= 1 else optimizer,
    )


def rank_for(layout: Layout, stage: str) -> int:
    """The pipeline rank of the ``first`` or ``last`` stage's device."""
    return 0 if stage == "first" else layout.pp - 1


def stage_params(work: Workload, layout: Layout, stage: str) -> float:
    """Parameters one device of the ``first`` or ``last`` pipeline rank holds before ZeRO."""
    return rank_params(work, layout, rank_for(layout, stage))


def rank_params(work: Workload, layout: Layout, pp_rank: int) -> float:
    """Parameters one device of pipeline rank ``pp_rank`` holds before ZeRO, split as the trainer
    splits them (``rank_share``; a mixture of experts' by ``moe_cost.rank_param_split``)."""
    return sum(rank_param_split(work, layout, pp_rank))


def state_bytes(
    work: Workload, layout: Layout, zero_stage: int, pp_rank: int
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes on one device of pipeline rank ``pp_rank``: the
    routed experts sharded over their expert-data-parallel group, the rest over dp_shard."""
    groups = zip(
        rank_param_split(work, layout, pp_rank),
        (layout.dp_shard_cp, expert_shard_degree(layout)),
        strict=True,
    )
    per_group = [
        [params * b for b in state_bytes_per_param(zero_stage, degree, work.mixed_precision)]
        for params, degree in groups
    ]
    weights, grads, optimizer = (sum(column) for column in zip(*per_group, strict=True))
    return weights, grads, optimizer


def fp32_weights_under_autocast(work: Workload, layout: Layout) -> bool:
    """Mixed precision through ``torch.autocast`` over fp32 weights: every layout of this project
    but FSDP's (zero2, zero3, hsdp over more than one rank), whose weights arrive in 16-bit. The
    residual stream then stays fp32, and each matmul casts its own 16-bit copy of its input and
    weight and keeps both for backward."""
    fsdp = layout.data_parallel in ("zero2", "zero3", "hsdp") and layout.dp_cp > 1
    return work.mixed_precision and not fsdp


def _residual_bytes(work: Workload, layout: Layout) -> int:
    return 4 if fp32_weights_under_autocast(work, layout) else work.activation_bytes


def _norm_bytes(work: Workload, layout: Layout) -> float:
    """What one norm keeps per token besides its output, with r bytes per residual element:
    LayerNorm its input (r*h) and fp32 mean and rstd (8); the project's RMSNorm, computed in
    fp32, an fp32 copy of its input (4*h; the input itself in fp32), the normalized value before
    the weight (r*h) and the fp32 rstd (4)."""
    h, r = work.model.n_embd, _residual_bytes(work, layout)
    return (4 + r) * h + 4 if work.model.is_llama else r * h + 8


def _weight_copy_bytes(work: Workload, layout: Layout, moe: bool) -> float:
    """Under autocast, the 16-bit copies of one block's matmul weights on one device: split over
    tp, but an MoE block's MLP (whole on every tp rank, its routed experts split over ep)."""
    args = work.model
    d, q, kv = args.n_embd, args.n_head * args.head_dim, args.n_kv_head * args.head_dim
    mlp = (3 if args.is_llama else 2) * d * args.ffn_hidden / layout.tp
    if moe:
        mlp = mlp_params_on_device(args, layout)
    return work.activation_bytes * ((2 * d * q + 2 * d * kv) / layout.tp + mlp)


def layer_activation_bytes(
    work: Workload, layout: Layout, recompute: str | None = None, moe: bool = False
) -> float:
    """Bytes one block keeps for backward, per micro-batch (see the module docstring).

    Per token, with e bytes per activation element, h = n_embd, f = ffn_hidden, a = heads:
      norms, twice:  ``_norm_bytes`` plus the norm's output, the next matmul's input (e*h)
      attention:     q, k, v (k and v expanded to all heads before the kernel) and the kernel's
                     output, 4*e*h, plus the fused kernel's fp32 log-sum-exp (4*a). The output is
                     laid out like q: gpt2's q is a transposed view, so the output reaches the
                     output projection without a copy; llama's rotated q is contiguous per head,
                     so the projection's input is a fresh copy (another e*h). Without a fused
                     kernel the softmax probabilities (e*a*s) are kept instead of the log-sum-exp.
      MLP:           gpt2: GELU input and output, 2*e*f; llama: w1 and w3 outputs, SiLU output and
                     their product, 4*e*f
      dropout:       1-byte masks after attention and MLP; unfused, also the probabilities' mask and
                     the dropped-out probabilities (e*a*s), making Korthikanti's 5*a*s/h
    ``recompute`` overrides the layout's checkpointing; "full" keeps only the block input. An
    MoE block (``moe``) keeps its MLP's tensors as ``moe_cost`` counts them instead.
    """
    args, t = work.model, layout.tp
    e = work.activation_bytes
    h, f, a, s = args.n_embd, args.ffn_hidden, args.n_head, work.seq_len
    mode = recompute or layout.activation_checkpointing
    replicated_split = t if layout.sequence_parallel else 1
    if mode == "full":
        return local_tokens(work, layout) * _residual_bytes(work, layout) * h / replicated_split
    autocast = fp32_weights_under_autocast(work, layout)
    # The norms' outputs as the next matmuls' inputs: under autocast every consumer casts its own
    # copy (wq, wk and wv; w1, and w3 in SwiGLU), else they share one.
    consumers = (3 + (2 if args.is_llama else 1)) if autocast else 2
    replicated = 2 * _norm_bytes(work, layout)
    # Under sequence parallelism torch gathers the norm's output before the column-parallel matmuls
    # and autograd keeps the gathered tensor (Megatron re-gathers it in backward instead).
    matmul_inputs = consumers * e * h
    attention = 4 * e * h + (e * h if args.is_llama else 0)
    if work.fused_attention:
        attention += 4 * a
    elif mode != "selective":  # Korthikanti's selective recompute redoes the attention core
        attention += e * a * s + ((1 + e) * a * s if args.dropout > 0 else 0)
    mlp = 0 if moe else (4 if args.is_llama else 2) * e * f
    if args.dropout > 0:
        replicated += 2 * h
    per_token = replicated / replicated_split + matmul_inputs + (attention + mlp) / t
    if moe:  # on the replicated residual stream, whole on every tp rank
        per_token += moe_mlp_activation_bytes(args, e, _residual_bytes(work, layout))
    weight_copies = _weight_copy_bytes(work, layout, moe) if autocast else 0.0
    return per_token * local_tokens(work, layout) + weight_copies


def output_activation_bytes(work: Workload, layout: Layout) -> float:
    """What the output layer keeps, per micro-batch: the final norm, the head's input, the fp32
    log-probabilities over the (tp-split) vocabulary and the int64 targets (and under autocast
    the head weight's 16-bit copy). Sequence parallelism splits the norm's, not the head's input,
    which is gathered first."""
    args, t, e = work.model, layout.tp, work.activation_bytes
    split = t if layout.sequence_parallel else 1
    per_token = (
        _norm_bytes(work, layout) / split
        + e * args.n_embd
        + LOSS_BYTES * args.vocab_size / t
        + TOKEN_ID_BYTES
    )
    weight_copy = (
        e * args.vocab_size * args.n_embd / t if fp32_weights_under_autocast(work, layout) else 0.0
    )
    return per_token * local_tokens(work, layout) + weight_copy


def logits_gradient_bytes(work: Workload, layout: Layout) -> float:
    """The log-probabilities' gradient, alive at the start of backward while every activation is
    still stored: not a saved tensor, but part of the peak."""
    return LOSS_BYTES * work.model.vocab_size / layout.tp * local_tokens(work, layout)


def in_flight_microbatches(layout: Layout, stage: str) -> float:
    """Micro-batches whose activations the ``first`` or ``last`` stage holds at its peak."""
    p, m, v = layout.pp, layout.micro_batches, layout.pp_stages_per_rank
    if p == 1:
        return 1
    if layout.pp_schedule in ("gpipe", "looped_bfs"):
        return m
    if stage == "last":
        return 1
    if layout.pp_schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
        return min(m, p * (1 + (p - 1) / (p * v)))
    return min(p, m)  # 1f1b, and the V zero-bubble schedules as ZB-H1


def activation_bytes(work: Workload, layout: Layout, stage: str) -> float:
    """Activations a device of the ``first`` or ``last`` stage holds at its peak: the saved
    tensors of its in-flight micro-batches plus, on the last stage, the logits' gradient."""
    share = rank_share(work.model, layout, rank_for(layout, stage))
    n_moe = moe_blocks_held(work.model, share.blocks)
    blocks = (share.layers - n_moe) * layer_activation_bytes(work, layout)
    blocks += n_moe * layer_activation_bytes(work, layout, moe=True)
    stored = blocks * in_flight_microbatches(layout, stage)
    if layout.activation_checkpointing == "full":  # the block being recomputed
        stored += layer_activation_bytes(work, layout, recompute="none", moe=n_moe > 0)
    tokens = local_tokens(work, layout)
    if share.embedding:
        stored += TOKEN_ID_BYTES * tokens
    if share.head:
        outputs = (
            layout.micro_batches
            if layout.pp_schedule in ("gpipe", "looped_bfs") and layout.pp > 1
            else 1
        )
        stored += output_activation_bytes(work, layout) * outputs + logits_gradient_bytes(
            work, layout
        )
    return stored


def buffer_bytes(work: Workload, layout: Layout) -> float:
    """Communication buffers: two ``parallel.bucket_mb`` gradient buckets (one reducing while the
    next fills; ddp, zero1, assuming gradients are views into the buckets). Fully sharded
    (zero3, hsdp): the largest FSDP unit (a block, or the embedding or head) gathered twice
    (current + prefetched) in the weight dtype plus its unsharded gradient. zero2 (FSDP2 keeping
    the gathered parameters from forward to backward): every weight of the stage gathered, plus
    the largest unit's unsharded gradient. In a pipeline, FSDP of any stage keeps every weight of
    the stage gathered and every gradient unsharded from the first backward to the last, after
    which it reduces once (torch's pipeline stage)."""
    if layout.pp > 1 and layout.uses_fsdp:
        weight, grad, _ = state_bytes_per_param(0, 1, work.mixed_precision)
        return stage_params(work, layout, "first") * (weight + grad)
    if _fsdp_zero2(layout):
        weight, grad, _ = state_bytes_per_param(0, 1, work.mixed_precision)
        return stage_params(work, layout, "first") * weight + _largest_unit(work, layout) * grad
    if layout.zero_stage < 3 or layout.dp_shard_cp == 1:
        return 2 * layout.bucket_mb * 2**20
    weight, grad, _ = state_bytes_per_param(0, 1, work.mixed_precision)
    return _largest_unit(work, layout) * (2 * weight + grad)


def _largest_unit(work: Workload, layout: Layout) -> float:
    """Parameters of the largest FSDP unit on one tp rank: a block, or the embedding or head."""
    args = work.model
    largest = max(layer_params(args), embedding_params(args), head_params(args)) / layout.tp
    return max(largest, moe_block_params_on_device(args, layout) if args.moe_experts else 0)


def _fsdp_zero2(layout: Layout) -> bool:
    return layout.data_parallel == "zero2" and layout.dp_shard_cp > 1


def device_memory(work: Workload, layout: Layout) -> MemoryBreakdown:
    """Memory of the most loaded device (first or last pipeline stage)."""
    zero_stage = 3 if _fsdp_zero2(layout) else layout.zero_stage
    buffers = buffer_bytes(work, layout)
    candidates = []
    for stage in ("first", "last"):
        weights, grads, optimizer = state_bytes(work, layout, zero_stage, rank_for(layout, stage))
        on_host = optimizer if layout.cpu_offload else 0.0
        candidates.append(
            MemoryBreakdown(
                parameters=weights,
                gradients=grads,
                optimizer=0.0 if layout.cpu_offload else optimizer,
                activations=activation_bytes(work, layout, stage),
                buffers=buffers,
                host_optimizer=on_host,
            )
        )
    return max(candidates, key=lambda m: m.total)
