"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism (Korthikanti et
al. 2022) applied to the plain ``Transformer`` with DTensor ``parallelize_module`` plans.

The plan, per block, on a 1-D ``tp`` mesh:

- attention: ``wq``, ``wk``, ``wv`` split by output (column-parallel: each rank owns
  ``n_head / tp`` query heads and ``n_kv_head / tp`` KV heads), ``wo`` split by input
  (row-parallel), so one reduction per attention and none inside it;
- MLP: ``w1`` (and llama's ``w3``) column-parallel, ``w2`` row-parallel;
- token embedding split on the vocabulary (row-parallel ``nn.Embedding``); output head
  column-parallel, its logits left sharded on the vocabulary (a DTensor, ``Shard(-1)``) so the loss
  runs under ``loss_parallel()`` without gathering ``[batch, seq, vocab]`` on any rank. GPT-2's tied
  head and embedding are both ``Shard(0)`` on the vocabulary, so they stay one parameter;
- everything else (norms, learned positions, row-parallel biases) replicated as DTensors, so every
  parameter is a DTensor on the mesh and gradient clipping and checkpointing treat them alike.

The residual stream between blocks is replicated, or with ``sequence_parallel=True`` split along
the sequence (``Shard(1)``): norms, dropout and the residual additions then run on ``seq / tp``
tokens, the row-parallel reductions become reduce-scatters and an all-gather of the sequence
precedes each column-parallel group (same communication volume, ``1 / tp`` of the activations).
RoPE tables are indexed inside attention, after that all-gather, so they see the full sequence.

The bert encoder (``clusterlm.models.bert``) gets the same block plan, with its post-norm
LayerNorms replicated, and its masked-LM head's output column-parallel like the decoder's head.

The mbart encoder–decoder (``clusterlm.models.seq2seq``) gets it on both sides, and a decoder
block's cross-attention is split like its self-attention: queries (from the decoder) and keys and
values (from the encoder's output) column-parallel by heads, the output row-parallel; a decoding
cache so keeps each rank's own heads. Its residual streams stay replicated: its layers call the
projections themselves, and decoding feeds one token a step, which no sequence split divides.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from clusterlm.errors import UserError
from clusterlm.models.bert import Encoder
from clusterlm.models.gpt import Transformer
from clusterlm.models.moe import MoE
from clusterlm.models.seq2seq import Seq2SeqTransformer

ShardedModel = Transformer | Encoder | Seq2SeqTransformer


class ReplicateParallel(ParallelStyle):
    """Replicate the module's parameters as DTensors; it runs on activations every rank holds in
    full, and its output is handed on as a local tensor laid out as ``output_layout``."""

    def __init__(self, output_layout: Placement | None = None):
        super().__init__()
        self.output_layout = output_layout or Replicate()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate_inputs(_module, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                if isinstance(x, torch.Tensor)
                else x
                for x in inputs
            )

        def local_output(_module, output, mesh):
            return output.redistribute(mesh, (self.output_layout,)).to_local()

        return distribute_module(
            module, device_mesh, input_fn=replicate_inputs, output_fn=local_output
        )


def check_divisible(model: ShardedModel, tp: int) -> None:
    """Heads are the unit of the attention split: every rank must hold whole query and KV heads."""
    args = model.args
    for name, count in (("n_head", args.n_head), ("n_kv_head", args.n_kv_head)):
        if count % tp:
            raise UserError(
                f"model.{name} = {count} is not divisible by parallel.tp = {tp}; "
                f"choose a tp that divides model.{name}"
            )


def apply_tensor_parallel(
    model: ShardedModel, tp_mesh: DeviceMesh, sequence_parallel: bool = False
) -> None:
    """Shard ``model`` in place over the 1-D ``tp_mesh``; see the module docstring for the plan.

    Afterwards every parameter is a DTensor, and ``model(tokens)`` (tokens replicated on the mesh)
    returns logits as a DTensor sharded on the vocabulary: compute the loss inside
    ``torch.distributed.tensor.parallel.loss_parallel()``.
    """
    check_divisible(model, tp_mesh.size())
    if isinstance(model, Encoder):  # model.args.is_encoder
        assert model.head is not None, (
            "tensor parallel applies to the masked-LM encoder, not a classifier's"
        )
        replicated = ("pos_embeddings", "type_embeddings", "emb_norm", "head.dense", "head.norm")
        _apply_replicated_stream(model, tp_mesh, "head.output", replicated)
        return
    if isinstance(model, Seq2SeqTransformer):
        tables = ("enc_positions", "dec_positions", "enc_emb_norm", "dec_emb_norm")
        _apply_replicated_stream(model, tp_mesh, "output", (*tables, "enc_norm", "dec_norm"))
        return
    residual = Shard(1) if sequence_parallel else Replicate()
    # Norms are elementwise along the sequence, so under SP each rank normalises its own tokens.
    norm_style = SequenceParallel() if sequence_parallel else ReplicateParallel()
    # A pipeline stage may lack the embeddings (not the first stage) or the head (not the last).
    first, last = model.tok_embeddings is not None, model.output is not None
    tied = (
        model.tok_embeddings is not None
        and model.output is not None
        and model.output.weight is model.tok_embeddings.weight
    )

    top_plan: dict[str, ParallelStyle] = {}
    if first:
        top_plan["tok_embeddings"] = RowwiseParallel(
            input_layouts=Replicate(), output_layouts=residual
        )
    if last:
        top_plan["norm"] = norm_style
        top_plan["output"] = ColwiseParallel(
            input_layouts=residual, output_layouts=Shard(-1), use_local_output=False
        )
    if first and model.pos_embeddings is not None:
        # Replicated table; under SP each rank keeps the positions of its own sequence slice. The
        # slice is taken by a DTensor redistribute so backward all-gathers the position gradient.
        top_plan["pos_embeddings"] = ReplicateParallel(
            output_layout=Shard(0) if sequence_parallel else Replicate()
        )
    parallelize_module(model, tp_mesh, top_plan)
    if tied:
        # Each style distributed its own copy of the shared matrix; both are Shard(0) on the
        # vocabulary, so pointing the head back at the embedding's DTensor restores the tie and
        # both uses accumulate into one gradient.
        assert model.output is not None and model.tok_embeddings is not None
        model.output.weight = model.tok_embeddings.weight

    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, residual, norm_style))


