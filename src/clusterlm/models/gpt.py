"""Decoder-only Transformer in two flavours, read top to bottom like the papers.

- ``gpt2``  (Radford et al. 2019): learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
- ``llama`` (Touvron et al. 2023): rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention,
  no biases.

The model knows nothing about distribution: parallelism is applied from outside by functions that
take this plain ``nn.Module``. Attention goes through ``F.scaled_dot_product_attention`` so the
fused kernels of each device are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from clusterlm.models.attention import local_attention
from clusterlm.models.init import InitRule, fill_parameters, seeded_source
from clusterlm.models.moe import MoE, MoeArgs


@dataclass
class ModelArgs(MoeArgs):
    """Architecture hyper-parameters (those of a mixture of experts in ``MoeArgs``).

    ``ModelConfig`` in clusterlm.config validates and builds these.
    """

    flavour: str = "gpt2"
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    decoder_layers: int = 0  # the encoder-decoder's (clusterlm.models.seq2seq)
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 128
    ffn_hidden: int = 512
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_llama(self) -> bool:
        return self.flavour == "llama"

    @property
    def is_encoder(self) -> bool:
        """bert (``clusterlm.models.bert``): bidirectional attention, exact GELU."""
        return self.flavour == "bert"

    @property
    def tie_embeddings(self) -> bool:
        """gpt2 uses the token table as the output projection."""
        return not self.is_llama


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares underflows/overflows in 16-bit. One fp32 copy,
        # kept once for backward.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def norm_layer(args: ModelArgs) -> nn.Module:
    if args.is_llama:
        return RMSNorm(args.n_embd, args.norm_eps)
    return nn.LayerNorm(args.n_embd, eps=args.norm_eps)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, [max_len, head_dim // 2] (Su et al., RoFormer)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of every head by position-dependent angles.

    x is [B, H, T, D].
    """
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        bias = not args.is_llama
        self.wq = nn.Linear(args.n_embd, args.n_head * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.n_embd, bias=bias)
        self.wo.residual_projection = True  # type: ignore[assignment]  # torch types only tensors, modules
        self.dropout = args.dropout
        self.causal = not args.is_encoder
        # q, k, v, mask, causal, dropout -> output: one process's attention unless context
        # parallelism swaps in its own (``clusterlm.parallel.context_parallel``).
        self.attend: Callable[..., torch.Tensor] = local_attention
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: Any = None,
    ) -> torch.Tensor:
        """``attn_mask``: what ``attend`` reads (``clusterlm.models.attention``): the encoder's
        [B, 1, 1, T] padding mask, a decoder's document mask, or None."""
        batch, seq, _ = x.shape
        # -1 rather than n_head: under tensor parallelism each rank holds a slice of the heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        dropout = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, attn_mask, self.causal, dropout)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(batch, seq, -1)))


ATTENTION_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """Where the model runs, the attention kernel to use: ``auto`` leaves the choice to torch."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel([ATTENTION_KERNELS[name]])


class MLP(nn.Module):
    """GELU MLP (gpt2: tanh approximation; bert: exact erf GELU) or SwiGLU.

    SwiGLU is llama's: w2(silu(w1 x) * w3 x).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        bias = not args.is_llama
        self.w1 = nn.Linear(args.n_embd, args.ffn_hidden, bias=bias)
        self.w3 = nn.Linear(args.n_embd, args.ffn_hidden, bias=False) if args.is_llama else None
        self.w2 = nn.Linear(args.ffn_hidden, args.n_embd, bias=bias)
        self.w2.residual_projection = True  # type: ignore[assignment]  # torch types only tensors, modules
        self.exact_gelu = args.is_encoder
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            hidden = F.silu(self.w1(x)) * self.w3(x)
        elif self.exact_gelu:
            hidden = F.gelu(self.w1(x))
        else:
            hidden = gelu_tanh(self.w1(x))
        return self.dropout(self.w2(hidden))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU, 0.5·x·(1 + tanh(u)) with u = sqrt(2/pi)·(x + 0.044715·x³). Compiled, it is
    written as the same function x·sigmoid(2u): the compiler's vectorized tanh costs about twice
    its exp on CPU. Eager keeps ATen's single fused kernel."""
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    y = x.float()
    return (y * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (y + 0.044715 * y * y * y))).to(x.dtype)


