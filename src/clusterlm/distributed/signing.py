"""How two processes of one job prove to each other that they hold the job's secret
(``clusterlm.distributed.job_secret``), over a store anyone who reaches its port can use:

* what they write to the store is signed and what they read is checked (``SignedStore``): a
  value is HMAC-SHA256(secret, full key, value) followed by the value, so nobody without the
  secret can write a value (a join, a gloo address) that a rank accepts, nor move a signed
  one to another key. The values are no secret and are not hidden.
* every new connection opens with a challenge (``challenge`` on the server, rank 0 of a two-rank
  group; ``answer_challenge`` on the worker): fresh random nonces from both sides and each
  side's HMAC over both and the connection's key. The server sends nothing else until the
  worker's proof checks out, nor the worker until the server's does.

Neither the secret nor a hash of it alone is ever written to the store or sent.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta

import torch
import torch.distributed as dist

from clusterlm.distributed.job_secret import SECRET_VARIABLE

TAG = 32  # bytes of an HMAC-SHA256, and of a nonce


def _tag(secret: bytes, purpose: bytes, *parts: bytes) -> bytes:
    message = b"".join(len(part).to_bytes(4, "big") + part for part in (purpose, *parts))
    return hmac.new(secret, message, hashlib.sha256).digest()


class UnsignedValue(RuntimeError):
    """A store value that was not written by a holder of the job's secret."""


class SignedStore(dist.Store):
    """``store`` under ``prefix``, every value signed with ``secret`` and checked when read.
    Counters (``add``) cannot be signed: nothing may trust one's value. Keep a reference to
    this object for as long as any store built on it (a PrefixStore, a gloo group) is in use."""

    def __init__(self, store: dist.Store, secret: bytes, prefix: str = ""):
        super().__init__()
        self.store, self.secret, self.prefix = store, secret, prefix

    def _signed(self, key: str, value: bytes) -> bytes:
        return _tag(self.secret, b"store", (self.prefix + key).encode(), value) + value

    def set(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        self.store.set(self.prefix + key, self._signed(key, data))  # type: ignore[arg-type]  # bytes: stored as given

    def get(self, key: str) -> bytes:
        raw = self.store.get(self.prefix + key)
        value = raw[TAG:]
        if len(raw) < TAG or not hmac.compare_digest(raw, self._signed(key, value)):
            raise UnsignedValue(
                f"store key {self.prefix + key!r} is not signed with this job's {SECRET_VARIABLE}"
            )
        return value

    def add(self, key: str, amount: int) -> int:
        return self.store.add(self.prefix + key, amount)

    def check(self, keys: list[str]) -> bool:
        return self.store.check([self.prefix + key for key in keys])

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        names = [self.prefix + key for key in keys]
        if timeout is None:
            self.store.wait(names)
        else:
            self.store.wait(names, timeout)

    def delete_key(self, key: str) -> bool:
        return self.store.delete_key(self.prefix + key)

    def set_timeout(self, timeout: timedelta) -> None:
        self.store.set_timeout(timeout)


def _send(group: dist.ProcessGroup, data: bytes, peer: int) -> None:
    group.send([torch.frombuffer(bytearray(data), dtype=torch.uint8)], peer, 0).wait()


def _recv(group: dist.ProcessGroup, size: int, peer: int) -> bytes:
    buffer = torch.zeros(size, dtype=torch.uint8)
    group.recv([buffer], peer, 0).wait()
    return bytes(buffer.tolist())


def challenge(group: dist.ProcessGroup, secret: bytes, context: str) -> bool:
    """The server's side (rank 0 of a two-rank ``group``): True when the peer proved it holds
    ``secret``; the peer then gets the server's own proof, else zeros."""
    ours = secrets.token_bytes(TAG)
    _send(group, ours, 1)
    answer = _recv(group, 2 * TAG, 1)
    theirs, proof = answer[:TAG], answer[TAG:]
    accepted = hmac.compare_digest(proof, _tag(secret, b"worker", context.encode(), ours, theirs))
    _send(
        group,
        _tag(secret, b"server", context.encode(), ours, theirs) if accepted else bytes(TAG),
        1,
    )
    return accepted


def answer_challenge(group: dist.ProcessGroup, secret: bytes, context: str) -> bool:
    """The worker's side (rank 1): True when the server accepted this worker's proof and proved
    in turn that it holds ``secret``."""
    theirs = _recv(group, TAG, 0)
    ours = secrets.token_bytes(TAG)
    _send(group, ours + _tag(secret, b"worker", context.encode(), theirs, ours), 0)
    proof = _recv(group, TAG, 0)
    return hmac.compare_digest(proof, _tag(secret, b"server", context.encode(), theirs, ours))
