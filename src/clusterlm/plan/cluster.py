"""What a cluster is to the planner: nodes of identical devices joined by two kinds of links.

Presets are TOML files in ``configs/clusters/`` (``--cluster 8xH100``); any other file can be
given by path. ``cpu`` is this machine, measured: a short matmul probe for peak FLOP/s and the
physical memory from ``os.sysconf``. File format (units in the key names)::

    name = "8xH100"
    nodes = 1
    devices_per_node = 8
    [device]
    name = "H100 SXM 80GB"
    memory_gib = 80
    reserved_gib = 1.5                       # CUDA context, NCCL buffers, allocator slack
    peak_tflops = { bf16 = 989, fp16 = 989, fp32 = 67 }
    [intra_node]                             # per device, one direction
    bandwidth_gb_s = 450
    latency_us = 3
    [inter_node]                             # per device (one NIC per device), one direction
    bandwidth_gb_s = 50
    latency_us = 10
    [host]                                   # for CPU offload; leave out where there is none
    memory_gib = 2048
    link_gb_s = 50                           # device <-> host (PCIe) per device
    adam_params_per_s = 2e9                  # CPU optimizer throughput of one node
    [calibration]                            # optional, see clusterlm.plan.calibration
    compute_efficiency = 0.55
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from clusterlm.errors import UserError
from clusterlm.hardware import cpu_model_name, cpu_peak_flops
from clusterlm.plan.calibration import Calibration

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIRS = (
    Path("configs/clusters"),
    Path(__file__).resolve().parents[3] / "configs" / "clusters",
)
GB, GIB = 1e9, 2**30


@dataclass(frozen=True)
class ExchangeWaits:
    """Seconds an exchange among a group of processes costs beyond its bytes where they share
    cores (``bench/exchange_probe.py``): the wait for the peers to be scheduled and arrive."""

    posted: float  # a ring hop posted before a block of work and waited on after it
    after: float  # a ring hop posted and waited on after a block of work
    all_to_all: float  # an all-to-all after a block of work
    chained: float  # a ring hop posted and waited on right after another one's wait


@dataclass(frozen=True)
class Link:
    """Alpha-beta link: a message of n bytes takes ``latency + n / bandwidth`` seconds."""

    bandwidth: float  # bytes/s, per device, one direction
    latency: float  # seconds
    waits: ExchangeWaits | None = None  # measured; None: each message waits the latency

    def exchange_waits(self, group_size: int) -> ExchangeWaits:
        if self.waits is not None:
            return self.waits
        return ExchangeWaits(
            self.latency, self.latency, (group_size - 1) * self.latency, self.latency
        )


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    peak_flops: dict[str, float]  # precision name -> dense FLOP/s
    reserved_bytes: float = 0.0  # runtime context and allocator slack, never available
    # Share of a CPU core that drives each device; host-side costs are divided by it (below 1
    # only when processes outnumber cores, as on a CPU machine running several ranks).
    host_share: float = 1.0
    # Measured FLOP/s per precision of the step's "linear" layers and "attention" core at its own
    # shapes (``clusterlm.bench.kernels``; a CPU probed by ``plan --validate``); empty: the peak.
    kernel_rates: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Host:
    """The CPU side of a node, used by optimizer-state offload."""

    memory_bytes: float
    link: Link  # device <-> host, per device
    adam_params_per_s: float  # parameters the node's CPUs update per second


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    devices_per_node: int
    device: Device
    intra_node: Link
    inter_node: Link
    host: Host | None = None
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def with_nodes(self, nodes: int) -> Cluster:
        if nodes <= 0:
            raise UserError(f"--nodes must be positive, got {nodes}")
        return replace(self, nodes=nodes)


def _number(
    table: dict[str, Any], key: str, where: str, minimum: float = 0.0, strict: bool = True
) -> float:
    if key not in table:
        raise UserError(f"{where}: missing key {key!r}")
    value = table[key]
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise UserError(f"{where}: {key} must be a number {relation} {minimum:g}, got {value!r}")
    return float(value)


def _table(tree: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = tree.get(key)
    if not isinstance(value, dict):
        raise UserError(f"{where}: missing [{key}] table")
    return value


def _link(tree: dict[str, Any], key: str, where: str) -> Link:
    table = _table(tree, key, where)
    return Link(
        bandwidth=_number(table, "bandwidth_gb_s", f"{where} [{key}]") * GB,
        latency=_number(table, "latency_us", f"{where} [{key}]", strict=False) * 1e-6,
    )


def cluster_from_mapping(tree: dict[str, Any], source: str) -> Cluster:
    """Build and validate a cluster; every bad value names its key and the file."""
    device = _table(tree, "device", source)
    peaks = device.get("peak_tflops")
    if not isinstance(peaks, dict) or not peaks:
        raise UserError(
            f"{source} [device]: peak_tflops must be a table like {{ bf16 = 989, fp32 = 67 }}"
        )
    where = f"{source} [device]"
    host = None
    if "host" in tree:
        table = _table(tree, "host", source)
        host = Host(
            memory_bytes=_number(table, "memory_gib", f"{source} [host]") * GIB,
            link=Link(_number(table, "link_gb_s", f"{source} [host]") * GB, 0.0),
            adam_params_per_s=_number(table, "adam_params_per_s", f"{source} [host]"),
        )
    nodes = _number(tree, "nodes", source, minimum=1, strict=False)
    per_node = _number(tree, "devices_per_node", source, minimum=1, strict=False)
    if not (nodes.is_integer() and per_node.is_integer()):
        raise UserError(f"{source}: nodes and devices_per_node must be whole numbers")
    return Cluster(
        name=str(tree.get("name", Path(source).stem)),
        nodes=int(nodes),
        devices_per_node=int(per_node),
        device=Device(
            name=str(device.get("name", "device")),
            memory_bytes=_number(device, "memory_gib", where) * GIB,
            peak_flops={str(k): _number(peaks, k, f"{where} peak_tflops") * 1e12 for k in peaks},
            reserved_bytes=_number(device, "reserved_gib", where, strict=False) * GIB
            if "reserved_gib" in device
            else 0.0,
        ),
        intra_node=_link(tree, "intra_node", source),
        inter_node=_link(tree, "inter_node", source),
        host=host,
        calibration=Calibration.from_mapping(
            tree.get("calibration", {}), f"{source} [calibration]"
        ),
    )


def preset_names() -> list[str]:
    names = {p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.toml")}
    return sorted(names | {"cpu"})


def load_cluster(name_or_path: str) -> Cluster:
    """A preset name (``8xH100``, ``cpu``) or a path to a cluster TOML file."""
    if name_or_path == "cpu":
        return probe_cpu_cluster()
    candidates = [Path(name_or_path)] + [d / f"{name_or_path}.toml" for d in PRESET_DIRS]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(
            f"cluster {name_or_path!r} not found; "
            f"use a TOML path or one of: {', '.join(preset_names())}"
        )
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: invalid TOML ({err})") from None
    return cluster_from_mapping(tree, str(path))


def physical_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def probe_cpu_cluster() -> Cluster:
    """This machine as a one-device cluster: peaks from the cached matmul probe (bf16 also stands
    in for fp16), memory from the OS. Links are nominal: shared memory between processes on the
    node, 10 Gb/s Ethernet between nodes. The CPU is the device, so there is no offload host."""
    fp32, bf16 = cpu_peak_flops(torch.float32), cpu_peak_flops(torch.bfloat16)
    return Cluster(
        name="cpu",
        nodes=1,
        devices_per_node=1,
        device=Device(
            name=f"CPU {cpu_model_name()} ({torch.get_num_threads()} threads)",
            memory_bytes=physical_memory_bytes(),
            peak_flops={"fp32": fp32, "bf16": bf16, "fp16": bf16},
            reserved_bytes=0.5 * GIB,
        ),
        intra_node=Link(bandwidth=5 * GB, latency=20e-6),
        inter_node=Link(bandwidth=1.25 * GB, latency=50e-6),
    )
