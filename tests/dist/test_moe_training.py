"""A mixture of experts trains on N data-parallel ranks exactly as in one process.

Real processes on gloo (timeouts in ``training.train_run``). The reference is one process that
accumulates the same micro-batches the ranks hold (rank r's batch is its micro-step r), so the
balance loss, computed per micro-batch, is the same sum of terms. Compared over 20 steps: every
step's loss and the validation losses at 1e-5, the weights as in ``training.assert_equivalent``,
and the aux-free routing biases, which move by whole steps of the rate from the tokens per expert
summed over the ranks, exactly.
"""

from __future__ import annotations

import pytest
import torch

from .training import BASE, MICRO, assert_equivalent, run

MOE = {
    "model__flavour": "llama", "model__moe_experts": 4, "model__moe_top_k": 2,
    "model__moe_shared_experts": 1, "model__moe_ffn_hidden": 16,
}
AUX_FREE = {**MOE, "model__moe_bias_rate": 0.01}
AUX_LOSS = {**MOE, "model__moe_balance": "aux_loss", "model__moe_aux_loss_coeff": 0.1}
CASES = [
    ("ddp", 2, AUX_FREE, {}),
    ("zero2", 2, AUX_FREE, {}),
    ("zero3", 2, AUX_FREE, {"parallel__bucket_mb": 0.01}),
    ("ddp", 2, AUX_LOSS, {}),
    ("zero3", 2, AUX_LOSS, {"parallel__bucket_mb": 0.01}),
    ("hsdp", 4, AUX_FREE, {"parallel__dp_replicate": 2}),
]
_references: dict[tuple, tuple] = {}


def reference(data_dir, tmp_path_factory, world_size: int, moe: dict) -> tuple:
    """One process accumulating ``world_size`` micro-batches of MICRO sequences (trained once)."""
    key = (world_size, *sorted(moe.items()))
    if key not in _references:
        tokens = MICRO * world_size * BASE["model.block_size"]
        out = tmp_path_factory.mktemp(f"moe-ref{world_size}")
        _references[key] = run(data_dir, out, 1, training__micro_batch_size=MICRO,
                               training__tokens_per_step=tokens, **moe)
    return _references[key]


def split_biases(result: tuple) -> tuple[tuple, dict[str, torch.Tensor]]:
    """The run's results without the routing biases (zero under aux_loss, so no relative norm),
    and the biases."""
    losses, other = result
    weights = dict(other["weights"])
    biases = {name: weights.pop(name) for name in list(weights) if name.endswith("expert_bias")}
    return (losses, {**other, "weights": weights}), biases


@pytest.mark.parametrize(
    "strategy,world_size,moe,extra", CASES,
    ids=[f"{s}-{n}-{m['model__moe_balance'] if 'model__moe_balance' in m else 'aux_free'}" for s, n, m, _ in CASES],
)
def test_moe_strategy_equals_single_process(strategy, world_size, moe, extra, data_dir, tmp_path_factory, tmp_path):
    candidate = run(data_dir, tmp_path, world_size, parallel__data_parallel=strategy,
                    training__micro_batch_size=MICRO, **moe, **extra)
    expected, expected_biases = split_biases(reference(data_dir, tmp_path_factory, world_size, moe))
    got, biases = split_biases(candidate)
    assert_equivalent(expected, got)
    assert biases.keys() == expected_biases.keys() and len(biases) == BASE["model.n_layer"]
    for name, bias in expected_biases.items():
        torch.testing.assert_close(biases[name], bias, rtol=0, atol=1e-6, msg=name)
    moved = any(bias.abs().sum() > 0 for bias in biases.values())
    assert moved == ("model__moe_balance" not in moe)  # aux_free moves them; aux_loss leaves them


TP_CASES = [
    ("tp2", 2, 1, {"parallel__tp": 2}),
    ("tp2xzero3", 4, 2, {"parallel__tp": 2, "parallel__data_parallel": "zero3"}),
]


@pytest.mark.parametrize("name,world_size,dp,settings", TP_CASES, ids=[c[0] for c in TP_CASES])
def test_moe_under_tensor_parallel_equals_single_process(name, world_size, dp, settings, data_dir, tmp_path_factory, tmp_path):
    """Attention split over the tp ranks, the mixture of experts whole on each of them."""
    candidate = run(data_dir, tmp_path, world_size, training__micro_batch_size=MICRO, **AUX_FREE, **settings)
    expected, expected_biases = split_biases(reference(data_dir, tmp_path_factory, dp, AUX_FREE))
    got, biases = split_biases(candidate)
    assert_equivalent(expected, got)
    for name, bias in expected_biases.items():
        torch.testing.assert_close(biases[name], bias, rtol=0, atol=1e-6, msg=name)
