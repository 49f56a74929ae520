"""A private MooseFS cluster for tests: a master and three chunkservers, every file stored twice
(goal 2), mounted with FUSE.

MooseFS maps one-to-one onto a distributed file system's name node and data nodes. Chunkservers
refuse loopback addresses, so the cluster runs in a network namespace of its own
(``clmmfs-<pid>-<tag>``) with a /32 address on its ``lo``, which also gives it its own ports. Every
daemon runs in the foreground as a child of this process, with its configuration and data under
one temporary directory; ``mfsmount`` and the ``mfs*`` tools enter only the namespace's network
(``nsenter --net``), so the mount is seen from the machine's own mount namespace. ``stop`` ends
the processes by the pids started here, unmounts, deletes the namespace and the directory.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from private_daemons import Daemons
from private_slurm import require_real_system

MOOSEFS_COMMANDS = ("mfsmaster", "mfschunkserver", "mfsmount", "mfssetgoal", "nsenter", "ip")
CHUNKSERVERS = 3
GOAL = 2
CLIENT_PORT, CHUNKSERVER_PORT = 9421, 9420
EMPTY_METADATA = Path("/var/lib/mfs/metadata.mfs.empty")
FAMILY = "clmmfs-"


def remove_stale() -> None:
    """Namespaces of earlier clusters whose test process is gone (killed before its cleanup)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for name in (line.split()[0] for line in listing.stdout.splitlines() if line.strip()):
        owner = name.removeprefix(FAMILY).split("-")[0]
        if name.startswith(FAMILY) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def _config(path: Path, **settings: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    return path


@dataclass
class MooseFS:
    """The cluster under ``root``; ``mount`` is where its file system appears once started."""

    root: Path
    namespace: str = field(init=False)
    address: str = field(init=False)
    daemons: Daemons = field(init=False)

    def __post_init__(self) -> None:
        self.daemons = Daemons("MooseFS", self.root)
        self.namespace = f"{FAMILY}{os.getpid()}-{random.randrange(16**4):04x}"
        self.address = f"10.214.{random.randrange(1, 255)}.{random.randrange(1, 255)}"

    @property
    def mount(self) -> Path:
        return self.root / "mnt"

    def start(self) -> None:
        require_real_system("MooseFS", MOOSEFS_COMMANDS)
        remove_stale()
        subprocess.run(["ip", "netns", "add", self.namespace], check=True, timeout=30)
        self._ip("link", "set", "lo", "up")
        self._ip("addr", "add", f"{self.address}/32", "dev", "lo")
        self._start_master()
        for index in range(CHUNKSERVERS):
            self._start_chunkserver(index)
        self.daemons.wait(self._chunkservers_connected, "three chunkservers to register")
        self.mount.mkdir()
        self._start(
            "mount",
            ["mfsmount", "-f", str(self.mount), "-H", self.address, "-P", str(CLIENT_PORT)],
        )
        self.daemons.wait(lambda: os.path.ismount(self.mount), "the FUSE mount")
        self.tool("mfssetgoal", "-r", str(GOAL), str(self.mount))

    def tool(self, *command: str) -> str:
        """An ``mfs*`` tool, run in the cluster's network namespace: its output."""
        return subprocess.run(
            self._in_namespace(list(command)),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout

    def kill_chunkserver(self, index: int) -> None:
        """Chunkserver ``index`` dies (SIGKILL): its copies are gone, the other copy remains."""
        self.daemons.kill(f"chunkserver{index}")

    def restart_chunkserver(self, index: int) -> None:
        """Chunkserver ``index`` back, with the chunks it held; returns once it has registered."""
        self._start_chunkserver(index)
        self.daemons.wait(self._chunkservers_connected, f"chunkserver {index} to register again")

    def drop_cached_pages(self, directory: Path) -> None:
        """Make the next reads of the files in ``directory`` go to the chunkservers."""
        for path in directory.iterdir():
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def stop(self) -> None:
        """Everything started here, by pid, then the mount, the namespace and the directory."""
        self.daemons.stop(first=["mount"])  # the client first
        if os.path.ismount(self.mount):
            subprocess.run(["umount", "-l", str(self.mount)], check=False, timeout=30)
        subprocess.run(["ip", "netns", "del", self.namespace], check=False, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)

    def _start_master(self) -> None:
        data = self.root / "master"
        data.mkdir(parents=True)
        shutil.copy(EMPTY_METADATA, data / "metadata.mfs")
        exports = data / "mfsexports.cfg"
        exports.write_text("*  /  rw,alldirs,admin,maproot=0:0\n")
        config = _config(
            data / "mfsmaster.cfg",
            WORKING_USER="root",
            WORKING_GROUP="root",
            DATA_PATH=data,
            EXPORTS_FILENAME=exports,
            TOPOLOGY_FILENAME=data / "mfstopology.cfg",
            REPLICATIONS_DELAY_INIT=0,
            MATOML_LISTEN_HOST=self.address,
            MATOCS_LISTEN_HOST=self.address,
            MATOCL_LISTEN_HOST=self.address,
        )
        (data / "mfstopology.cfg").write_text("")
        self._start("master", ["mfsmaster", "-f", "-c", str(config)])
        self.daemons.wait(lambda: self._listening(CLIENT_PORT), "the master")

    def _start_chunkserver(self, index: int) -> None:
        data = self.root / f"chunkserver{index}"
        (data / "hdd").mkdir(parents=True, exist_ok=True)
        hdd = data / "mfshdd.cfg"
        hdd.write_text(f"{data / 'hdd'}\n")
        config = _config(
            data / "mfschunkserver.cfg",
            WORKING_USER="root",
            WORKING_GROUP="root",
            DATA_PATH=data,
            HDD_CONF_FILENAME=hdd,
            HDD_LEAVE_SPACE_DEFAULT="64MiB",
            MASTER_HOST=self.address,
            MASTER_PORT=CHUNKSERVER_PORT,
            BIND_HOST=self.address,
            CSSERV_LISTEN_HOST=self.address,
            CSSERV_LISTEN_PORT=9422 + index,
        )
        self._start(f"chunkserver{index}", ["mfschunkserver", "-f", "-c", str(config)])

    def _chunkservers_connected(self) -> bool:
        listing = self.tool("mfscli", "-H", self.address, "-P", str(CLIENT_PORT), "-SCS", "-s,")
        return sum(self.address in line for line in listing.splitlines()) >= CHUNKSERVERS

    def _start(self, name: str, command: list[str]) -> None:
        self.daemons.start(name, self._in_namespace(command))

    def _in_namespace(self, command: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.namespace}", *command]

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.namespace, *args], check=True, timeout=30)

    def _listening(self, port: int) -> bool:
        probe = f"import socket; socket.create_connection(('{self.address}', {port}), 1)"
        return (
            subprocess.run(
                self._in_namespace(["python3", "-c", probe]),
                check=False,
                capture_output=True,
                timeout=30,
            ).returncode
            == 0
        )
