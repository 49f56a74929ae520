"""The encoder-decoder trains on a translation task exactly like one process under data
parallelism (ddp, zero1-3, hsdp), tensor parallelism (alone, with zero3, and with label smoothing),
and under local SGD averaging every step, and trains asynchronously through a parameter server.
Each rank's micro-batch loss is its mean over its own target tokens, so the reference is one process accumulating the same micro-batches (rank r's is
micro-step r there), and the tolerances are training.py's."""

from __future__ import annotations

import json

import pytest
from translation_pairs import MBART, prepare_pairs

from clusterlm.cli import main as cli

from .training import MICRO, STEPS, assert_equivalent, results, run, train_run

SETTINGS = {**{k.replace(".", "__"): v for k, v in MBART.items()}, "model__block_size": 24}
ACCUMULATE = {"training__micro_batch_size": MICRO, "training__tokens_per_step": 2 * MICRO * 24}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return prepare_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference_dir(task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train_run(task_dir, out, 1, **SETTINGS, **ACCUMULATE)
    return out


@pytest.fixture(scope="module")
def reference(reference_dir):
    return results(reference_dir)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_layouts_equal_one_process(task_dir, reference, tmp_path, strategy):
    candidate = run(task_dir, tmp_path, 2, parallel__data_parallel=strategy,
                    training__micro_batch_size=MICRO, **SETTINGS)  # fmt: skip
    assert_equivalent(reference, candidate)


def _scores(out_dir) -> list[float]:
    """Token accuracy, BLEU and chrF of each periodic evaluation (greedy decoding on the run's
    layout; this one against test_seq2seq_tensor_parallel.py's decoding of a model far from
    initialization)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    names = ("accuracy", "bleu", "chrf")
    return [r[f"val_{name}"] for r in records if r["kind"] == "eval" for name in names]


TENSOR_PARALLEL = [
    # (name, processes, settings): the reference's 2 micro-batches, accumulated (tp2) or one per
    # data-parallel rank (tp2 x zero3)
    ("tp2", 2, {"parallel__tp": 2, **ACCUMULATE}),
    ("tp2xzero3-2", 4, {"parallel__tp": 2, "parallel__data_parallel": "zero3",
                        "training__micro_batch_size": MICRO}),
]  # fmt: skip


@pytest.mark.parametrize(
    "name,world_size,settings", TENSOR_PARALLEL, ids=[c[0] for c in TENSOR_PARALLEL]
)
def test_tensor_parallel_equals_one_process(
    task_dir, reference, reference_dir, tmp_path, name, world_size, settings
):
    """Heads of the encoder's, the decoder's and the cross-attention, MLP columns and the tied
    vocabulary on 2 ranks: losses, weights, and the greedy translations' BLEU and chrF."""
    candidate = run(task_dir, tmp_path, world_size, **SETTINGS, **settings)
    assert_equivalent(reference, candidate)
    assert _scores(tmp_path) == pytest.approx(_scores(reference_dir), rel=1e-5)


def test_label_smoothed_tensor_parallel_equals_one_process(
    task_dir, reference, tmp_path, tmp_path_factory
):
    """Label smoothing on the vocabulary split over tp2 (which torch's loss_parallel does not
    smooth; ``next_token_loss`` does) trains like one process smoothing whole logits."""
    smoothed = {**SETTINGS, **ACCUMULATE, "training__label_smoothing": 0.1}
    smoothed_reference = run(task_dir, tmp_path_factory.mktemp("ref-smoothed"), 1, **smoothed)
    candidate = run(task_dir, tmp_path, 2, parallel__tp=2, **smoothed)
    assert_equivalent(smoothed_reference, candidate)
    last = max(reference[0])  # smoothing keeps a trained model's loss from falling as low
    assert smoothed_reference[0][last] > reference[0][last]


def test_tensor_parallel_resumes_and_evaluates(task_dir, reference, tmp_path, capsys):
    """tp2 for half the steps, then resumed on tp2 to the end: the uninterrupted run's losses and
    weights; `clusterlm eval` of the run scores the whole model in one process."""
    for steps in (STEPS // 2, STEPS):
        summary = train_run(task_dir, tmp_path, 2, parallel__tp=2, training__steps=steps,
                            optim__decay_steps=STEPS, checkpoint__resume="auto", **SETTINGS, **ACCUMULATE)  # fmt: skip
    assert summary.resumed_from and summary.resumed_from.endswith(f"step_{STEPS // 2:08d}")
    assert_equivalent(reference, results(tmp_path))
    capsys.readouterr()
    assert cli(["eval", "--run", str(tmp_path), "--split", "test"]) == 0
    assert "test loss" in capsys.readouterr().out


def test_hsdp_equals_one_process(task_dir, tmp_path, tmp_path_factory):
    """2 replicas of 2 shards, one pair per rank: one process accumulating 4 micro-batches."""
    micro = MICRO // 2
    reference = run(task_dir, tmp_path_factory.mktemp("ref-hsdp"), 1, **SETTINGS,
                    training__micro_batch_size=micro, training__tokens_per_step=4 * micro * 24)  # fmt: skip
    candidate = run(task_dir, tmp_path, 4, parallel__data_parallel="hsdp", parallel__dp_replicate=2,
                    training__micro_batch_size=micro, **SETTINGS)  # fmt: skip
    assert_equivalent(reference, candidate)


def test_local_sgd_every_step_equals_one_process(task_dir, tmp_path, tmp_path_factory):
    """Averaging parameters after every SGD step equals averaging gradients
    (see test_local_sgd.py)."""
    from .test_local_sgd import SGD

    reference = run(
        task_dir, tmp_path_factory.mktemp("ref-sgd"), 1, **SETTINGS, **ACCUMULATE, **SGD
    )
    candidate = run(task_dir, tmp_path, 2, parallel__data_parallel="local_sgd",
                    parallel__local_steps=1, training__micro_batch_size=MICRO, **SETTINGS, **SGD)  # fmt: skip
    assert_equivalent(reference, candidate)


def test_parameter_server_workers_train_and_rank_0_scores_the_test_split(task_dir, tmp_path):
    """Asynchronous training: 1 server and 2 workers; rank 0 translates the splits alone."""
    from .test_ps import run_ps

    settings = {**SETTINGS, "parallel__ps_staleness": 1, "training__eval_interval": 10}
    records = run_ps(task_dir, tmp_path, 3, **settings)
    (test,) = [r for r in records if r["kind"] == "test"]
    assert 0 <= test["test_chrf"] <= 100 and test["step"] == 20
