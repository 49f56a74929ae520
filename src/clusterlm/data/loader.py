"""Deterministic, rank-aware, resumable batches from prepared token shards.

A split's shards form one token stream of N tokens, cut into W = (N - 1) // block_size windows
that start at k * block_size and hold block_size + 1 tokens (x is the first block_size, y the
last). Sample i of a run is window ``order(i // W)[i % W]``, where ``order(e)`` is a permutation of
range(W) seeded by (seed, e) (a mixture of datasets orders its samples itself:
``clusterlm.data.mixture``). A training step consumes the next G = micro_batch_size * grad_accum
* dp_size samples; rank r at micro-step m takes samples
``counter + m * micro_batch_size * dp_size + r * micro_batch_size + [0, micro_batch_size)``.
So the loader's state is one integer, ranks read disjoint parts of every global batch, and their
union is what a single process with micro_batch_size * dp_size would read.

Load balancing (``assign``) changes only who reads what: the step's G samples form
grad_accum * dp_size micro-batches, micro-batch k holding samples ``counter + k * micro_batch_size
+ [0, micro_batch_size)``, and they are dealt to the ranks in micro-step order, each rank taking
as many as the assignment gives it (``micro_batch_slots``). Equal counts deal exactly the layout
above, and every step consumes the same samples whatever the assignment.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from clusterlm.data.manifest import load_manifest
from clusterlm.data.shard_cache import CacheSettings, ShardCache, StoreStats, StoreStream
from clusterlm.data.storage import is_local, join, url_to_fs
from clusterlm.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


class SampleStream(Protocol):
    """What a loader draws samples from: a split's token windows (``TokenStream``) or a labelled
    task's examples (``clusterlm.data.classification.ExampleStream``)."""

    def num_windows(self, block_size: int) -> int: ...

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch: ...


@runtime_checkable
class OrderedStream(SampleStream, Protocol):
    """A stream that orders its own samples: global sample i reads item ``sample_order(seed,
    block_size)(i)`` (a mixture of datasets, ``clusterlm.data.mixture``) instead of the loader's
    shuffled epochs."""

    def sample_order(self, seed: int, block_size: int) -> Callable[[int], int]: ...


class EpochOrder:
    """Sample i reads item ``order(i // n)[i % n]`` of n items, ``order(e)`` a permutation of
    range(n) seeded by (*key, e): every item once per epoch, each epoch shuffled anew."""

    def __init__(self, items: int, *key: int) -> None:
        self.items = items
        self._key = key
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def __call__(self, sample: int) -> int:
        epoch, position = divmod(sample, self.items)
        if epoch != self._epoch:
            self._order = np.random.default_rng([*self._key, epoch]).permutation(self.items)
            self._epoch = epoch
        return int(self._order[position])


