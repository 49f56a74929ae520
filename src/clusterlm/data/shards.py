"""Token shards: one split's token stream, written as files of at most ``shard_tokens`` ids; and a
document's ids held until its split is drawn, on a temporary file when they are many."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from typing import IO

import numpy as np

from clusterlm.data.manifest import ShardInfo, SplitInfo
from clusterlm.data.storage import StagedDir
from clusterlm.files import disk_errors


class ShardWriter:
    """One split's token stream, cut into staged files of at most ``shard_tokens`` tokens each."""

    def __init__(self, staged: StagedDir, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self._staged = staged
        self._split = split
        self._dtype = dtype.newbyteorder("<")  # shards are little-endian on every machine
        self._shard_tokens = shard_tokens
        self._shards: list[ShardInfo] = []
        self._file: ExitStack | None = None  # the open shard, if any

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._open_next()
            room = self._shard_tokens - self._tokens
            data = ids[:room].astype(self._dtype, copy=False).tobytes()
            self._stream.write(data)
            self._hash.update(data)
            self._tokens += min(room, len(ids))
            ids = ids[room:]
            if self._tokens == self._shard_tokens:
                self._close()

    def finish(self) -> SplitInfo:
        self._close()
        return SplitInfo(tokens=sum(s.tokens for s in self._shards), shards=tuple(self._shards))

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:  # an error mid-shard: close the temporary file for discarding
            self._file.close()

    def _open_next(self) -> None:
        self._name = f"{self._split}_{len(self._shards):05d}.bin"
        self._file = ExitStack()
        self._stream = self._file.enter_context(self._staged.open(self._name))
        self._hash = hashlib.sha256()
        self._tokens = 0

    def _close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self._shards.append(ShardInfo(self._name, self._tokens, self._hash.hexdigest()))


class DocumentIds:
    """One document's token ids as they are encoded: in memory up to ``limit`` of them, beyond that
    on a temporary file (in ``$TMPDIR``), so a document of any length costs bounded memory."""

    def __init__(self, dtype: np.dtype, limit: int) -> None:
        self._dtype, self._limit = dtype, limit
        self._held: list[np.ndarray] = []
        self._held_count = 0
        self._file: IO[bytes] | None = None  # the temporary file, once ids spill
        self.count = 0

    def append(self, ids: np.ndarray) -> None:
        self._held.append(ids)
        self._held_count += len(ids)
        self.count += len(ids)
        if self._held_count > self._limit:
            self._spill()

    def read(self, start: int, stop: int) -> Iterator[np.ndarray]:
        """Ids ``[start, stop)``, in chunks of at most ``limit``."""
        if self._file is None:
            ids = np.concatenate(self._held) if self._held else np.zeros(0, self._dtype)
            self._held, self._held_count = [ids], len(ids)
            yield ids[start:stop]
            return
        self._spill()
        self._file.seek(start * self._dtype.itemsize)
        while start < stop:
            count = min(self._limit, stop - start)
            yield np.frombuffer(self._file.read(count * self._dtype.itemsize), dtype=self._dtype)
            start += count

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def _spill(self) -> None:
        with disk_errors(tempfile.gettempdir(), "TMPDIR"):
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="clusterlm-ids-")
            self._file.seek(0, 2)
            for ids in self._held:
                self._file.write(np.ascontiguousarray(ids, dtype=self._dtype).tobytes())
        self._held, self._held_count = [], 0