def _block_plan(
    block: nn.Module, residual: Placement, norm_style: ParallelStyle
) -> dict[str, ParallelStyle]:
    """Heads and MLP columns split across the mesh; the same for pre-norm and post-norm blocks."""
    # One entry point per column-parallel group: the sequence is gathered once (SP), and in
    # backward the input gradients of wq/wk/wv (w1/w3) are summed before a single reduction. (The
    # encoder-decoder's layers call the attention projections themselves, so its attention entry
    # points never run; its residual stream is replicated, which they would leave as it is.)
    gather_sequence = PrepareModuleInput(
        input_layouts=(residual, None), desired_input_layouts=(Replicate(), None)
    )
    plan: dict[str, ParallelStyle] = {"mlp_norm": norm_style}
    # Self-attention, and a decoder block's cross-attention over the encoder's output.
    for attn in ("attn", "cross") if hasattr(block, "cross") else ("attn",):
        plan |= {
            f"{attn}_norm": norm_style,
            attn: gather_sequence,
            f"{attn}.wq": ColwiseParallel(),
            f"{attn}.wk": ColwiseParallel(),
            f"{attn}.wv": ColwiseParallel(),
            f"{attn}.wo": RowwiseParallel(output_layouts=residual),
        }
    mlp = block.get_submodule("mlp")
    if isinstance(mlp, MoE):
        # A mixture of experts stays whole on every rank, its parameters plain tensors: it runs
        # on the replicated residual stream, so every rank computes the same output and the same
        # gradients. (Expert parallelism is what splits experts across ranks.)
        return plan
    plan["mlp"] = PrepareModuleInput(
        input_layouts=(residual,), desired_input_layouts=(Replicate(),)
    )
    plan["mlp.w1"] = ColwiseParallel()
    plan["mlp.w2"] = RowwiseParallel(output_layouts=residual)
    if mlp.w3 is not None:
        plan["mlp.w3"] = ColwiseParallel()
    return plan


def _apply_replicated_stream(
    model: Encoder | Seq2SeqTransformer, tp_mesh: DeviceMesh, head: str, replicated: tuple[str, ...]
) -> None:
    """The bert encoder and the encoder–decoder: blocks as the decoder's with the residual stream
    replicated (no sequence parallelism), the token table split on the vocabulary and tied to the
    output projection ``head``, column-parallel; the ``replicated`` modules (position tables,
    norms, bert's head transform) whole on every rank."""
    plan: dict[str, ParallelStyle] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        head: ColwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }
    plan |= {name: ReplicateParallel() for name in replicated}
    parallelize_module(model, tp_mesh, plan)
    # Both Shard(0) on the vocabulary: one parameter again.
    model.get_submodule(head).weight = model.tok_embeddings.weight
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block, Replicate(), ReplicateParallel()))


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Where the loss and its backward run: with tp > 1 the logits stay sharded on the vocabulary
    and cross-entropy is computed in parallel (``loss_parallel``), never gathering full logits."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def vocab_parallel_argmax(logits: DTensor) -> torch.Tensor:
    """``argmax(-1)`` of logits split on the vocabulary over a 1-D mesh, whole on every rank,
    without gathering the logits: each rank's best of its own slice (value, index and slice width
    packed in float64, exact for both), then the best of the ranks' (the lowest rank among equal
    values, so the lowest index, as ``argmax``)."""
    local = logits.to_local()
    index = local.argmax(-1, keepdim=True)
    packed = torch.stack(
        [
            local.gather(-1, index).squeeze(-1).double(),
            index.squeeze(-1).double(),
            torch.full_like(index.squeeze(-1), local.size(-1), dtype=torch.float64),
        ]
    )
    parts = [torch.empty_like(packed) for _ in range(logits.device_mesh.size())]
    dist.all_gather(parts, packed, group=logits.device_mesh.get_group())
    values, indices, widths = torch.stack(parts).unbind(1)  # each [ranks, ...]
    indices = indices + widths.cumsum(0) - widths  # each slice's first id
    best = values.argmax(0, keepdim=True)
    return indices.gather(0, best).squeeze(0).long()


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor result: the parallel loss (replicated), or logits split on
    the vocabulary, gathered whole (decoding reads them whole)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