class TokenStream:
    """One split's shards as a single read-only token sequence, memory-mapped.

    Shards of a remote store stream through a bounded local cache (``ShardCache``, configured by
    ``cache``); local shards are mapped where they are, after a size check.
    """

    def __init__(
        self, data_dir: str | os.PathLike[str], split: str, cache: CacheSettings | None = None
    ) -> None:
        manifest = load_manifest(data_dir)
        if split not in manifest.splits:
            raise UserError(
                f"{data_dir} has no {split!r} split; use one of {', '.join(manifest.splits)}"
            )
        fs, root = url_to_fs(data_dir)
        dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self.split = split
        self.data_dir = os.fspath(data_dir)
        shards = manifest.splits[split].shards
        self._local: list[np.memmap] = []
        self.cache = (
            None if is_local(fs) else ShardCache(fs, root, shards, dtype, cache or CacheSettings())
        )
        for shard in shards if self.cache is None else ():
            path = join(root, shard.file)
            if not fs.isfile(path) or fs.size(path) != shard.tokens * dtype.itemsize:
                raise UserError(
                    f"shard {shard.file} in {data_dir} is missing or has the wrong size; "
                    f"run `clusterlm prepare --out {data_dir} --force` to rebuild it"
                )
            self._local.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard.tokens,)))
        # Stream offset where each shard begins, plus the total at the end.
        self._starts = np.cumsum([0] + [s.tokens for s in shards])
        self.num_tokens = int(self._starts[-1])

    @property
    def store_stats(self) -> StoreStats:
        """What this process read from a remote store (zeros for local shards)."""
        return StoreStats() if self.cache is None else self.cache.stats

    def prefetch(self, indices: Sequence[int], block_size: int) -> None:
        """Start fetching the shards that windows ``indices`` read (a remote store's)."""
        if self.cache is not None:  # window k spans tokens k * block_size ... (k + 1) * block_size
            ends = [(int(k) * block_size, (int(k) + 1) * block_size) for k in indices]
            shards = np.searchsorted(self._starts, np.array(ends, dtype=np.int64), "right") - 1
            self.cache.prefetch(s for a, b in shards.reshape(-1, 2) for s in range(a, b + 1))

    def _shard(self, index: int) -> np.memmap:
        return self._local[index] if self.cache is None else self.cache.shard(index)

    def num_windows(self, block_size: int) -> int:
        """How many non-overlapping windows of block_size + 1 tokens the stream holds."""
        windows = (self.num_tokens - 1) // block_size
        if windows < 1:
            raise UserError(
                f"the {self.split} split of {self.data_dir} has {self.num_tokens} tokens, "
                f"fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller block_size or prepare more text"
                + (" (or a larger --val-fraction)" if self.split == "val" else "")
            )
        return windows

    def windows(self, indices: Sequence[int] | np.ndarray, block_size: int) -> np.ndarray:
        """Windows ``indices`` as an int64 array [len(indices), block_size + 1]."""
        out = np.empty((len(indices), block_size + 1), dtype=np.int64)
        for row, k in enumerate(indices):
            self._read(int(k) * block_size, out[row])
        return out

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        """(x, y) of windows ``indices``: inputs and next-token targets."""
        return to_batch(self.windows(indices, block_size), device)

    def _read(self, start: int, out: np.ndarray) -> None:
        """Fill ``out`` with the tokens from ``start`` on, across shard boundaries."""
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < len(out):
            offset = start + filled - int(self._starts[shard])
            chunk = self._shard(shard)[offset : offset + len(out) - filled]
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
            shard += 1


def micro_batch_slots(counts: Sequence[int], rank: int) -> list[int]:
    """The step's micro-batches ``rank`` reads when rank r takes ``counts[r]`` of them: dealt in
    micro-step order (micro-step 0 of every rank that has one, then micro-step 1, ...)."""
    dealt = [r for m in range(max(counts)) for r in range(len(counts)) if m < counts[r]]
    return [slot for slot, owner in enumerate(dealt) if owner == rank]


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise UserError(
            f"dp_rank {dp_rank} is outside [0, {dp_size}); check the launch environment"
        )


def to_batch(windows: np.ndarray, device: torch.device) -> Batch:
    """(x, y) int64 tensors [B, T] on ``device``: inputs and next-token targets of each window."""
    tokens = torch.from_numpy(windows)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if device.type == "cuda":  # pinned pages let the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
            device, non_blocking=True
        )
    return x.to(device), y.to(device)


