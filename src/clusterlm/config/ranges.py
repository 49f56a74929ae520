"""The range of every numeric key: finite, of the right sign, within its bounds.

``RANGES`` names a rule for every ``int`` and ``float`` field of the config (a unit test checks
that none is missing). ``check_ranges`` applies them before anything starts: a float must be a
finite number, an integer must fit in 64 bits, and both must satisfy the key's rule. Each
failure is one line naming the key, the rule and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from clusterlm.config.sections import Config
from clusterlm.errors import UserError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Range:
    """``low`` <= value <= ``high`` (either end open when its flag says so); ``text`` is what the
    error says the value must be."""

    text: str
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


POSITIVE = Range("must be positive", low=0, low_open=True)
NON_NEGATIVE = Range("must be >= 0", low=0)
AT_LEAST_ONE = Range("must be >= 1", low=1)
FRACTION = Range("must be in [0, 1)", low=0, high=1, high_open=True)
OPEN_FRACTION = Range("must be in (0, 1)", low=0, high=1, low_open=True, high_open=True)
SHARE = Range("must be in (0, 1]", low=0, high=1, low_open=True)

RANGES: dict[str, Range] = {
    "data.cache_gb": POSITIVE,
    "data.retry_s": NON_NEGATIVE,
    "model.n_layer": POSITIVE,
    "model.decoder_layers": NON_NEGATIVE,
    "model.n_head": POSITIVE,
    "model.n_kv_head": NON_NEGATIVE,
    "model.n_embd": POSITIVE,
    "model.block_size": POSITIVE,
    "model.vocab_size": NON_NEGATIVE,
    "model.ffn_hidden": NON_NEGATIVE,
    "model.ffn_multiple_of": POSITIVE,
    "model.dropout": FRACTION,
    "model.norm_eps": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.moe_experts": NON_NEGATIVE,
    "model.moe_top_k": AT_LEAST_ONE,
    "model.moe_shared_experts": NON_NEGATIVE,
    "model.moe_ffn_hidden": NON_NEGATIVE,
    "model.moe_aux_loss_coeff": NON_NEGATIVE,
    "model.moe_bias_rate": NON_NEGATIVE,
    "training.steps": POSITIVE,
    "training.micro_batch_size": POSITIVE,
    "training.seq_len": NON_NEGATIVE,
    "training.tokens_per_step": NON_NEGATIVE,
    "training.seed": NON_NEGATIVE,
    "training.grad_clip": NON_NEGATIVE,
    "training.eval_interval": NON_NEGATIVE,
    "training.eval_batches": POSITIVE,
    "training.log_interval": POSITIVE,
    "training.threads": NON_NEGATIVE,
    "training.mlm_probability": OPEN_FRACTION,
    "training.label_smoothing": FRACTION,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.decay_steps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": FRACTION,
    "optim.beta2": FRACTION,
    "optim.eps": POSITIVE,
    "optim.momentum": FRACTION,
    "parallel.dp_replicate": NON_NEGATIVE,
    "parallel.dp_shard": NON_NEGATIVE,
    "parallel.tp": POSITIVE,
    "parallel.cp": POSITIVE,
    "parallel.ep": AT_LEAST_ONE,
    "parallel.pp": POSITIVE,
    "parallel.pp_microbatches": NON_NEGATIVE,
    "parallel.pp_stages_per_rank": NON_NEGATIVE,
    "parallel.bucket_mb": POSITIVE,
    "parallel.timeout_s": POSITIVE,
    "parallel.ps_servers": AT_LEAST_ONE,
    "parallel.ps_staleness": Range("is -1 (fully asynchronous) or a bound >= 0", low=-1),
    "parallel.ps_lease_s": POSITIVE,
    "parallel.local_steps": AT_LEAST_ONE,
    "parallel.outer_lr": POSITIVE,
    "parallel.outer_momentum": FRACTION,
    "parallel.hang_timeout_s": Range("must be >= 0 (0 = off)", low=0),
    "comm.powersgd_rank": AT_LEAST_ONE,
    "comm.topk_ratio": SHARE,
    "checkpoint.interval": NON_NEGATIVE,
    "checkpoint.keep_last": POSITIVE,
    "checkpoint.preempt_grace_s": POSITIVE,
    "metrics.peak_flops": NON_NEGATIVE,
    "metrics.straggler_ratio": NON_NEGATIVE,
    "metrics.prometheus_port": Range(
        "must be a port number in 0..65535 (0 = off)", low=0, high=65535
    ),
    "finetune.freeze_layers": NON_NEGATIVE,
    "finetune.head_lr": NON_NEGATIVE,
}


def numeric_values(cfg: Config) -> dict[str, int | float]:
    """Every int and float key of ``cfg`` with its value (booleans are not numbers here)."""
    values = {}
    for section in dataclasses.fields(cfg):
        body = getattr(cfg, section.name)
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"{section.name}.{f.name}"] = value
    return values


def range_error(key: str, value: int | float) -> str | None:
    """Why ``value`` is impossible for ``key`` (one line), or None when it is fine."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be a finite number, got {value}"
    if isinstance(value, int) and abs(value) > INT64_MAX:
        return f"{key} must be at most {INT64_MAX} in magnitude (64 bits), got {value}"
    rule = RANGES.get(key)
    if rule is not None and not rule.admits(value):
        return f"{key} {rule.text}, got {value}"
    return None


def check_ranges(cfg: Config) -> None:
    """The first numeric key out of its range fails, in one line."""
    for key, value in numeric_values(cfg).items():
        problem = range_error(key, value)
        if problem:
            raise UserError(problem)
