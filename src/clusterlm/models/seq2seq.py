"""Encoder–decoder Transformer (Vaswani et al. 2017) in mBART's layout (Liu et al. 2020), read top
to bottom like the paper.

The family is mBART (Hugging Face ``MBartForConditionalGeneration``) because it is the one of
``transformers``' encoder–decoders that is the gpt2 decoder's own block: pre-norm LayerNorm with
biases, learned absolute positions, a GELU MLP and one token table shared by the encoder, the
decoder and the output projection; so the blocks here are built from ``clusterlm.models.gpt``'s
``Attention``, ``MLP`` and ``norm_layer``. (Marian and BART normalize after the residual addition
and Marian's positions are sinusoidal; T5 has relative position buckets and no biases.) mBART
adds a LayerNorm after each side's embeddings and one after each side's last block, as here. Its
MLP activation is configurable; this model uses gpt2's tanh GELU (``gelu_pytorch_tanh``), and
mBART's position table starts two rows in, which an export fills.

The encoder has ``n_layer`` blocks and the decoder ``decoder_layers`` (as many when 0), as mBART's
``encoder_layers`` and ``decoder_layers``; both sides have ``block_size`` positions. The model
reads one token row per example: the source, then the decoder's input (the end-of-text token, then
the target), each padded to the same length with ``PAD`` (-1): ``forward`` returns the logits of
every decoder position. Padded source tokens are never attended to. Decoding passes a
``DecodingCache``: the encoder runs once, its keys and values for cross-attention are kept per
block, and so are the decoder's own keys and values, so each step feeds only the newest token.

Like every model here it knows nothing about distribution; built on the meta device it holds no
values until materialized per shard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.models.gpt import MLP, Attention, ModelArgs, norm_layer
from clusterlm.models.init import InitRule, fill_parameters, seeded_source

SEQ2SEQ_FLAVOUR = "mbart"
KeysValues = tuple[torch.Tensor, torch.Tensor]


def is_seq2seq(args: ModelArgs) -> bool:
    return args.flavour == SEQ2SEQ_FLAVOUR


def decoder_depth(args: ModelArgs) -> int:
    """The decoder's blocks: ``decoder_layers``, or the encoder's ``n_layer`` when that is 0."""
    return args.decoder_layers or args.n_layer


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, H * D] -> [B, H, T, D]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def keys_values(attn: Attention, source: torch.Tensor) -> KeysValues:
    return _heads(attn.wk(source), attn.head_dim), _heads(attn.wv(source), attn.head_dim)


def attend(
    attn: Attention,
    x: torch.Tensor,
    kv: KeysValues,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``attn``'s projections, with queries from ``x`` [B, T, d] over keys and values ``kv``
    ([B, H, S, D] each); ``key_mask`` [B, S] is True where a key may be attended."""
    q = _heads(attn.wq(x), attn.head_dim)
    y = F.scaled_dot_product_attention(
        q,
        *kv,
        attn_mask=None if key_mask is None else key_mask[:, None, None, :],
        is_causal=causal,
        dropout_p=attn.dropout if attn.training else 0.0,
    )
    return attn.resid_dropout(attn.wo(y.transpose(1, 2).flatten(2)))


class LayerCache:
    """One decoder block's keys and values while decoding: its own, grown a step at a time, and
    those of the encoder's output for cross-attention, computed once."""

    def __init__(self) -> None:
        self.own: KeysValues | None = None
        self.cross: KeysValues | None = None


