"""Training runs shared by the layout equivalence tests: a tiny corpus, one run per layout on
real processes, the single-process reference, and the comparison with its tolerance.

Tolerance (fp32): relative 1e-5 on every step's loss and validation loss; weights per tensor by
relative norm, ||a - b|| <= 2e-5 ||b||: AdamW divides each update by the root of the gradient's
second moment, so rounding differences in near-zero gradient entries (reduction order differs
between layouts) move the weights by more than they move the loss. The key projection's bias is left out: softmax is
shift-invariant per query, so its exact gradient is zero, and AdamW turns the rounding noise left
in it into full-size updates of random sign in any two runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clusterlm.interop.pretrained_shape import load_config
from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import TrainSummary, train

from .helpers import run_distributed

KEY_BIASES = ("attn.wk.bias", "cross.wk.bias")  # self- and cross-attention's (see above)
STEPS = 20
MICRO = 2  # sequences per rank per micro-step
BASE = {
    "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 16,
    "training.steps": STEPS, "training.eval_batches": 2, "training.eval_interval": 10,
    "training.log_interval": 1, "optim.warmup_steps": 3, "optim.lr": 3e-3,
    "checkpoint.interval": 0, "metrics.progress": "none", "metrics.tensorboard": False,
    "metrics.plot": False, "metrics.peak_flops": 1e12, "training.precision": "fp32",
}


def prepare_corpus(tmp_path_factory) -> Path:
    from clusterlm.cli import main as cli

    root = tmp_path_factory.mktemp("dp-corpus")
    text = "".join(f"line {i}: to be or not to be, that is the question {i * 7 % 13}\n" for i in range(3000))
    (root / "text.txt").write_text(text)
    assert cli(["prepare", str(root / "text.txt"), "--out", str(root / "data"), "--workers", "1"]) == 0
    return root / "data"


def _train_rank(rank: int, world_size: int, values: dict) -> TrainSummary:
    return train(load_config(None, values))


def train_run(data_dir: Path, out_dir: Path, world_size: int, **overrides) -> TrainSummary:
    """Train BASE with ``overrides`` (``section__key=value``) on ``world_size`` processes; rank 0's
    summary."""
    values = {**BASE, "data.dir": str(data_dir), "training.out_dir": str(out_dir)}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    if world_size == 1:
        return train(load_config(None, values))
    return run_distributed(_train_rank, world_size, values, timeout=240)[0]


def run(data_dir: Path, out_dir: Path, world_size: int, **overrides) -> tuple[dict[int, float], dict]:
    train_run(data_dir, out_dir, world_size, **overrides)
    return results(out_dir)


def results(out_dir: Path) -> tuple[dict[int, float], dict]:
    """A finished run's losses per step, validation losses and final weights, for ``assert_equivalent``."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    val = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    return losses, {"val": val, "weights": final_weights(out_dir)}


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights, loaded as one process would."""
    model = load_for_inference(find_checkpoint(str(out_dir)), device="cpu").model.parts[0]
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_equivalent(reference, candidate, rtol=1e-5, weight_rtol=2e-5):
    ref_losses, ref = reference
    losses, other = candidate
    assert losses.keys() == ref_losses.keys()
    for step in ref_losses:
        assert losses[step] == pytest.approx(ref_losses[step], rel=rtol), f"step {step}"
    for step in ref["val"]:
        assert other["val"][step] == pytest.approx(ref["val"][step], rel=rtol), f"val at {step}"
    for name, tensor in ref["weights"].items():
        if name.endswith(KEY_BIASES):
            continue
        difference = (other["weights"][name] - tensor).norm() / tensor.norm()
        assert difference <= weight_rtol, f"{name}: relative difference {difference:.2e}"


def reference_runs(data_dir, tmp_path_factory):
    """``get(global_sequences, **model_settings)``: the single-process run with that global batch,
    trained once and cached."""
    cache = {}

    def get(global_sequences: int, **model_settings):
        key = (global_sequences, *sorted(model_settings.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ref{global_sequences}")
            cache[key] = run(data_dir, out, 1, training__micro_batch_size=global_sequences, **model_settings)
        return cache[key]

    return get


