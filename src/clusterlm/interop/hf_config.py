"""Hugging Face ``config.json`` <-> clusterlm ``model.*`` values, for GPT2LMHeadModel and
LlamaForCausalLM. An HF option that changes the computation in a way clusterlm's model does not
reproduce is refused with one line rather than imported into a silently different model."""

from __future__ import annotations

from typing import Any

from clusterlm.errors import UserError
from clusterlm.models import ModelArgs

ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}

# option -> the values clusterlm computes identically (absent options take HF's default)
_GPT2_REQUIRES = {
    "activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
    "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
    "tie_word_embeddings": (True,), "add_cross_attention": (False,),
}
_LLAMA_REQUIRES = {
    "hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,), "pretraining_tp": (1,),
    "rope_scaling": (None,),
}


def model_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """The clusterlm ``model.*`` values of an HF config (flavour, sizes, epsilon, rope base)."""
    flavour = {"gpt2": "gpt2", "llama": "llama"}.get(config.get("model_type", ""))
    if flavour is None:
        supported = " or ".join(ARCHITECTURES.values())
        raise UserError(f"{where}: model_type {config.get('model_type')!r} is not supported; "
                        f"clusterlm reads {supported} checkpoints")
    try:
        values = _gpt2_values(config) if flavour == "gpt2" else _llama_values(config, where)
    except KeyError as err:
        raise UserError(f"{where}: config.json lacks {err.args[0]!r}; save the model again with save_pretrained") from None
    required = _GPT2_REQUIRES if flavour == "gpt2" else _LLAMA_REQUIRES
    for option, allowed in required.items():
        if option in config and config[option] not in allowed:
            raise UserError(f"{where}: {option} = {config[option]!r} is not supported "
                            f"(clusterlm's {flavour} computes {allowed[0]!r})")
    return {"flavour": flavour, **values}


def _gpt2_values(config: dict[str, Any]) -> dict[str, Any]:
    n_embd = config["n_embd"]
    return {
        "n_layer": config["n_layer"], "n_head": config["n_head"], "n_kv_head": config["n_head"],
        "n_embd": n_embd, "block_size": config["n_positions"], "vocab_size": config["vocab_size"],
        "ffn_hidden": config.get("n_inner") or 4 * n_embd,
        "norm_eps": float(config.get("layer_norm_epsilon", 1e-5)), "rope_theta": 10000.0,
    }


def _llama_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope_type {rope['rope_type']!r} is not supported (clusterlm's llama "
                        "uses the default rotary positions)")
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise UserError(f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {n_embd}; "
                        "clusterlm needs hidden_size = heads x head_dim")
    return {
        "n_layer": config["num_hidden_layers"], "n_head": n_head,
        "n_kv_head": config.get("num_key_value_heads") or n_head, "n_embd": n_embd,
        "block_size": config["max_position_embeddings"], "vocab_size": config["vocab_size"],
        "ffn_hidden": config["intermediate_size"], "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
    }


def hf_config(args: ModelArgs, eot_id: int | None, dtype: str = "float32") -> dict[str, Any]:
    """The ``config.json`` transformers builds ``args``' model from (weights of ``dtype``, no dropout)."""
    special = {"bos_token_id": eot_id, "eos_token_id": eot_id}
    common = {"architectures": [ARCHITECTURES[args.flavour]], "model_type": args.flavour, "dtype": dtype,
              "vocab_size": args.vocab_size, **special}
    if args.is_llama:
        return {
            **common, "hidden_size": args.n_embd, "intermediate_size": args.ffn_hidden,
            "num_hidden_layers": args.n_layer, "num_attention_heads": args.n_head,
            "num_key_value_heads": args.n_kv_head, "head_dim": args.head_dim,
            "max_position_embeddings": args.block_size, "rms_norm_eps": args.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
            "rope_theta": args.rope_theta, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": False,
        }
    return {
        **common, "n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head,
        "n_positions": args.block_size, "n_inner": args.ffn_hidden, "activation_function": "gelu_new",
        "layer_norm_epsilon": args.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
    }