class DecodingCache:
    """What decoding keeps between steps for a batch of ``source`` rows [B, S] (PAD-padded).

    A plain class, not a dataclass: wrappers that move or cast a forward's inputs (DDP, FSDP)
    rebuild the dataclasses among them, and the steps must fill this very object."""

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        self.memory: torch.Tensor | None = None  # the encoder's output [B, S, d]
        self.length = 0  # decoder positions fed so far
        self.layers: dict[str, LayerCache] = {}

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep batch rows ``rows``, in that order (beam search's surviving beams)."""
        self.source = self.source[rows]
        self.memory = None if self.memory is None else self.memory[rows]
        for layer in self.layers.values():
            for name in ("own", "cross"):
                kv = getattr(layer, name)
                setattr(layer, name, None if kv is None else (kv[0][rows], kv[1][rows]))


class EncoderLayer(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x)); attention sees the whole source."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm, self.attn = norm_layer(args), Attention(args)
        self.mlp_norm, self.mlp = norm_layer(args), MLP(args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + attend(self.attn, h, keys_values(self.attn, h), mask)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention over the encoder's output, MLP."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm, self.attn = norm_layer(args), Attention(args)
        self.cross_norm, self.cross = norm_layer(args), Attention(args)
        self.mlp_norm, self.mlp = norm_layer(args), MLP(args)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        h = self.attn_norm(x)
        own = keys_values(self.attn, h)
        if cache is not None and cache.own is not None:  # earlier steps' keys and values first
            own = (torch.cat([cache.own[0], own[0]], 2), torch.cat([cache.own[1], own[1]], 2))
        # Causal when the queries are every position; one new query may see all that came before.
        x = x + attend(self.attn, h, own, causal=own[0].size(2) == x.size(1) > 1)
        if cache is not None and cache.cross is not None:
            cross = cache.cross
        else:
            cross = keys_values(self.cross, memory)
        if cache is not None:
            cache.own, cache.cross = own, cross
        x = x + attend(self.cross, self.cross_norm(x), cross, memory_mask)
        return x + self.mlp(self.mlp_norm(x))


class Seq2SeqTransformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d = args.n_embd
        self.tok_embeddings = nn.Embedding(args.vocab_size, d)
        self.enc_positions = nn.Embedding(args.block_size, d)
        self.dec_positions = nn.Embedding(args.block_size, d)
        self.enc_emb_norm, self.dec_emb_norm = norm_layer(args), norm_layer(args)
        self.dropout = nn.Dropout(args.dropout)
        # One ModuleDict in forward order, the encoder's blocks then the decoder's: what data
        # parallelism, activation checkpointing and compiling wrap one by one.
        self.layers = nn.ModuleDict(
            {f"enc{i}": EncoderLayer(args) for i in range(args.n_layer)}
            | {f"dec{i}": DecoderLayer(args) for i in range(decoder_depth(args))}
        )
        self.enc_norm, self.dec_norm = norm_layer(args), norm_layer(args)
        self.output = nn.Linear(d, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight
        if not self.tok_embeddings.weight.is_meta:  # on meta, values come per shard later
            self.reset_parameters()

    def init_rule(self, name: str) -> InitRule:
        """mBART's initialization: N(0, 0.02) for matrices and tables, zero biases, unit
        LayerNorm weights."""
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

    def forward(self, tokens: torch.Tensor, cache: DecodingCache | None = None) -> torch.Tensor:
        """Training: ``tokens`` [B, 2L], the source then the decoder's input, -> logits [B, L, V].
        Decoding: ``tokens`` [B, t] the next decoder tokens of ``cache``'s rows -> [B, t, V]."""
        if cache is None:
            source, target = tokens.chunk(2, dim=1)
            memory, mask = self.encode(source)
            return self.decode(target, memory, mask)
        if cache.memory is None:
            cache.memory = self.encode(cache.source)[0]
        logits = self.decode(tokens, cache.memory, cache.source >= 0, cache)
        cache.length += tokens.size(1)
        return logits

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The source [B, S] -> the encoder's output [B, S, d] and its mask (True: a token)."""
        mask = source >= 0
        h = self._embed(source, self.enc_positions, self.enc_emb_norm, 0)
        for name, layer in self.layers.items():
            if name.startswith("enc"):
                h = layer(h, mask)
        return self.enc_norm(h), mask

    def decode(
        self,
        target: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: DecodingCache | None = None,
    ) -> torch.Tensor:
        start = 0 if cache is None else cache.length
        h = self._embed(target, self.dec_positions, self.dec_emb_norm, start)
        for name, layer in self.layers.items():
            if name.startswith("dec"):
                layer_cache = None if cache is None else cache.layers.setdefault(name, LayerCache())
                h = layer(h, memory, memory_mask, layer_cache)
        return self.output(self.dec_norm(h))

    def _embed(
        self, tokens: torch.Tensor, positions: nn.Embedding, norm: nn.Module, start: int
    ) -> torch.Tensor:
        seq = tokens.size(1)
        if start + seq > self.args.block_size:
            raise ValueError(
                f"sequence length {start + seq} exceeds block_size {self.args.block_size}"
            )
        h = self.tok_embeddings(tokens.clamp(min=0)) + positions(
            torch.arange(start, start + seq, device=tokens.device)
        )
        return self.dropout(norm(h))

    def num_params(self) -> int:
        """Unique parameters (the shared token table counts once)."""
        return sum(p.numel() for p in self.parameters())