def moe_mlp(args: ModelArgs) -> MoE:
    """A mixture of SwiGLU experts; its shared experts are one MLP as wide as all of them."""
    hidden = args.moe_ffn_hidden or args.ffn_hidden
    shared = args.moe_shared_experts * hidden
    mlp = MLP(dataclasses.replace(args, ffn_hidden=shared)) if shared else None
    return MoE(args.n_embd, hidden, args, mlp)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, moe: bool = False):
        super().__init__()
        self.attn_norm = norm_layer(args)
        self.attn = Attention(args)
        self.mlp_norm = norm_layer(args)
        self.mlp: nn.Module = moe_mlp(args) if moe else MLP(args)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: Any = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, attn_mask=mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # llama's rotary tables: buffers, registered in __init__
    rope_sin: torch.Tensor

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # A pipeline stage drops the embeddings (all but the first) or norm and output (all but the
        # last): None there (``clusterlm.parallel.pipeline.stage_module``).
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.n_embd)
        self.pos_embeddings = None if args.is_llama else nn.Embedding(args.block_size, args.n_embd)
        self.dropout = nn.Dropout(args.dropout)
        # A ModuleDict keyed by layer index keeps names stable when pipeline stages drop layers.
        moe = args.moe_blocks(args.n_layer)
        self.layers = nn.ModuleDict({str(i): Block(args, i in moe) for i in range(args.n_layer)})
        self.norm: nn.Module | None = norm_layer(args)
        self.output: nn.Linear | None = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if args.is_llama:
            self.register_buffer(
                "rope_cos", torch.empty(args.block_size, args.head_dim // 2), persistent=False
            )
            self.register_buffer(
                "rope_sin", torch.empty(args.block_size, args.head_dim // 2), persistent=False
            )
        if (
            not self.tok_embeddings.weight.is_meta
        ):  # on the meta device, values come per shard later
            self.init_buffers()
            self.reset_parameters()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The rotary tables: computed, not learned, so rebuilt wherever the model is
        materialized."""
        if self.args.is_llama:
            cos, sin = rotary_tables(self.args.head_dim, self.args.block_size, self.args.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_rule(self, name: str) -> InitRule:
        """GPT-2 initialisation of parameter ``name``.

        N(0, 0.02), zero biases, unit norm weights, and residual projections scaled by
        1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
        """
        module_name, _, kind = name.rpartition(".")
        module = self.get_submodule(module_name)
        if isinstance(module, (nn.LayerNorm, RMSNorm)):
            return InitRule("ones" if kind == "weight" else "zeros")
        if kind == "bias":
            return InitRule("zeros")
        residual = kind in getattr(module, "residual_parameters", ())  # stacked experts' w2
        scale = (
            1 / math.sqrt(2 * self.args.n_layer)
            if getattr(module, "residual_projection", False) or residual
            else 1.0
        )
        return InitRule("normal", 0.02 * scale)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialize every parameter by ``init_rule``, drawn per (seed, name) as any layout draws
        its shards (``clusterlm.models.init``); without a seed, one is taken from torch's RNG."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        fill_parameters(self, seeded_source(self.init_rule, seed))

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: Any = None
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab].

        ``positions`` [B, T]: each token's position (default 0..T-1): restarted at each document
        of a packed window, or the global positions of a context-parallel rank's share.
        ``mask``: what the layers' attention reads (``clusterlm.models.attention``), built once
        per forward from the token ids outside the model; None is plain causal attention.

        A pipeline stage is this model with modules removed: without ``tok_embeddings`` the input
        is the hidden state [B, T, d] of the previous stage, and without ``norm`` and ``output`` the
        hidden state is returned.
        """
        h = self._blocks(tokens, positions, mask)
        if self.output is None:
            return h
        assert self.norm is not None, "a last stage keeps the final norm with the output"
        return self.output(self.norm(h))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> the normalized last hidden states [B, T, d] the output head reads
        (what a fine-tuning head reads instead)."""
        assert self.norm is not None, "features of the whole model, not of a pipeline stage"
        return self.norm(self._blocks(tokens))

    def _blocks(
        self, tokens: torch.Tensor, positions: torch.Tensor | None = None, mask: Any = None
    ) -> torch.Tensor:
        seq = tokens.size(1)
        if positions is None:
            if seq > self.args.block_size:
                raise ValueError(f"sequence length {seq} exceeds block_size {self.args.block_size}")
            positions = torch.arange(seq, device=tokens.device)
        rope = (
            (self.rope_cos[positions].unsqueeze(-3), self.rope_sin[positions].unsqueeze(-3))
            if self.args.is_llama
            else None
        )
        if self.tok_embeddings is None:
            h = tokens
        else:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(positions)
            h = self.dropout(h)
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        return h

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once). ``exclude_embeddings`` drops the token
        and position tables, the N of the 6N FLOP rule, unless they double as the output head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            assert self.tok_embeddings is not None and self.output is not None, (
                "the whole model, not a stage"
            )
            if self.pos_embeddings is not None:
                n -= self.pos_embeddings.weight.numel()
            if self.output.weight is not self.tok_embeddings.weight:
                n -= self.tok_embeddings.weight.numel()
        return n
