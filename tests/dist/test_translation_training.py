"""The encoder-decoder trains on a translation task exactly like one process under data
parallelism (ddp, zero1-3, hsdp) and under local SGD averaging every step, and trains
asynchronously through a parameter server. Each rank's micro-batch loss is its mean over its own
target tokens, so the reference is one process accumulating the same micro-batches (rank r's is
micro-step r there), and the tolerances are training.py's."""

from __future__ import annotations

import pytest
from translation_pairs import MBART, prepare_pairs

from .training import MICRO, assert_equivalent, run

SETTINGS = {**{k.replace(".", "__"): v for k, v in MBART.items()}, "model__block_size": 24}
ACCUMULATE = {"training__micro_batch_size": MICRO, "training__tokens_per_step": 2 * MICRO * 24}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return prepare_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference(task_dir, tmp_path_factory):
    return run(task_dir, tmp_path_factory.mktemp("ref"), 1, **SETTINGS, **ACCUMULATE)


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "zero3"])
def test_layouts_equal_one_process(task_dir, reference, tmp_path, strategy):
    candidate = run(task_dir, tmp_path, 2, parallel__data_parallel=strategy,
                    training__micro_batch_size=MICRO, **SETTINGS)  # fmt: skip
    assert_equivalent(reference, candidate)


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
