import pytest
import torch

from clusterlm.data.packing import Packing, document_ids, document_positions, packing_for
from clusterlm.errors import UserError

SEP = 9


def test_the_separator_closes_its_document():
    tokens = torch.tensor([[1, 2, SEP, 3, SEP, SEP, 4, 5]])
    assert document_ids(tokens, SEP).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]


def test_positions_restart_at_each_document():
    documents = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5, 5, 6]])
    assert document_positions(documents).tolist() == [
        [0, 1, 2, 0, 1, 0, 0, 1],
        [0, 1, 2, 3, 4, 5, 6, 0],
    ]


def test_packing_without_either_feature_reads_nothing():
    tokens = torch.tensor([[1, SEP, 2]])
    assert Packing(SEP).documents(tokens) is None
    reset = Packing(SEP, position_reset=True)
    assert reset.positions(reset.documents(tokens)).tolist() == [[0, 1, 0]]
    assert Packing(SEP, document_masking=True).positions(document_ids(tokens, SEP)) is None


@pytest.mark.parametrize("masking,reset", [(True, False), (False, True)])
def test_data_without_a_separator_is_refused(masking, reset):
    with pytest.raises(UserError, match="end-of-text"):
        packing_for(None, masking, reset)
    assert packing_for(None, False, False) == Packing()
