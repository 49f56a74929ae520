"""Initial values per (seed, name, position): any slice equals the same slice of the whole."""

import torch

from clusterlm.models import init
from clusterlm.models.init import InitRule, seeded_source


def _rule(name: str) -> InitRule:
    return InitRule("ones") if name.endswith("norm") else InitRule("normal", 0.02)


def test_any_slice_equals_the_slice_of_the_whole(monkeypatch):
    monkeypatch.setattr(init, "BLOCK_VALUES", 40)  # blocks of 4 rows of 10: slices cross blocks
    source = seeded_source(_rule, seed=7)
    shape = (23, 10)
    whole = source("w", shape, (slice(0, 23), slice(0, 10)))
    for rows in (slice(0, 5), slice(3, 9), slice(8, 23), slice(22, 23), slice(5, 5)):
        for cols in (slice(0, 10), slice(2, 7)):
            assert torch.equal(source("w", shape, (rows, cols)), whole[rows, cols])
    assert abs(whole.std().item() - 0.02) < 0.005


def test_values_depend_on_seed_and_name_only():
    shape, whole = (4, 3), (slice(0, 4), slice(0, 3))
    a = seeded_source(_rule, seed=1)
    assert torch.equal(a("w", shape, whole), seeded_source(_rule, seed=1)("w", shape, whole))
    assert not torch.equal(a("w", shape, whole), a("v", shape, whole))
    assert not torch.equal(a("w", shape, whole), seeded_source(_rule, seed=2)("w", shape, whole))
    assert torch.equal(a("norm", (5,), (slice(1, 4),)), torch.ones(3))
