"""Local SGD and DiLoCo on real processes: H = 1 local SGD with SGD is synchronous data
parallelism, and an interrupted DiLoCo run (stopped mid-window) resumes to the uninterrupted one.

Tolerances: fp32, relative 1e-5 against the single process (parameter averaging and gradient
averaging round differently); the resume is compared at 1e-6.
"""

from __future__ import annotations

import json

import pytest

from .training import MICRO, assert_equivalent, run

SGD = {"optim__optimizer": "sgd", "optim__momentum": 0.9, "optim__lr": 0.3, "training__grad_clip": 0.0}


def test_local_sgd_every_step_equals_synchronous_data_parallel(data_dir, reference, tmp_path):
    """Averaging parameters after every SGD step (momentum included: it is linear in the
    gradients) gives the same weights as averaging the gradients."""
    candidate = run(data_dir, tmp_path, 2, parallel__data_parallel="local_sgd", parallel__local_steps=1,
                    training__micro_batch_size=MICRO, **SGD)
    assert_equivalent(reference(MICRO * 2, **SGD), candidate)


def test_diloco_resumes_mid_window_exactly(data_dir, tmp_path):
    """12 steps with H = 4 straight, against 6 + stop + resume for 6: the stop falls inside a
    window, so each replica, its AdamW state, the anchor and the outer momentum must all carry over."""
    settings = {"parallel__data_parallel": "diloco", "parallel__local_steps": 4, "training__micro_batch_size": MICRO,
                "training__steps": 12, "optim__decay_steps": 12, "training__eval_interval": 4}
    straight_losses, straight = run(data_dir, tmp_path / "straight", 2, **settings)
    run(data_dir, tmp_path / "resumed", 2, **{**settings, "training__steps": 6})
    losses, resumed = run(data_dir, tmp_path / "resumed", 2, **settings, checkpoint__resume="auto")
    assert losses == pytest.approx(straight_losses, rel=1e-6)
    for step, val in straight["val"].items():  # the interrupted run also evaluated at its end, step 6
        assert resumed["val"][step] == pytest.approx(val, rel=1e-6)
    for name, tensor in straight["weights"].items():
        assert (resumed["weights"][name] - tensor).norm() <= 1e-6 * tensor.norm(), name
    assert straight_losses[12] < 0.8 * straight_losses[1]
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["synchronizations"] for r in records if r["kind"] == "train"][-1] == 3
