"""`clusterlm train --data.mix`: a tiny model trained on two datasets, stopped and resumed."""

import json
from pathlib import Path

import pytest
from train_helpers import TINY_ARGS, records

from clusterlm.cli import main as cli


@pytest.fixture(scope="module")
def mix(data_dir, tmp_path_factory) -> str:
    """data_dir (70%) and a second corpus prepared with its tokenizer (30%)."""
    root = tmp_path_factory.mktemp("second")
    lines = ("the heart of the king", "my love doth speak", "thou art")
    (root / "b.txt").write_text("".join(f"{lines[i % 3]}\n" for i in range(3000)))
    tokenizer = str(data_dir / "tokenizer.json")
    argv = ["prepare", str(root / "b.txt"), "--out", str(root / "b"), "--tokenizer", tokenizer]
    assert cli([*argv, "--workers", "1"]) == 0
    return f"{data_dir}=0.7,{root / 'b'}=0.3"


def train_mix(mix: str, out: Path, steps: int, *extra: str) -> int:
    settings = ["--training.steps", str(steps), "--checkpoint.interval", "4", *TINY_ARGS]
    return cli(["train", "--data.mix", mix, "--training.out_dir", str(out), *settings, *extra])


def test_a_mixed_run_logs_each_dataset_and_resumes_exactly(mix, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ("--training.eval_interval", "8", "--optim.decay_steps", "8")
    assert train_mix(mix, straight, 8, *common) == 0
    assert train_mix(mix, resumed, 4, *common) == 0
    assert train_mix(mix, resumed, 8, *common, "--checkpoint.resume", "auto") == 0
    a, b = records(straight, "train"), records(resumed, "train")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b if r["step"]]
    last = a[-1]
    assert last["tokens_mix0"] + last["tokens_mix1"] == last["tokens"] == 8 * 4 * 32
    assert abs(last["tokens_mix0"] / last["tokens"] - 0.7) <= 1 / 32  # within a sample of 32
    counted = ("tokens", "tokens_mix0", "tokens_mix1")
    assert [last[k] for k in counted] == [b[-1][k] for k in counted]  # recovered on resume
    val = records(straight, "eval")[-1]
    assert val["val_loss"] == pytest.approx(0.7 * val["val_loss_mix0"] + 0.3 * val["val_loss_mix1"])
    saved = json.loads((straight / "checkpoints" / "step_00000008" / "trainer.json").read_text())
    assert saved["mix_tokens"] == {k: last[k] for k in ("tokens_mix0", "tokens_mix1")}


def test_eval_of_a_mixed_run_scores_the_mix_or_one_dataset(mix, data_dir, tmp_path, capsys):
    assert train_mix(mix, tmp_path, 2) == 0
    capsys.readouterr()
    assert cli(["eval", "--run", str(tmp_path), "--batches", "1"]) == 0
    assert cli(["eval", "--run", str(tmp_path), "--batches", "1", "--data-dir", str(data_dir)]) == 0
    mixed, alone = (float(line.split()[2]) for line in capsys.readouterr().out.splitlines()[-2:])
    assert mixed != alone


def test_resuming_with_other_weights_is_refused(mix, tmp_path, capsys):
    assert train_mix(mix, tmp_path, 4) == 0
    lighter = mix.replace("=0.7", "=0.6")
    assert train_mix(lighter, tmp_path, 8, "--checkpoint.resume", "auto") != 0
    assert "another data.mix" in capsys.readouterr().err
