"""Jobs across network-namespace "nodes": each node runs its own `clusterlm train` launcher, the
rendezvous on node 0's address; and the data accounting of a run whose group changed size."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from .netns import NetworkNamespaces
from .training import BASE, MICRO

# Rendezvous timeouts for tests: a lost node is noticed within ~3 s (missed keep-alives), a
# group forms 3 s after its smallest size has joined, and a node that cannot complete a
# rendezvous (cut off from it) gives up after 40 s.
RDZV_CONF = "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=40,read_timeout=20"


def train_arguments(data_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """The layout tests' tiny run (tests/dist/training.py BASE) as command-line options."""
    values = {**BASE, "data.dir": str(data_dir), "training.out_dir": str(out_dir),
              "metrics.progress": "lines", "training.micro_batch_size": MICRO, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [item for key, value in values.items() for item in (f"--{key}", str(value).lower()
                                                               if isinstance(value, bool) else str(value))]


class Cluster:
    """Launchers on the nodes of ``net``; their output in ``logs/node<i>-<n>.log``."""

    def __init__(self, net: NetworkNamespaces, logs: Path, nnodes: str, nproc: int, arguments: list[str]) -> None:
        self.net, self.logs, self.nnodes, self.nproc, self.arguments = net, logs, nnodes, nproc, arguments
        self.port = random.randrange(20000, 60000)
        self.launchers: dict[int, subprocess.Popen] = {}
        self.started = time.monotonic()
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, node: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "clusterlm", "train", "--nproc", str(self.nproc), "--nnodes", self.nnodes,
                   "--rdzv-endpoint", f"{self.net.address(0)}:{self.port}", "--local-addr", self.net.address(node),
                   "--rdzv-id", "test", "--rdzv-conf", RDZV_CONF, *self.arguments]
        log = (self.logs / f"node{node}-{len(list(self.logs.glob(f'node{node}-*')))}.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.launchers[node] = self.net.popen(node, command, log, env)
        return self.launchers[node]

    def kill(self, node: int) -> None:
        self.net.kill_node(node, self.launchers[node])

    def wait(self, node: int, timeout: float) -> int:
        return self.launchers[node].wait(timeout=timeout)

    def output(self, node: int) -> str:
        return "\n".join(path.read_text() for path in sorted(self.logs.glob(f"node{node}-*.log")))

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def listening(self, node: int) -> set[str]:
        """The local addresses of every TCP socket listening in node's namespace (only the job's run there)."""
        result = subprocess.run(["ip", "netns", "exec", self.net.name(node), "ss", "-Hltn"], capture_output=True,
                                text=True, timeout=30)
        return {line.split()[3] for line in result.stdout.splitlines() if line.strip()}


def wait_for(condition: Callable[[], bool], timeout: float, what: str, cluster: Cluster | None = None) -> float:
    """Poll until ``condition`` holds; returns the seconds waited."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            tail = "" if cluster is None else cluster.output(0)[-3000:]
            raise AssertionError(f"no {what} within {timeout} s\n{tail}")
        time.sleep(0.2)
    return time.monotonic() - start


FILE = re.compile(r"from-step(\d+)-dp(\d+)-rank(\d+)\.jsonl")


def read_sample_logs(folder: Path) -> dict[tuple[int, int], dict[int, dict[int, list[int]]]]:
    """{(start step, dp size): {dp rank: {step: samples}}} from metrics.sample_log's files, in
    the order the groups ran (by start step, then by when they wrote)."""
    groups: dict[tuple[int, int], dict[int, dict[int, list[int]]]] = defaultdict(dict)
    written: dict[tuple[int, int], float] = defaultdict(float)
    for path in folder.glob("*.jsonl"):
        start, size, rank = map(int, FILE.fullmatch(path.name).groups())
        records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        groups[(start, size)][rank] = {r["step"]: r["samples"] for r in records}
        written[(start, size)] = max(written[(start, size)], path.stat().st_mtime)
    return {key: groups[key] for key in sorted(groups, key=lambda key: (key[0], written[key]))}


def committed_steps(folder: Path, steps: int) -> tuple[list[tuple[int, int, list[int]]], int]:
    """The run's committed history: for each step 1..steps, (step, dp size, the samples all ranks
    read), from the group that last ran it (a group that restarted from step S replaces every
    later step of earlier groups); and how many steps were computed and then thrown away."""
    groups = read_sample_logs(folder)
    order = list(groups)  # later groups resumed from later (or the same) checkpoints
    history, computed = [], 0
    for index, (start, size) in enumerate(order):
        end = order[index + 1][0] if index + 1 < len(order) else steps
        ranks = groups[(start, size)]
        assert sorted(ranks) == list(range(size)), f"group from step {start} on {size} ranks: logs of {sorted(ranks)}"
        computed += max(len(per_step) for per_step in ranks.values())
        for step in range(start + 1, end + 1):
            samples = [i for rank in range(size) for i in ranks[rank].get(step, [])]
            history.append((step, size, samples))
    return history, computed - steps
