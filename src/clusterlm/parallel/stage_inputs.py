"""What each pipeline stage reads besides the hidden state: the positions and attention mask of
the micro-batch it runs (``clusterlm.parallel.packed_inputs``).

A pipeline passes from stage to stage only the hidden state, but every layer needs its tokens'
positions and document mask. Every schedule runs a stage's forwards in micro-batch order, so
each stage takes the inputs of its micro-batches from a queue, one per forward.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from torch import nn
from torch.distributed.pipelining import PipelineStage

from clusterlm.parallel.packed_inputs import Inputs


class StageInputs:
    """The per-micro-batch keyword inputs of this rank's ``stages``, fed before each step."""

    def __init__(self, stages: list[PipelineStage]):
        self.queues: dict[int, deque[Inputs]] = {}
        self.inferring = False
        for stage in stages:
            queue: deque[Inputs] = deque()
            self.queues[stage.stage_index] = queue
            # First, so that a hook filling missing positions (context parallel) sees them.
            stage.submod.register_forward_pre_hook(
                self._supplier(queue), with_kwargs=True, prepend=True
            )
            self._peek_while_inferring(stage)

    def feed(self, micro_batches: list[Inputs]) -> None:
        """The inputs of the next forwards of every stage: one entry per micro-batch, in order."""
        for queue in self.queues.values():
            queue.clear()
            queue.extend(micro_batches)

    def _supplier(self, queue: deque[Inputs]):
        def supply(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if not queue:  # called outside a fed step, e.g. by a plain forward
                return args, kwargs
            supplied = queue[0] if self.inferring else queue.popleft()
            return args, {**supplied, **kwargs}

        return supply

    def _peek_while_inferring(self, stage: PipelineStage) -> None:
        # In its first step a stage runs its module once more, on placeholders shaped like the
        # first micro-batch, to learn what it sends: that forward must not use up an entry.
        infer = stage._forward_metadata_inference

        def infer_peeking(*args: Any, **kwargs: Any) -> Any:
            self.inferring = True
            try:
                return infer(*args, **kwargs)
            finally:
                self.inferring = False

        stage._forward_metadata_inference = infer_peeking  # type: ignore[method-assign]
