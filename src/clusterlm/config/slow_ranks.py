"""``training.slow_ranks``: which ranks an experiment slows, and by what factor (the slowing
itself: ``clusterlm.train.injected_slowdown``)."""

from __future__ import annotations

from clusterlm.errors import UserError


def parse_slow_ranks(text: str) -> dict[int, float]:
    """'1:3,2:1.5' -> {1: 3.0, 2: 1.5}; '' -> {}."""
    factors: dict[int, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        rank, sep, factor = item.partition(":")
        try:
            if not sep:
                raise ValueError
            factors[int(rank)] = float(factor)
        except ValueError:
            raise UserError(
                f"training.slow_ranks takes RANK:FACTOR[,RANK:FACTOR...], e.g. '1:3'; got {text!r}"
            ) from None
        if factors[int(rank)] < 1 or int(rank) < 0:
            raise UserError(f"training.slow_ranks: ranks are >= 0 and factors >= 1, got {item!r}")
    return factors


def rank_factor(slow_ranks: str, rank: int, world_size: int) -> float:
    factors = parse_slow_ranks(slow_ranks)
    beyond = [r for r in factors if r >= world_size]
    if beyond:
        raise UserError(
            f"training.slow_ranks names rank {beyond[0]}, but the job has {world_size} ranks"
        )
    return factors.get(rank, 1.0)
