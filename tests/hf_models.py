"""Tiny random Hugging Face models, built offline with transformers, for the interop tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

SIZES = {"layers": 2, "width": 32, "heads": 4, "context": 16}


def tiny_hf_model(
    out: Path,
    flavour: str,
    vocab_size: int,
    tokenizer_json: str | None = None,
    seed: int = 0,
    **options,
):
    """A random GPT2LMHeadModel, LlamaForCausalLM (grouped-query attention: 2 KV heads),
    MixtralForCausalLM (the same, 4 experts, top-2) or BertForMaskedLM (``vocab_size`` tokens,
    then clusterlm's 4 special tokens, [PAD] last) saved
    to ``out`` as safetensors; returns the model in eval mode. ``options`` go to the HF config."""
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if flavour == "gpt2":
        config = GPT2Config(
            n_layer=SIZES["layers"],
            n_embd=SIZES["width"],
            n_head=SIZES["heads"],
            n_positions=SIZES["context"],
            vocab_size=vocab_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
            **options,
        )
        model = GPT2LMHeadModel(config)
    elif flavour == "bert":
        config = BertConfig(
            num_hidden_layers=SIZES["layers"],
            hidden_size=SIZES["width"],
            num_attention_heads=SIZES["heads"],
            intermediate_size=72,
            max_position_embeddings=SIZES["context"],
            vocab_size=vocab_size + 4,
            pad_token_id=vocab_size + 3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **options,
        )
        model = BertForMaskedLM(config)
    elif flavour == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(
            num_hidden_layers=SIZES["layers"],
            hidden_size=SIZES["width"],
            num_attention_heads=SIZES["heads"],
            num_key_value_heads=2,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=SIZES["context"],
            vocab_size=vocab_size,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
            **options,
        )
        model = MixtralForCausalLM(config)
    else:
        config = LlamaConfig(
            num_hidden_layers=SIZES["layers"],
            hidden_size=SIZES["width"],
            num_attention_heads=SIZES["heads"],
            num_key_value_heads=2,
            intermediate_size=72,
            max_position_embeddings=SIZES["context"],
            vocab_size=vocab_size,
            rope_theta=500.0,
            rms_norm_eps=1e-5,
            **options,
        )
        model = LlamaForCausalLM(config)
    with (
        torch.no_grad()
    ):  # norms start at one and biases at zero; make them matter for the comparisons
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    return model.eval()


def reader(model: torch.nn.Module):
    """``read(name)`` for ``export_hf`` from a live, whole model (its buffers too, as a
    checkpoint holds them)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return lambda name: tensors[name].detach()


def safetensors_bytes(directory: Path) -> dict[str, bytes]:
    """Every tensor of a directory's safetensors files, as raw bytes by name (for byte-identity
    checks)."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
    return out
