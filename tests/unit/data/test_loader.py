"""TokenLoader and eval_batches: window layout, determinism, data-parallel slices, resumption."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterlm.data.loader import TokenLoader, TokenStream, eval_batches
from clusterlm.data.manifest import load_manifest
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.errors import UserError

BLOCK = 8


@pytest.fixture
def data_dir(corpus_dir, tmp_path):
    # Small shards, so windows cross shard boundaries.
    out = tmp_path / "data"
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(out), shard_tokens=50, workers=1))
    return out


def stream_of(data_dir, split="train") -> np.ndarray:
    manifest = load_manifest(data_dir)
    return np.concatenate(
        [np.fromfile(data_dir / s.file, dtype="<u2") for s in manifest.splits[split].shards]
    )


def loader(data_dir, **kw) -> TokenLoader:
    return TokenLoader(
        TokenStream(data_dir, "train"), **{"block_size": BLOCK, "micro_batch_size": 4, **kw}
    )


def steps(lo: TokenLoader, n: int) -> list[torch.Tensor]:
    """The x of every micro-batch of the next n steps."""
    return [x for _ in range(n) for x, _ in lo.next_step()]


def test_windows_are_shifted_slices_of_the_stream(data_dir):
    stream = stream_of(data_dir)
    lo = loader(data_dir, micro_batch_size=1)
    assert lo.windows_per_epoch == (len(stream) - 1) // BLOCK
    for _ in range(lo.windows_per_epoch):
        window = lo.window_of(lo.samples_consumed)
        [(x, y)] = lo.next_step()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (1, BLOCK)
        start = window * BLOCK
        assert x[0].tolist() == stream[start : start + BLOCK].tolist()
        assert y[0].tolist() == stream[start + 1 : start + BLOCK + 1].tolist()


def test_each_epoch_visits_every_window_once_in_a_seeded_order(data_dir):
    lo = loader(data_dir)
    windows = lo.windows_per_epoch
    first, second = (
        [lo.window_of(i) for i in range(e * windows, (e + 1) * windows)] for e in (0, 1)
    )
    assert sorted(first) == sorted(second) == list(range(windows))
    assert first != second


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    a, b, c = (steps(loader(data_dir, grad_accum=2, seed=s), 3) for s in (0, 0, 1))
    assert all(x.equal(y) for x, y in zip(a, b, strict=True))
    assert not all(x.equal(y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_read_disjoint_slices_whose_union_is_the_single_process_batch(data_dir, dp_size):
    reference = steps(loader(data_dir, micro_batch_size=8, grad_accum=2), 3)
    ranks = [
        steps(
            loader(
                data_dir, micro_batch_size=8 // dp_size, grad_accum=2, dp_rank=r, dp_size=dp_size
            ),
            3,
        )
        for r in range(dp_size)
    ]
    for m, expected in enumerate(reference):
        assert torch.cat([rank[m] for rank in ranks]).equal(expected)
    indices = [
        i
        for r in range(dp_size)
        for i in loader(data_dir, micro_batch_size=2, dp_rank=r, dp_size=dp_size).sample_indices(0)
    ]
    assert sorted(indices) == list(range(2 * dp_size))


def test_resume_from_state_dict_equals_an_uninterrupted_run(data_dir):
    uninterrupted = steps(loader(data_dir, grad_accum=2), 40)  # crosses epoch boundaries
    first = loader(data_dir, grad_accum=2)
    head = steps(first, 17)
    resumed = loader(data_dir, grad_accum=2)
    resumed.load_state_dict(first.state_dict())
    assert first.state_dict() == {"samples_consumed": 17 * 8, "seed": 0, "block_size": BLOCK}
    assert all(x.equal(y) for x, y in zip(head + steps(resumed, 23), uninterrupted, strict=True))


def test_changing_layout_on_resume_reads_every_sample_exactly_once(data_dir):
    seen: list[int] = []

    def run(n_steps, state, **layout):
        ranks = [loader(data_dir, dp_rank=r, **layout) for r in range(layout["dp_size"])]
        for lo in ranks:
            lo.load_state_dict(state)
        for _ in range(n_steps):
            for lo in ranks:
                seen.extend(i for m in range(lo.grad_accum) for i in lo.sample_indices(m))
                lo.next_step()
        return ranks[0].state_dict()

    state = run(
        5, {"samples_consumed": 0, "seed": 0, "block_size": BLOCK}, micro_batch_size=3, dp_size=2
    )
    state = run(4, state, micro_batch_size=2, grad_accum=2, dp_size=4)
    run(3, state, micro_batch_size=5, dp_size=1)
    assert sorted(seen) == list(range(5 * 6 + 4 * 16 + 3 * 5))


def test_resume_refuses_another_block_size_or_seed(data_dir):
    state = loader(data_dir).state_dict()
    for other in (loader(data_dir, block_size=4), loader(data_dir, seed=3)):
        with pytest.raises(UserError, match="to resume"):
            other.load_state_dict(state)


def eval_union(data_dir, dp_size, batch_size=6, num_batches=4):
    per_rank = [
        list(eval_batches(data_dir, "val", BLOCK, batch_size * num_batches, batch_size, r, dp_size))
        for r in range(dp_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of forward passes
    return torch.cat([x for batches in per_rank for x, _ in batches])


def test_eval_batches_union_is_the_same_for_any_dp_size(data_dir):
    single = eval_union(data_dir, 1)
    assert single.shape == (24, BLOCK)
    for dp_size in (2, 3, 4):
        assert eval_union(data_dir, dp_size).equal(single)
    assert eval_union(data_dir, 1).equal(single)  # deterministic


def test_eval_batches_are_evenly_spaced_windows(data_dir):
    stream = stream_of(data_dir, "val")
    windows = (len(stream) - 1) // BLOCK
    [(x, y)] = eval_batches(data_dir, "val", BLOCK, num_windows=3, batch_size=3)
    for row, k in enumerate(np.arange(3) * windows // 3):
        assert y[row].tolist() == stream[k * BLOCK + 1 : (k + 1) * BLOCK + 1].tolist()


def test_eval_batches_refuse_an_uneven_split():
    with pytest.raises(UserError, match="multiple of 4"):
        eval_batches("unused", "val", BLOCK, num_windows=3, batch_size=3, dp_size=4)


def test_too_short_split_says_how_many_tokens_it_has(data_dir):
    tokens = load_manifest(data_dir).splits["val"].tokens
    with pytest.raises(UserError, match=f"val split .* has {tokens} tokens, fewer than block_size"):
        TokenLoader(TokenStream(data_dir, "val"), block_size=tokens, micro_batch_size=1)


def test_missing_data_dir_says_to_prepare(tmp_path):
    with pytest.raises(UserError, match="no prepared data"):
        loader(tmp_path / "absent")
