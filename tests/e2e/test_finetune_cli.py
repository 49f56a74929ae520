"""`clusterlm finetune` as a user runs it: pretrain, fine-tune from the run, beat the majority class
on an easy task, resume; and each bad input gets one line and writes nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from clusterlm.cli import main as cli

WORDS = {"sun": ["bright", "warm", "day", "gold"], "moon": ["pale", "night", "cold", "silver"]}
TINY = [
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "32",
    "--training.micro_batch_size",
    "8",
    "--training.eval_batches",
    "2",
    "--training.precision",
    "fp32",
    "--metrics.progress",
    "none",
    "--metrics.tensorboard",
    "false",
    "--metrics.plot",
    "false",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A corpus, a decoder pretrained on it for a few steps, and a two-label task sharing its
    tokenizer."""
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    texts = [
        (label, " ".join(rng.choice(words) for _ in range(6)))
        for _ in range(150)
        for label, words in WORDS.items()
    ]
    (root / "corpus.txt").write_text("\n".join(text for _, text in texts) + "\n")
    assert (
        cli(["prepare", str(root / "corpus.txt"), "--out", str(root / "data"), "--workers", "1"])
        == 0
    )
    assert (
        cli(
            [
                "train",
                *TINY,
                "--data.dir",
                str(root / "data"),
                "--training.steps",
                "4",
                "--training.out_dir",
                str(root / "pretrained"),
            ]
        )
        == 0
    )
    (root / "task.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": label}) + "\n" for label, t in texts)
    )
    assert (
        cli(
            [
                "prepare",
                "--task",
                f"jsonl:{root / 'task.jsonl'}",
                "--out",
                str(root / "task"),
                "--tokenizer",
                str(root / "data" / "tokenizer.json"),
            ]
        )
        == 0
    )
    return {
        "root": root,
        "data": root / "data",
        "pretrained": root / "pretrained",
        "task": root / "task",
    }


def finetune(setup, out: Path, *extra: str) -> int:
    return cli(
        [
            "finetune",
            *TINY,
            "--task",
            str(setup["task"]),
            "--training.out_dir",
            str(out),
            "--training.eval_interval",
            "20",
            "--optim.lr",
            "3e-3",
            "--optim.warmup_steps",
            "5",
            *extra,
        ]
    )


def test_finetune_learns_the_task_and_resumes(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        finetune(setup, out, "--init-from", str(setup["pretrained"]), "--training.steps", "20") == 0
    )
    assert (
        finetune(
            setup,
            out,
            "--init-from",
            str(setup["pretrained"]),
            "--training.steps",
            "40",
            "--resume",
            "auto",
        )
        == 0
    )
    assert "done: step 40, test accuracy" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r["kind"] == "test"][-1]
    assert (
        test["test_accuracy"] > 0.9 and test["test_macro_f1"] > 0.9
    )  # the majority class scores 0.5
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # resumed at 20, not started again


def _refusals(setup) -> list[tuple[list[str], str]]:
    other = setup["root"] / "other-tokenizer"
    if not other.exists():
        assert (
            cli(["prepare", "--task", f"jsonl:{setup['root'] / 'task.jsonl'}", "--out", str(other)])
            == 0
        )
    pretrained = str(setup["pretrained"])
    return [
        (["--task", str(setup["data"])], "language-modelling corpus"),
        (["--task", str(other), "--init-from", pretrained], "different tokenizer"),
        (
            ["--task", str(setup["task"]), "--init-from", pretrained, "--model.flavour", "bert"],
            "contradicts",
        ),
        (
            ["--task", str(setup["task"]), "--init-from", str(setup["root"] / "nowhere")],
            "neither a complete",
        ),
        (["--task", str(setup["task"]), "--parallel.tp", "2"], "data-parallel layouts"),
        (["--init-from", pretrained], "needs finetune.task"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_gets_one_line_and_writes_nothing(setup, tmp_path, capsys, case):
    argv, expected = _refusals(setup)[case]
    out = tmp_path / "run"
    capsys.readouterr()
    assert cli(["finetune", *TINY, "--training.out_dir", str(out), *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and expected in error[0], error
    assert not out.exists()


def test_a_fine_tuned_checkpoint_is_no_pretrained_model(setup, tmp_path, capsys):
    first = tmp_path / "first"
    assert finetune(setup, first, "--training.steps", "2") == 0
    capsys.readouterr()
    assert (
        finetune(setup, tmp_path / "second", "--init-from", str(first), "--training.steps", "2")
        == 2
    )
    assert "fine-tuned classifier" in capsys.readouterr().err
    assert not (tmp_path / "second" / "checkpoints").exists()
    for command in (
        ["eval", "--run", str(first)],
        ["export", "hf", "--run", str(first), "--out", str(tmp_path / "hf")],
    ):
        assert cli(command) == 2
        assert "not a language model" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_finetune_settles_the_config_as_pretraining_does(setup, tmp_path, monkeypatch):
    """One session builder: fine-tuning settles precision and the attention kernel like pretraining,
    and its checkpoint records the settled values."""
    from clusterlm.parallel import precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_attention_kernel", lambda shape, dtype: "math")
    out = tmp_path / "run"
    assert (
        finetune(
            setup,
            out,
            "--init-from",
            str(setup["pretrained"]),
            "--training.steps",
            "2",
            "--training.precision",
            "bf16",
        )
        == 0
    )
    saved = json.loads(next((out / "checkpoints").glob("step_*/trainer.json")).read_text())[
        "config"
    ]
    assert saved["training"]["precision"] == "bf16" and saved["training"]["attention"] == "math"
    assert saved["model"]["vocab_size"] > 0 and saved["model"]["ffn_hidden"] == 4 * 32
