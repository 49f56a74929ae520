"""Small values shared between ranks as JSON: torch's object collectives
(``broadcast_object_list``, ``all_gather_object``) pickle, and unpickling what another process
sent can run code. Here a value travels as its JSON text in a byte tensor, so a rank receives
only numbers, strings, lists and dicts."""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist


def _device() -> torch.device:
    """Where the default group's collectives take tensors: NCCL's on this rank's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(value: Any, device: torch.device) -> torch.Tensor:
    text = json.dumps(value, allow_nan=True).encode()
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(device)


def _decode(data: torch.Tensor) -> Any:
    return json.loads(data.cpu().numpy().tobytes().decode())


def broadcast_json(value: Any, src: int = 0) -> Any:
    """``src``'s ``value`` on every rank (other ranks' ``value`` is ignored): a JSON value, so
    tuples come back as lists."""
    if not dist.is_initialized():
        return value
    device = _device()
    data = _encode(value, device) if dist.get_rank() == src else None
    size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if data is None:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=src)
    return _decode(data)


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    device = _device()
    data = _encode(value, device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = int(max(size.item() for size in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [_decode(rows[: int(size.item())]) for rows, size in zip(gathered, sizes, strict=True)]
