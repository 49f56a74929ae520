"""Token ids that no tokenizer assigns: an encoder's special tokens, which follow the tokenizer's
vocabulary in its token table, and the filler that pads a classifier's rows."""

from __future__ import annotations

SPECIAL_TOKENS = ("[MASK]", "[CLS]", "[SEP]", "[PAD]")
PAD = -1  # pads a labelled example's row; never a token id, so the classifier finds the padding


def special_token_id(vocab_size: int, token: str) -> int:
    """Id of special ``token`` after a tokenizer vocabulary of ``vocab_size`` tokens."""
    return vocab_size + SPECIAL_TOKENS.index(token)