class TokenLoader:
    """Training batches for one data-parallel rank; its whole state is the samples consumed.

    The samples are the items of ``stream``: a split's windows (``TokenStream``), or a labelled
    task's examples (``clusterlm.data.classification``)."""

    def __init__(
        self,
        stream: SampleStream,
        block_size: int,
        micro_batch_size: int,
        grad_accum: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, value in (
            ("block_size", block_size),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum", grad_accum),
            ("dp_size", dp_size),
        ):
            if value < 1:
                raise UserError(f"{name} is {value}; it must be at least 1")
        if seed < 0:
            raise UserError(f"data seed {seed} is negative; use 0 or more")
        _check_rank(dp_rank, dp_size)
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.device = torch.device(device)
        self.samples_consumed = 0
        self.loading_seconds = 0.0  # time spent in next_step, for the data-wait share
        self.assignment: list[int] | None = None  # micro-batches per rank, when load balancing
        self._slots = [m * dp_size + dp_rank for m in range(grad_accum)]
        self._stream = stream
        self.windows_per_epoch = self._stream.num_windows(block_size)
        self._order = (
            stream.sample_order(seed, block_size)
            if isinstance(stream, OrderedStream)
            else EpochOrder(self.windows_per_epoch, seed)
        )

    @property
    def global_batch_size(self) -> int:
        """Samples one step consumes over all ranks: micro_batch_size * grad_accum * dp_size."""
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def epoch(self) -> float:
        """Passes over the split so far (fractional)."""
        return self.samples_consumed / self.windows_per_epoch

    @property
    def micro_batches(self) -> int:
        """This rank's micro-batches per step: ``grad_accum``, unless assigned otherwise."""
        return len(self._slots)

    def sample_indices(self, micro_step: int) -> range:
        """The global sample indices this rank reads at ``micro_step`` of the current step."""
        start = self.samples_consumed + self._slots[micro_step] * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def assign(self, counts: Sequence[int]) -> None:
        """From the next step on, rank r reads ``counts[r]`` of the step's micro-batches."""
        if (
            len(counts) != self.dp_size
            or sum(counts) != self.grad_accum * self.dp_size
            or min(counts) < 1
        ):
            per_rank = ",".join(map(str, counts))
            raise UserError(
                f"micro-batches per rank {per_rank} must be {self.dp_size} counts of at least "
                f"1 adding up to the step's {self.grad_accum * self.dp_size} micro-batches"
            )
        self.assignment = [int(c) for c in counts]
        self._slots = micro_batch_slots(self.assignment, self.dp_rank)

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches (x, y) of the next step (``grad_accum`` of them unless
        assigned otherwise); advances the state."""
        start = time.perf_counter()
        batches = [self._batch(self.sample_indices(m)) for m in range(self.micro_batches)]
        self.samples_consumed += self.global_batch_size
        if isinstance(self._stream, StoreStream):
            upcoming = [i for m in range(self.micro_batches) for i in self.sample_indices(m)]
            self._stream.prefetch([self.window_of(i) for i in upcoming], self.block_size)
        self.loading_seconds += time.perf_counter() - start
        return batches

    @property
    def store_stats(self) -> StoreStats:
        """What this rank read from a remote store so far."""
        return self._stream.store_stats if isinstance(self._stream, StoreStream) else StoreStats()

    def state_dict(self) -> dict[str, int]:
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "block_size": self.block_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume; batch sizes and dp_size may differ from the saved run's.

        The counter of samples consumed is global.
        """
        for key in ("seed", "block_size"):
            if state[key] != getattr(self, key):
                raise UserError(
                    f"the data order was saved with {key} {state[key]} but this run uses "
                    f"{getattr(self, key)}; use the same {key} to resume"
                )
        self.samples_consumed = int(state["samples_consumed"])

    def _batch(self, indices: range) -> Batch:
        return self._stream.batch(
            [self.window_of(i) for i in indices], self.block_size, self.device
        )

    def window_of(self, sample: int) -> int:
        """The window that global sample index ``sample`` reads."""
        return self._order(sample)


def eval_batches(
    data_dir: str | os.PathLike[str],
    split: str,
    block_size: int,
    num_windows: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    device: str | torch.device = "cpu",
    cache: CacheSettings | None = None,
) -> Iterator[Batch]:
    """The evaluation windows of rank ``dp_rank``, as batches (x, y) of at most ``batch_size``.

    The evaluation set is ``num_windows`` windows evenly spaced over the split, the same for every
    dp_size and batch size (windows repeat only if the split has fewer). Rank r scores the r-th of
    dp_size equal contiguous shares, so ranks are disjoint, their union is the whole set, and every
    rank runs the same number of forward passes.
    """
    _check_rank(dp_rank, dp_size)
    if batch_size < 1 or num_windows < 1 or num_windows % dp_size:
        raise UserError(
            f"an evaluation set of {num_windows} windows does not split evenly "
            f"over {dp_size} ranks; make it a positive multiple of {dp_size}"
        )
    stream = TokenStream(data_dir, split, cache)
    windows = np.arange(num_windows, dtype=np.int64) * stream.num_windows(block_size) // num_windows
    share = num_windows // dp_size
    mine = windows[dp_rank * share : (dp_rank + 1) * share]
    device = torch.device(device)
    return (
        to_batch(stream.windows(mine[i : i + batch_size], block_size), device)
        for i in range(0, share, batch_size)
    )
