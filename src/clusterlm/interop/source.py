"""Read a Hugging Face model directory: its config as clusterlm ``model.*`` values, and its
weights as a parameter source that reads only the slice asked for (of stacked experts, only the
experts asked for, each from its own tensor).

A ``ParamSource`` (``clusterlm.models.init``) takes a clusterlm full-model parameter name, the
parameter's full shape and one slice per dimension, and returns that slice as a float32 CPU
tensor; materializing a meta model asks it for each rank's shards only, so each tensor-,
pipeline- or FSDP-shard reads only its own slice from disk (``safe_open(...).get_slice``). Only
JSON and safetensors are read: a pickle is never opened.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from clusterlm.errors import UserError
from clusterlm.files import plain_name
from clusterlm.interop.hf_config import model_values
from clusterlm.interop.hf_mapping import (
    GPT2_PREFIX,
    Link,
    hf_shapes,
    link_for,
    parameter_shapes,
    rope_rows,
    stored_name,
)
from clusterlm.interop.hf_mbart import LOGITS_BIAS, check_logits_bias
from clusterlm.interop.writer import INDEX, SINGLE
from clusterlm.models import ModelArgs
from clusterlm.models.init import ParamSource

_FLOATS = {"F32", "F16", "BF16", "F64"}
# The other name of a tied tensor, under which a directory may store it instead.
_TIED_ALIASES = {
    "lm_head.weight": "model.embed_tokens.weight",
    "cls.predictions.bias": "cls.predictions.decoder.bias",
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (
        OSError,
        ValueError,
        RecursionError,
    ) as err:  # RecursionError: nested too deeply for the parser
        raise UserError(
            f"{path} is unreadable ({err}); save the model again with save_pretrained"
        ) from None
    if not isinstance(value, dict):
        raise UserError(
            f"{path} holds a JSON {type(value).__name__}, not an object; save the model again with "
            "save_pretrained"
        )
    return value


def hf_config_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
    root = Path(directory)
    if not root.is_dir():
        raise UserError(
            f"Hugging Face model directory {root} does not exist; pass a directory written by "
            "save_pretrained or `clusterlm export hf`"
        )
    if not (root / "config.json").is_file():
        raise UserError(
            f"{root} has no config.json, so it is not a complete Hugging Face model directory; "
            "save it again with save_pretrained"
        )
    return _read_json(root / "config.json")


def hf_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """clusterlm ``model.*`` values of the HF model in ``directory`` (flavour, n_layer, n_head,
    n_kv_head, n_embd, block_size, vocab_size, ffn_hidden, norm_eps, rope_theta)."""
    return model_values(hf_config_json(directory), str(directory))


def _weight_files(root: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file holding it (through the index when sharded)."""
    if (root / INDEX).is_file():
        weight_map = _read_json(root / INDEX).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise UserError(
                f"{root / INDEX} has no weight_map object; download or save the model again"
            )
        for (
            name
        ) in weight_map.values():  # each a file beside the index, never a path out of the directory
            plain_name(name, f"{root / INDEX}", "download or save the model again")
        missing = sorted({name for name in weight_map.values() if not (root / name).is_file()})
        if missing:
            raise UserError(
                f"{root / INDEX} names {missing[0]}, which is missing: the directory is "
                "incomplete; download or save it again"
            )
        return {key: root / name for key, name in weight_map.items()}
    if (root / SINGLE).is_file():
        return {key: root / SINGLE for key in _open(root / SINGLE).keys()}
    if any(root.glob("pytorch_model*.bin")):
        raise UserError(
            f"{root} holds only pytorch_model.bin, a pickle clusterlm will not open; convert it: "
            "AutoModel...from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)"
        )
    raise UserError(
        f"{root} has no model.safetensors or {INDEX}; save the model with save_pretrained"
    )


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as err:
        raise UserError(
            f"{path} is not a readable safetensors file ({err}); it may be half-written, "
            "download or save it again"
        ) from None


