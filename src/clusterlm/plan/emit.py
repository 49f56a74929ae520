"""Write a chosen layout as a clusterlm config TOML: the model section, the [training] values the
layout fixes, and a [parallel] section with the mesh degrees under the project's key names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from clusterlm.config import ModelConfig
from clusterlm.files import atomic_write
from clusterlm.models.moe import MoeArgs
from clusterlm.plan.layout import layout_config
from clusterlm.plan.search import Candidate

MODEL_KEYS = (
    "flavour",
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "ffn_hidden",
    "block_size",
    "vocab_size",
    "dropout",
    "norm_eps",
    "rope_theta",
)
DECODER_KEYS = ("decoder_layers",)  # written for the encoder-decoder
EXPERT_KEYS = tuple(f.name for f in dataclasses.fields(MoeArgs))  # written for a mixture of experts
TRAINING_KEYS = (
    "micro_batch_size",
    "seq_len",
    "tokens_per_step",
    "activation_checkpointing",
    "precision",
)
PARALLEL_KEYS = (
    "pp",
    "dp_replicate",
    "dp_shard",
    "tp",
    "data_parallel",
    "sequence_parallel",
    "pp_schedule",
    "pp_microbatches",
    "pp_stages_per_rank",
    "cpu_offload",
    "ep",
)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def model_keys(model: ModelConfig) -> tuple[str, ...]:
    """The model section's keys: an encoder-decoder's decoder depth, a mixture's expert keys."""
    decoder = DECODER_KEYS if model.flavour == "mbart" else ()
    return MODEL_KEYS + decoder + (EXPERT_KEYS if model.moe_experts else ())


def _section(name: str, section: Any, keys: tuple[str, ...]) -> str:
    values = dataclasses.asdict(section)
    return "\n".join([f"[{name}]"] + [f"{key} = {_value(values[key])}" for key in keys])


def config_toml(best: Candidate) -> str:
    """The layout's config (``layout_config``, the trainer's conventions) as TOML."""
    layout = best.layout
    cfg = layout_config(layout, best.work)
    header = (
        f"# Chosen by `clusterlm plan` for {best.cluster.nodes} x {best.cluster.name}: "
        f"{layout.describe()}\n"
        f"# predicted {best.time.total:.3f} s/step, {best.tokens_per_s:,.0f} tokens/s, "
        f"MFU {best.mfu:.1%}, "
        f"{best.memory.total / 2**30:.1f} GiB per device\n"
    )
    sections = [
        _section("model", cfg.model, model_keys(cfg.model)),
        _section("training", cfg.training, TRAINING_KEYS),
        _section("parallel", cfg.parallel, PARALLEL_KEYS),
    ]
    return header + "\n\n".join(sections) + "\n"


def write_config(path: str | Path, best: Candidate) -> None:
    atomic_write(path, config_toml(best))
