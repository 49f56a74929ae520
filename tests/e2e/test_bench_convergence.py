"""`clusterlm bench convergence` as a user runs it, on a tiny budget: two real jobs (ddp and the
asynchronous parameter server) with a straggler, then convergence.json and convergence.png."""

import json

from clusterlm.cli import main as cli


def test_tiny_study_writes_table_and_figure(tmp_path, capsys):
    text = "".join(
        f"line {i}: to be or not to be, that is the question {i * 7 % 13}\n" for i in range(2000)
    )
    (tmp_path / "text.txt").write_text(text)
    assert (
        cli(
            [
                "prepare",
                str(tmp_path / "text.txt"),
                "--out",
                str(tmp_path / "data"),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = tmp_path / "study"
    code = cli(
        [
            "bench",
            "convergence",
            "--nproc",
            "2",
            "--straggler",
            "1",
            "--out",
            str(out),
            "--runs",
            "ddp,ps_async",
            "--timeout",
            "240",
            "--data.dir",
            str(tmp_path / "data"),
            "--model.n_embd",
            "32",
            "--model.block_size",
            "16",
            "--training.steps",
            "8",
            "--training.eval_interval",
            "4",
            "--training.log_interval",
            "4",
            "--training.eval_batches",
            "2",
        ]
    )
    assert code == 0
    report = json.loads((out / "convergence.json").read_text())
    ddp, ps = report["runs"]
    assert (ddp["name"], ps["name"], ps["processes"]) == ("ddp", "ps async", 3)
    assert (
        [p["tokens"] for p in ddp["curve"]]
        == [p["tokens"] for p in ps["curve"]]
        == [4 * 2 * 8 * 16, 8 * 2 * 8 * 16]
    )
    assert (
        ps["staleness_max"] >= 0
        and ps["pushes_per_s_per_server"] > 0
        and ddp["staleness_max"] is None
    )
    assert "ddp" in report["comparison"]["time_to_target_vs_ddp"]
    assert (out / "convergence.png").stat().st_size > 0
    assert "best:" in capsys.readouterr().out
