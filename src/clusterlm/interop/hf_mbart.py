"""Hugging Face ``config.json`` <-> clusterlm ``model.*`` values for the encoder-decoder,
``MBartForConditionalGeneration`` (the registry of every flavour is ``interop.hf_config``)."""

from __future__ import annotations

from typing import Any

import torch

from clusterlm.errors import UserError
from clusterlm.models import ModelArgs
from clusterlm.models.seq2seq import decoder_depth

# option -> the values clusterlm computes identically (absent options take HF's default)
MBART_REQUIRES: dict[str, tuple[Any, ...]] = {
    "activation_function": ("gelu_pytorch_tanh", "gelu_new"),
    "scale_embedding": (False,),
    "tie_word_embeddings": (True,),
}

# A bias added to every logit, a buffer transformers saves as zeros and never trains.
LOGITS_BIAS = "final_logits_bias"


def check_logits_bias(bias: torch.Tensor, where: str) -> None:
    """clusterlm's encoder-decoder has no output bias: it equals a checkpoint whose
    ``final_logits_bias`` is zero (as transformers saves it), and no other."""
    if bias.any():
        raise UserError(
            f"{where}: {LOGITS_BIAS} is non-zero (largest |value| {bias.abs().max().item():.3g}), "
            "an output bias clusterlm's encoder-decoder does not have; import a model whose "
            f"{LOGITS_BIAS} is zero"
        )


def mbart_values(config: dict[str, Any], where: str) -> dict[str, Any]:
    """MBartForConditionalGeneration's values: each side its own depth, but the same heads and
    MLP width, as clusterlm's encoder-decoder builds them."""
    for encoder, decoder in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if config[encoder] != config[decoder]:
            raise UserError(
                f"{where}: {encoder} = {config[encoder]} but {decoder} = {config[decoder]}; "
                "clusterlm's encoder-decoder has the same blocks on both sides"
            )
    return {
        "n_layer": config["encoder_layers"],
        "decoder_layers": config["decoder_layers"],
        "n_head": config["encoder_attention_heads"],
        "n_kv_head": config["encoder_attention_heads"],
        "n_embd": config["d_model"],
        "block_size": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
        "ffn_hidden": config["encoder_ffn_dim"],
        "norm_eps": 1e-5,  # mBART's LayerNorms keep torch's default
        "rope_theta": 10000.0,
    }


def mbart_config(args: ModelArgs) -> dict[str, Any]:
    """Generation starts the decoder at the end-of-text token, which also ends and pads: see
    ``hf_config``. mBART's default of forcing token 2 last is turned off."""
    if args.norm_eps != 1e-5:
        raise UserError(
            f"model.norm_eps = {args.norm_eps}: mBART's LayerNorms use 1e-5, so this run has "
            "no Hugging Face equivalent"
        )
    sides: dict[str, Any] = {"encoder_layers": args.n_layer, "decoder_layers": decoder_depth(args)}
    for side in ("encoder", "decoder"):
        sides |= {
            f"{side}_attention_heads": args.n_head,
            f"{side}_ffn_dim": args.ffn_hidden,
            f"{side}_layerdrop": 0.0,
        }
    return {
        **sides,
        "d_model": args.n_embd,
        "max_position_embeddings": args.block_size,
        "activation_function": "gelu_pytorch_tanh",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "classifier_dropout": 0.0,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        "forced_eos_token_id": None,
    }
