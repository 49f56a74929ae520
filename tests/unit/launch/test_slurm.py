"""The sbatch script and the Slurm commands around it, run with stand-ins for Slurm's client
commands (the real Slurm runs it in tests/e2e/test_slurm_mpirun.py): quoting, options, errors."""

import json
import os
import subprocess

import pytest

from clusterlm.cli import main as cli
from clusterlm.errors import UserError
from clusterlm.launch.jobs import last_train_record
from clusterlm.launch.slurm import SlurmJob, batch_script, time_limit_s

INJECTION = [
    "--training.out_dir",
    "'; rm -rf / #",
    "--model.name",
    '"$(touch pwned)"`touch pwned`\nfalse',
]
RECORD_ARGV = """#!/bin/sh
python3 -c 'import json, sys; print(json.dumps([sys.argv[1].rsplit("/", 1)[1]] + sys.argv[2:]))' \
"$0" "$@" >> "$CALLS"
"""


def job(**changes) -> SlurmJob:
    values = dict(
        nodes=2, procs_per_node=4, train_argv=["--config", "c.toml"], run_dir="/runs/a", steps=100
    )
    return SlurmJob(**{**values, **changes})


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """srun, scontrol, scancel, sbatch and squeue that record their arguments in ``calls``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "scancel", "sbatch", "squeue", "fakepython"):
        (bin_dir / name).write_text(RECORD_ARGV)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CALLS", str(tmp_path / "calls"))
    return bin_dir


def calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_user_value_reaches_the_trainer_verbatim_and_inert(fake_slurm, tmp_path):
    script = batch_script(job(train_argv=INJECTION, python=str(fake_slurm / "fakepython")))
    env = {
        **os.environ,
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
    }
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "pwned").exists()
    (hostnames,), (srun,) = (
        [c for c in calls(tmp_path) if c[0] == name] for name in ("scontrol", "srun")
    )
    assert hostnames == ["scontrol", "show", "hostnames", "n[1-2]"]
    assert srun[srun.index("-m") + 1 : srun.index("-m") + 3] == [
        "clusterlm.launch.agent",
        "--nnodes=2",
    ]
    assert "--rdzv-backend=clusterlm" in srun
    assert (
        "--rdzv-endpoint=:14321" in srun
    )  # the fake scontrol names no host; the port is 10000 + id % 20000
    assert srun[-len(INJECTION) - 2 :] == [*INJECTION, "--resume", "auto"]


def test_every_run_of_the_script_exports_a_new_secret_that_no_command_line_or_log_shows(
    fake_slurm, tmp_path
):
    """The secret comes from /dev/urandom when the script runs (Slurm keeps the script, so it is not
    in it), reaches srun (and so every node's ranks) through the environment only, and is never
    printed."""
    (fake_slurm / "srun").write_text(
        '#!/bin/sh\nprintf "%s\\n" "$CLUSTERLM_JOB_SECRET" >> "$SECRETS"\n'
        + RECORD_ARGV.split("\n", 1)[1]
    )
    script = batch_script(job())
    env = {
        **os.environ,
        "SLURM_JOB_ID": "4321",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_JOB_NUM_NODES": "1",
        "SECRETS": str(tmp_path / "secrets"),
    }
    outputs = [
        subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        for _ in range(2)
    ]
    assert all(result.returncode == 0 for result in outputs), outputs[0].stderr
    secrets = (tmp_path / "secrets").read_text().split()
    assert len(secrets) == 2 and secrets[0] != secrets[1]
    assert all(len(secret) == 64 and int(secret, 16) >= 0 for secret in secrets)
    shown = (
        script
        + json.dumps(calls(tmp_path))
        + "".join(result.stdout + result.stderr for result in outputs)
    )
    assert not any(secret in shown for secret in secrets)


def test_directives_signal_and_requeue():
    script = batch_script(
        job(time="1-02:00:00", partition="gpu-a100", grace_s=300, gpus_per_node=4)
    )
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --time=1-02:00:00",
        "#SBATCH --partition=gpu-a100",
        "#SBATCH --gpus-per-node=4",
        '--cpus-per-task="$SLURM_CPUS_PER_TASK"',
        "trap checkpoint_and_requeue USR1",
        'scontrol requeue "$SLURM_JOB_ID"',
        "--nproc-per-node=4",
        "--shutdown-timeout=290",
        "SIGUSR1",
    ):
        assert line in script
    assert script.startswith("#!/bin/bash\n")
    assert not any(
        f"--{name}" in batch_script(job()) for name in ("partition", "time", "gpus-per-node")
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(nodes=0), "--nodes must be a whole number of at least 1, got 0"),
        (dict(procs_per_node=-2), "--procs-per-node must be a whole number of at least 1, got -2"),
        (dict(time="2 hours"), "--time takes Slurm's"),
        (dict(partition="gpu; rm -rf /"), "--partition takes a partition name"),
        (dict(time="1", grace_s=120), "not longer than --grace 120 s"),
        (dict(grace_s=5), "--grace must be 15 to 65535 seconds"),
        (dict(gpus_per_node=-1), "--gpus-per-node must be a whole number of at least 0, got -1"),
        (dict(run_dir="/runs/100%"), "contains '%'"),
    ],
)
def test_bad_job_settings_are_one_clear_line(changes, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        job(**changes)


def test_time_limits_in_every_slurm_form():
    assert [time_limit_s(t) for t in ("90", "5:30", "1:00:00", "2-3", "2-3:04", "2-03:04:05")] == [
        5400,
        330,
        3600,
        2 * 86400 + 3 * 3600,
        2 * 86400 + 3 * 3600 + 240,
        2 * 86400 + 3 * 3600 + 245,
    ]


def test_submit_passes_the_run_to_sbatch_and_prints_the_job_id(
    fake_slurm, tmp_path, monkeypatch, capsys
):
    (fake_slurm / "sbatch").write_text(RECORD_ARGV + "cat > \"$CALLS.script\"; echo '77;cluster'\n")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "it's a run"
    assert (
        cli(
            [
                "submit",
                "--scheduler",
                "slurm",
                "--nodes",
                "1",
                "--procs-per-node",
                "2",
                "--",
                "--training.out_dir",
                str(run),
                "--training.steps",
                "9",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "77\n"
    (sbatch,) = calls(tmp_path)
    assert json.loads(sbatch[sbatch.index("--job-name=clusterlm") + 1].split("=", 1)[1]) == {
        "run": str(run),
        "steps": 9,
    }
    assert sbatch[-1] == f"--output={run}/slurm-%j.out" and run.is_dir()
    assert (tmp_path / "calls.script").read_text().startswith("#!/bin/bash")


def test_dry_run_prints_the_script_and_submits_nothing(fake_slurm, tmp_path, capsys):
    assert (
        cli(
            [
                "submit",
                "--scheduler",
                "slurm",
                "--nodes",
                "2",
                "--procs-per-node",
                "2",
                "--dry-run",
                "--",
                "--training.out_dir",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("#!/bin/bash\n#SBATCH --nodes=2")
    assert calls(tmp_path) == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--nodes", "0", "--procs-per-node", "2"],
            "--nodes must be a whole number of at least 1, got 0",
        ),
        (
            ["--nodes", "1", "--procs-per-node", "2", "--", "--nproc", "2"],
            "--nproc is torchrun's option",
        ),
        (
            ["--nodes", "1", "--procs-per-node", "2", "--", "--resume", "x"],
            "submit always trains with --resume auto",
        ),
        (
            ["--nodes", "1", "--procs-per-node", "3", "--", "--parallel.tp", "2"],
            "does not divide the 3 processes",
        ),
    ],
)
def test_bad_submissions_are_one_line_and_submit_nothing(
    argv, message, fake_slurm, tmp_path, capsys
):
    assert cli(["submit", "--scheduler", "slurm", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert calls(tmp_path) == []


def test_without_slurm_installed_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert (
        cli(
            [
                "submit",
                "--scheduler",
                "slurm",
                "--nodes",
                "1",
                "--procs-per-node",
                "1",
                "--",
                "--training.out_dir",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "Slurm is not installed here (sbatch is not on PATH)" in capsys.readouterr().err
    assert cli(["jobs"]) == 2 and "squeue is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_jobs_lists_state_and_progress_from_the_run_directory(fake_slurm, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"kind": "train", "step": s, "loss": 3.0 / s, "ms_per_step": 500.0} for s in (10, 20)]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*lines, {"kind": "eval", "step": 20}])
    )
    comment = json.dumps({"run": str(run), "steps": 100})
    (fake_slurm / "squeue").write_text(
        f"#!/bin/sh\necho '12|RUNNING|{comment}'\necho '9|PENDING|(null)'\n"
    )
    assert cli(["jobs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "STATE", "STEP", "LOSS", "ETA", "RUN"]
    assert out[1].split() == ["9", "PENDING", "-", "-", "-", "-"]
    assert out[2].split() == ["12", "RUNNING", "20/100", "0.1500", "40s", str(run)]


def test_the_last_train_record_comes_from_the_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(
            json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 5001)
        )
        + '{"kind": "train", "step": 50'
    )  # a line still being written
    assert last_train_record(path)["step"] == 5000
    assert last_train_record(tmp_path / "missing.jsonl") is None


def test_cancel_refuses_jobs_that_are_not_the_users_clusterlm_jobs(fake_slurm, tmp_path, capsys):
    assert cli(["cancel", "12; rm -rf /"]) == 2
    assert "a Slurm job id is a number" in capsys.readouterr().err
    assert cli(["cancel", "12"]) == 2  # the fake squeue lists nothing
    assert "not one of your clusterlm jobs" in capsys.readouterr().err
    assert [c[0] for c in calls(tmp_path)] == ["squeue"]
