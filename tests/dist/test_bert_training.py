"""The bert encoder with masked-LM pretraining trains exactly like one process with the same global
batch, under DDP with gradient accumulation, ZeRO-3 and tensor parallelism, and resumes exactly on
another world size. Every sequence masks the same number of tokens, so the mean of per-rank, per-micro-batch
losses is the mean over the masked tokens of the global batch. Tolerances: see training.py."""

from __future__ import annotations

import json

import pytest

from .training import BASE, MICRO, STEPS, assert_equivalent, run

BERT = {"model__flavour": "bert", "training__objective": "mlm"}


def test_ddp_with_accumulation_equals_single_process(data_dir, reference, tmp_path):
    """2 ranks x 2 micro-steps of MICRO / 2 sequences == 1 process with MICRO * 2 sequences."""
    tokens = MICRO * 2 * BASE["model.block_size"]
    candidate = run(data_dir, tmp_path, 2, parallel__data_parallel="ddp", training__micro_batch_size=MICRO // 2,
                    training__tokens_per_step=tokens, **BERT)
    assert_equivalent(reference(MICRO * 2, **BERT), candidate)


def test_zero3_equals_single_process(data_dir, reference, tmp_path):
    candidate = run(data_dir, tmp_path, 2, parallel__data_parallel="zero3", training__micro_batch_size=MICRO, **BERT)
    assert_equivalent(reference(MICRO * 2, **BERT), candidate)


def test_resume_on_another_world_size_is_exact(data_dir, reference, tmp_path):
    """2 ranks ddp for 10 steps, then 1 process to the end: the masks, like the data, follow the
    sample counter, so the losses are those of the uninterrupted single-process run."""
    for world_size, micro, steps in ((2, MICRO, STEPS // 2), (1, MICRO * 2, STEPS)):
        losses, result = run(data_dir, tmp_path, world_size, training__micro_batch_size=micro,
                             training__steps=steps, optim__decay_steps=STEPS, checkpoint__resume="auto", **BERT)
    reference_losses, ref = reference(MICRO * 2, **BERT)
    assert losses == pytest.approx(reference_losses, rel=1e-5)
    assert result["val"][STEPS] == pytest.approx(ref["val"][STEPS], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["val_accuracy"] for r in records if r["kind"] == "eval"]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)  # of the masked tokens


def test_tensor_parallel_equals_single_process(data_dir, reference, tmp_path):
    """Heads and MLP columns on 2 ranks, the tied vocabulary split; the masked-LM loss runs under
    loss_parallel with the unmasked positions ignored."""
    candidate = run(data_dir, tmp_path, 2, parallel__tp=2, training__micro_batch_size=MICRO * 2, **BERT)
    assert_equivalent(reference(MICRO * 2, **BERT), candidate)
