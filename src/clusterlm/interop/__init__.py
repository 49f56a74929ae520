"""Hugging Face interoperability: export a clusterlm model as a ``transformers`` directory
(config.json, safetensors, tokenizer) and start from one (GPT2LMHeadModel,
LlamaForCausalLM, BertForMaskedLM, MBartForConditionalGeneration; a mixture of experts as
MixtralForCausalLM)."""

from clusterlm.interop.source import hf_model_config, hf_source
from clusterlm.interop.to_hf import export_hf

__all__ = ["export_hf", "hf_model_config", "hf_source"]
