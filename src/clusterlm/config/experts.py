"""Mixture-of-experts settings: which blocks are MoE blocks (``model.moe_layers``), and how the
``model.moe_*`` keys may combine.

``model.moe_layers`` names the blocks (counted from 0) whose MLP is a mixture of experts:

- ``all``: every block (Mixtral, Qwen3-MoE);
- ``every:K``: every K-th block, blocks K-1, 2K-1, ... (Qwen's ``decoder_sparse_step``);
- ``after:K``: all but the first K blocks, which stay dense (DeepSeek's
  ``first_k_dense_replace``);
- ``I,J,...``: the blocks listed.
"""

from __future__ import annotations

import dataclasses

from clusterlm.config.sections import Config, ModelConfig
from clusterlm.errors import UserError

LAYERS_SYNTAX = "all, every:K, after:K or a list of block indices such as 1,3"
# Strategies that run the MoE blocks as they are today: the whole model on every rank.
MOE_DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3", "hsdp")
# Expert parallelism: FSDP reduces the experts' gradients over their own data-parallel group.
EXPERT_PARALLEL_DATA_PARALLEL = ("zero2", "zero3", "hsdp")


def moe_layer_indices(spec: str, n_layer: int) -> tuple[int, ...]:
    """The indices of the MoE blocks that ``spec`` (``model.moe_layers``) names among
    ``n_layer`` blocks; a bad spec is one line naming the key and its syntax."""
    kind, _, value = spec.strip().partition(":")
    try:
        if spec.strip() == "all":
            chosen = list(range(n_layer))
        elif kind == "every" and int(value) >= 1:
            chosen = list(range(int(value) - 1, n_layer, int(value)))
        elif kind == "after" and int(value) >= 0:
            chosen = list(range(int(value), n_layer))
        elif not value:
            chosen = sorted({int(part) for part in spec.split(",")})
        else:
            raise ValueError(spec)
    except ValueError:
        raise UserError(f"model.moe_layers must be {LAYERS_SYNTAX}; got {spec!r}") from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_layer:
        raise UserError(
            f"model.moe_layers = {spec!r} must name at least one block among the "
            f"{n_layer} blocks 0..{n_layer - 1} (model.n_layer)"
        )
    return tuple(chosen)


def _moe_keys_changed(m: ModelConfig) -> list[str]:
    """The ``model.moe_*`` keys set to other than their defaults."""
    defaults = ModelConfig()
    return [
        f.name
        for f in dataclasses.fields(m)
        if f.name.startswith("moe_") and getattr(m, f.name) != getattr(defaults, f.name)
    ]


def check_experts(cfg: Config) -> None:
    """The ``model.moe_*`` keys: consistent with each other, with the model and the layout."""
    m, p = cfg.model, cfg.parallel
    if p.ep > 1 and not m.moe_experts:
        raise UserError(
            f"parallel.ep = {p.ep} splits the experts of a mixture of experts: set "
            "model.moe_experts > 0 or parallel.ep = 1"
        )
    if not m.moe_experts:
        changed = [key for key in _moe_keys_changed(m) if key != "moe_experts"]
        if changed:
            raise UserError(
                f"model.{changed[0]} applies to a mixture of experts: set model.moe_experts > 0 "
                "(0 = a dense model)"
            )
        return
    if m.flavour != "llama":
        raise UserError(
            f"model.moe_experts needs model.flavour = llama (SwiGLU experts), got {m.flavour}"
        )
    if m.moe_top_k > m.moe_experts:
        raise UserError(
            f"model.moe_top_k ({m.moe_top_k}) exceeds model.moe_experts ({m.moe_experts}): "
            "a token is sent to at most every expert once"
        )
    defaults = ModelConfig()
    if m.moe_balance != "aux_loss" and m.moe_aux_loss_coeff != defaults.moe_aux_loss_coeff:
        raise UserError("model.moe_aux_loss_coeff applies to model.moe_balance = aux_loss")
    if m.moe_balance != "aux_free" and m.moe_bias_rate != defaults.moe_bias_rate:
        raise UserError("model.moe_bias_rate applies to model.moe_balance = aux_free")
    moe_layer_indices(m.moe_layers, m.n_layer)
    if p.sequence_parallel or p.data_parallel not in MOE_DATA_PARALLEL:
        raise UserError(
            "a mixture of experts (model.moe_experts > 0) trains with parallel.data_parallel = "
            f"{', '.join(MOE_DATA_PARALLEL)}, without sequence parallelism "
            "(sequence_parallel = false)"
        )
    if p.pp > 1 and m.moe_balance == "aux_loss":
        raise UserError(
            "model.moe_balance = aux_loss needs the balance loss of every block in the loss, which "
            "a pipeline's last stage does not see; use aux_free or parallel.pp = 1"
        )
    _check_expert_parallel(cfg)


def _check_expert_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    if p.ep == 1:
        return
    if m.moe_experts % p.ep:
        raise UserError(
            f"model.moe_experts ({m.moe_experts}) is not divisible by parallel.ep ({p.ep}): "
            "each expert-parallel rank holds the same number of experts"
        )
    if p.data_parallel not in EXPERT_PARALLEL_DATA_PARALLEL:
        raise UserError(
            f"parallel.ep > 1 runs with parallel.data_parallel = "
            f"{', '.join(EXPERT_PARALLEL_DATA_PARALLEL)} (FSDP over the experts' data-parallel "
            f"group), not {p.data_parallel}"
        )
    if p.load_balance:
        raise UserError(
            "parallel.load_balance gives ranks different numbers of micro-batches, but the "
            "expert-parallel ranks exchange tokens in every one; use parallel.ep = 1"
        )
    if cfg.training.compile:
        raise UserError("training.compile does not run expert parallelism yet; use parallel.ep = 1")
