"""Write a clusterlm model as a Hugging Face directory that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load: config.json, safetensors weights (sharded with an index past a size) and
the tokenizer files. Tensors are pulled one at a time through ``read(name)`` (a checkpoint reader
or a live model), so the exporter holds one HF tensor and its pieces, never the whole model.
The directory appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from clusterlm.data.tokenizer import EOT, Tokenizer
from clusterlm.errors import UserError
from clusterlm.files import temporary_sibling
from clusterlm.interop.hf_config import hf_config
from clusterlm.interop.layout import assemble, hf_shapes, hf_tensors
from clusterlm.interop.writer import write_sharded
from clusterlm.models import ModelArgs

DEFAULT_MAX_SHARD = 5 * 10**9
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tokenizer_files(out: Path, tokenizer_json: str, block_size: int) -> None:
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT} if Tokenizer(tokenizer_json).eot_id is not None else {}
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; choose a new --out directory or remove it")


def export_hf(out: str | os.PathLike[str], args: ModelArgs, read: Callable[[str], torch.Tensor],
              tokenizer_json: str, max_shard_bytes: int = DEFAULT_MAX_SHARD, dtype: str = "fp32") -> list[str]:
    """Write the HF directory ``out`` of a model of ``args`` whose full tensors ``read`` returns by
    clusterlm name, stored as ``dtype`` (fp32, bf16, fp16); returns the file names written. ``out``
    must be absent or empty."""
    out = Path(out)
    check_destination(out)
    pieces = hf_tensors(args)
    tmp = temporary_sibling(out)
    tmp.mkdir(parents=True)
    try:
        eot_id = Tokenizer(tokenizer_json).eot_id
        config = hf_config(args, eot_id, str(DTYPES[dtype]).removeprefix("torch."))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        written = write_sharded(tmp, hf_shapes(args), DTYPES[dtype], max_shard_bytes,
                                lambda key: assemble(args, key, {name: read(name) for name in pieces[key]}))
        _tokenizer_files(tmp, tokenizer_json, args.block_size)
        check_destination(out)  # still free: nothing else wrote there meanwhile
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ["config.json", *written, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
