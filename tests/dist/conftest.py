"""Fixtures of the layout equivalence tests: one tiny prepared corpus and the single-process
reference runs, shared by every test module in this session (the references are trained once)."""

import pytest

from .training import prepare_corpus, reference_runs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return prepare_corpus(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(data_dir, tmp_path_factory):
    return reference_runs(data_dir, tmp_path_factory)
