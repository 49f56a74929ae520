"""Every kind of layout the planner can pick is a config the trainer runs: the search's layouts on a
4-device node, chosen so that every strategy, schedule, checkpointing mode, offload and
accumulation appears at least once, each emitted as a config and trained for two steps on 4 real
processes (one process group, one session per layout)."""

from __future__ import annotations

import math

from clusterlm.config import apply_overrides
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.cluster import GIB, Cluster, Device, Host, Link
from clusterlm.plan.layout import Layout, layout_config, layout_from_config
from clusterlm.plan.search import SEARCHED_SCHEDULES, enumerate_layouts
from clusterlm.plan.workload import Workload
from clusterlm.train.session import build_session
from clusterlm.train.trainer import train_step

from .helpers import run_distributed

MODEL = ModelArgs(flavour="gpt2", vocab_size=96, block_size=16, n_layer=4, n_head=2, n_kv_head=2, n_embd=32,
                  ffn_hidden=128)
WORK = Workload(MODEL, 16, 8 * 16, "fp32", fused_attention=False)  # the search tries selective AC then
LINK = Link(5e9, 20e-6)
NODE = Cluster("node", 1, 4, Device("cpu", 16 * GIB, {"fp32": 1e11}), LINK, LINK,
               host=Host(64 * GIB, LINK, 1e9))


def features(layout: Layout) -> set[tuple[str, object]]:
    return {("data_parallel", layout.data_parallel), ("tp", layout.tp > 1), ("sp", layout.sequence_parallel),
            ("schedule", layout.pp_schedule if layout.pp > 1 else None), ("ac", layout.activation_checkpointing),
            ("offload", layout.cpu_offload), ("accumulation", layout.pp == 1 and layout.micro_batches > 1),
            ("cp", layout.cp_attention if layout.cp > 1 else None)}


def covering_layouts() -> list[Layout]:
    """Few layouts that together show every feature value some searched layout has (greedy cover)."""
    candidates = list(enumerate_layouts(WORK, NODE))
    wanted = set().union(*map(features, candidates))
    chosen: list[Layout] = []
    while wanted:
        best = max(candidates, key=lambda layout: len(features(layout) & wanted))
        chosen.append(best)
        wanted -= features(best)
    return chosen


def test_layouts_convert_to_configs_and_back():
    for layout in enumerate_layouts(WORK, NODE):
        assert layout_from_config(layout_config(layout, WORK), layout.world_size) == layout


def _train_each(rank: int, world_size: int, layouts: list[Layout], data_dir: str, out_dir: str) -> list[float]:
    losses = []
    for i, layout in enumerate(layouts):
        cfg = apply_overrides(layout_config(layout, WORK), {
            "model.vocab_size": 0,  # the tokenizer's
            "data.dir": data_dir, "training.out_dir": f"{out_dir}/{i}",
            "training.steps": 2, "metrics.peak_flops": 1e12,
        })
        session = build_session(cfg)
        losses += [float(train_step(session)) for _ in range(2)]
    return losses


def test_every_kind_of_planned_layout_trains(data_dir, tmp_path):
    layouts = covering_layouts()
    kinds = set().union(*map(features, layouts))
    assert {("schedule", name) for name, _ in SEARCHED_SCHEDULES} <= kinds
    assert {("data_parallel", "hsdp"), ("offload", True), ("ac", "selective")} <= kinds
    assert {("cp", "ring"), ("cp", "all_to_all")} <= kinds
    results = run_distributed(_train_each, 4, layouts, str(data_dir), str(tmp_path), timeout=150)
    for rank_losses in results:
        assert len(rank_losses) == 2 * len(layouts) and all(math.isfinite(x) for x in rank_losses)
