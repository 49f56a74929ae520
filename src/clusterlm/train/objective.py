"""The training objective's data side: for ``training.objective = mlm``, the masking rule that
turns token windows into masked inputs and labels (``clusterlm.data.masking``). The loss itself is
the same cross-entropy for both objectives: masked-LM labels mark unmasked positions with
``IGNORE_INDEX``, which it leaves out."""

from __future__ import annotations

from clusterlm.config import Config
from clusterlm.data.masking import MaskingRule
from clusterlm.data.special_tokens import special_token_id


def masking_rule(cfg: Config) -> MaskingRule | None:
    """The run's masking rule (None for next-token prediction); ``cfg.model.vocab_size`` is the
    resolved one (the model has been built), and ``[MASK]`` follows it."""
    if cfg.training.objective != "mlm":
        return None
    vocab = cfg.model.vocab_size
    return MaskingRule(
        cfg.training.seed, cfg.training.mlm_probability, special_token_id(vocab, "[MASK]"), vocab
    )
