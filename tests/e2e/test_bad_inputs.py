"""The bad-input corpus: every command, fed what users get wrong, answers with one line.

Each entry of ``bad_inputs_table.CASES`` (configs, corpora, tasks, checkpoints, Hugging Face
directories, launch environments, signals, disks) runs the command line as a user would, in this
process where it can (``clusterlm.cli.main``) and as a real process for launchers, environments
and signals. It must end with exactly one line on stderr, a non-zero status, no traceback, and
the disk as it was. To add a case, append a ``case(...)`` to the table; the harness
(``bad_inputs_harness.py``) describes the fields.
"""

from __future__ import annotations

import pytest
from bad_inputs_harness import TINY, Case, Shared, changed, fill, run_subprocess, snapshot
from bad_inputs_table import CASES

from clusterlm.cli import main as cli

CORPUS = "".join(f"now is the winter of our discontent {i}\n" for i in range(300))
TASK = "".join(
    f'{{"text": "{word} {i}", "label": "{label}"}}\n'
    for i in range(40)
    for word, label in (("winter", "cold"), ("discontent", "warm"))
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    (root / "corpus.txt").write_text(CORPUS)
    (root / "task.jsonl").write_text(TASK)
    inputs = Shared(
        root,
        root / "data",
        root / "run",
        root / "run" / "checkpoints" / "step_00000002",
        root / "task",
        root / "hf",
    )
    assert (
        cli(["prepare", str(root / "corpus.txt"), "--out", str(inputs.data), "--workers", "1"]) == 0
    )
    assert (
        cli(["train", *TINY, "--data.dir", str(inputs.data), "--training.out_dir", str(inputs.run)])
        == 0
    )
    assert (
        cli(
            [
                "prepare",
                "--task",
                f"jsonl:{root / 'task.jsonl'}",
                "--out",
                str(inputs.task),
                "--tokenizer",
                str(inputs.data / "tokenizer.json"),
            ]
        )
        == 0
    )
    assert cli(["export", "hf", "--run", str(inputs.run), "--out", str(inputs.hf)]) == 0
    return inputs


def _run(
    entry: Case, argv: list[str], env: dict[str, str], tmp_path, capsys, monkeypatch
) -> tuple[int, str, str]:
    if entry.subprocess:
        return run_subprocess(entry, argv, env, tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # relative defaults (runs/default, data/...) land in the snapshot
    capsys.readouterr()
    status = cli(argv)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(entry, id=entry.id, marks=[pytest.mark.slow] if entry.subprocess else [])
        for entry in CASES
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(
    entry: Case, shared, tmp_path, capsys, monkeypatch
):
    if entry.setup is not None:
        entry.setup(tmp_path, shared)
    argv = fill(entry.argv, tmp_path, shared)
    env = dict(zip(entry.env, fill(tuple(entry.env.values()), tmp_path, shared), strict=True))
    before, shared_before = snapshot(tmp_path), snapshot(shared.root)
    status, out, err = _run(entry, argv, env, tmp_path, capsys, monkeypatch)
    lines = err.splitlines()
    assert status != 0, f"status 0; stdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err + out, err
    assert len(lines) == 1 and lines[0].startswith(entry.prefix), f"stderr must be one line:\n{err}"
    assert entry.expect in lines[0], lines[0]
    assert changed(before, snapshot(tmp_path), entry.may_change) == []
    assert changed(shared_before, snapshot(shared.root), ()) == []
