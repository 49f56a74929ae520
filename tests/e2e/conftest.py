"""Corpus fixtures shared by the end-to-end tests, each prepared once per test module."""

import random
from pathlib import Path

import pytest
from launch_helpers import clusterlm
from private_ceph import Ceph
from private_moosefs import MooseFS

from clusterlm.cli import main as cli


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A small deterministic corpus, prepared once for the module with the char tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["thou", "art", "the", "king", "of", "my", "heart", "and", "love", "doth", "speak"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(6000)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    out = root / "prepared"
    assert cli(["prepare", str(root / "text.txt"), "--out", str(out), "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def launch_data_dir(tmp_path_factory) -> Path:
    """A one-file corpus prepared by a real ``clusterlm prepare`` process, for launcher jobs."""
    root = tmp_path_factory.mktemp("launch")
    (root / "a.txt").write_text(
        "".join(f"now is the winter of our discontent {i}\n" for i in range(2000))
    )
    prepared = clusterlm(
        "prepare", str(root / "a.txt"), "--out", str(root / "data"), "--workers", "1"
    )
    assert prepared.returncode == 0
    return root / "data"


@pytest.fixture(scope="session")
def moosefs(tmp_path_factory):
    """A private MooseFS cluster (master, three chunkservers, goal 2) mounted with FUSE, started
    once for the test run and stopped by pid at its end, even after a failure."""
    cluster = MooseFS(tmp_path_factory.mktemp("moosefs"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def ceph(tmp_path_factory):
    """A private Ceph cluster (monitor, manager, three in-memory OSDs, two copies of every object)
    with radosgw serving S3 on 127.0.0.1, started once for the test run and stopped by pid."""
    cluster = Ceph(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def s3(ceph, monkeypatch, request):
    """A new bucket on the private Ceph cluster (its URL), reached through the standard AWS
    variables as a user would; s3fs's cached clients are dropped so each test sees its own."""
    import s3fs

    for name, value in ceph.credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    yield ceph.create_bucket(f"t-{abs(hash(request.node.nodeid)) % 10**12}")
    s3fs.S3FileSystem.clear_instance_cache()
