"""Attention on one process, and the masks that keep it inside each document of a packed window.

A layer's attention function (``Attention.attend``) takes q [B, H, T, D], k and v [B, Hkv, T, D]
and the mask its caller built once per forward: None (plain causal or bidirectional), a boolean
tensor broadcastable to [B, H, T, T] (True where a query may read a key), or a flex attention
``BlockMask``. Context parallelism swaps the function for one that spans processes
(``clusterlm.parallel.context_parallel``); the model itself stays free of distribution.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # flex attention loads the compiler: imported where a block mask is used
    from torch.nn.attention.flex_attention import BlockMask


def repeat_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each of k's heads serves ``heads // k.size(1)`` query heads."""
    return k if k.size(1) == heads else k.repeat_interleave(heads // k.size(1), dim=1)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any,
    causal: bool,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of one process; a given mask already holds causality
    (``document_mask``), so ``causal`` applies only without one."""
    k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
    if mask is not None and not isinstance(mask, torch.Tensor):  # a flex BlockMask
        return flex(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, dropout_p=dropout_p
    )


@functools.cache
def _compiled_flex() -> Any:
    """flex attention's fused kernels come from the compiler, compiled once per process."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """flex attention: compiled on a GPU; on a CPU torch runs it eagerly and unfused, without a
    backward (so CPU training takes the boolean mask)."""
    from torch.nn.attention.flex_attention import flex_attention

    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    out = kernel(q, k, v, block_mask=block_mask)
    assert isinstance(out, torch.Tensor)  # without return_lse it returns the output alone
    return out


def document_mask(documents: torch.Tensor, use_flex: bool) -> torch.Tensor | BlockMask:
    """Causal attention inside each document: ``documents`` [B, T] numbers each token's document
    (``clusterlm.data.packing.document_ids``). A flex ``BlockMask`` skips the blocks no query
    reads; the boolean [B, 1, T, T] mask is the fallback every SDPA kernel takes."""
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx >= kv_idx) & (documents[b, q_idx] == documents[b, kv_idx])

        batch, seq = documents.shape
        return create_block_mask(
            same_document, batch, None, seq, seq, device=str(documents.device), _compile=False
        )
    seq = documents.size(1)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=documents.device).tril()
    same = documents.unsqueeze(2) == documents.unsqueeze(1)
    return (same & causal).unsqueeze(1)
