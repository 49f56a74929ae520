"""`clusterlm bench speedrun` on a tiny corpus: both runs scored on the same windows, the time to
the target reported with the CPU; bad input in one line. (A benchmark command: nothing here is
timed.)"""

from __future__ import annotations

from clusterlm.cli import main as cli

TINY = """[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
[training]
steps = 3
micro_batch_size = {batch}
eval_interval = 3
eval_batches = 1
precision = "fp32"
"""


def test_speedrun_reports_time_to_target_for_both_runs(tmp_path, corpus_dir, capsys):
    data = tmp_path / "data"
    assert cli(["prepare", str(corpus_dir), "--out", str(data), "--workers", "1"]) == 0
    (tmp_path / "base.toml").write_text(TINY.format(batch=2))
    (tmp_path / "fast.toml").write_text(TINY.format(batch=4))
    args = [
        "bench",
        "speedrun",
        "--config",
        str(tmp_path / "fast.toml"),
        "--against",
        str(tmp_path / "base.toml"),
        "--data-dir",
        str(data),
    ]
    assert cli([*args, "--target", "100"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and out.count("s at step 3") == 2 and "config / baseline wall time" in out
    (tmp_path / "long.toml").write_text(
        TINY.format(batch=2).replace("block_size = 16", "block_size = 32")
    )
    assert (
        cli(
            [
                "bench",
                "speedrun",
                "--config",
                str(tmp_path / "long.toml"),
                "--against",
                str(tmp_path / "base.toml"),
                "--data-dir",
                str(data),
            ]
        )
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "same validation windows" in err[-1]
    (tmp_path / "diverging.toml").write_text(
        TINY.format(batch=2) + "[optim]\nlr = 1e30\nwarmup_steps = 0\n"
    )
    assert (
        cli([*args[:2], "--config", str(tmp_path / "diverging.toml"), *args[4:], "--target", "0.1"])
        != 0
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert "config: training stopped at step" in err[-1] and "optim.lr" in err[-1]
