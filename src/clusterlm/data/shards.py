"""Token shards: one split's token stream, written as files of at most ``shard_tokens`` ids."""

from __future__ import annotations

import hashlib
from contextlib import ExitStack

import numpy as np

from clusterlm.data.manifest import ShardInfo, SplitInfo
from clusterlm.data.storage import StagedDir


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
