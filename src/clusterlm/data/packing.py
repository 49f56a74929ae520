"""Documents of a packed window: which document each token belongs to, and its position there.

``prepare`` follows every document (every contiguous piece of one in a split) with the tokenizer's
end-of-text token, so a training window packs the end of one document, whole documents, and the
start of another. The separator closes its document: it belongs to the text it ends, and the next
token starts a new document.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clusterlm.errors import UserError


def document_ids(tokens: torch.Tensor, separator: int) -> torch.Tensor:
    """[B, T] -> the index of each token's document within its window (0, 1, ...)."""
    ends = (tokens == separator).long()
    return ends.cumsum(1) - ends


def document_positions(documents: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> each token's position within its document (0 at each start)."""
    index = torch.arange(documents.size(1), device=documents.device).expand_as(documents)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    return index - torch.where(starts, index, 0).cummax(1).values


@dataclass(frozen=True)
class Packing:
    """How a run reads the documents of its windows: ``document_masking`` keeps attention inside
    each, ``position_reset`` restarts positions at each; both find the boundaries at
    ``separator``."""

    separator: int | None = None
    document_masking: bool = False
    position_reset: bool = False

    def documents(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The document ids of a batch of windows, when masking or resetting positions needs
        them."""
        if self.separator is None or not (self.document_masking or self.position_reset):
            return None
        return document_ids(tokens, self.separator)

    def positions(self, documents: torch.Tensor | None) -> torch.Tensor | None:
        """Each token's position where they restart at each document (None: 0..T-1)."""
        return (
            document_positions(documents) if self.position_reset and documents is not None else None
        )


def packing_for(eot_id: int | None, document_masking: bool, position_reset: bool) -> Packing:
    """The packing of a run on data whose separator is ``eot_id`` (the manifest's)."""
    if (document_masking or position_reset) and eot_id is None:
        key = "data.document_masking" if document_masking else "model.position_reset"
        raise UserError(
            f"{key} finds document boundaries at the end-of-text separator, but the prepared "
            "data has none (its tokenizer defines no end-of-text token); prepare the data with "
            "a tokenizer that has one or set it to false"
        )
    return Packing(eot_id, document_masking, position_reset)
