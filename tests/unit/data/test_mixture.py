"""A mixture of prepared datasets: ratios, a pure function of the sample index, resumption and
data-parallel layouts reading the same global samples, and the mixes refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterlm.config.data_mix import MixSource
from clusterlm.data.loader import TokenLoader, TokenStream
from clusterlm.data.mixture import MixedStream, MixSchedule
from clusterlm.data.prepare import PrepareOptions, prepare
from clusterlm.errors import UserError

BLOCK = 8
STEP_SAMPLES = 12  # a nano-cpu step: micro-batch 12 on one rank


@pytest.fixture
def two_datasets(corpus_dir, tmp_path):
    """Two datasets of the same tokenizer: the tiny corpus, and part of it reversed."""
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(PrepareOptions(inputs=(str(corpus_dir),), out=str(a), shard_tokens=50))
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed((corpus_dir / "b.txt").read_text())), encoding="utf-8")
    tokenizer = str(a / "tokenizer.json")
    prepare(PrepareOptions(inputs=(str(other),), out=str(b), tokenizer=tokenizer, shard_tokens=64))
    return [MixSource(str(a), 0.7), MixSource(str(b), 0.3)]


@pytest.mark.parametrize("weights", [(0.7, 0.3), (5.0, 3.0, 2.0), (0.01, 0.99), (1, 1, 1, 1)])
@pytest.mark.parametrize("seed", [0, 1337])
def test_realised_ratios_track_the_weights(weights, seed):
    schedule = MixSchedule(weights, seed)
    shares = np.array(weights) / sum(weights)
    for samples in (1000, 1000 * STEP_SAMPLES):  # 1,000 steps of one sample, or of nano-cpu's
        counts = np.array(schedule.counts(samples))
        assert np.abs(counts / samples - shares).max() < 0.01
        # Every prefix is within a sample per dataset of its share.
        assert np.abs(counts - samples * shares).max() <= len(weights)


def test_locate_and_counts_agree():
    schedule = MixSchedule((0.5, 0.3, 0.2), seed=3)
    served = [0, 0, 0]
    for sample in range(3000):
        source, position = schedule.locate(sample)
        assert position == served[source]  # each dataset's samples are read in turn
        served[source] += 1
        assert schedule.counts(sample + 1) == served


def test_schedule_is_a_function_of_seed_and_index():
    a, b = MixSchedule((0.7, 0.3), 0), MixSchedule((0.7, 0.3), 0)
    far = 10**15  # exact arithmetic: no drift however long the run
    assert [a.locate(i) for i in range(far, far + 50)] == [
        b.locate(i) for i in range(far, far + 50)
    ]
    assert sum(a.counts(far)) == far and abs(a.counts(far)[0] - 0.7 * far) <= 1
    other = MixSchedule((0.7, 0.3), 1)
    assert [a.locate(i)[0] for i in range(100)] != [other.locate(i)[0] for i in range(100)]


def test_items_are_windows_of_their_dataset(two_datasets):
    mixed = MixedStream(two_datasets, "train")
    streams = [TokenStream(s.dir, "train") for s in two_datasets]
    order = mixed.sample_order(seed=5, block_size=BLOCK)
    schedule = mixed.schedule(5)
    first = streams[0].num_windows(BLOCK)
    assert mixed.num_windows(BLOCK) == first + streams[1].num_windows(BLOCK)
    samples = list(range(200))
    x, y = mixed.batch([order(i) for i in samples], BLOCK, torch.device("cpu"))
    for row, sample in enumerate(samples):
        source, _ = schedule.locate(sample)
        window = order(sample) - (first if source else 0)
        expected = streams[source].windows([window], BLOCK)[0]
        assert (
            x[row].tolist() == expected[:-1].tolist() and y[row].tolist() == expected[1:].tolist()
        )


def test_each_dataset_repeats_its_windows_by_epochs(two_datasets):
    mixed = MixedStream(two_datasets, "train")
    order, schedule = mixed.sample_order(0, BLOCK), mixed.schedule(0)
    small = TokenStream(two_datasets[1].dir, "train").num_windows(BLOCK)
    first = TokenStream(two_datasets[0].dir, "train").num_windows(BLOCK)
    seen = [order(i) - first for i in range(2000) if schedule.locate(i)[0] == 1][: 2 * small]
    assert sorted(seen[:small]) == sorted(seen[small:]) == list(range(small))


def global_batches(sources, steps, dp_size, micro, grad_accum=1, resume_at=None):
    """The x of every step's global batch (in sample order), read by dp_size ranks; with
    ``resume_at``, fresh loaders take over from a saved state at that step."""

    def loaders(state=None):
        made = []
        for rank in range(dp_size):
            lo = TokenLoader(
                MixedStream(sources, "train"), BLOCK, micro, grad_accum, rank, dp_size, seed=7
            )
            if state is not None:
                lo.load_state_dict(state)
            made.append(lo)
        return made

    ranks, out = loaders(), []
    for step in range(steps):
        if step == resume_at:
            ranks = loaders(ranks[0].state_dict())
        per_rank = [lo.next_step() for lo in ranks]
        rows = {}
        for rank, batches in enumerate(per_rank):
            for m, (x, _) in enumerate(batches):
                start = (m * dp_size + rank) * micro
                for k in range(micro):
                    rows[start + k] = x[k]
        out.append(torch.stack([rows[i] for i in sorted(rows)]))
    return out


def test_resumed_and_resized_runs_read_the_same_samples(two_datasets):
    straight = global_batches(two_datasets, 30, dp_size=1, micro=8)
    for other in (
        global_batches(two_datasets, 30, dp_size=1, micro=8, resume_at=11),
        global_batches(two_datasets, 30, dp_size=4, micro=2),
        global_batches(two_datasets, 30, dp_size=2, micro=2, grad_accum=2),
        global_batches(two_datasets, 30, dp_size=2, micro=4, resume_at=17),
    ):
        assert all(torch.equal(a, b) for a, b in zip(straight, other, strict=True))


def test_elastic_four_to_two_ranks_mid_run(two_datasets):
    """4 ranks for 9 steps, then 2 ranks resume from their state: as one uninterrupted run."""
    straight = global_batches(two_datasets, 20, dp_size=1, micro=8)
    four = global_batches(two_datasets, 9, dp_size=4, micro=2)
    lo = TokenLoader(MixedStream(two_datasets, "train"), BLOCK, 2, 1, 0, 4, seed=7)
    lo.samples_consumed = 9 * 8
    state = lo.state_dict()
    two = []
    ranks = [
        TokenLoader(MixedStream(two_datasets, "train"), BLOCK, 4, 1, r, 2, seed=7) for r in (0, 1)
    ]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(11):
        (x0, _), (x1, _) = (r.next_step()[0] for r in ranks)
        two.append(torch.cat([x0, x1]))
    assert all(torch.equal(a, b) for a, b in zip(straight, four + two, strict=True))


def test_datasets_of_other_tokenizers_are_refused(two_datasets, corpus_dir, tmp_path):
    other = tmp_path / "other"
    prepare(PrepareOptions(inputs=(str(corpus_dir / "sub"),), out=str(other)))
    with pytest.raises(UserError, match="another tokenizer"):
        MixedStream([two_datasets[0], MixSource(str(other), 1.0)], "train")
    with pytest.raises(UserError, match="no dataset"):
        MixedStream([], "train")
