"""Foreground daemons of a private system under test, each a child of this process with its log
under the system's temporary directory, waited on until ready and stopped by the pids started
here (never by name)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Daemons:
    """The processes of ``system`` (a name for messages), logging to ``root/<name>.log``."""

    system: str
    root: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it open
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, name: str) -> None:
        """Daemon ``name`` dies at once (SIGKILL), as in a crash."""
        process = self.processes.pop(name)
        process.kill()
        process.wait(timeout=30)

    def wait(self, ready: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
        """Until ``ready()``; raises with the log of a daemon that exited meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = (self.root / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.system} {name} exited ({process.returncode}): {log}")
            try:
                if ready():
                    return
            except subprocess.CalledProcessError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.system}: waited {timeout_s} s for {what}")

    def stop(self, first: Iterable[str] = ()) -> None:
        """The daemons named in ``first``, then the others in the reverse order of their start:
        SIGTERM, and SIGKILL for one still there after 20 s."""
        order = [*first, *reversed([n for n in self.processes if n not in first])]
        for process in (self.processes.pop(name, None) for name in order):
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
