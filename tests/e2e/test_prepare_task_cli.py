"""`clusterlm prepare --task` as a user runs it: a JSONL task, re-runs, and one-line errors that
leave --out as it was; task and corpus directories are never mistaken for each other."""

from __future__ import annotations

import json

import pytest

from clusterlm import cli
from clusterlm.data.manifest import load_manifest
from clusterlm.data.task import load_task


def run(*args: str) -> int:
    return cli.main(["prepare", *map(str, args)])


def jsonl(path, rows) -> str:
    path.write_text(
        "".join(row if isinstance(row, str) else json.dumps(row) for row in rows), encoding="utf-8"
    )
    return f"jsonl:{path}"


def good_rows(n: int = 12, label=lambda i: ["neg", "pos", "mixed"][i % 3]) -> list[dict]:
    return [
        {"text": f"example {i}: {'so good' if i % 2 else 'so bad'}\n", "label": label(i)}
        for i in range(n)
    ]


def with_splits(rows: list[dict], splits: list[str]) -> list[dict]:
    return [dict(row, split=split) for row, split in zip(rows, splits, strict=True)]


def test_jsonl_task_rerun_and_force(tmp_path, corpus_dir, capsys):
    task, out = (
        jsonl(tmp_path / "t.jsonl", [json.dumps(r) + "\n\n" for r in good_rows()]),
        tmp_path / "task",
    )
    assert run("--task", task, "--out", out) == 0
    loaded = load_task(str(out))
    assert (
        loaded.labels == ("mixed", "neg", "pos")
        and sum(len(s) for s in loaded.splits.values()) == 12
    )
    assert "3 labels" in capsys.readouterr().out
    assert run("--task", task, "--out", out) == 0
    assert "up to date" in capsys.readouterr().out
    assert run("--task", task, "--out", out, "--seed", 3) == 2
    assert "--force" in capsys.readouterr().err
    reused = tmp_path / "reused"  # a given tokenizer.json is used as is
    assert run("--task", task, "--out", reused, "--tokenizer", out / "tokenizer.json") == 0
    assert (reused / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert load_task(str(reused)).manifest.tokenizer.kind == "file"
    corpus = (
        tmp_path / "corpus-out"
    )  # a language-modelling corpus replaced by a task: no stale shards
    assert run(corpus_dir, "--out", corpus, "--workers", 1) == 0
    assert run("--task", task, "--out", corpus, "--force") == 0
    assert not list(corpus.glob("train_0*.bin")) and load_task(str(corpus)).manifest.seed == 0
    assert (
        run(corpus_dir, "--out", corpus, "--workers", 1, "--force") == 0
    )  # and back: no task files
    assert sorted(p.name for p in corpus.iterdir()) == sorted(
        ["manifest.json", *load_manifest(corpus).files]
    )


def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, text the error line must contain)."""
    rows = good_rows()
    splits = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    no_label = [*rows[:2], {"text": "orphan"}, *rows[2:]]
    cases = {
        "missing label": (no_label, 'line 3 has no "label"'),
        "missing text": ([*rows[:4], {"label": "pos"}], 'line 5 has no "text"'),
        "mixed label types": (
            good_rows(label=lambda i: i % 3 if i > 4 else "neg"),
            "mix strings and integers",
        ),
        "label sets differ": (
            with_splits(good_rows(label=lambda i: i % 2 if i < 9 else 0), splits),
            "the test split lacks 1",
        ),
        "empty split": (with_splits(rows, ["train"] * 9 + ["val"] * 3), "the test split of jsonl:"),
        "some lines without split": (
            with_splits(rows, splits)[:5] + rows[5:],
            'line 6 has no "split"',
        ),
        "invalid json": (
            [json.dumps(r) + "\n" for r in rows[:2]] + ['{"text": "x", "label": 1,\n'],
            "line 3 is not valid JSON",
        ),
        "too few per label": (good_rows(6), "has only 2 examples"),
        "bool label": ([{"text": "a", "label": True}], "must be a string or an integer"),
    }
    args = {
        name: (
            [
                "--task",
                jsonl(
                    tmp_path / f"{i}.jsonl",
                    r if name == "invalid json" else [json.dumps(x) + "\n" for x in r],
                ),
            ],
            expected,
        )
        for i, (name, (r, expected)) in enumerate(cases.items())
    }
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9", "label": 1}\n')
    return args | {
        "not utf-8": (["--task", f"jsonl:{tmp_path / 'latin1.jsonl'}"], "line 1 is not UTF-8"),
        "missing file": (
            ["--task", f"jsonl:{tmp_path / 'nope.jsonl'}"],
            "nope.jsonl does not exist",
        ),
        "unknown task kind": (["--task", "sentiment"], "unknown --task 'sentiment'"),
        "inputs with task": (["--task", "play-classification", tmp_path], "--task takes no INPUT"),
        "fractions too large": (
            ["--task", "play-classification", "--val-fraction", "0.5", "--test-fraction", "0.5"],
            "leave nothing to train on",
        ),
    }


CASES = [
    "missing label",
    "missing text",
    "mixed label types",
    "label sets differ",
    "empty split",
    "some lines without split",
    "invalid json",
    "too few per label",
    "bool label",
    "not utf-8",
    "missing file",
    "unknown task kind",
    "inputs with task",
    "fractions too large",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("out_state", ["absent", "prepared"])
def test_bad_input_is_one_error_line_and_leaves_out_as_it_was(
    case, out_state, tmp_path, capsys, tree
):
    out = tmp_path / "out"
    if out_state == "prepared":
        assert (
            run(
                "--task",
                jsonl(tmp_path / "good.jsonl", [json.dumps(r) + "\n" for r in good_rows()]),
                "--out",
                out,
            )
            == 0
        )
    before = tree(out)
    argv, expected = bad_inputs(tmp_path)[case]
    capsys.readouterr()
    assert run(*argv, "--out", out, "--force") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert tree(out) == before


def test_task_and_corpus_directories_are_refused_in_each_others_place(tmp_path, corpus_dir, capsys):
    task, corpus = tmp_path / "task", tmp_path / "lm"
    assert (
        run(
            "--task",
            jsonl(tmp_path / "t.jsonl", [json.dumps(r) + "\n" for r in good_rows()]),
            "--out",
            task,
        )
        == 0
    )
    assert run(corpus_dir, "--out", corpus, "--workers", 1) == 0
    capsys.readouterr()
    assert (
        cli.main(["train", "--data.dir", str(task), "--training.out_dir", str(tmp_path / "run")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a labelled task, not a language-modelling corpus" in err, (
        err
    )
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="is a language-modelling corpus, not a labelled task"):
        load_task(str(corpus))
    with pytest.raises(Exception, match="is a labelled task"):
        load_manifest(task)
