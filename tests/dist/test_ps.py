"""The parameter server on real processes, launched as torchrun launches them (``ps_job.Job``),
so that one worker can be killed and started again: s = 0 with SGD equals synchronous data
parallel through a checkpoint and resume, and a job survives losing a worker and takes it back
while uneven workers stay within the staleness bound.

Tolerance of the equivalence: fp32, relative 1e-5 on validation losses and weights (a worker
logs its own batch's loss, so training losses are not compared).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clusterlm.config import build_config
from clusterlm.data.manifest import load_manifest
from clusterlm.distributed.job_secret import SECRET_VARIABLE
from clusterlm.train.session import build_model

from .ps_job import TIMEOUT_S, Job, records, wait_for
from .training import BASE, MICRO, STEPS, final_weights


def run_ps(data_dir: Path, out: Path, world: int, **overrides) -> list[dict]:
    values = {**BASE, "data.dir": data_dir, "training.out_dir": out, "parallel.data_parallel": "ps",
              "training.micro_batch_size": MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}}
    out.mkdir(parents=True, exist_ok=True)
    Job(values, world, out).wait()
    return records(out)


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
    wait_for(lambda: any(r.get("step", 0) >= 10 for r in records(tmp_path)), job, "step 10", spare=(2,))
    job.procs[2].kill()
    job.procs[2].wait()
    wait_for(lambda: any(r.get("ps_live_workers") == 2 for r in records(tmp_path)), job, "the loss to be seen",
             spare=(2,))
    lost_at = max(r["step"] for r in records(tmp_path) if r.get("ps_live_workers") == 2)
    job.procs[2] = job.start(2)
    job.wait()
    train = [r for r in records(tmp_path) if r["kind"] == "train"]
    rejoined = [r["step"] for r in train if r["step"] > lost_at and r["ps_live_workers"] == 3]
    assert rejoined, f"worker 2 never came back: {[(r['step'], r['ps_live_workers']) for r in train]}"
    assert train[-1]["step"] == 400 and max(r["staleness_max"] for r in train) == 1


ROGUE = Path(__file__).with_name("ps_rogue.py")
SLOW = "0:10,1:10"  # the job runs for seconds after its workers joined: time for the rogue's attempts


def _shard_size(values: dict) -> int:
    """The values one server holds: every trainable parameter of the model."""
    model, _ = build_model(build_config(None, values), load_manifest(values["data.dir"]).vocab_size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _attack(data_dir: Path, out: Path, mode: str) -> tuple[dict, list[dict], str]:
    """A ps job of 2 workers and 1 server (s = 0, SGD), and a rogue process (``ps_rogue.py``)
    started with it; the rogue's report, the job's metrics and the server's log."""
    values = {**BASE, "data.dir": data_dir, "training.out_dir": out, "parallel.data_parallel": "ps",
              "training.micro_batch_size": MICRO, "parallel.ps_staleness": 0, "training.slow_ranks": SLOW,
              **{k.replace("__", "."): v for k, v in SGD.items()}}
    job = Job(values, 3, out)
    env = {k: v for k, v in job.env.items() if mode == "insider" or k != SECRET_VARIABLE}
    rogue = subprocess.Popen([sys.executable, str(ROGUE), mode, f"127.0.0.1:{job.store.port}", "clusterlm-ps/0/",
                              str(_shard_size(values)), str(out / "metrics.jsonl")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    try:
        report, errors = rogue.communicate(timeout=TIMEOUT_S)
        job.wait()
    finally:
        rogue.kill()
        job.kill()
    assert rogue.returncode == 0, errors[-3000:]
    server_log = "".join(path.read_text() for path in out.glob("rank2.*.log"))
    return json.loads(report.splitlines()[-1]), records(out), server_log


def _assert_like_the_reference(out: Path, reference) -> None:
    """Finite weights, equal to those of the same job without the rogue (which equals one process)."""
    _, ref = reference(MICRO * 2, **SGD)
    weights = final_weights(out)
    for name, tensor in ref["weights"].items():
        assert weights[name].isfinite().all(), name
        if not name.endswith("attn.wk.bias"):
            assert (weights[name] - tensor).norm() <= 1e-5 * tensor.norm(), name


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_process_without_the_job_secret_can_neither_read_nor_push(data_dir, reference, tmp_path):
    """The rogue joins a running job four times (joins signed with a secret of its own, or not
    at all) to pull the parameters and to push a NaN gradient, a NaN learning rate and a wrong
    size: every join is refused before the server sends or reads anything, each refusal is
    counted and logged, and the job ends as it would have without the rogue."""
    report, metrics, server_log = _attack(data_dir, tmp_path, "outsider")
    assert set(report) == {"pull", "nan-gradient", "nan-lr", "wrong-shape"}
    assert all(outcome.startswith("failed") for outcome in report.values()), report
    train = [r for r in metrics if r["kind"] == "train"]
    assert train[-1]["step"] == STEPS and train[-1]["ps_refused_peers"] == 4 and train[-1]["ps_rejected_pushes"] == 0
    assert server_log.count("refused a peer: join") == 4, server_log[-3000:]
    _assert_like_the_reference(tmp_path, reference)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_a_worker_pushing_garbage_is_rejected_and_training_goes_on(data_dir, reference, tmp_path):
    """A process with the secret joins as worker 7 and pushes a NaN gradient, a NaN learning
    rate, a negative one, a short gradient (each rejected, its connection kept: it still reads
    the parameters), then one larger than the shard (rejected and disconnected). Each rejection
    names the worker and is counted; the job ends with the weights it would have had without it."""
    report, metrics, server_log = _attack(data_dir, tmp_path, "insider")
    assert report["proved"] and report["join"][-1]
    kept = ("nan-gradient", "nan-lr", "negative-lr", "short")
    assert [report[name][6] for name in kept] == [1, 2, 3, 4], report  # rejected pushes, as each reply counts them
    assert all(report[name][-1] for name in kept)  # finite parameters came back every time
    assert report["oversize"].startswith("closed"), report
    train = [r for r in metrics if r["kind"] == "train"]
    assert train[-1]["step"] == STEPS and train[-1]["ps_rejected_pushes"] == 5 and train[-1]["ps_refused_peers"] == 0
    assert server_log.count("rejected a push from worker 7") == 5, server_log[-3000:]
    _assert_like_the_reference(tmp_path, reference)
