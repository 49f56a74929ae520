"""Which layers, and whether the embedding and the head, each pipeline rank of a layout holds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

from clusterlm.models.gpt import ModelArgs
from clusterlm.parallel.pipeline import stage_indices_on_rank, stage_layer_ranges
from clusterlm.plan.layout import Layout


@dataclass(frozen=True)
class RankShare:
    """What one pipeline rank holds: its blocks by index (over all its stages), and whether it
    holds the embeddings (the first stage) and the output head (the last stage)."""

    blocks: tuple[int, ...]
    embedding: bool
    head: bool

    @property
    def layers(self) -> int:
        return len(self.blocks)


def _stage_layers(args: ModelArgs, stages: int) -> tuple[int, ...]:
    return _balanced_layers(dataclasses.astuple(args), stages)


@lru_cache(maxsize=4096)
def _balanced_layers(args: tuple, stages: int) -> tuple[int, ...]:
    """Layers per stage (cached: the search asks for the same split thousands of times)."""
    return tuple(len(r) for r in stage_layer_ranges(ModelArgs(*args), stages))


def rank_share(args: ModelArgs, layout: Layout, pp_rank: int) -> RankShare:
    """The trainer's split: stages balanced by parameter count (``stage_layer_ranges``) and placed
    on ranks by the schedule (``stage_indices_on_rank``; a V puts the first and last on rank 0)."""
    stages = layout.pp * layout.pp_stages_per_rank
    if stages == 1:
        return RankShare(tuple(range(args.n_layer)), True, True)
    counts = _stage_layers(args, stages)
    held = stage_indices_on_rank(layout.pp_schedule, pp_rank, layout.pp, layout.pp_stages_per_rank)
    starts = [sum(counts[:i]) for i in range(stages)]
    blocks = sorted(b for i in held for b in range(starts[i], starts[i] + counts[i]))
    return RankShare(tuple(blocks), 0 in held, stages - 1 in held)
