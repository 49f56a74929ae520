"""Hugging Face ``config.json`` <-> clusterlm ``model.*`` values, for GPT2LMHeadModel,
LlamaForCausalLM, BertForMaskedLM, MBartForConditionalGeneration and, for a mixture of experts,
MixtralForCausalLM. An HF option that changes the computation in a way clusterlm's model does not
reproduce is refused with one line rather than imported into a silently different model.

Mixtral rather than Qwen3-MoE is the mixture of experts read and written because it is exactly a
clusterlm llama with MoE blocks: llama attention, a softmax router over every block's experts, the
top k renormalized, no shared experts. Qwen3-MoE normalizes each head's queries and keys (q/k
RMSNorm), which clusterlm's attention does not; DeepSeek-V3 adds latent attention and grouped
routing. The features of ours Mixtral has no place for (shared experts, sigmoid scores, weights
left unnormalized, dense blocks among the MoE ones) are refused on export (``check_exportable``);
routing biases (aux-free balancing) by ``interop.to_hf``, which reads them.
"""

from __future__ import annotations

from typing import Any

from clusterlm.data.special_tokens import SPECIAL_TOKENS, special_token_id
from clusterlm.errors import UserError
from clusterlm.interop.hf_mbart import MBART_REQUIRES, mbart_config, mbart_values
from clusterlm.models import ModelArgs
from clusterlm.models.bert import TOKEN_TYPES, vocab_rows

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "bert": "BertForMaskedLM",
    "mbart": "MBartForConditionalGeneration",
}
MIXTRAL = "MixtralForCausalLM"  # a llama whose MLPs are mixtures of experts

# option -> the values clusterlm computes identically (absent options take HF's default)
_GPT2_REQUIRES: dict[str, tuple[Any, ...]] = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
    "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,),
    "reorder_and_upcast_attn": (False,),
    "tie_word_embeddings": (True,),
    "add_cross_attention": (False,),
}
_LLAMA_REQUIRES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
    "rope_scaling": (None,),
}
_MIXTRAL_REQUIRES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "sliding_window": (None,),
    "rope_scaling": (None,),
}
_BERT_REQUIRES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("gelu",),
    "position_embedding_type": ("absolute",),
    "is_decoder": (False,),
    "add_cross_attention": (False,),
    "type_vocab_size": (TOKEN_TYPES,),
    "tie_word_embeddings": (True,),
}
# BERT relatives whose blocks normalize before the residual addition; clusterlm's bert is post-norm.
_PRE_NORM = ("megatron-bert", "roberta-prelayernorm")
# Architectures of a BERT directory that hold the masked-LM head (BertForPreTraining's NSP head is
# left out).
_BERT_HEADS = ("BertForMaskedLM", "BertForPreTraining")


