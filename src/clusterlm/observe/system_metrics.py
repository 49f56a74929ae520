"""System figures of one rank, sampled with psutil (and NVML on a GPU) every log interval.

Network bytes are the host's (psutil has no per-process network counters); disk bytes are the
process's own reads and writes (the host's where the kernel does not report them per process).
Byte figures are cumulative; the exporter turns them into counters and JSONL keeps them raw.
"""

from __future__ import annotations

import psutil
import torch

SYSTEM_KEYS = (
    "cpu_percent",
    "rss_bytes",
    "net_recv_bytes",
    "net_sent_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "gpu_utilization",
    "gpu_memory_bytes",
)


class SystemSampler:
    def __init__(self, device: torch.device):
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first call starts the interval the next one measures
        self.gpu = device if device.type == "cuda" else None

    def sample(self) -> dict[str, float]:
        net = psutil.net_io_counters()
        try:
            disk = self.process.io_counters()
        except (psutil.AccessDenied, AttributeError):  # not reported per process here
            disk = psutil.disk_io_counters()
        values = {
            "cpu_percent": self.process.cpu_percent(None),
            "rss_bytes": float(self.process.memory_info().rss),
            "net_recv_bytes": float(net.bytes_recv),
            "net_sent_bytes": float(net.bytes_sent),
            "disk_read_bytes": float(disk.read_bytes),
            "disk_write_bytes": float(disk.write_bytes),
        }
        if self.gpu is not None:
            # torch maps the device to its NVML index (CUDA_VISIBLE_DEVICES) and imports pynvml
            # (nvidia-ml-py) only here, on a machine with a GPU.
            values["gpu_utilization"] = float(torch.cuda.utilization(self.gpu))
            values["gpu_memory_bytes"] = float(torch.cuda.device_memory_used(self.gpu))
        return values
