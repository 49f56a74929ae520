"""The bounded cache of a remote store's shards, on fsspec's memory filesystem and a flaky one."""

from __future__ import annotations

import errno

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from clusterlm.data.loader import TokenLoader, TokenStream
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.data.shard_cache import CacheSettings, with_retries
from clusterlm.errors import UserError
from clusterlm.files import DiskError

SHARD_TOKENS = 300
SHARD_GB = SHARD_TOKENS * 2 / 2**30  # uint16 ids


class FlakyFileSystem(MemoryFileSystem):
    """The memory filesystem, whose reads fail with a transient error ``failures`` times."""

    protocol = "flaky"
    failures = 0
    opened = 0

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            FlakyFileSystem.opened += 1
            if FlakyFileSystem.failures > 0:
                FlakyFileSystem.failures -= 1
                raise ConnectionResetError("connection reset by the store")
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture
def remote(corpus_dir, tmp_path, memory_fs):
    """The corpus prepared on the store (memory://data) and on local disk."""
    for url in ("memory://data", tmp_path / "local"):
        prepare(
            PrepareOptions(
                inputs=(str(corpus_dir),), out=str(url), shard_tokens=SHARD_TOKENS, workers=1
            )
        )
    FlakyFileSystem.failures = FlakyFileSystem.opened = 0
    return tmp_path / "local"


def steps(stream, count=6, **kw):
    loader = TokenLoader(stream, block_size=16, micro_batch_size=4, seed=3, **kw)
    return [loader.next_step() for _ in range(count)]


def settings(tmp_path, **kw):
    return CacheSettings(tmp_path / "cache", **{"gb": 1.0, "retry_s": 5.0, **kw})


def test_streamed_samples_are_bitwise_those_read_from_local_disk(remote, tmp_path):
    stream = TokenStream("memory://data", "train", settings(tmp_path))
    streamed, local = steps(stream), steps(TokenStream(remote, "train"))
    for a, b in zip(streamed, local, strict=True):
        assert all(x.equal(y) for x, y in zip(a[0], b[0], strict=True))
    stats = stream.store_stats
    assert stats.bytes_read == sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
    assert stats.misses >= 1 and stats.hits >= 1


def test_the_next_steps_shards_are_prefetched(remote, tmp_path):
    stream = TokenStream("memory://data", "train", settings(tmp_path))
    loader = TokenLoader(stream, block_size=16, micro_batch_size=8, seed=3)
    loader.next_step()
    assert stream.cache is not None
    stream.cache.settle()  # waits for the prefetch
    before = stream.store_stats.misses
    loader.next_step()
    assert stream.store_stats.misses == before  # every shard of step 2 was there already


def test_the_cache_stays_within_its_bound(remote, tmp_path):
    stream = TokenStream("memory://data", "train", settings(tmp_path, gb=2.5 * SHARD_GB))
    streamed, local = steps(stream, count=12), steps(TokenStream(remote, "train"), count=12)
    assert stream.cache is not None
    stream.cache.settle()
    assert len(list((tmp_path / "cache").glob("*.bin"))) <= 2
    assert streamed[-1][0][0].equal(local[-1][0][0])
    assert stream.store_stats.bytes_read > sum(  # evicted shards were read again
        f.stat().st_size for f in (remote).glob("train_*.bin")
    )


def test_a_cache_smaller_than_two_shards_is_refused(remote, tmp_path):
    with pytest.raises(UserError, match="raise data.cache_gb to at least"):
        TokenStream("memory://data", "train", settings(tmp_path, gb=SHARD_GB))


def test_transient_errors_are_retried_and_the_read_resumes(remote, tmp_path):
    FlakyFileSystem.failures = 3
    stream = TokenStream("flaky://data", "train", settings(tmp_path))
    streamed, local = steps(stream), steps(TokenStream(remote, "train"))
    assert streamed[0][0][0].equal(local[0][0][0]) and FlakyFileSystem.failures == 0


def test_retries_back_off_exponentially_then_end_with_one_line():
    delays: list[float] = []

    def unreachable():
        raise TimeoutError("the store did not answer")

    with pytest.raises(UserError) as err:
        with_retries(unreachable, "reading shard s", 1.0, sleep=delays.append)
    assert "data.retry_s = 1 s" in str(err.value) and "\n" not in str(err.value)
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]


def test_a_store_that_stays_down_ends_the_read_after_retry_s(remote, tmp_path):
    FlakyFileSystem.failures = 10**6
    stream = TokenStream("flaky://data", "train", settings(tmp_path, retry_s=0.3))
    with pytest.raises(UserError, match=r"failed for data.retry_s = 0.3 s \(ConnectionResetError"):
        steps(stream, count=1)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_missing_shards_and_refusals_are_not_retried():
    for error, words in ((FileNotFoundError, "missing"), (PermissionError, "credentials")):

        def fail(error=error):
            raise error("no")

        with pytest.raises(UserError, match=words):
            with_retries(fail, "reading shard s", 60.0, sleep=pytest.fail)


def test_a_shard_changed_on_the_store_is_one_line(remote, tmp_path, memory_fs):
    shard = sorted(p for p in memory_fs.find("/data") if "train_" in p)[0]
    memory_fs.pipe_file(shard, b"\0\0" * SHARD_TOKENS)
    stream = TokenStream("memory://data", "train", settings(tmp_path))
    with pytest.raises(UserError, match=r"changed on the store .*prepare --force"):
        stream.windows(range(stream.num_windows(16)), 16)
    assert not list((tmp_path / "cache").glob("*")) or all(
        ".tmp-" not in p.name for p in (tmp_path / "cache").iterdir()
    )


def test_a_cache_dir_under_a_file_is_one_line(remote, tmp_path):
    (tmp_path / "file").write_text("x")
    bad = CacheSettings(tmp_path / "file" / "cache", 1.0, 5.0)
    with pytest.raises(UserError, match="data.cache_dir .* is not a writable directory") as err:
        TokenStream("memory://data", "train", bad)
    assert "\n" not in str(err.value)


def test_a_refused_write_to_the_cache_is_not_retried(remote, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise DiskError(errno.ENOSPC, "no space left on the cache's disk; free some")

    stream = TokenStream("memory://data", "train", settings(tmp_path))
    monkeypatch.setattr("clusterlm.data.shard_cache.disk_errors", full)
    with pytest.raises(UserError, match="no space left"):
        stream.windows([0], 16)
