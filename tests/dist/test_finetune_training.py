"""Fine-tuning trains exactly like one process with the same global batch under every data-parallel
layout (DDP with accumulation, ZeRO-1/2/3, HSDP), for a decoder and an encoder, with the lowest
block frozen and the head at its own learning rate; and it resumes exactly on another world size.
Tolerances: see training.py (relative 1e-5 on losses, 2e-5 on each weight's norm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clusterlm.cli import main as cli
from clusterlm.checkpoint.dcp_io import CheckpointReader, list_complete

from .test_local_sgd import SGD
from .training import BASE, MICRO, STEPS, run, train_run

FINETUNE = {"finetune__freeze_layers": 1, "finetune__head_lr": 1e-2, "training__eval_interval": STEPS // 2}
ENCODER = {"model__flavour": "bert", "training__objective": "mlm"}


@pytest.fixture(scope="module")
def task_dir(data_dir, tmp_path_factory) -> Path:
    """A three-label task whose text uses the corpus's characters (its tokenizer is the corpus's)."""
    root = tmp_path_factory.mktemp("task")
    lines = [json.dumps({"text": f"{'tbq'[i % 3]} to be or not to be {i} " * (1 + i % 2),
                         "label": ["yes", "no", "maybe"][i % 3]}) for i in range(120)]
    (root / "task.jsonl").write_text("\n".join(lines) + "\n")
    assert cli(["prepare", "--task", f"jsonl:{root / 'task.jsonl'}", "--out", str(root / "task"),
                "--tokenizer", str(data_dir / "tokenizer.json")]) == 0
    return root / "task"


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    """``get(flavour)``: a run directory pretrained for a few steps on the corpus (once per flavour)."""
    runs = {}

    def get(**model) -> Path:
        key = tuple(sorted(model.items()))
        if key not in runs:
            runs[key] = tmp_path_factory.mktemp("pretrained")
            run(data_dir, runs[key], 1, training__steps=4, **model)
        return runs[key]

    return get


def finetune(data_dir, task_dir, pretrained_run, out, world_size, **overrides):
    """A fine-tuning run's losses per step, validation losses and final weights (of any layout)."""
    train_run(data_dir, out, world_size, finetune__task=str(task_dir), finetune__init_from=str(pretrained_run),
              **{**FINETUNE, **overrides})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    reader = CheckpointReader(list_complete(out / "checkpoints")[-1])
    weights = {name: reader.model_tensor(name) for name in reader.model_shapes()}
    return ({r["step"]: r["loss"] for r in records if r["kind"] == "train"},
            {"val": {r["step"]: (r["val_loss"], r["val_accuracy"]) for r in records if r["kind"] == "eval"},
             "test": [r for r in records if r["kind"] == "test"], "weights": weights})


@pytest.fixture(scope="module")
def reference(data_dir, task_dir, pretrained, tmp_path_factory):
    cache = {}

    def get(**settings):
        key = tuple(sorted(settings.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("finetune-ref")
            model = {name: value for name, value in settings.items() if name in ENCODER}  # what was pretrained
            cache[key] = finetune(data_dir, task_dir, pretrained(**model), out, 1,
                                  training__micro_batch_size=MICRO * 2, **settings)
        return cache[key]

    return get


def assert_same(reference, candidate):
    ref_losses, ref = reference
    losses, other = candidate
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for step, (loss, accuracy) in ref["val"].items():
        assert other["val"][step][0] == pytest.approx(loss, rel=1e-5) and other["val"][step][1] == accuracy
    for name, tensor in ref["weights"].items():
        if name.endswith("attn.wk.bias"):  # see training.py
            continue
        difference = (other["weights"][name] - tensor).norm() / tensor.norm().clamp(min=1e-12)
        assert difference <= 2e-5, f"{name}: relative difference {difference:.2e}"


LAYOUTS = [
    ("ddp", 2, {"training__micro_batch_size": MICRO // 2,
                "training__tokens_per_step": MICRO * 2 * BASE["model.block_size"]}),  # with accumulation
    ("zero1", 2, {}), ("zero2", 2, {}), ("zero3", 2, {}),
    ("hsdp", 4, {"parallel__dp_replicate": 2, "training__micro_batch_size": MICRO // 2}),
]


@pytest.mark.parametrize("strategy,world_size,extra", LAYOUTS, ids=[f"{s}{n}" for s, n, _ in LAYOUTS])
def test_decoder_layouts_equal_single_process(data_dir, task_dir, pretrained, reference, tmp_path, strategy,
                                              world_size, extra):
    candidate = finetune(data_dir, task_dir, pretrained(), tmp_path, world_size, parallel__data_parallel=strategy,
                         **{"training__micro_batch_size": MICRO, **extra})
    assert_same(reference(), candidate)
    test, = candidate[1]["test"]  # the test split, scored once at the end
    assert 0.0 <= test["test_accuracy"] <= 1.0 and 0.0 <= test["test_macro_f1"] <= 1.0


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_encoder_layouts_equal_single_process(data_dir, task_dir, pretrained, reference, tmp_path, strategy):
    candidate = finetune(data_dir, task_dir, pretrained(**ENCODER), tmp_path, 2, parallel__data_parallel=strategy,
                         training__micro_batch_size=MICRO, **ENCODER)
    assert_same(reference(**ENCODER), candidate)


def test_resume_on_another_world_size_is_exact(data_dir, task_dir, pretrained, reference, tmp_path):
    """2 ranks zero3 for half the steps, then 1 process to the end: the losses and weights are the
    uninterrupted single-process run's."""
    for world_size, micro, steps in ((2, MICRO, STEPS // 2), (1, MICRO * 2, STEPS)):
        result = finetune(data_dir, task_dir, pretrained(), tmp_path, world_size, training__micro_batch_size=micro,
                          training__steps=steps, optim__decay_steps=STEPS, checkpoint__resume="auto",
                          parallel__data_parallel="zero3")
    ref_losses, ref = reference()
    assert result[0] == pytest.approx(ref_losses, rel=1e-5)
    for name, tensor in ref["weights"].items():
        if not name.endswith("attn.wk.bias"):
            assert torch.allclose(result[1]["weights"][name], tensor, rtol=1e-4, atol=1e-6), name


def test_local_sgd_every_step_equals_single_process(data_dir, task_dir, pretrained, reference, tmp_path):
    """Averaging parameters after every SGD step equals averaging gradients (see test_local_sgd.py)."""
    candidate = finetune(data_dir, task_dir, pretrained(), tmp_path, 2, parallel__data_parallel="local_sgd",
                         parallel__local_steps=1, training__micro_batch_size=MICRO, **SGD)
    assert_same(reference(**SGD), candidate)


def test_parameter_server_workers_fine_tune_and_rank_0_scores_the_test_split(data_dir, task_dir, pretrained,
                                                                           tmp_path):
    """Asynchronous training: 1 server and 2 workers; rank 0 scores the splits alone."""
    from .test_ps import run_ps

    records = run_ps(data_dir, tmp_path, 3, finetune__task=str(task_dir), finetune__init_from=str(pretrained()),
                     parallel__ps_staleness=1, **FINETUNE)
    test, = [r for r in records if r["kind"] == "test"]
    assert 0.0 <= test["test_accuracy"] <= 1.0 and test["step"] == STEPS
