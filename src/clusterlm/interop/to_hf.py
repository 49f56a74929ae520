"""Write a clusterlm model as a Hugging Face directory that ``AutoModelForCausalLM`` (decoders) or
``AutoModelForMaskedLM`` (bert) and ``AutoTokenizer`` load: config.json, safetensors weights
(sharded with an index past a size) and the tokenizer files. Tensors are pulled one at a time
through ``read(name)`` (a checkpoint reader or a live model), so the exporter holds one HF tensor
and its pieces, never the whole model (a mixture of experts: one stacked parameter, while its
experts' tensors are written). The directory appears complete or not at all.

A bert's tokenizer gains the encoder's special tokens at the ids after its vocabulary, where the
encoder's token table has them, and names them as its mask, cls, sep and pad tokens. It adds no
``[CLS]``/``[SEP]`` when encoding: the encoder is pretrained on plain token streams."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from clusterlm.data.special_tokens import SPECIAL_TOKENS, special_token_id
from clusterlm.data.tokenizer import EOT, Tokenizer
from clusterlm.errors import UserError
from clusterlm.files import check_destination, check_output_path, temporary_sibling
from clusterlm.interop.hf_config import check_exportable, hf_config
from clusterlm.interop.hf_mapping import assemble, hf_shapes, hf_tensors, link_for, parameter_shapes
from clusterlm.interop.writer import write_sharded
from clusterlm.models import ModelArgs

DEFAULT_MAX_SHARD = 5 * 10**9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _encoder_tokenizer(tokenizer: Tokenizer, args: ModelArgs) -> tuple[Tokenizer, dict[str, str]]:
    """``tokenizer`` with the encoder's special tokens at the ids its token table gives them."""
    extended = tokenizer.with_special_tokens(SPECIAL_TOKENS)
    for token in SPECIAL_TOKENS:
        encoder_id = special_token_id(args.vocab_size, token)
        if extended.token_id(token) != encoder_id:
            raise UserError(
                f"the run's tokenizer cannot hold {token} at id {encoder_id} "
                f"where the encoder has it (it has {tokenizer.vocab_size} tokens for a model of "
                f"{args.vocab_size}); export a run prepared with a tokenizer of its own"
            )
    return extended, {f"{token.strip('[]').lower()}_token": token for token in SPECIAL_TOKENS}


def _tokenizer_files(out: Path, tokenizer: Tokenizer, args: ModelArgs) -> None:
    special = {"bos_token": EOT, "eos_token": EOT} if tokenizer.eot_id is not None else {}
    if args.is_encoder:
        tokenizer, encoder_special = _encoder_tokenizer(tokenizer, args)
        special |= encoder_special
    (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    settings = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": args.block_size,
        **special,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(settings, indent=2, sort_keys=True) + "\n"
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n"
    )


def _check_router_biases(args: ModelArgs, read: Callable[[str], torch.Tensor]) -> None:
    """Mixtral chooses experts by score alone: routing biases that aux-free balancing moved would
    make the exported model choose others."""
    for block in args.moe_blocks(args.n_layer):
        if read(f"layers.{block}.mlp.router.expert_bias").any():
            raise UserError(
                f"block {block}'s routing biases are not zero (model.moe_balance = aux_free moved "
                f"them) and Mixtral routes without biases, so the export would choose other "
                "experts; export a model trained with model.moe_balance = aux_loss or none"
            )


def _one_stack_kept(
    args: ModelArgs, read: Callable[[str], torch.Tensor]
) -> Callable[[str], torch.Tensor]:
    """``read`` that keeps the last stacked-experts parameter it read: its experts are written as
    consecutive HF tensors, each of which would otherwise read the whole stack again."""
    stacked = {name for name in parameter_shapes(args) if link_for(args, name).experts}
    kept: dict[str, torch.Tensor] = {}

    def cached(name: str) -> torch.Tensor:
        if name not in stacked:
            return read(name)
        if name not in kept:
            kept.clear()  # before reading: one stack held at a time
            kept[name] = read(name)
        return kept[name]

    return cached


def export_hf(
    out: str | os.PathLike[str],
    args: ModelArgs,
    read: Callable[[str], torch.Tensor],
    tokenizer_json: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD,
    dtype: str = "fp32",
) -> list[str]:
    """Write the HF directory ``out`` of a model of ``args`` whose full tensors ``read`` returns by
    clusterlm name, stored as ``dtype`` (fp32, bf16, fp16); returns the file names written. ``out``
    must be absent or empty."""
    out = Path(out)
    check_output_path(out, "--out")
    check_destination(out)
    check_exportable(args)
    _check_router_biases(args, read)
    read = _one_stack_kept(args, read)
    pieces = hf_tensors(args)
    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)
    try:
        eot_id = Tokenizer(tokenizer_json).eot_id
        config = hf_config(args, eot_id, str(DTYPES[dtype]).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _tokenizer_files(
            tmp, Tokenizer(tokenizer_json), args
        )  # first: a tokenizer misfit reads no weights
        written = write_sharded(
            tmp,
            hf_shapes(args),
            DTYPES[dtype],
            max_shard_bytes,
            lambda key: assemble(args, key, {name: read(name) for name in pieces[key]}),
        )
        check_destination(out)  # still free: nothing else wrote there meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [
        "config.json",
        *written,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
