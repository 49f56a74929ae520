"""Several "nodes" on one machine: Linux network namespaces joined by veth pairs on a bridge.

``NetworkNamespaces(n)`` makes namespaces ``clmnet-<pid>-<tag>-n0 .. n<n-1>``, each with a veth
``eth0`` at 10.213.X.(i+1)/24 (X random per fixture), and a bridge in its own namespace
``...-br`` joining them. Nothing is added to the machine's own network namespace. ``close()``
kills what still runs inside the namespaces (processes the test started) and deletes them; stale
namespaces of earlier runs whose process is gone are removed first.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

import pytest

FAMILY = "clmnet-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def skip_or_fail(reason: str) -> None:
    """Without permission the test skips with the reason; under CI=true that is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"network namespaces unavailable under CI=true: {reason}")
    pytest.skip(reason)


def _kill_inside(name: str) -> None:
    """Every process in namespace ``name``: only processes this fixture's test started there."""
    for pid in _ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete(name: str) -> None:
    _kill_inside(name)
    _ip("netns", "del", name, check=False)


def remove_stale() -> None:
    """Namespaces of this family whose creating process no longer exists."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(FAMILY):
            continue
        owner = name[len(FAMILY):].split("-")[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            _delete(name)


@dataclass
class NetworkNamespaces:
    nodes: int
    prefix: str = field(init=False)
    subnet: str = field(init=False)
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.prefix = f"{FAMILY}{os.getpid()}-{random.randrange(16**4):04x}"
        self.subnet = f"10.213.{random.randrange(1, 255)}"

    def name(self, node: int) -> str:
        return f"{self.prefix}-n{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node + 1}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    def create(self) -> None:
        if os.geteuid() != 0:
            skip_or_fail("network namespaces need root (ip netns add)")
        if shutil.which("ip") is None:
            skip_or_fail("the ip command (iproute2) is missing; `make iproute2` installs it")
        remove_stale()
        try:
            self._add(self.bridge)
        except (OSError, subprocess.CalledProcessError) as exc:
            skip_or_fail(f"ip netns add is not permitted here: {getattr(exc, 'stderr', exc)}".strip())
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for node in range(self.nodes):
            ns = self.name(node)
            self._add(ns)
            _ip("-n", self.bridge, "link", "add", f"p{node}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.bridge, "link", "set", f"p{node}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _add(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)

    def set_link(self, node: int, up: bool) -> None:
        """Cut (or restore) a node's only link: a network partition."""
        _ip("-n", self.name(node), "link", "set", "eth0", "up" if up else "down")

    def popen(self, node: int, command: list[str], log, env: dict[str, str]) -> subprocess.Popen:
        """``command`` inside node's namespace, in its own process group. (`clusterlm train
        --local-addr` puts gloo on the veth that holds the address.)"""
        return subprocess.Popen(["ip", "netns", "exec", self.name(node), *command], stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill_node(self, node: int, launcher: subprocess.Popen, wait_s: float = 30) -> None:
        """A node lost: its launcher's process group, then whatever else runs in its namespace
        (torchrun starts workers in sessions of their own)."""
        kill_group(launcher, wait_s=wait_s)
        _kill_inside(self.name(node))

    def close(self) -> None:
        for name in reversed(self.created):
            _delete(name)
        self.created.clear()


def kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL, wait_s: float = 30) -> None:
    """A node's launcher and its workers, by the launcher's process group."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
