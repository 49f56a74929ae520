"""Attention of queries against one block of keys, with the log-sum-exp of each query's scores:
the pieces ring attention merges (``clusterlm.parallel.ring_attention``).

Forward returns the block's output and log-sum-exp; backward takes the *merged* output and
log-sum-exp of all blocks, which is what makes each block's gradients exact (flash attention's
backward: softmax weights exp(s - lse), and rowsum(dO * O) from the final output). On a CPU both
run torch's fused flash kernel; elsewhere explicit matmuls (the GPU kernels' log-sum-exp outputs
are private and differ by device). A block is visible by ``allowed`` (a boolean mask, for
documents) or whole, or causally (``causal``: the diagonal block of a causal sequence).
"""

from __future__ import annotations

import math

import torch

from clusterlm.models.attention import repeat_kv

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision the softmax accumulates in: fp32, or wider if it is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, -math.inf
    )


def _scores(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    s = (wide(q) @ wide(k).transpose(-2, -1)) * q.size(-1) ** -0.5
    if causal:
        allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    return s if allowed is None else s.masked_fill(~allowed, -math.inf)


def _sum_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Gradients of repeated K/V heads [B, H, T, D] summed back onto the kv_heads they copy."""
    batch, heads, seq, dim = grad.shape
    return grad.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def fused(q: torch.Tensor) -> bool:
    """Whether the fused kernel computes blocks on ``q``'s device (a CPU)."""
    return q.device.type == "cpu"


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of q [B, H, Tq, D] against k, v [B, Hkv, Tk, D], in wide precision;
    a query that reads nothing of the block has log-sum-exp -inf and output 0."""
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    if fused(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=_additive(allowed, q.dtype)
        )
        if allowed is not None:  # the kernel gives 0 for a query with no key to read
            lse = lse.masked_fill(~allowed.any(-1), -math.inf)
        return wide(out), wide(lse)
    s = _scores(q, k, allowed, causal)
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # exp(-inf) = 0 where none read
    return p @ wide(v), lse


def block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    allowed: torch.Tensor | None,
    causal: bool,
) -> Grads:
    """Gradients of q, k and v (k and v with their own heads) of the block, given the merged
    output ``out``, log-sum-exp ``lse`` and output gradient of the rows of q, in wide precision."""
    kv_heads = k.size(1)
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    if fused(q):
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.to(q.dtype),
            q,
            k,
            v,
            out.to(q.dtype),
            lse.to(wide(q).dtype),
            0.0,
            causal,
            attn_mask=_additive(allowed, q.dtype),
        )
        grad_q, grad_k, grad_v = (wide(g) for g in grads)
    else:
        p = torch.exp(_scores(q, k, allowed, causal) - lse.unsqueeze(-1))
        grad_v = p.transpose(-2, -1) @ grad_out
        grad_p = grad_out @ wide(v).transpose(-2, -1)
        delta = (grad_out * out).sum(-1, keepdim=True)
        grad_s = p * (grad_p - delta) * q.size(-1) ** -0.5
        grad_q, grad_k = grad_s @ wide(k), grad_s.transpose(-2, -1) @ wide(q)
    return grad_q, _sum_groups(grad_k, kv_heads), _sum_groups(grad_v, kv_heads)
