"""Corpus fixtures shared by the end-to-end tests, each prepared once per test module."""

import random
from pathlib import Path

import pytest
from launch_helpers import clusterlm
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
