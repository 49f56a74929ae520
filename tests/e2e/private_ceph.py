"""A private Ceph cluster for tests: one monitor, a manager, three OSDs keeping objects in memory
(memstore), every object stored twice (pool size 2, min_size 1, so one OSD may die), and radosgw
serving S3 on 127.0.0.1.

Every daemon runs in the foreground as a child of this process; its configuration, data, sockets,
logs (the monitor's cluster log too) and keyrings are under one temporary directory, its ports
are free ones. Authentication between the daemons is off (``auth ... required = none``), which
also needs the messenger's crc mode, else radosgw waits minutes for the monitor; S3 clients
still sign their requests with the key pair of a user made with ``radosgw-admin``. ``stop`` ends
the processes by the pids started here and deletes the directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from private_daemons import Daemons
from private_slurm import free_port, require_real_system

CEPH_COMMANDS = ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "ceph", "radosgw-admin")
OSDS = 3
MESSENGER_ROLES = ("mon client", "mon cluster", "mon service", "cluster", "service", "client")
ACCESS_KEY, SECRET_KEY = "clusterlm-test", "clusterlm-test-secret"


@dataclass
class Ceph:
    """The cluster under ``root``; ``endpoint`` serves S3 once started, for the key pair in
    ``credentials``."""

    root: Path
    daemons: Daemons = field(init=False)
    mon_port: int = field(default_factory=free_port)
    s3_port: int = field(default_factory=free_port)
    osd_uuids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.daemons = Daemons("Ceph", self.root)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def credentials(self) -> dict[str, str]:
        """The standard AWS variables that point S3 clients at this cluster."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    def start(self) -> None:
        require_real_system("Ceph", CEPH_COMMANDS)
        self._write_conf()
        monmap = self.root / "monmap"
        fsid = self._conf_value("fsid")
        self._run(
            "monmaptool", "--create", "--add", "a", self._mon_address, "--fsid", fsid, str(monmap)
        )
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "-c", str(self.conf))
        self.daemons.start("mon", ["ceph-mon", "-f", "-i", "a", "-c", str(self.conf)])
        self.daemons.start("mgr", ["ceph-mgr", "-f", "-i", "x", "-c", str(self.conf)])
        for _ in range(OSDS):
            index = int(self.ceph("osd", "new", osd_uuid := str(uuid.uuid4())))
            self.osd_uuids[index] = osd_uuid
            self._start_osd(index)
        self.daemons.wait(lambda: self._osds_up() == OSDS, f"{OSDS} OSDs to be up")
        self.start_gateway()
        self._run(
            "radosgw-admin",
            "-c",
            str(self.conf),
            "user",
            "create",
            "--uid",
            "clusterlm",
            "--display-name",
            "clusterlm tests",
            "--access-key",
            ACCESS_KEY,
            "--secret-key",
            SECRET_KEY,
        )

    def ceph(self, *args: str) -> str:
        """A ``ceph`` command against this cluster: its output."""
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "30", *args)

    def create_bucket(self, name: str) -> str:
        """A new bucket (with boto3: s3fs's mkdir sends a location constraint radosgw refuses);
        returns its URL."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def start_gateway(self) -> None:
        """radosgw, started; returns once it answers."""
        self.daemons.start("rgw", ["radosgw", "-f", "-n", "client.rgw", "-c", str(self.conf)])
        self.daemons.wait(self._s3_answers, "radosgw to answer", timeout_s=120)

    def kill_gateway(self) -> None:
        """radosgw dies (SIGKILL): the store stops answering, its objects stay."""
        self.daemons.kill("rgw")

    def kill_osd(self, index: int) -> None:
        """OSD ``index`` dies (SIGKILL): the objects it held in memory are gone, their other
        copies remain."""
        self.daemons.kill(f"osd{index}")

    def replace_osd(self, index: int) -> None:
        """A new, empty OSD in place of the dead one ``index`` (as after a disk swap): it refills
        from the other copies; returns once it is up."""
        shutil.rmtree(self.root / f"osd/ceph-{index}")
        self._start_osd(index)
        self.daemons.wait(lambda: self._osds_up() == OSDS, f"OSD {index} to be up again")

    def stop(self) -> None:
        """Everything started here, by pid (the gateway first, the monitor last), then the
        directory."""
        self.daemons.stop(first=["rgw"])
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def _mon_address(self) -> str:
        return f"v2:127.0.0.1:{self.mon_port}"

    def _write_conf(self) -> None:
        root = self.root
        for folder in ("run", "log", "mon", "mgr/ceph-x", "osd", "rgw"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        settings = {
            "fsid": uuid.uuid4(),
            "mon host": self._mon_address,
            "mon initial members": "a",
            "public addr": "127.0.0.1",
            "ms bind msgr1": "false",
            **{f"auth {kind} required": "none" for kind in ("cluster", "service", "client")},
            **{f"ms {kind} mode": "crc" for kind in MESSENGER_ROLES},
            "run dir": root / "run",
            "admin socket": root / "run/$name.asok",
            "log file": root / "log/$name.log",
            "mon cluster log file": root / "log/cluster.log",
            "crash dir": root / "crash",
            "pid file": root / "run/$name.pid",
            "mon data": root / "mon/$cluster-$id",
            "mgr data": root / "mgr/$cluster-$id",
            "osd data": root / "osd/$cluster-$id",
            "rgw data": root / "rgw",
            "keyring": root / "$name.keyring",
            "mon data avail warn": 1,
            "mon warn on insecure global id reclaim allowed": "false",
            "osd objectstore": "memstore",
            "memstore device bytes": 1 << 30,
            "osd pool default size": 2,
            "osd pool default min size": 1,
            "osd pool default pg num": 8,
            "osd pool default pgp num": 8,
            "osd pool default pg autoscale mode": "off",
            "osd crush chooseleaf type": 0,  # one host: the two copies on two OSDs
            "mon warn on pool no redundancy": "false",
            # A dead OSD is noticed in seconds, so reads go to the other copy soon.
            "osd heartbeat interval": 1,
            "osd heartbeat grace": 4,
            "rgw frontends": f"beast endpoint=127.0.0.1:{self.s3_port}",
        }
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self.conf.write_text("[global]\n" + lines)

    def _conf_value(self, key: str) -> str:
        prefix = f"{key} = "
        lines = self.conf.read_text().splitlines()
        return next(line[len(prefix) :] for line in lines if line.startswith(prefix))

    def _start_osd(self, index: int) -> None:
        (self.root / f"osd/ceph-{index}").mkdir(parents=True)
        self._run(
            "ceph-osd",
            "-c",
            str(self.conf),
            "-i",
            str(index),
            "--mkfs",
            "--osd-uuid",
            self.osd_uuids[index],
        )
        self.daemons.start(
            f"osd{index}", ["ceph-osd", "-f", "-i", str(index), "-c", str(self.conf)]
        )

    def _osds_up(self) -> int:
        return json.loads(self.ceph("osd", "stat", "-f", "json"))["num_up_osds"]

    def _s3_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def _run(self, *command: str) -> str:
        return subprocess.run(
            command, capture_output=True, text=True, check=True, timeout=120
        ).stdout
