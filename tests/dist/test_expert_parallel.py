"""Expert parallelism trains exactly as one process.

Real processes on gloo (timeouts in ``training.train_run``), against the single-process reference
of ``test_moe_training`` (one process accumulating the micro-batches the data-parallel ranks
hold): every step's loss and the validation losses at 1e-5, the weights as in
``training.assert_equivalent``, the aux-free routing biases exactly. The final weights are read
from the run's checkpoint by one process, so every case also loads a checkpoint saved with the
experts split over ep ranks into a model holding them all (ep1).
"""

from __future__ import annotations

import pytest
import torch

from .test_moe_training import AUX_FREE, reference, split_biases
from .training import MICRO, assert_equivalent, run

EP_CASES = [
    ("ep2", 2, 2, {"parallel__ep": 2, "parallel__data_parallel": "zero2"}),
    ("ep4", 4, 4, {"parallel__ep": 4, "parallel__data_parallel": "zero2"}),
    ("ep2xzero3", 4, 4, {"parallel__ep": 2, "parallel__data_parallel": "zero3", "parallel__bucket_mb": 0.01}),
    ("ep2xtp2", 4, 2, {"parallel__ep": 2, "parallel__tp": 2, "parallel__data_parallel": "zero2"}),
    ("ep2xhsdp", 4, 4, {"parallel__ep": 2, "parallel__data_parallel": "hsdp", "parallel__dp_replicate": 2}),
    ("ep2xzero3-ac", 2, 2, {"parallel__ep": 2, "parallel__data_parallel": "zero3", "training__activation_checkpointing": "full"}),
    ("pp2", 2, 1, {"parallel__pp": 2, "parallel__pp_microbatches": 2}),
    ("pp2xep2", 4, 2, {"parallel__pp": 2, "parallel__pp_microbatches": 2, "parallel__ep": 2, "parallel__data_parallel": "zero2"}),
]


@pytest.mark.parametrize("name,world_size,dp,settings", EP_CASES, ids=[c[0] for c in EP_CASES])
def test_expert_parallel_equals_single_process(name, world_size, dp, settings, data_dir, tmp_path_factory, tmp_path):
    candidate = run(data_dir, tmp_path, world_size, training__micro_batch_size=MICRO, **AUX_FREE, **settings)
    expected, expected_biases = split_biases(reference(data_dir, tmp_path_factory, dp, AUX_FREE))
    got, biases = split_biases(candidate)
    assert_equivalent(expected, got)
    assert biases.keys() == expected_biases.keys()
    for key, bias in expected_biases.items():
        torch.testing.assert_close(biases[key], bias, rtol=0, atol=1e-6, msg=key)
    assert any(bias.abs().sum() > 0 for bias in biases.values())
