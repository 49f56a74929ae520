"""Rows and targets of translation pairs: source, then the end-of-text token and the target, each
padded; targets shifted by one and ignored where padded; long pairs cut; filler rows."""

import numpy as np
import torch

from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.pair_batches import PairStream
from clusterlm.data.translation import PairSplit, Sequences

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
