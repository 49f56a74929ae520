"""Rows and targets of translation pairs: source, then the end-of-text token and the target, each
padded; targets shifted by one and ignored where padded; long pairs cut; filler rows. The
decoder-only layout, trimmed batches (the same loss) and the length-sorted training order."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterlm.data.loader import EpochOrder
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.pair_batches import JoinedPairStream, PairStream, SortishOrder, prompt_lengths
from clusterlm.data.translation import PairSplit, Sequences
from clusterlm.models import ModelArgs, create_model

EOT = 9


def split(pairs: list[tuple[list[int], list[int]]]) -> PairSplit:
    def side(seqs):
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        return Sequences(np.concatenate([np.asarray(s, np.uint16) for s in seqs]), offsets)

    return PairSplit(side([s for s, _ in pairs]), side([t + [EOT] for _, t in pairs]))


def test_rows_hold_the_source_then_the_shifted_target():
    stream = PairStream(split([([1, 2], [3, 4, 5]), ([6, 7, 8, 1, 2, 3], [4, 4, 4, 4, 4, 4])]), EOT)
    x, y = stream.batch([0, 1, -1], 5, torch.device("cpu"))
    assert x[0].tolist() == [1, 2, -1, -1, -1, EOT, 3, 4, 5, -1]
    assert y[0].tolist() == [3, 4, 5, EOT, IGNORE_INDEX]
    assert x[1].tolist() == [6, 7, 8, 1, 2, EOT, 4, 4, 4, 4]  # both sides cut to 5
    assert y[1].tolist() == [4, 4, 4, 4, 4]  # the end-of-text token cut off too
    assert x[2].tolist() == [EOT, -1, -1, -1, -1, EOT, -1, -1, -1, -1]  # a filler row
    assert (y[2] == IGNORE_INDEX).all()
    assert stream.num_windows(5) == 2


def test_a_trimmed_batch_is_as_long_as_its_longest_pair_rounded_up():
    stream = PairStream(split([([1, 2], [3, 4, 5]), ([6] * 9, [4])]), EOT, trim=True)
    x, y = stream.batch([0, -1], 96, torch.device("cpu"))
    assert x.shape == (2, 16) and y.shape == (2, 8)  # 4 target positions, rounded up to 8
    assert x[0].tolist() == [1, 2] + [-1] * 6 + [EOT, 3, 4, 5] + [-1] * 4
    x, y = stream.batch([0, 1], 96, torch.device("cpu"))
    assert y.shape == (2, 16)  # a 9-token source
    assert stream.batch([1], 12, torch.device("cpu"))[1].shape == (1, 12)  # at most block_size


def test_joined_rows_hold_source_separator_target_and_score_the_target_only():
    stream = JoinedPairStream(split([([1, 2], [3, 4, 5]), ([6, 7, 8, 1, 2, 3], [4, 4, 4, 4])]), EOT)
    x, y = stream.batch([0, 1, -1], 8, torch.device("cpu"))
    ignored = IGNORE_INDEX
    assert x[0].tolist() == [1, 2, EOT, 3, 4, 5, EOT, EOT]
    assert y[0].tolist() == [ignored, ignored, 3, 4, 5, EOT, ignored, ignored]
    assert x[1].tolist() == [6, 7, 8, 1, EOT, 4, 4, 4]  # each side cut to half of 8
    assert y[1].tolist() == [ignored] * 4 + [4, 4, 4, 4]
    assert (y[2] == ignored).all()
    assert prompt_lengths(y).tolist() == [3, 5, 1]
    trimmed = JoinedPairStream(stream.split, EOT, trim=True)
    assert trimmed.batch([0], 96, torch.device("cpu"))[0].shape == (1, 8)


def test_sortish_order_sorts_each_pool_of_an_epoch_by_length():
    lengths = np.random.default_rng(0).integers(1, 50, size=103)
    order = SortishOrder(lengths, pool=20, seed=3)
    for epoch in range(2):
        samples = [order(epoch * 103 + i) for i in range(103)]
        assert sorted(samples) == list(range(103))  # every pair once per epoch
        for start in range(0, 103, 20):
            pool = lengths[samples[start : start + 20]]
            assert (np.diff(pool) <= 0).all()  # longest first
        shuffled = EpochOrder(103, 3)
        first = {shuffled(epoch * 103 + i) for i in range(20)}
        assert set(samples[:20]) == first  # the same pairs as the shuffled epoch's first pool
    again = SortishOrder(lengths, pool=20, seed=3)
    assert [again(i) for i in range(250, 150, -1)] == [order(i) for i in range(250, 150, -1)]


def test_the_stream_orders_training_samples_by_its_pool():
    pairs = split([([1] * n, [2] * n) for n in range(1, 30)])
    assert isinstance(PairStream(pairs, EOT).sample_order(5, 8), EpochOrder)
    order = PairStream(pairs, EOT, pool=10).sample_order(5, 8)
    assert isinstance(order, SortishOrder)


@pytest.mark.parametrize("flavour", ["mbart", "gpt2"])
def test_trimmed_and_full_batches_give_the_same_loss(flavour):
    """Padding is masked (the source) or after every scored position (causal), so trimming it
    changes no loss."""
    rng = np.random.default_rng(1)
    pairs = split([(list(rng.integers(0, 9, n)), list(rng.integers(0, 9, m)))
                   for n, m in ((3, 7), (11, 2), (5, 5), (1, 1))])  # fmt: skip
    args = ModelArgs(flavour=flavour, n_layer=2, n_head=2, n_kv_head=2, n_embd=16, ffn_hidden=32,
                     block_size=64, vocab_size=10)  # fmt: skip
    torch.manual_seed(0)
    model = create_model(args)
    layout = PairStream if flavour == "mbart" else JoinedPairStream
    losses = []
    for trim in (False, True):
        x, y = layout(pairs, EOT, trim=trim).batch([0, 1, 2, 3, -1], 32, torch.device("cpu"))
        logits = model(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX))
    assert x.size(1) < (64 if flavour == "mbart" else 32)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