class _HFWeights:
    """The safetensors tensors of one directory. A file is opened for each read and closed after:
    the values are copied out of the memory-mapped file, whose pages would otherwise stay mapped
    and counted in this process's memory until the end."""

    def __init__(self, root: Path, args: ModelArgs, tied: bool):
        self.root, self.args, self.tied = root, args, tied
        self.files = _weight_files(root)

    def key(self, key: str) -> str:
        """Where ``key`` is stored under this directory's naming."""
        if (
            key not in self.files
            and key.startswith(GPT2_PREFIX)
            and key[len(GPT2_PREFIX) :] in self.files
        ):
            key = key[len(GPT2_PREFIX) :]  # GPT2Model-style names, as in the original gpt2 upload
        if key in _TIED_ALIASES and key not in self.files and self.tied:
            key = _TIED_ALIASES[key]
        if key not in self.files:
            raise UserError(
                f"{self.root} lacks tensor {key}; the directory is incomplete or of another model"
            )
        return key

    def check(self) -> None:
        """Every tensor the model needs is present, of a float dtype and of the config's shape."""
        for hf_key, expected in hf_shapes(self.args).items():
            key = self.key(hf_key)
            with _open(self.files[key]) as f:
                stored = f.get_slice(key)
                dtype, shape = stored.get_dtype(), tuple(stored.get_shape())
            if dtype not in _FLOATS:
                raise UserError(
                    f"{self.root}: tensor {key} is {dtype}, not a floating-point type; "
                    "this is not a model's weights"
                )
            if shape != expected:
                raise UserError(
                    f"{self.root}: tensor {key} has shape {list(shape)} "
                    f"but its config.json implies {list(expected)}; "
                    "the weights and config.json belong to different models"
                )
        if self.args.flavour == "mbart" and LOGITS_BIAS in self.files:
            check_logits_bias(self.read(LOGITS_BIAS, (slice(None),), False), str(self.root))

    def read(self, key: str, index: tuple[slice, ...], transpose: bool) -> torch.Tensor:
        """``stored[index]`` (transposed), copied out of the file as a contiguous float32 tensor."""
        with _open(self.files[key]) as f:
            view = f.get_slice(key)[index]
            view = view.t() if transpose else view
            return torch.empty(view.shape, dtype=torch.float32).copy_(view)


def _check_shape(
    shapes: dict[str, tuple[int, ...]],
    args: ModelArgs,
    root: Path,
    name: str,
    shape: tuple[int, ...],
) -> None:
    expected = shapes.get(stored_name(args, name))
    fits = expected == shape or (
        name == "pos_embeddings.weight"
        and expected is not None
        and shape[1:] == expected[1:]
        and shape[0] <= expected[0]
    )
    if not fits:
        raise UserError(
            f"parameter {name} has shape {list(shape)} here but {list(expected or [])} in "
            f"{root}; use the model settings of its config.json"
        )


def _read_rows(
    weights: _HFWeights, link: Link, start: int, stop: int, rest: tuple[slice, ...]
) -> torch.Tensor:
    """Rows [start, stop) of the HF tensor in [out, in] orientation, columns ``rest``."""
    if link.conv1d:
        return weights.read(weights.key(link.key), (*rest, slice(start, stop)), transpose=True)
    return weights.read(weights.key(link.key), (slice(start, stop), *rest), transpose=False)


def _read_experts(
    weights: _HFWeights, link: Link, experts: range, rest: tuple[slice, ...]
) -> torch.Tensor:
    """Experts ``experts`` of a stacked parameter, columns ``rest``: each expert's own HF tensor
    ([out, in]) sliced and transposed into our [in, out]."""
    blocks = [
        weights.read(weights.key(link.expert_key(e)), rest[::-1], transpose=True) for e in experts
    ]
    if blocks:
        return torch.stack(blocks)
    return torch.empty(0, *(s.stop - s.start for s in rest))


def hf_source(directory: str | os.PathLike[str]) -> ParamSource:
    """The weights of the HF model in ``directory`` as a ``ParamSource`` (see the module doc)."""
    config = hf_config_json(directory)
    values = hf_model_config(directory)
    args = ModelArgs(**values)
    weights = _HFWeights(
        Path(directory), args, tied=bool(config.get("tie_word_embeddings", args.tie_embeddings))
    )
    weights.check()
    shapes = parameter_shapes(args)

    def read(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
        _check_shape(shapes, args, weights.root, name, tuple(shape))
        link = link_for(args, name)
        bounds = [dim.indices(size) for dim, size in zip(index, shape, strict=True)]
        if any(step != 1 for _, _, step in bounds):
            raise ValueError(f"{name}: only contiguous slices can be read, got {index}")
        (start, stop, _), rest = bounds[0], tuple(slice(a, b) for a, b, _ in bounds[1:])
        if link.experts:
            return _read_experts(weights, link, range(start, stop), rest)
        if not link.rope_head_dim:
            block = _read_rows(weights, link, start + link.row_offset, stop + link.row_offset, rest)
        else:  # read the whole heads covering the rows, then put them in our order
            d = link.rope_head_dim
            first, last = start // d * d, math.ceil(stop / d) * d
            heads = _read_rows(weights, link, first, last, rest)
            order = (
                torch.arange(first, last).unflatten(0, (-1, d)) // d * d + rope_rows(d) - first
            ).flatten()
            block = heads[order[start - first : stop - first]]
        return block

    return read
