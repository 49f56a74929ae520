"""What is being trained: the model's shape, the sequence length, the global batch, the precision.

``load_model_args`` turns a preset name (``llama-8b``, looked up in ``configs/``) or a config TOML
path into ``ModelArgs``, filling the config's "derive it" zeros the way the trainer does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clusterlm.errors import UserError
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.models.from_config import resolve_model_args
from clusterlm.models.gpt import ModelArgs

PRESET_DIR = Path(__file__).resolve().parents[3] / "configs"
PRECISIONS = ("bf16", "fp16", "fp32")


def load_model_args(name_or_path: str, vocab_size: int = 0) -> ModelArgs:
    """Model section of a preset or config file; ``vocab_size`` fills a vocabulary of 0."""
    candidates = [
        Path(name_or_path),
        Path("configs") / f"{name_or_path}.toml",
        PRESET_DIR / f"{name_or_path}.toml",
    ]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(
            f"model {name_or_path!r} not found; give a config TOML path or a preset name "
            "from configs/ (nano-cpu, gpt2-124m, llama-1b, llama-8b)"
        )
    cfg = load_config(str(path), {})
    if cfg.model.vocab_size <= 0 and vocab_size <= 0:
        raise UserError(
            f"{path} leaves model.vocab_size = 0 (taken from the tokenizer when training); "
            "pass --vocab-size"
        )
    return resolve_model_args(cfg, vocab_size)


@dataclass(frozen=True)
class Workload:
    """One optimizer step: ``global_batch_tokens`` tokens in sequences of ``seq_len``.

    ``fused_attention``: attention runs as a fused kernel (FlashAttention / SDPA) that keeps only
    its output and a per-row log-sum-exp, never the s x s score matrix. True by default, as for
    every current GPU stack and for this project's model (``F.scaled_dot_product_attention``).

    ``expert_imbalance``: a mixture of experts' routed tokens on the busiest expert-parallel rank
    over the mean, per MoE block (1: balanced routing). Expert parallelism waits for that rank at
    every exchange (``moe_cost``). The trainer's ``moe_load_imbalance`` (max over mean tokens per
    expert) bounds it from above: a rank's load is the sum of its experts'.
    """

    model: ModelArgs
    seq_len: int
    global_batch_tokens: int
    precision: str = "bf16"
    fused_attention: bool = True
    expert_imbalance: float = 1.0

    def __post_init__(self) -> None:
        if not self.expert_imbalance >= 1.0:
            raise UserError(
                f"--expert-imbalance is a busiest-over-mean ratio, at least 1; got "
                f"{self.expert_imbalance}"
            )
        if self.precision not in PRECISIONS:
            raise UserError(
                f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        if self.seq_len <= 0:
            raise UserError(f"--seq must be positive, got {self.seq_len}")
        if self.seq_len > self.model.block_size:
            raise UserError(
                f"--seq {self.seq_len} exceeds the model's context "
                f"block_size {self.model.block_size}; lower --seq"
            )
        if self.global_batch_tokens % self.seq_len:
            raise UserError(
                f"--global-batch-tokens {self.global_batch_tokens} is not a multiple of --seq "
                f"{self.seq_len}; use a multiple such as {self.seq_len * max(1, self.sequences)}"
            )

    @property
    def sequences(self) -> int:
        return self.global_batch_tokens // self.seq_len

    @property
    def mixed_precision(self) -> bool:
        return self.precision != "fp32"

    @property
    def activation_bytes(self) -> int:
        """Bytes of one activation element: 16-bit under mixed precision, else 4."""
        return 2 if self.mixed_precision else 4
