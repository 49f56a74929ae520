"""Values shared between ranks as JSON agree with torch's (pickling) object collectives."""

from __future__ import annotations

import torch.distributed as dist

from clusterlm.distributed.json_collectives import all_gather_json, broadcast_json

from .helpers import run_distributed


def _shared(rank: int, world_size: int) -> dict:
    mine = {"rank": rank, "name": "é" * rank, "loss": float("inf") if rank else 0.5}
    chosen = {"path": "/runs/a", "state": {"step": 7, "ids": [1, 2]}} if rank == 0 else None
    boxes: list = [None] * world_size
    dist.all_gather_object(boxes, mine)
    box = [chosen]
    dist.broadcast_object_list(box, src=0)
    return {
        "broadcast": broadcast_json(chosen),
        "from_last": broadcast_json(f"rank {rank}", src=world_size - 1),
        "empty": broadcast_json({} if rank == 0 else None),
        "gathered": all_gather_json(mine),
        "torch_broadcast": box[0],
        "torch_gathered": boxes,
    }


def test_broadcast_and_all_gather_agree_with_the_object_collectives():
    for result in run_distributed(_shared, 3, timeout=60):
        assert result["broadcast"] == result["torch_broadcast"]
        assert result["gathered"] == result["torch_gathered"]
        assert result["from_last"] == "rank 2"
        assert result["empty"] == {}


def test_without_a_process_group_a_value_is_its_own():
    assert broadcast_json({"a": 1}) == {"a": 1}
    assert all_gather_json([1]) == [[1]]
