"""Shards of a remote store (any fsspec URL that is not a local path), streamed into a bounded
local cache instead of being copied whole.

A shard is downloaded when first read, or ahead of time when the loader says which shards the
next step reads (``prefetch``, on one background thread). Each download is checked against the
manifest's sha256 as it arrives and published under that name, so every cached file is verified
and ranks of a node that share ``dir`` download a shard once. When the cache would outgrow its
bound, the least recently read shards go first, never one the current or the next step reads.
Transient errors of the store (any ``OSError`` but a missing file or a refusal) are retried with
exponential backoff for ``retry_s`` seconds, the download resuming where it stopped; after that
the run ends with one line, and its last checkpoint resumes it once the store is back.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
from fsspec import AbstractFileSystem

from clusterlm.config import DataConfig
from clusterlm.data.manifest import ShardInfo
from clusterlm.data.storage import default_cache_dir, display_name, join
from clusterlm.data.store_errors import refusal, unreachable_errors
from clusterlm.errors import UserError
from clusterlm.files import disk_errors

_CHUNK = 1 << 20
_FIRST_DELAY_S, _MAX_DELAY_S = 0.05, 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class CacheSettings:
    """Where and how much of a remote store's shards are kept (``data.cache_dir``,
    ``data.cache_gb``), and how long the store may fail before the run ends (``data.retry_s``)."""

    dir: Path = field(default_factory=default_cache_dir)
    gb: float = 20.0
    retry_s: float = 300.0

    @classmethod
    def of(cls, data: DataConfig) -> CacheSettings:
        directory = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
        return cls(directory, data.cache_gb, data.retry_s)


@runtime_checkable
class StoreStream(Protocol):
    """A sample stream whose shards may come from a remote store: told the windows of the next
    step ahead of time, and counting what it read."""

    def prefetch(self, indices: Sequence[int], block_size: int) -> None: ...

    @property
    def store_stats(self) -> StoreStats: ...


@dataclass
class StoreStats:
    """What one process read from its store: bytes downloaded, and shard reads served from the
    cache (hits) or that had to wait for a download (misses)."""

    bytes_read: int = 0
    hits: int = 0
    misses: int = 0


def with_retries(
    action: Callable[[], T],
    what: str,
    retry_s: float,
    sleep: Callable[[float], None] = time.sleep,
    url: str = "",
) -> T:
    """``action()`` on the store of ``url``, retried with exponential backoff on transient
    errors for ``retry_s``."""
    deadline, delay = time.monotonic() + retry_s, _FIRST_DELAY_S
    while True:
        try:
            return action()
        except UserError:  # a refused write to the cache (a DiskError is an OSError too)
            raise
        except FileNotFoundError:
            raise UserError(
                f"{what} failed: it is missing from the store; prepare the data again"
            ) from None
        except Exception as err:
            if (mapped := refusal(what, url, err)) is not None:
                raise mapped from None
            if not isinstance(err, unreachable_errors()):
                raise
            if time.monotonic() + delay > deadline:
                raise UserError(
                    f"{what} failed for data.retry_s = {retry_s:g} s ({type(err).__name__}: "
                    f"{err}); check the store, then resume from the last checkpoint"
                ) from None
            sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)


class ShardCache:
    """The shards of one split of a remote store, read through a bounded local cache."""

    def __init__(
        self,
        fs: AbstractFileSystem,
        root: str,
        shards: Sequence[ShardInfo],
        dtype: np.dtype,
        settings: CacheSettings,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._fs, self._root, self._shards, self._dtype = fs, root, shards, dtype
        self._settings, self._sleep = settings, sleep
        self._capacity = int(settings.gb * 2**30)
        largest = max((self._size(i) for i in range(len(shards))), default=0)
        if 2 * largest > self._capacity:
            raise UserError(
                f"data.cache_gb = {settings.gb:g} holds fewer than two shards of "
                f"{display_name(fs, root)} (the largest is {largest / 2**30:.3g} GB); "
                f"raise data.cache_gb to at least {2 * largest / 2**30:.3g}"
            )
        try:
            settings.dir.mkdir(parents=True, exist_ok=True)
            (settings.dir / f".probe-{os.getpid()}").touch()
            (settings.dir / f".probe-{os.getpid()}").unlink()
        except OSError as err:
            raise UserError(
                f"data.cache_dir {settings.dir} is not a writable directory ({err.strerror}); "
                "set data.cache_dir to one this process may write"
            ) from None
        self.stats = StoreStats()
        self._resident: OrderedDict[int, np.memmap | None] = OrderedDict()  # least recent first
        self._pending: dict[int, Future[None]] = {}
        self._protected: set[int] = set()  # read by the current or the next step
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="clusterlm-prefetch")

    def shard(self, index: int) -> np.memmap:
        """Shard ``index``, memory-mapped from the cache (downloaded first if need be)."""
        self._collect()
        mapped = self._resident.get(index)
        if mapped is None:
            mapped = self._map(index)
        else:
            self._count(hits=1)
        self._resident[index] = mapped
        self._resident.move_to_end(index)
        self._protected.add(index)
        return mapped

    def prefetch(self, indices: Iterable[int]) -> None:
        """Start downloading the shards the next step reads; until the next call, these and the
        shards read meanwhile are not evicted."""
        self._collect()
        wanted = sorted(set(indices))
        self._protected = set(wanted)
        for index in wanted:
            if index in self._resident or index in self._pending:
                continue
            if not self._make_room(self._size(index)):
                return  # read on demand once shards of this step may go
            self._pending[index] = self._executor.submit(self._download, index)

    def settle(self) -> None:
        """Wait for the downloads in flight (an error of one is raised when its shard is read)."""
        for future in list(self._pending.values()):
            with suppress(Exception):
                future.result()
        self._collect()

    def _map(self, index: int) -> np.memmap:
        future = self._pending.pop(index, None)
        if future is not None:
            self._count(hits=int(future.done()), misses=int(not future.done()))
            future.result()  # the prefetch's error, if any, is this read's
        else:
            path = self._path(index)
            if not path.exists():
                self._wait_for_room(self._size(index))
                self._download(index)
                self._count(misses=1)
            else:
                self._count(hits=1)
        try:
            return np.memmap(self._path(index), self._dtype, "r", shape=(self._tokens(index),))
        except FileNotFoundError:  # another rank sharing the cache evicted it just now
            self._download(index)
            return np.memmap(self._path(index), self._dtype, "r", shape=(self._tokens(index),))

    def _download(self, index: int) -> None:
        """Copy shard ``index`` into the cache, verified, resuming after transient errors."""
        shard, target = self._shards[index], self._path(index)
        if target.exists():
            return
        source = join(self._root, shard.file)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        digest, copied = hashlib.sha256(), 0

        def copy_rest() -> None:
            nonlocal copied
            with self._fs.open(source, "rb") as src, open(tmp, "ab" if copied else "wb") as dst:
                src.seek(copied)
                while chunk := src.read(_CHUNK):
                    with disk_errors(self._settings.dir, "data.cache_dir"):
                        dst.write(chunk)
                        dst.flush()
                    digest.update(chunk)
                    copied += len(chunk)
                    self._count(bytes_read=len(chunk))

        try:
            url = display_name(self._fs, source)
            retry_s = self._settings.retry_s
            with_retries(copy_rest, f"reading shard {url}", retry_s, self._sleep, url)
            if digest.hexdigest() != shard.sha256:
                raise UserError(
                    f"shard {url} changed on the store (its sha256 "
                    "differs from the manifest); prepare the data again with `clusterlm prepare "
                    "--force`"
                )
            os.replace(tmp, target)  # ranks sharing the cache write identical bytes
        finally:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)

    def _collect(self) -> None:
        """Prefetched shards that arrived become resident (not yet mapped)."""
        for index, future in list(self._pending.items()):
            if future.done() and future.exception() is None:
                del self._pending[index]
                self._resident[index] = None

    def _wait_for_room(self, size: int) -> None:
        if not self._make_room(size):
            self.settle()
            self._protected.clear()
            self._make_room(size)

    def _make_room(self, size: int) -> bool:
        """Evict least recently read shards outside the protected set until ``size`` more bytes
        fit in the bound; whether they do."""
        used = sum(self._size(i) for i in [*self._resident, *self._pending])
        for index in list(self._resident):
            if used + size <= self._capacity:
                break
            if index in self._protected:
                continue
            del self._resident[index]
            with suppress(FileNotFoundError):
                self._path(index).unlink()
            used -= self._size(index)
        return used + size <= self._capacity

    def _count(self, bytes_read: int = 0, hits: int = 0, misses: int = 0) -> None:
        with self._lock:
            self.stats.bytes_read += bytes_read
            self.stats.hits += hits
            self.stats.misses += misses

    def _path(self, index: int) -> Path:
        return self._settings.dir / f"{self._shards[index].sha256}.bin"

    def _tokens(self, index: int) -> int:
        return self._shards[index].tokens

    def _size(self, index: int) -> int:
        return self._shards[index].tokens * self._dtype.itemsize
