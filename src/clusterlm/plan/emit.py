"""Write a chosen layout as a clusterlm config TOML: the model section, the [training] values the
layout fixes, and a [parallel] section with the mesh degrees under the project's key names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from clusterlm.files import atomic_write
from clusterlm.plan.search import Candidate

MODEL_KEYS = ("flavour", "n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "vocab_size",
              "dropout", "norm_eps", "rope_theta")
PARALLEL_KEYS = ("pp", "dp_replicate", "dp_shard", "tp", "data_parallel", "sequence_parallel", "pp_schedule",
                 "pp_stages_per_rank", "cpu_offload")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _section(name: str, values: dict[str, Any]) -> str:
    return "\n".join([f"[{name}]"] + [f"{key} = {_value(value)}" for key, value in values.items()])


def config_toml(best: Candidate) -> str:
    work, layout = best.work, best.layout
    model = dataclasses.asdict(work.model)
    # The trainer's micro-batch is what one rank processes per forward call: under a pipeline that
    # is the whole per-rank batch, split by the schedule; otherwise the rest is gradient accumulation.
    pipelined = layout.pp > 1
    training = {
        "micro_batch_size": layout.micro_batch_size * (layout.micro_batches if pipelined else 1),
        "seq_len": work.seq_len,
        "tokens_per_step": work.global_batch_tokens,
        "activation_checkpointing": layout.activation_checkpointing,
        "precision": work.precision,
    }
    parallel = {key: getattr(layout, key) for key in PARALLEL_KEYS}
    if pipelined:
        parallel["pp_microbatches"] = layout.micro_batches
    header = (f"# Chosen by `clusterlm plan` for {best.cluster.nodes} x {best.cluster.name}: {layout.describe()}\n"
              f"# predicted {best.time.total:.3f} s/step, {best.tokens_per_s:,.0f} tokens/s, MFU {best.mfu:.1%}, "
              f"{best.memory.total / 2**30:.1f} GiB per device\n")
    sections = [_section("model", {k: model[k] for k in MODEL_KEYS}), _section("training", training),
                _section("parallel", parallel)]
    return header + "\n\n".join(sections) + "\n"


def write_config(path: str | Path, best: Candidate) -> None:
    atomic_write(path, config_toml(best))
