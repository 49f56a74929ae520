"""The seconds and bytes of context-parallel attention's communication, for ``bench train``.

The ring's K/V and dK/dV exchanges and Ulysses' all-to-alls run inside ``traffic(nbytes)``: a
shared ``nullcontext`` unless ``recording()`` is open, so training outside a benchmark pays one
attribute lookup per exchange. Seconds are those the rank spends posting and waiting on the
transfers, the part of the communication that compute did not hide; bytes are what the rank sends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import TracebackType


@dataclass
class AttentionTraffic:
    seconds: float = 0.0
    bytes_sent: float = 0.0
    exchanges: int = 0


_UNTIMED = nullcontext()
_active: AttentionTraffic | None = None


class _Timed(AbstractContextManager["_Timed"]):
    def __init__(self, into: AttentionTraffic, nbytes: float) -> None:
        self.into, self.nbytes = into, nbytes

    def __enter__(self) -> _Timed:
        self.start = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.into.seconds += time.perf_counter() - self.start
        self.into.bytes_sent += self.nbytes
        self.into.exchanges += 1 if self.nbytes else 0


def traffic(nbytes: float = 0.0) -> AbstractContextManager[object]:
    """Around a transfer (posting it, or waiting on it with ``nbytes`` 0) of ``nbytes`` sent."""
    return _UNTIMED if _active is None else _Timed(_active, nbytes)


@contextmanager
def recording() -> Iterator[AttentionTraffic]:
    """Count the attention's communication of this process while the block runs."""
    global _active
    previous, _active = _active, AttentionTraffic()
    try:
        yield _active
    finally:
        _active = previous
