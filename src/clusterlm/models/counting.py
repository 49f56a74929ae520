"""Exact parameter counts and training FLOPs from the architecture alone.

Computed analytically (no model is built), so the planner can count an 8B model instantly; a test
checks every term against a real ``Transformer``'s parameters.
"""

from __future__ import annotations

from clusterlm.models.bert import TOKEN_TYPES, vocab_rows
from clusterlm.models.gpt import ModelArgs
from clusterlm.models.seq2seq import decoder_depth, is_seq2seq


def layer_params(args: ModelArgs, moe: bool = False, active: bool = False) -> int:
    """Parameters of one Transformer block; of an MoE block (``moe``) all of them, or with
    ``active`` those one token uses: the router, its top-k experts and the shared ones."""
    d, hd, f = args.n_embd, args.head_dim, args.ffn_hidden
    q, kv = args.n_head * hd, args.n_kv_head * hd
    attn = d * q + 2 * d * kv + q * d
    if moe:
        routed = args.moe_top_k if active else args.moe_experts
        experts = (routed + args.moe_shared_experts) * 3 * d * (args.moe_ffn_hidden or f)
        return attn + d * args.moe_experts + experts + 2 * d  # router gate, experts, norms
    if args.is_llama:
        mlp = 3 * d * f  # w1, w3 (gate, up) and w2 (down), no biases
        norms = 2 * d  # two RMSNorm weights
    else:
        attn += q + 2 * kv + d  # biases of wq, wk, wv, wo
        mlp = 2 * d * f + f + d
        norms = 2 * 2 * d  # two LayerNorms, weight and bias
    return attn + mlp + norms


def embedding_params(args: ModelArgs) -> int:
    """Token table (+ learned positions for gpt2); the tied gpt2 head adds nothing. bert: the table
    with its special tokens, positions, token types and the embedding LayerNorm."""
    if args.is_encoder:
        return (vocab_rows(args) + args.block_size + TOKEN_TYPES) * args.n_embd + 2 * args.n_embd
    positions = 0 if args.is_llama else args.block_size * args.n_embd
    return args.vocab_size * args.n_embd + positions


def head_params(args: ModelArgs) -> int:
    """Final norm plus the untied output projection (llama). bert: the masked-LM head's transform
    (dense + LayerNorm) and its output bias; its projection is the token table."""
    if args.is_encoder:
        return args.n_embd * args.n_embd + args.n_embd + 2 * args.n_embd + vocab_rows(args)
    final_norm = args.n_embd if args.is_llama else 2 * args.n_embd
    output = args.vocab_size * args.n_embd if args.is_llama else 0
    return final_norm + output


def param_count(args: ModelArgs, active: bool = False) -> int:
    """Every parameter, or with ``active`` those one token uses (a mixture of experts' routed
    experts count top-k of them)."""
    if is_seq2seq(args):
        return seq2seq_params(args)
    moe = args.moe_blocks(args.n_layer)
    blocks = sum(layer_params(args, i in moe, active) for i in range(args.n_layer))
    return embedding_params(args) + blocks + head_params(args)


def seq2seq_params(args: ModelArgs) -> int:
    """The encoder–decoder (``clusterlm.models.seq2seq``): one token table (also the output
    projection), each side's positions and embedding LayerNorm, its blocks (a decoder block is an
    encoder block with cross-attention and its LayerNorm) and each side's final LayerNorm."""
    d, attention = args.n_embd, 4 * args.n_embd * args.n_embd + 4 * args.n_embd
    embeddings = args.vocab_size * d + 2 * (args.block_size * d + 2 * d)
    blocks = (args.n_layer + decoder_depth(args)) * layer_params(args)
    blocks += decoder_depth(args) * (attention + 2 * d)
    return embeddings + blocks + 2 * 2 * d


def matmul_params(args: ModelArgs) -> int:
    """N of the 6N rule: every parameter that takes part in a matrix multiply per token.

    The position table and an untied token table are lookups and are excluded; the gpt2 token
    table is included because it doubles as the output head (bert's too, whose position and
    token-type tables are lookups). Of a mixture of experts, only the active experts count.
    """
    n = param_count(args, active=True)
    if is_seq2seq(args):  # both position tables are lookups; the token table is the head too
        n -= 2 * args.block_size * args.n_embd
    elif args.is_encoder:
        n -= (args.block_size + TOKEN_TYPES) * args.n_embd
    elif not args.is_llama:
        n -= args.block_size * args.n_embd
    else:
        n -= args.vocab_size * args.n_embd
    return n


def training_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward + backward FLOPs per token: 6N + 12 * n_layer * d_attn * seq_len.

    6N: each weight does one multiply-add (2 FLOPs) forward and two backward (input and weight
    gradients). The attention term counts QK^T and AV (2 matmuls of 2 * d_attn * seq_len FLOPs per
    token forward, x3 for backward), over the full score matrix as in PaLM (Chowdhery et al. 2022,
    appendix B), the convention MFU figures are usually quoted in. Activation recomputation is not
    included: it is overhead, not model FLOPs.
    """
    d_attn = args.n_head * args.head_dim
    # The encoder–decoder: per target token, a source token of the same length through the
    # encoder; attention over the source in each encoder block, and in each decoder block over
    # the target and across.
    attentions = args.n_layer + (2 * decoder_depth(args) if is_seq2seq(args) else 0)
    return 6.0 * matmul_params(args) + 12.0 * d_attn * seq_len * attentions


def classifier_flops_per_token(args: ModelArgs, seq_len: int, labels: int) -> float:
    """Training FLOPs per token of a sequence classifier (``clusterlm.models.classifier``): the
    backbone's without its language-model head (the token table is then a lookup only), plus the
    classification head, which runs once per sequence."""
    d = args.n_embd
    if args.is_encoder:
        rows = vocab_rows(args)
        lm_head = rows * d + (d * d + d) + 2 * d + rows  # projection, transform, LayerNorm, bias
        head = (d * d + d) + (d * labels + labels)  # pooler, classifier
    else:
        lm_head, head = args.vocab_size * d, d * labels + labels
    return training_flops_per_token(args, seq_len) - 6.0 * lm_head + 6.0 * head / seq_len
