"""This rank's model and optimizer tensors under the full model's parameter names, whatever the
layout, so that the pieces of all ranks form one state any other layout can read
(``torch.distributed.checkpoint`` reshards it on load).

The strategies' consequences for that state live here: ZeRO-1 keeps each parameter's optimizer
state on one rank only, and a pipeline's last stage of a tied model holds its own copy of the
token table, which a checkpoint of the whole model stores once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

# A checkpoint of a whole gpt2 model stores its tied matrix once, as the token table; a last
# pipeline stage holds a copy of it as its output projection (see clusterlm.parallel.pipeline).
TIED_COPIES = {"output.weight": "tok_embeddings.weight"}


def _part_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One model part's tensors and its optimizer's state, keyed by parameter name."""
    if optimizer is None:
        return get_state_dict(model, [])[0], {}
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return get_state_dict(model, [])[0], _owned_optimizer_state(model, optimizer)
    model_state, optim_state = get_state_dict(model, optimizer)
    return model_state, _by_parameter(optim_state)


def _by_parameter(optim_state: dict[str, Any]) -> dict[str, Any]:
    """The per-parameter entries of an optimizer state dict, keyed by parameter name."""
    return cast(dict[str, Any], optim_state["state"])  # a dict; its "param_groups" are the list


def training_state(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None
) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}``: ``parts`` are this rank's pieces of the model (pipeline
    stages, or the one whole model), each with its optimizer. Optimizer hyper-parameters are
    left out: they come from the config and the step."""
    model_state: dict[str, Any] = {}
    optim_state: dict[str, Any] = {}
    for part, optimizer in zip(parts, _each_part(parts, optimizers), strict=True):
        part_model, part_optim = _part_state(part, optimizer)
        model_state.update(part_model)
        optim_state.update(part_optim)
    return {"model": model_state, "optim": optim_state} if optimizers else {"model": model_state}


def _each_part(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer] | None
) -> list[torch.optim.Optimizer | None]:
    """Each part's optimizer: ``optimizers``, or None for every part when there are none."""
    return list(optimizers) if optimizers else [None] * len(parts)


def _owned_optimizer_state(model: nn.Module, optimizer: ZeroRedundancyOptimizer) -> dict[str, Any]:
    """ZeRO-1: this rank's optimizer state, for the parameters it owns, under the parameters'
    names. Ranks own disjoint parameters, so each entry is written once and any layout can read
    it. State not created yet (before the first step) is created by a step of zero gradients
    at learning rate 0, so that it can be loaded into."""
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    names = {id(param): name for name, param in unwrapped.named_parameters()}
    local = optimizer.optim
    create_missing_state(local)
    return {
        names[id(param)]: local.state[param]
        for group in local.param_groups
        for param in group["params"]
    }


def create_missing_state(optimizer: torch.optim.Optimizer) -> None:
    params = [
        p for group in optimizer.param_groups for p in group["params"] if not optimizer.state[p]
    ]
    if not params:
        return
    saved = [(p.grad, p.detach().clone()) for p in params]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for (grad, value), p in zip(saved, params, strict=True):
        p.grad = grad
        p.data.copy_(value)  # weight decay at lr 0 changes nothing; copied back to be exact
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def load_training_state(
    parts: list[nn.Module],
    optimizers: list[torch.optim.Optimizer] | None,
    read: Callable[[dict[str, Any]], None],
    saved_keys: set[str],
) -> None:
    """Fill ``parts`` (and ``optimizers``) from a checkpoint: ``read(state)`` loads the saved
    tensors into the tensors of ``state`` in place, resharding them; ``saved_keys`` are the
    checkpoint's flattened keys ("model.<name>", "optim.<name>...")."""
    state = training_state(parts, optimizers)
    aliased = _read_tied_copies_from_their_source(state, saved_keys)
    read(state)
    for section, copy_name, source_name, value in aliased:
        loaded = state[section].get(source_name)
        if value is None:  # the copy's tensors were loaded under the source's name
            state[section][copy_name] = state[section].pop(source_name)
        else:  # this rank holds both: the source was loaded, the copy takes its values
            torch.utils._pytree.tree_map(lambda dst, src: dst.copy_(src), value, loaded)
            state[section][copy_name] = value
    for part, optimizer in zip(parts, _each_part(parts, optimizers), strict=True):
        _set_part_state(part, optimizer, state)


def _set_part_state(
    part: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]
) -> None:
    part_model, _ = _part_state(part, None)
    model_state = {name: state["model"][name] for name in part_model}
    # No optimizer state to set here: none, or ZeRO-1's, which was loaded in place.
    if optimizer is None or isinstance(optimizer, ZeroRedundancyOptimizer):
        set_state_dict(part, [], model_state_dict=model_state, optim_state_dict={})
        return
    _, template = get_state_dict(part, optimizer)
    set_state_dict(
        part,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict={
            "state": {name: state["optim"][name] for name in _by_parameter(template)},
            "param_groups": template["param_groups"],
        },
    )


def _read_tied_copies_from_their_source(state: dict[str, Any], saved_keys: set[str]) -> list[tuple]:
    """Point each tied copy the checkpoint lacks at its source's entry before loading; returns
    (section, copy, source, value-if-this-rank-also-holds-the-source) to undo it afterwards."""
    aliased = []
    for section in ("model", "optim"):
        entries = state.get(section, {})
        for copy_name, source_name in TIED_COPIES.items():
            if copy_name not in entries or any(
                key.startswith(f"{section}.{copy_name}") for key in saved_keys
            ):
                continue
            value = entries.pop(copy_name)
            if source_name in entries:
                aliased.append((section, copy_name, source_name, value))
            else:
                entries[source_name] = value
                aliased.append((section, copy_name, source_name, None))
    return aliased
