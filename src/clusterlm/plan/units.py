"""Human-sized numbers on the command line and in tables: '4M' tokens, '15T' tokens, '31.4 GiB'.

Batch sizes are powers of two in practice, so ``parse_batch_tokens`` reads suffixes as binary
(4M = 4 * 2**20 = 512 sequences of 8192, the Llama 3 convention of "4M tokens"); corpus and
training-run sizes are quoted in decimal, so ``parse_train_tokens`` reads 15T as 15e12.
"""

from __future__ import annotations

from clusterlm.errors import UserError

SUFFIXES = "KMGTP"
GIB = 2**30


def _parse(text: str, base: int, what: str) -> float:
    cleaned = text.strip().upper().replace("_", "")
    power = 0
    if cleaned and cleaned[-1] in SUFFIXES:
        power = SUFFIXES.index(cleaned[-1]) + 1
        cleaned = cleaned[:-1]
    try:
        value = float(cleaned) * base**power
    except ValueError:
        raise UserError(f"{what} {text!r} is not a number; write e.g. 4M, 2048 or 1.5T") from None
    if value <= 0:
        raise UserError(f"{what} must be positive, got {text!r}")
    return value


def parse_batch_tokens(text: str) -> int:
    """'4M' -> 4194304 (binary suffixes K, M, G, T)."""
    value = _parse(text, 1024, "--global-batch-tokens")
    if not value.is_integer():
        raise UserError(f"--global-batch-tokens {text!r} is not a whole number of tokens")
    return int(value)


def parse_train_tokens(text: str) -> float:
    """'15T' -> 1.5e13 (decimal suffixes K, M, G, T, P)."""
    return _parse(text, 1000, "--train-tokens")


def human(value: float, unit: str = "") -> str:
    """1.5e13 -> '15.0T' (decimal)."""
    for power in range(len(SUFFIXES), 0, -1):
        if abs(value) >= 1000**power:
            return f"{value / 1000**power:.3g}{SUFFIXES[power - 1]}{unit}"
    return f"{value:.3g}{unit}"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f}"
