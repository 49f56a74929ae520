"""The exporter against the real Prometheus server (Debian's ``prometheus``).

A private server, started with a generated scrape config (scrape_interval 1s, the exporter as
the one target) and its storage under the test's temporary directory, scrapes a 2-process
training run. The test polls the exporter itself, noting when each series is first exposed, and
the server's HTTP API (``/api/v1/query``), noting when it is first visible there: every
exported series must be visible within two scrape intervals. The server is stopped by its pid,
also when the test fails. Without the package the test skips with the reason (fails with
CI=true); ``make test`` installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from clusterlm.cli import main as cli
from clusterlm.observe.prometheus import exported_names

SCRAPE_S = 1.0
TINY = [
    "--model.n_layer",
    "2",
    "--model.n_head",
    "2",
    "--model.n_embd",
    "32",
    "--model.block_size",
    "16",
    "--training.micro_batch_size",
    "2",
    "--training.eval_interval",
    "0",
    "--metrics.progress",
    "none",
    "--metrics.tensorboard",
    "false",
    "--metrics.plot",
    "false",
    "--metrics.peak_flops",
    "1e12",
]
NEVER_EXPOSED = {
    "clusterlm_system_gpu_utilization_percent",
    "clusterlm_system_gpu_memory_bytes",
    "clusterlm_moe_load_imbalance",
    "clusterlm_moe_aux_loss",
}  # CPU only here, and a dense model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return None


@pytest.fixture
def prometheus(tmp_path):
    """(server URL, exporter port): a private Prometheus scraping 127.0.0.1:<exporter port>."""
    binary = shutil.which("prometheus")
    if binary is None:
        reason = "needs the Debian package prometheus (make test installs it when run as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    exporter_port, port = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {  # YAML is a superset of JSON
                "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": f"{SCRAPE_S:g}s"},
                "scrape_configs": [
                    {
                        "job_name": "clusterlm",
                        "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                    }
                ],
            }
        )
    )
    log = open(tmp_path / "prometheus.log", "w")
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _get(f"{url}/-/ready") is None:
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready in 60 s"
            time.sleep(0.2)
        yield url, exporter_port
    finally:
        os.kill(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, 9)
            server.wait()
        log.close()


def _exposed(text: str) -> set[str]:
    names = {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line.startswith("clusterlm_")
    }
    return {name for name in names if not name.endswith("_created")}


def _visible(url: str) -> set[str]:
    """The clusterlm series names the server can answer a query for now."""
    answer = _get(
        f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": '{__name__=~"clusterlm_.*"}'})
    )
    return (
        {series["metric"]["__name__"] for series in json.loads(answer)["data"]["result"]}
        if answer
        else set()
    )


def test_every_exported_metric_reaches_prometheus_within_two_scrapes(prometheus, tmp_path):
    url, exporter_port = prometheus
    (tmp_path / "a.txt").write_text("".join(f"all the world's a stage {i}\n" for i in range(2000)))
    data_dir = tmp_path / "data"
    assert cli(["prepare", str(tmp_path / "a.txt"), "--out", str(data_dir), "--workers", "1"]) == 0
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clusterlm",
            "train",
            "--nproc",
            "2",
            "--data.dir",
            str(data_dir),
            "--training.out_dir",
            str(tmp_path / "run"),
            "--training.steps",
            "100000",
            "--training.log_interval",
            "2",
            "--metrics.prometheus_port",
            str(exporter_port),
            "--metrics.system",
            "true",
            *TINY,
            "--parallel.load_balance",
            "true",
            "--training.tokens_per_step",
            "128",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "train.log", "w"),
        start_new_session=True,
    )
    expected = exported_names() - NEVER_EXPOSED
    exposed_at: dict[str, float] = {}
    visible_at: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not expected <= set(visible_at):
            assert job.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            now = time.monotonic()
            for name in _exposed(_get(f"http://127.0.0.1:{exporter_port}/metrics") or ""):
                exposed_at.setdefault(name, now)
            for name in _visible(url):
                visible_at.setdefault(name, time.monotonic())
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, 15)
        job.wait(timeout=60)
    assert set(exposed_at) == expected
    late = {
        name: round(visible_at.get(name, float("inf")) - exposed_at[name], 2) for name in exposed_at
    }
    assert all(delay <= 2 * SCRAPE_S for delay in late.values()), late
