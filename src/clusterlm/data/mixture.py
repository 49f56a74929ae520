"""Several prepared datasets read as one stream, each in proportion to its weight (``data.mix``).

Which dataset serves global sample i, and which of its samples, is a pure function of (seed, i).
The datasets are split off one at a time: dataset s takes the share
p_s = w_s / (w_s + ... + w_last) of the samples the earlier ones left. Numbering those remaining
samples n = 0, 1, ..., sample n goes to s when floor((n + 1) p_s + t_s) > floor(n p_s + t_s),
with a phase t_s in [0, 1) drawn from (seed, s). This is a Beatty sequence, as evenly spread as a
sequence can be: s holds floor(n p_s + t_s) of the first n, within one of n p_s. So every prefix
of the stream holds each dataset's share to within a sample per dataset, the samples each dataset
served up to any counter take O(datasets) to compute (per-dataset token counts follow from the
loader's one counter), and resuming or changing the layout changes nothing. Dataset s's j-th
sample is window ``EpochOrder(W_s, seed, s)(j)``: its own shuffled epochs, a smaller dataset
repeating sooner. Arithmetic is exact (fractions), so no counter is too large.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np
import torch

from clusterlm.config.data_mix import MixSource
from clusterlm.data.loader import Batch, EpochOrder, TokenStream, to_batch
from clusterlm.data.manifest import Manifest, load_manifest
from clusterlm.data.shard_cache import CacheSettings, StoreStats
from clusterlm.errors import UserError

_PHASE_BITS = 32


class MixSchedule:
    """Which dataset serves each global sample, for weights ``weights`` and ``seed``."""

    def __init__(self, weights: Sequence[float], seed: int) -> None:
        exact = [Fraction(w) for w in weights]
        self._splits = []  # (share of the remaining samples, phase) of every dataset but the last
        for s in range(len(exact) - 1):
            phase = np.random.default_rng([seed, s]).integers(1 << _PHASE_BITS)
            self._splits.append((exact[s] / sum(exact[s:]), Fraction(int(phase), 1 << _PHASE_BITS)))

    def locate(self, sample: int) -> tuple[int, int]:
        """(dataset, how many samples that dataset served before) of global sample ``sample``."""
        n = sample
        for s, (share, phase) in enumerate(self._splits):
            before = math.floor(n * share + phase)
            if math.floor((n + 1) * share + phase) > before:
                return s, before
            n -= before
        return len(self._splits), n

    def counts(self, samples: int) -> list[int]:
        """How many of the first ``samples`` global samples each dataset served."""
        served, n = [], samples
        for share, phase in self._splits:
            served.append(math.floor(n * share + phase))
            n -= served[-1]
        return [*served, n]


def same_tokenizer(dirs: Sequence[str]) -> list[Manifest]:
    """The manifests of ``dirs``, refused unless all were prepared with one tokenizer."""
    manifests = [load_manifest(d) for d in dirs]
    for directory, manifest in zip(dirs[1:], manifests[1:], strict=True):
        if manifest.tokenizer.sha256 != manifests[0].tokenizer.sha256:
            raise UserError(
                f"data.mix: {directory} was prepared with another tokenizer than {dirs[0]}; "
                f"prepare it again with `clusterlm prepare --tokenizer {dirs[0]}/tokenizer.json`"
            )
    return manifests


class MixedStream:
    """The ``split`` of every dataset of a mix; an item is a window of one of them, numbered
    after all the windows of the datasets before it."""

    def __init__(
        self, sources: Sequence[MixSource], split: str, cache: CacheSettings | None = None
    ) -> None:
        if not sources:
            raise UserError("data.mix names no dataset; give at least one DIR=WEIGHT")
        same_tokenizer([s.dir for s in sources])
        self.sources = tuple(sources)
        self.streams = [TokenStream(s.dir, split, cache) for s in sources]

    def num_windows(self, block_size: int) -> int:
        return sum(stream.num_windows(block_size) for stream in self.streams)

    def schedule(self, seed: int) -> MixSchedule:
        return MixSchedule([s.weight for s in self.sources], seed)

    def sample_order(self, seed: int, block_size: int) -> Callable[[int], int]:
        """Global sample -> item (module docstring)."""
        schedule, offsets = self.schedule(seed), self._offsets(block_size)
        orders = [
            EpochOrder(stream.num_windows(block_size), seed, s)
            for s, stream in enumerate(self.streams)
        ]

        def item(sample: int) -> int:
            s, position = schedule.locate(sample)
            return int(offsets[s]) + orders[s](position)

        return item

    def batch(self, indices: Sequence[int], block_size: int, device: torch.device) -> Batch:
        offsets = self._offsets(block_size)
        windows = np.empty((len(indices), block_size + 1), dtype=np.int64)
        for row, item in enumerate(indices):
            s = int(np.searchsorted(offsets, item, side="right")) - 1
            windows[row] = self.streams[s].windows([item - int(offsets[s])], block_size)[0]
        return to_batch(windows, device)

    def prefetch(self, indices: Sequence[int], block_size: int) -> None:
        offsets = self._offsets(block_size)
        for s, stream in enumerate(self.streams):
            stream.prefetch(
                [i - int(offsets[s]) for i in indices if offsets[s] <= i < offsets[s + 1]],
                block_size,
            )

    @property
    def store_stats(self) -> StoreStats:
        stats = [stream.store_stats for stream in self.streams]
        return StoreStats(
            *(sum(getattr(x, f) for x in stats) for f in ("bytes_read", "hits", "misses"))
        )

    def _offsets(self, block_size: int) -> np.ndarray:
        return np.cumsum([0] + [stream.num_windows(block_size) for stream in self.streams])


def mix_labels(sources: Sequence[MixSource]) -> list[str]:
    """How metrics name each dataset of a mix: ``mix0``, ``mix1``, ... in the mix's order."""
    return [f"mix{s}" for s in range(len(sources))]


def describe_mix(sources: Sequence[MixSource]) -> str:
    total = sum(s.weight for s in sources)
    return ", ".join(
        f"{label} = {os.fspath(s.dir)} ({s.weight / total:.1%})"
        for label, s in zip(mix_labels(sources), sources, strict=True)
    )
