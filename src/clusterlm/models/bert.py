"""BERT-style encoder (Devlin et al. 2019), read top to bottom like the paper.

Bidirectional self-attention (every token sees every other), learned positions, token-type
(segment) embeddings, exact GELU MLP, and a masked-language-model head: a dense transform, GELU and
LayerNorm, then a projection tied to the token table with its own bias.

Post-norm, as in the original BERT: each block normalizes after its residual addition,
``x = LN(x + attn(x)); x = LN(x + mlp(x))``, and the embeddings are normalized before the first
block. Chosen so a trained encoder has the layout of published BERT checkpoints (and Hugging
Face's ``BertForMaskedLM``); pre-norm trains more easily deep and without warm-up, which the
small encoders here do not need.

The vocabulary is the tokenizer's followed by ``SPECIAL_TOKENS``: the tokenizers built by
``clusterlm prepare`` have no ``[MASK]``, ``[CLS]``, ``[SEP]`` or ``[PAD]``, so the encoder's token
table adds them at the end, ``[MASK]`` at id ``vocab_size``. Attention, MLP and initialization
scheme are the decoder's (``clusterlm.models.gpt``); as there, built on the meta device the model
holds no values until materialized per shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.data.special_tokens import SPECIAL_TOKENS, special_token_id
from clusterlm.models.gpt import MLP, Attention, ModelArgs
from clusterlm.models.init import InitRule, fill_parameters, seeded_source

TOKEN_TYPES = 2  # segment A and segment B of a sentence pair


def vocab_rows(args: ModelArgs) -> int:
    """Rows of the encoder's token table: the tokenizer's vocabulary, then the special tokens."""
    return args.vocab_size + len(SPECIAL_TOKENS)


class EncoderBlock(nn.Module):
    """Post-norm block: the residual stream is normalized after each addition."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn = Attention(args)
        self.attn_norm = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.mlp = MLP(args)
        self.mlp_norm = nn.LayerNorm(args.n_embd, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, None, attn_mask=attn_mask))
        return self.mlp_norm(x + self.mlp(x))


class MaskedLMHead(nn.Module):
    """Transform (dense, GELU, LayerNorm), then logits over the vocabulary; the projection's weight
    is the token table (set by ``Encoder``), its bias its own."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.n_embd, args.n_embd)
        self.norm = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.output = nn.Linear(args.n_embd, vocab_rows(args))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(F.gelu(self.dense(h))))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(vocab_rows(args), args.n_embd)
        self.pos_embeddings = nn.Embedding(args.block_size, args.n_embd)
        self.type_embeddings = nn.Embedding(TOKEN_TYPES, args.n_embd)
        self.emb_norm = nn.LayerNorm(args.n_embd, eps=args.norm_eps)
        self.dropout = nn.Dropout(args.dropout)
        # A ModuleDict keyed by layer index, like the decoder's: data parallelism wraps each block.
        self.layers = nn.ModuleDict({str(i): EncoderBlock(args) for i in range(args.n_layer)})
        # None under a fine-tuning head (``clusterlm.models.classifier``), which reads ``features``.
        self.head: MaskedLMHead | None = MaskedLMHead(args)
        self.head.output.weight = self.tok_embeddings.weight
        if (
            not self.tok_embeddings.weight.is_meta
        ):  # on the meta device, values come per shard later
            self.reset_parameters()

    @property
    def mask_id(self) -> int:
        return special_token_id(self.args.vocab_size, "[MASK]")

    def init_rule(self, name: str) -> InitRule:
        """BERT's initialization: N(0, 0.02) for matrices and tables, zero biases, unit LayerNorm
        weights (no depth scaling of residual projections: post-norm renormalizes each block)."""
        module_name, _, kind = name.rpartition(".")
        if isinstance(self.get_submodule(module_name), nn.LayerNorm):
            return InitRule("ones" if kind == "weight" else "zeros")
        return InitRule("zeros") if kind == "bias" else InitRule("normal", 0.02)

    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialize every parameter by ``init_rule``, drawn per (seed, name) as any layout draws
        its shards; without a seed, one is taken from torch's RNG."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        fill_parameters(self, seeded_source(self.init_rule, seed))

    def forward(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> masked-LM logits [B, T, vocab + specials].

        ``token_types`` [B, T] (0 or 1) default to segment A; ``padding_mask`` [B, T] is True at
        real tokens: padded positions are never attended to (their own outputs are meaningless).
        """
        assert self.head is not None, "the masked-LM head was removed for a classifier"
        return self.head(self.features(tokens, token_types, padding_mask))

    def features(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's hidden states [B, T, d], which the masked-LM head (or a fine-tuning
        head) reads; arguments as for ``forward``."""
        seq = tokens.size(1)
        if seq > self.args.block_size:
            raise ValueError(f"sequence length {seq} exceeds block_size {self.args.block_size}")
        h = self.tok_embeddings(tokens) + self.pos_embeddings(
            torch.arange(seq, device=tokens.device)
        )
        h = h + self.type_embeddings(
            torch.zeros_like(tokens) if token_types is None else token_types
        )
        h = self.dropout(self.emb_norm(h))
        attn_mask = None if padding_mask is None else padding_mask[:, None, None, :]
        for layer in self.layers.values():
            h = layer(h, attn_mask)
        return h

    def num_params(self) -> int:
        """Unique parameters (the tied token table counts once)."""
        return sum(p.numel() for p in self.parameters())
