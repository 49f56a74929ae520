"""What a decoder reads besides the tokens of a packed window: each token's position and the
attention mask, computed from the token ids outside the model (``Transformer.forward``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from clusterlm.data.packing import Packing
from clusterlm.models.attention import document_mask

Inputs = dict[str, Any]


@dataclass(frozen=True)
class ModelInputs:
    """The model's keyword inputs for a batch of windows: ``positions`` where they restart at each
    document, ``mask`` where attention stays inside it. ``use_flex`` builds flex attention's block
    mask (where the kernels are compiled or on a GPU) rather than the boolean fallback."""

    packing: Packing = field(default_factory=Packing)
    use_flex: bool = False

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Inputs]:
        """A batch of windows (x, y) -> what this rank feeds the model: its tokens, their targets
        and the keyword inputs (none for plain windows, so an encoder is called as before)."""
        documents = self.packing.documents(x)
        if documents is None:
            return x, y, {}
        return x, y, {"positions": self.packing.positions(documents), "mask": self.mask(documents)}

    def mask(self, documents: torch.Tensor) -> Any:
        """The attention mask of windows of ``documents``, or None where attention crosses
        them."""
        if not self.packing.document_masking:
            return None
        return document_mask(documents, self.use_flex)

    def combine(self, sums: torch.Tensor) -> torch.Tensor:
        """Evaluation sums of this rank's tokens -> those of the whole windows (the same here)."""
        return sums
