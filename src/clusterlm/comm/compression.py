"""Gradient compression around an all-reduce: none, fp16/bf16 casting, PowerSGD, top-k.

A compressor averages a flat gradient buffer over a group in place. ``reduce`` takes the shapes
of the gradients packed in the buffer (PowerSGD compresses each matrix on its own) and a key
naming the buffer across steps (a DDP bucket index), under which PowerSGD and top-k keep their
per-buffer memory. Each compressor counts the bytes it hands to the network per rank
(``stats``), so the compression ratio is uncompressed bytes / bytes sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from clusterlm.comm.allreduce import all_reduce


@dataclass
class CompressionStats:
    bytes_uncompressed: int = 0  # what a plain all-reduce of the same buffers would contribute
    # What this compressor contributed (per rank, before the algorithm's own factor).
    bytes_sent: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.bytes_uncompressed / self.bytes_sent if self.bytes_sent else 1.0

    def record(self, uncompressed: torch.Tensor, *sent: torch.Tensor) -> None:
        self.bytes_uncompressed += uncompressed.numel() * uncompressed.element_size()
        self.bytes_sent += sum(t.numel() * t.element_size() for t in sent)


class Compressor:
    """No compression: average the buffer with the chosen all-reduce algorithm."""

    def __init__(
        self,
        algorithm: str = "native",
        group: dist.ProcessGroup | None = None,
        **algorithm_options: Any,
    ):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.sum: Callable[[torch.Tensor], torch.Tensor] = partial(
            all_reduce, op="sum", algorithm=algorithm, group=group, **algorithm_options
        )
        self.stats = CompressionStats()

    def reduce(self, buffer: torch.Tensor, shapes: Sequence[torch.Size] = (), key: int = 0) -> None:
        self.stats.record(buffer, buffer)
        self.sum(buffer).div_(self.world_size)


class CastCompressor(Compressor):
    """Send in a 16-bit float type: cast, divide, sum with the algorithm, cast back.

    Dividing before the sum (as torch's fp16 hook does) keeps the fp16 sum from overflowing.
    """

    def __init__(self, dtype: torch.dtype, **kwargs: Any):
        super().__init__(**kwargs)
        self.dtype = dtype

    def reduce(self, buffer: torch.Tensor, shapes: Sequence[torch.Size] = (), key: int = 0) -> None:
        compressed = buffer.to(self.dtype).div_(self.world_size)
        self.stats.record(buffer, compressed)
        buffer.copy_(self.sum(compressed))


class ErrorFeedbackCompressor(Compressor):
    """Base for lossy compressors that add what the last compression dropped to the next input.

    The memory of a key is reset when its gradient shapes change (DDP rebuilds its buckets
    after the first step).
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.memory: dict[int, tuple[tuple[torch.Size, ...], dict[str, Any]]] = {}

    def memory_for(
        self, key: int, buffer: torch.Tensor, shapes: Sequence[torch.Size]
    ) -> dict[str, Any]:
        layout = (buffer.shape, *shapes)
        if key not in self.memory or self.memory[key][0] != layout:
            self.memory[key] = (layout, {"error": torch.zeros_like(buffer)})
        return self.memory[key][1]


class PowerSGDCompressor(ErrorFeedbackCompressor):
    """PowerSGD (Vogels et al. 2019), as torch's ``powerSGD_hook`` with error feedback and warm
    start.

    Each gradient with two or more dimensions, viewed as an n x m matrix M, is sent as
    P = M Q (n x r) and Q = M^T P (m x r) with P orthogonalized in between; the average is
    P Q^T / world_size. Q starts random (the same seed on every rank) and is reused next step
    (warm start). Vectors, and matrices too small to gain, travel uncompressed in the P
    all-reduce. Both all-reduces use the chosen algorithm.
    """

    def __init__(
        self, rank: int = 1, min_compression_rate: float = 2.0, seed: int = 0, **kwargs: Any
    ):
        super().__init__(**kwargs)
        if rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {rank}")
        self.rank = rank
        self.min_compression_rate = min_compression_rate
        self.generator = torch.Generator().manual_seed(seed)

    def reduce(self, buffer: torch.Tensor, shapes: Sequence[torch.Size] = (), key: int = 0) -> None:
        shapes = shapes or [buffer.shape]
        memory = self.memory_for(key, buffer, shapes)
        buffer += memory["error"]
        corrected = buffer.clone()
        matrices, dense = self._split(buffer, shapes)
        if "qs" not in memory:
            # Drawn on the CPU generator, so every rank and device starts from the same Q.
            memory["qs"] = [
                torch.randn(m.shape[1], r, generator=self.generator).to(m.device, m.dtype)
                for m, r in matrices
            ]
        qs = memory["qs"]

        p_message = _flatten(
            [m @ q for (m, _), q in zip(matrices, qs, strict=True)] + dense, buffer
        )
        self.sum(p_message)
        p_sums = _unflatten(
            p_message, [(m.shape[0], r) for m, r in matrices] + [d.shape for d in dense]
        )
        for piece, total in zip(dense, p_sums[len(matrices) :], strict=True):
            piece.copy_(total)
        ps = [_orthonormal_columns(p) for p in p_sums[: len(matrices)]]

        for q, (m, _), p in zip(qs, matrices, ps, strict=True):
            torch.matmul(m.t(), p, out=q)
        q_message = _flatten(qs, buffer)
        self.sum(q_message)
        for q, q_sum, (m, _), p in zip(
            qs, _unflatten(q_message, [q.shape for q in qs]), matrices, ps, strict=True
        ):
            q.copy_(q_sum)  # the warm start for the next step
            torch.matmul(p, q.t(), out=m)

        self.stats.record(buffer, p_message, q_message)
        buffer.div_(self.world_size)
        # What this rank's input lost to the compressed average (paper's e = delta - decompress).
        memory["error"] = corrected - buffer

    def _split(
        self, buffer: torch.Tensor, shapes: Sequence[torch.Size]
    ) -> tuple[list[tuple[torch.Tensor, int]], list[torch.Tensor]]:
        """(matrix view, its rank) for the gradients worth compressing; flat views of the rest."""
        matrices, dense = [], []
        for piece, shape in zip(buffer.split([math.prod(s) for s in shapes]), shapes, strict=True):
            rows = shape[0] if len(shape) >= 2 else 0
            cols = piece.numel() // rows if rows else 0
            r = min(self.rank, rows, cols)
            if r and rows * cols >= self.min_compression_rate * (rows + cols) * r:
                matrices.append((piece.view(rows, cols), r))
            else:
                dense.append(piece)
        return matrices, dense


class TopKCompressor(ErrorFeedbackCompressor):
    """Top-k sparsification with error feedback.

    Each rank sends its ``ratio`` largest-magnitude entries (values and int32 indices); a sparse
    exchange is an all-gather, not an all-reduce, so it uses the library's all-gather whatever
    the algorithm. The entries not sent are kept and added to the next step's gradient.
    """

    def __init__(self, ratio: float = 0.01, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < ratio <= 1:
            raise ValueError(f"top-k ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def reduce(self, buffer: torch.Tensor, shapes: Sequence[torch.Size] = (), key: int = 0) -> None:
        memory = self.memory_for(key, buffer, shapes)
        buffer += memory["error"]
        k = max(1, math.ceil(self.ratio * buffer.numel()))
        indices = buffer.abs().topk(k, sorted=False).indices
        values = buffer[indices]
        memory["error"] = buffer.clone().index_fill_(0, indices, 0)

        all_values = values.new_empty((self.world_size, k))
        all_indices = torch.empty((self.world_size, k), dtype=torch.int32, device=buffer.device)
        dist.all_gather(list(all_values), values, group=self.group)
        dist.all_gather(list(all_indices), indices.to(torch.int32), group=self.group)
        self.stats.record(buffer, values, all_indices[0])
        buffer.zero_().index_add_(0, all_indices.view(-1).long(), all_values.view(-1))
        buffer.div_(self.world_size)


def _orthonormal_columns(p: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR decomposition (in float32 for half precision)."""
    return torch.linalg.qr(p.float()).Q.to(p.dtype)


def _flatten(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else like.new_empty(0)


def _unflatten(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    return [
        part.view(shape)
        for part, shape in zip(flat.split([math.prod(s) for s in shapes]), shapes, strict=True)
    ]


COMPRESSIONS: dict[str, Callable[..., Compressor]] = {
    "none": Compressor,
    "fp16": partial(CastCompressor, torch.float16),
    "bf16": partial(CastCompressor, torch.bfloat16),
    "powersgd": PowerSGDCompressor,
    "topk": TopKCompressor,
}


def make_compressor(
    compression: str = "none",
    algorithm: str = "native",
    group: dist.ProcessGroup | None = None,
    compression_options: dict[str, Any] | None = None,
    **algorithm_options: Any,
) -> Compressor:
    """The compressor named ``compression``, reducing with ``algorithm`` over ``group``."""
    if compression not in COMPRESSIONS:
        raise ValueError(
            f"unknown compression {compression!r}; choose one of: {', '.join(COMPRESSIONS)}"
        )
    return COMPRESSIONS[compression](
        algorithm=algorithm, group=group, **(compression_options or {}), **algorithm_options
    )
