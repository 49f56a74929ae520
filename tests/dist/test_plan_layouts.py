"""Every kind of layout the planner can pick is a config the trainer runs: the search's layouts on a
4-device node, chosen so that every strategy, schedule, checkpointing mode, offload and
accumulation appears at least once (and, for a mixture of experts, every expert-parallel degree),
each emitted as a config and trained for two steps on 4 real processes (one process group, one
session per layout)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

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

MOE = dataclasses.replace(MODEL, flavour="llama", moe_experts=4, moe_top_k=2, moe_ffn_hidden=32, moe_layers="all",
                          moe_balance="aux_free")  # aux_free: a pipeline runs it
MOE_WORK = dataclasses.replace(WORK, model=MOE)


def features(layout: Layout) -> set[tuple[str, object]]:
    return {("data_parallel", layout.data_parallel), ("tp", layout.tp > 1), ("sp", layout.sequence_parallel),
            ("schedule", layout.pp_schedule if layout.pp > 1 else None), ("ac", layout.activation_checkpointing),
            ("offload", layout.cpu_offload), ("accumulation", layout.pp == 1 and layout.micro_batches > 1),
            ("cp", layout.cp_attention if layout.cp > 1 else None)}


def cover(candidates: list[Layout], kinds: Callable[[Layout], set]) -> list[Layout]:
    """Few of ``candidates`` that together show every feature value (``kinds``) one of them has (greedy)."""
    wanted = set().union(*map(kinds, candidates))
    chosen: list[Layout] = []
    while wanted:
        best = max(candidates, key=lambda layout: len(kinds(layout) & wanted))
        chosen.append(best)
        wanted -= kinds(best)
    return chosen


def covering_layouts() -> list[Layout]:
    return cover(list(enumerate_layouts(WORK, NODE)), features)


def test_layouts_convert_to_configs_and_back():
    for work in (WORK, MOE_WORK):
        for layout in enumerate_layouts(work, NODE):
            assert layout_from_config(layout_config(layout, work), layout.world_size) == layout


def _train_each(rank: int, world_size: int, work: Workload, layouts: list[Layout], data_dir: str,
                out_dir: str) -> list[float]:
    losses = []
    for i, layout in enumerate(layouts):
        cfg = apply_overrides(layout_config(layout, work), {
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
    results = run_distributed(_train_each, 4, WORK, layouts, str(data_dir), str(tmp_path), timeout=150)
    for rank_losses in results:
        assert len(rank_losses) == 2 * len(layouts) and all(math.isfinite(x) for x in rank_losses)



def test_every_kind_of_planned_expert_parallel_layout_trains(data_dir, tmp_path):
    """The search's ep layouts of a mixture of experts, covering each ep, strategy, tp, pp and offload."""
    def moe_features(layout: Layout) -> set[tuple[str, object]]:
        return {("ep", layout.ep), ("data_parallel", layout.data_parallel), ("tp", layout.tp > 1),
                ("pp", layout.pp > 1), ("offload", layout.cpu_offload)}

    chosen = cover([layout for layout in enumerate_layouts(MOE_WORK, NODE) if layout.ep > 1], moe_features)
    kinds = set().union(*map(moe_features, chosen))
    assert {("ep", 2), ("ep", 4), ("tp", True), ("pp", True), ("offload", True)} <= kinds
    results = run_distributed(_train_each, 4, MOE_WORK, chosen, str(data_dir), str(tmp_path), timeout=150)
    for rank_losses in results:
        assert len(rank_losses) == 2 * len(chosen) and all(math.isfinite(x) for x in rank_losses)