def model_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The clusterlm ``model.*`` values of an HF config (flavour, sizes, epsilon, rope base)."""
    model_type = config.get("model_type", "")
    if model_type in _PRE_NORM:
        raise UserError(
            f"{where}: model_type {model_type!r} normalizes before each residual addition "
            "(pre-norm); clusterlm's bert is post-norm like the original BERT "
            "and cannot represent it"
        )
    if model_type not in _FLAVOURS:
        supported = ", ".join(ARCHITECTURES.values()) + f" or {MIXTRAL}"
        raise UserError(
            f"{where}: model_type {config.get('model_type')!r} is not supported; "
            f"clusterlm reads {supported} checkpoints"
        )
    values_of, required = _FLAVOURS[model_type]
    try:
        values = values_of(config, where)
    except KeyError as err:
        raise UserError(
            f"{where}: config.json lacks {err.args[0]!r}; save the model again with save_pretrained"
        ) from None
    for option, allowed in required.items():
        if option in config and config[option] not in allowed:
            raise UserError(
                f"{where}: {option} = {config[option]!r} is not supported "
                f"(clusterlm's {model_type} computes {allowed[0]!r})"
            )
    return {"flavour": model_type, **values}


def _gpt2_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    n_embd = config["n_embd"]
    return {
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "n_kv_head": config["n_head"],
        "n_embd": n_embd,
        "block_size": config["n_positions"],
        "vocab_size": config["vocab_size"],
        "ffn_hidden": config.get("n_inner") or 4 * n_embd,
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)),
        "rope_theta": 10000.0,
    }


def _llama_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"{where}: rope_type {rope['rope_type']!r} is not supported (clusterlm's llama "
            "uses the default rotary positions)"
        )
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise UserError(
            f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {n_embd}; "
            "clusterlm needs hidden_size = heads x head_dim"
        )
    return {
        "n_layer": config["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": config.get("num_key_value_heads") or n_head,
        "n_embd": n_embd,
        "block_size": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
        "ffn_hidden": config["intermediate_size"],
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    }


def _mixtral_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """A llama whose every block's MLP is a mixture of ``num_local_experts`` experts, of which a
    token takes the top ``num_experts_per_tok`` by softmax score, renormalized. The balancing
    (``router_aux_loss_coef``, ``router_jitter_noise``) is a training choice, left to the run."""
    hidden = config["intermediate_size"]
    return {
        **_llama_values(config, where),
        "flavour": "llama",
        "moe_experts": config["num_local_experts"],
        "moe_top_k": config["num_experts_per_tok"],
        "moe_shared_experts": 0,
        "moe_ffn_hidden": hidden,
        "moe_layers": "all",
        "moe_score": "softmax",
        "moe_norm_topk": True,
    }


def _bert_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """BertForMaskedLM's values. Its vocabulary must end with clusterlm's four special tokens, as an
    exported encoder's does: ``[PAD]`` (``pad_token_id``) is the last id. A BERT whose special
    tokens sit elsewhere (Google's: ``[PAD]`` = 0, ``[MASK]`` = 103) is refused, since masking would
    then use another token than the one it was trained with."""
    architectures = config.get("architectures") or list(_BERT_HEADS)
    if not set(architectures) & set(_BERT_HEADS):
        raise UserError(
            f"{where}: architectures {architectures} has no masked-LM head; clusterlm's bert "
            f"imports {' or '.join(_BERT_HEADS)}"
        )
    rows, n_embd, n_head = (
        config["vocab_size"],
        config["hidden_size"],
        config["num_attention_heads"],
    )
    vocab_size = rows - len(SPECIAL_TOKENS)
    if vocab_size < 1 or config.get("pad_token_id", 0) != special_token_id(vocab_size, "[PAD]"):
        raise UserError(
            f"{where}: pad_token_id {config.get('pad_token_id', 0)} is not the last of the "
            f"{rows} ids; clusterlm's bert reserves the last four ids "
            f"for {', '.join(SPECIAL_TOKENS)} (in that order) "
            "and imports only a vocabulary laid out that way"
        )
    if n_embd % n_head:
        raise UserError(
            f"{where}: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}"
        )
    return {
        "n_layer": config["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": n_head,
        "n_embd": n_embd,
        "block_size": config["max_position_embeddings"],
        "vocab_size": vocab_size,
        "ffn_hidden": config["intermediate_size"],
        "norm_eps": float(config.get("layer_norm_eps", 1e-12)),
        "rope_theta": 10000.0,
    }


# model_type -> (its clusterlm values, the options it must leave at values clusterlm computes)
_FLAVOURS = {
    "gpt2": (_gpt2_values, _GPT2_REQUIRES),
    "llama": (_llama_values, _LLAMA_REQUIRES),
    "bert": (_bert_values, _BERT_REQUIRES),
    "mixtral": (_mixtral_values, _MIXTRAL_REQUIRES),
    "mbart": (mbart_values, MBART_REQUIRES),
}


def _llama_config(args: ModelArgs) -> dict[str, Any]:
    return {
        "hidden_size": args.n_embd,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head,
        "head_dim": args.head_dim,
        "max_position_embeddings": args.block_size,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
    }


def _mixtral_config(args: ModelArgs) -> dict[str, Any]:
    dense_only = ("attention_bias", "mlp_bias")  # options of LlamaConfig, not MixtralConfig
    llama = {k: v for k, v in _llama_config(args).items() if k not in dense_only}
    return {
        **llama,
        "intermediate_size": args.moe_ffn_hidden or args.ffn_hidden,
        "num_local_experts": args.moe_experts,
        "num_experts_per_tok": args.moe_top_k,
        "router_aux_loss_coef": args.moe_aux_loss_coeff,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "sliding_window": None,
    }


def check_exportable(args: ModelArgs) -> None:
    """A mixture of experts must be one MixtralForCausalLM computes; one line otherwise."""
    if not args.moe_experts:
        return
    blocks = args.moe_blocks(args.n_layer)
    unexpressible = {
        "model.moe_shared_experts > 0 (Mixtral has no shared experts)": args.moe_shared_experts,
        "model.moe_score = sigmoid (Mixtral's router is a softmax)": args.moe_score != "softmax",
        "model.moe_norm_topk = false (Mixtral rescales the chosen weights to sum to 1)": (
            not args.moe_norm_topk
        ),
        f"model.moe_layers = {args.moe_layers} (every Mixtral block is a mixture of experts)": (
            len(blocks) != args.n_layer
        ),
    }
    for feature, present in unexpressible.items():
        if present:
            raise UserError(
                f"a mixture of experts exports as {MIXTRAL}, which cannot express {feature}; "
                "only a model without it can be exported to Hugging Face"
            )


def _gpt2_config(args: ModelArgs) -> dict[str, Any]:
    return {
        "n_embd": args.n_embd,
        "n_layer": args.n_layer,
        "n_head": args.n_head,
        "n_positions": args.block_size,
        "n_inner": args.ffn_hidden,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": args.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }


def _bert_config(args: ModelArgs) -> dict[str, Any]:
    """The encoder's vocabulary is the tokenizer's plus the special tokens.

    ``[PAD]`` is the pad id.
    """
    return {
        "vocab_size": vocab_rows(args),
        "hidden_size": args.n_embd,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "intermediate_size": args.ffn_hidden,
        "hidden_act": "gelu",
        "max_position_embeddings": args.block_size,
        "type_vocab_size": TOKEN_TYPES,
        "layer_norm_eps": args.norm_eps,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "pad_token_id": special_token_id(args.vocab_size, "[PAD]"),
    }


_CONFIGS = {
    "gpt2": _gpt2_config,
    "llama": _llama_config,
    "bert": _bert_config,
    "mbart": mbart_config,
}


def hf_config(args: ModelArgs, eot_id: int | None, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` transformers builds ``args``' model from.

    Weights are of ``dtype``, with no dropout.
    """
    if args.moe_experts:
        architecture, model_type, values = MIXTRAL, "mixtral", _mixtral_config(args)
    else:
        architecture, model_type = ARCHITECTURES[args.flavour], args.flavour
        values = _CONFIGS[args.flavour](args)
    common = {
        "architectures": [architecture],
        "model_type": model_type,
        "dtype": dtype,
        "vocab_size": args.vocab_size,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }
    if args.flavour == "mbart":  # the decoder starts at, and a finished beam is padded with, it
        common |= {"decoder_start_token_id": eot_id, "pad_token_id": eot_id}
    return {**common, **values}
