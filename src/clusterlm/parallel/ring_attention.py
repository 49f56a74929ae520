"""Attention over a sequence split across the ranks of a context-parallel group.

Each of the cp ranks holds two of the sequence's 2·cp equal chunks, i and 2·cp−1−i (zig-zag), so
that under a causal mask every rank has the same work: the early chunk reads little, the late one
much.

- ``ring_attention``: the K/V blocks travel around the ring (each rank sends its current block on
  while it computes with it) and the partial results merge by their log-sum-exp (online softmax).
  Of a block from an earlier rank only its first chunk is visible to this rank's queries, and of
  a block from a later rank only this rank's second chunk sees it, so each step but the first
  computes half a block. Backward goes around the ring again, the K/V gradients travelling with
  their blocks until they reach their owner.
- ``all_to_all_attention`` (Ulysses): an all-to-all trades the split of the sequence for a split
  of the heads, each rank attends over the whole sequence for its heads, and a second all-to-all
  trades back. It needs the heads divisible by cp.

torch's own ``context_parallel`` has no CPU path (its SDPA sharding rules cover the GPU kernels
only); these run on any backend and are tested against one process.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from clusterlm.models.attention import local_attention, repeat_kv
from clusterlm.parallel.attention_blocks import block_backward, block_forward, wide
from clusterlm.parallel.attention_traffic import traffic


def zigzag_positions(local_len: int, rank: int, cp: int, device: torch.device) -> torch.Tensor:
    """Global positions of the ``local_len`` tokens rank ``rank`` holds: chunks rank, 2cp−1−rank."""
    chunk = local_len // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    return torch.cat([first, first + (2 * cp - 1 - 2 * rank) * chunk])


def visible_block(rank: int, source: int, half: int) -> tuple[slice, slice]:
    """The (query rows, key columns) of this rank's block against ``source``'s K/V that any query
    may read; the rest is masked whole (module docstring)."""
    if source == rank:
        return slice(None), slice(None)
    if source < rank:
        return slice(None), slice(0, half)
    return slice(half, None), slice(None)


def _visible(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    documents: torch.Tensor | None,
    diagonal: bool,
) -> tuple[torch.Tensor | None, bool]:
    """What of a block the queries read, as ``attention_blocks`` takes it: a [B, 1, Tq, Tk] mask
    (earlier keys of the query's own document), or causally (this rank's own block), or whole (the
    visible half of another rank's block)."""
    if documents is None:
        return None, diagonal
    causal = q_pos.unsqueeze(1) >= k_pos.unsqueeze(0)
    same = documents[:, q_pos].unsqueeze(2) == documents[:, k_pos].unsqueeze(1)
    return (causal & same).unsqueeze(1), False


def _exchange(buffer: torch.Tensor, group: ProcessGroup) -> tuple[torch.Tensor, list[Any]]:
    """Send ``buffer`` to the next rank of the ring and receive the previous rank's; returns the
    receiving buffer and the requests to wait on."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(buffer)
    ops = [
        dist.P2POp(dist.isend, buffer, dist.get_global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group),
    ]
    with traffic(buffer.nbytes):
        return received, dist.batch_isend_irecv(ops)


def _wait(requests: list[Any]) -> None:
    with traffic():
        for request in requests:
            request.wait()


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: torch.Tensor | None,
        group: ProcessGroup,
    ) -> torch.Tensor:
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        half = q.size(2) // 2
        q_pos = zigzag_positions(q.size(2), rank, cp, q.device)
        out = torch.zeros_like(wide(q))
        lse = torch.full(q.shape[:-1], -math.inf, dtype=out.dtype, device=q.device)
        kv = torch.stack([k, v])
        for step in range(cp):
            if step < cp - 1:
                arriving, requests = _exchange(kv, group)
            source = (rank - step) % cp
            rows, cols = visible_block(rank, source, half)
            k_pos = zigzag_positions(q.size(2), source, cp, q.device)
            visible = _visible(q_pos[rows], k_pos[cols], documents, source == rank)
            block_out, block_lse = block_forward(
                q[:, :, rows], kv[0][:, :, cols], kv[1][:, :, cols], *visible
            )
            merged = torch.logaddexp(lse[:, :, rows], block_lse)
            out[:, :, rows] = out[:, :, rows] * torch.exp(lse[:, :, rows] - merged).unsqueeze(
                -1
            ) + block_out * torch.exp(block_lse - merged).unsqueeze(-1)
            lse[:, :, rows] = merged
            if step < cp - 1:
                _wait(requests)
                kv = arriving
        ctx.save_for_backward(q, k, v, out, lse, documents)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        q, k, v, out, lse, documents = ctx.saved_tensors
        group = ctx.group
        rank, cp = dist.get_rank(group), dist.get_world_size(group)
        half = q.size(2) // 2
        q_pos = zigzag_positions(q.size(2), rank, cp, q.device)
        grad_out = wide(grad_out)
        grad_q = torch.zeros_like(wide(q))
        kv = torch.stack([k, v])
        grad_kv = torch.zeros_like(wide(kv))
        for step in range(cp):
            if step < cp - 1:
                arriving, requests = _exchange(kv, group)
            source = (rank - step) % cp
            rows, cols = visible_block(rank, source, half)
            k_pos = zigzag_positions(q.size(2), source, cp, q.device)
            visible = _visible(q_pos[rows], k_pos[cols], documents, source == rank)
            block_q, block_k, block_v = block_backward(
                grad_out[:, :, rows],
                q[:, :, rows],
                kv[0][:, :, cols],
                kv[1][:, :, cols],
                out[:, :, rows],
                lse[:, :, rows],
                *visible,
            )
            grad_q[:, :, rows] += block_q
            grad_kv[0][:, :, cols] += block_k
            grad_kv[1][:, :, cols] += block_v
            if step < cp - 1:
                _wait(requests)
                kv = arriving
            # The gradients travel with their K/V block; after the last step they reach its owner.
            grad_kv, requests = _exchange(grad_kv, group)
            _wait(requests)
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), None, None


@torch.compiler.disable  # point-to-point traffic in a loop: nothing for the compiler to fuse
def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    causal: bool,
    dropout_p: float = 0.0,
    *,
    group: ProcessGroup,
) -> torch.Tensor:
    """Causal attention of this rank's zig-zag share of the sequence (``Attention.attend``);
    ``mask`` is None or the document ids of the whole windows [B, T] in natural order."""
    assert causal and dropout_p == 0.0, "the configuration checks allow decoders without dropout"
    out = _RingAttention.apply(q, k, v, mask, group)
    assert isinstance(out, torch.Tensor)
    return out


def _gathered_order(local_len: int, cp: int, device: torch.device) -> torch.Tensor:
    """Global position of each token of the sequence gathered rank after rank."""
    return torch.cat([zigzag_positions(local_len, r, cp, device) for r in range(cp)])


def _exchange_blocks(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Block i of ``send`` (dim 0) to rank i, block i of the result from rank i."""
    received = torch.empty_like(send)
    with traffic(send.nbytes * (1 - 1 / dist.get_world_size(group))):  # its own block stays
        dist.all_to_all_single(received, send, group=group)
    return received


class _AllToAll(torch.autograd.Function):
    """With equal blocks an all-to-all is its own inverse: backward sends the gradients back."""

    @staticmethod
    def forward(ctx: Any, send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _exchange_blocks(send, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        return _exchange_blocks(grad.contiguous(), ctx.group), None


def _all_to_all(send: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Block i of ``send`` (dim 0) to rank i; backward is the reverse all-to-all."""
    out = _AllToAll.apply(send, group)
    assert isinstance(out, torch.Tensor)
    return out


Exchange = Callable[[torch.Tensor], torch.Tensor]  # block i of dim 0 to rank i, and back


def _heads_to_sequence(x: torch.Tensor, cp: int, exchange: Exchange) -> torch.Tensor:
    """[B, H, T/cp, D] (this rank's tokens, all heads) -> [B, H/cp, T, D] (every token in natural
    order, this rank's heads)."""
    batch, heads, local, dim = x.shape
    send = x.view(batch, cp, heads // cp, local, dim).transpose(0, 1).contiguous()
    received = exchange(send)
    gathered = received.permute(1, 2, 0, 3, 4).reshape(batch, heads // cp, cp * local, dim)
    natural = torch.argsort(_gathered_order(local, cp, x.device))
    return gathered[:, :, natural]


def _sequence_to_heads(y: torch.Tensor, cp: int, exchange: Exchange) -> torch.Tensor:
    """The inverse of ``_heads_to_sequence``."""
    batch, heads, seq, dim = y.shape
    local = seq // cp
    gathered = y[:, :, _gathered_order(local, cp, y.device)]
    send = gathered.view(batch, heads, cp, local, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = exchange(send)
    return received.transpose(0, 1).reshape(batch, cp * heads, local, dim)


def ulysses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp: int,
    exchange: Exchange,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``attend`` over the whole sequence for this rank's share of the heads, from and back to this
    rank's share of the sequence (all heads); ``exchange`` the all-to-all. (``bench.kernels``
    times the layout work alone with an exchange that keeps the blocks where they are.)"""
    if k.size(1) % cp:  # too few K/V heads to split: each query head gets its own copy
        k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    q, k, v = (_heads_to_sequence(t, cp, exchange) for t in (q, k, v))
    return _sequence_to_heads(attend(q, k, v), cp, exchange)


@torch.compiler.disable  # the collectives run inside an autograd function the compiler would break
def all_to_all_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    causal: bool,
    dropout_p: float = 0.0,
    *,
    group: ProcessGroup,
) -> torch.Tensor:
    """Ulysses attention of this rank's zig-zag share (``Attention.attend``); ``mask`` is the
    whole windows' mask in natural order, or None."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return local_attention(q, k, v, mask, causal, dropout_p)

    cp = dist.get_world_size(group)
    return ulysses(q, k, v, cp, functools.partial(_all_to_all, group=group), attend)
