"""The parameter server on real processes, launched as torchrun launches them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT and a TCPStore the launcher hosts), so that one worker can be killed and started
again: s = 0 with SGD equals synchronous data parallel through a checkpoint and resume, and a
job survives losing a worker and takes it back while uneven workers stay within the staleness
bound.

Tolerance of the equivalence: fp32, relative 1e-5 on validation losses and weights (a worker
logs its own batch's loss, so training losses are not compared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from .training import BASE, MICRO, final_weights

TIMEOUT_S = 240


class Job:
    """``world`` ranks of ``python -m clusterlm train`` around a store this process hosts."""

    def __init__(self, values: dict, world: int, tmp: Path):
        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port),
                    "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join(sys.path)}
        self.args = [a for key, value in values.items() for a in (f"--{key}", str(value))]
        self.tmp = tmp
        self.procs = {rank: self.start(rank) for rank in range(world)}

    def start(self, rank: int) -> subprocess.Popen:
        with open(self.tmp / f"rank{rank}.{time.monotonic_ns()}.log", "w") as log:  # the child keeps its copy
            return subprocess.Popen([sys.executable, "-m", "clusterlm", "train", *self.args], stdout=log,
                                    stderr=subprocess.STDOUT,
                                    env={**self.env, "RANK": str(rank), "LOCAL_RANK": str(rank)})

    def wait(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for rank, proc in self.procs.items():
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                assert code == 0, f"rank {rank} exited {code}:\n{self.logs()}"
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("rank*.log")))


def run_ps(data_dir: Path, out: Path, world: int, **overrides) -> list[dict]:
    values = {**BASE, "data.dir": data_dir, "training.out_dir": out, "parallel.data_parallel": "ps",
              "training.micro_batch_size": MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}}
    out.mkdir(parents=True, exist_ok=True)
    Job(values, world, out).wait()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SGD = {"optim__optimizer": "sgd", "optim__momentum": 0.9, "optim__lr": 0.3, "training__grad_clip": 0.0}


def test_s0_equals_synchronous_data_parallel_through_a_resume(data_dir, reference, tmp_path):
    """2 workers and 2 servers (the tensors sharded between them), s = 0, SGD with momentum: 6
    steps, stop, resume for 6 more; the servers' parameters and momentum carry over and the
    result equals 12 steps of one process with the 2-worker global batch."""
    settings = {**SGD, "training__eval_interval": 6, "optim__decay_steps": 12}
    ref_losses, ref = reference(MICRO * 2, training__steps=12, **settings)
    common = {**settings, "parallel__ps_servers": 2, "parallel__ps_staleness": 0}
    run_ps(data_dir, tmp_path, 4, training__steps=6, **common)
    records = run_ps(data_dir, tmp_path, 4, training__steps=12, checkpoint__resume="auto", **common)
    val = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
    assert val[6] == pytest.approx(ref["val"][6], rel=1e-5) and val[12] == pytest.approx(ref["val"][12], rel=1e-5)
    weights = final_weights(tmp_path)
    for name, tensor in ref["weights"].items():
        if not name.endswith("attn.wk.bias"):
            assert (weights[name] - tensor).norm() <= 1e-5 * tensor.norm(), name
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["staleness_max"] == 0 and last["ps_pushes"] == 6 * 2  # counted since the servers started


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _wait_for(condition, job: Job, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for r, p in job.procs.items() if r != 2):
            job.kill()
            pytest.fail(f"waiting for {what}:\n{job.logs()}")
        time.sleep(0.2)


def test_a_lost_worker_does_not_stop_training_and_a_restarted_one_rejoins(data_dir, tmp_path):
    """3 workers, 1 server, s = 1 (so a lost worker would block the others if it were still
    counted): worker 2 is killed mid-run; the others go on; worker 2 is started again, pulls the
    current parameters and pushes again; the job finishes its steps. Workers 0 and 1 are slowed
    2x (training.slow_ranks), so worker 2 runs ahead of them: updates reach the staleness bound
    of 1 clock and never pass it."""
    values = {**BASE, "data.dir": data_dir, "training.out_dir": tmp_path, "parallel.data_parallel": "ps",
              "parallel.ps_staleness": 1, "training.micro_batch_size": MICRO, "training.steps": 400,
              "training.eval_interval": 0, "training.slow_ranks": "0:2,1:2"}
    job = Job(values, 4, tmp_path)
    _wait_for(lambda: any(r.get("step", 0) >= 10 for r in _records(tmp_path)), job, "step 10")
    job.procs[2].kill()
    job.procs[2].wait()
    _wait_for(lambda: any(r.get("ps_live_workers") == 2 for r in _records(tmp_path)), job, "the loss to be seen")
    lost_at = max(r["step"] for r in _records(tmp_path) if r.get("ps_live_workers") == 2)
    job.procs[2] = job.start(2)
    job.wait()
    train = [r for r in _records(tmp_path) if r["kind"] == "train"]
    rejoined = [r["step"] for r in train if r["step"] > lost_at and r["ps_live_workers"] == 3]
    assert rejoined, f"worker 2 never came back: {[(r['step'], r['ps_live_workers']) for r in train]}"
    assert train[-1]["step"] == 400 and max(r["staleness_max"] for r in train) == 1
