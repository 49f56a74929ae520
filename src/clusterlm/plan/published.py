"""Predictions against published large training runs (``clusterlm plan --published``).

Each row is a run whose shape, layout and throughput were published. Megatron-style reports count
recomputed FLOPs in "achieved TFLOP/s" (``counts_recompute``), so the prediction is compared in
the same convention. Where a paper leaves a setting out, the row's ``assumed`` says what we chose.
The planner's default calibration is used unchanged; nothing here is fitted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.cluster import GB, Link, load_cluster
from clusterlm.plan.layout import Layout
from clusterlm.plan.report import table
from clusterlm.plan.search import evaluate
from clusterlm.plan.workload import Workload

MIB = 2**20


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: ModelArgs
    cluster: str
    nodes: int
    layout: Layout
    seq_len: int
    global_batch_sequences: int
    reported_tflops: float  # per device
    counts_recompute: bool
    source: str
    assumed: str = ""
    inter_node_gb_s: float = 0.0  # overrides the preset's per-device inter-node bandwidth


def _gpt(n_layer: int, n_embd: int, n_head: int, vocab: int = 51200, seq: int = 2048) -> ModelArgs:
    return ModelArgs(flavour="gpt2", vocab_size=vocab, block_size=seq, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, ffn_hidden=4 * n_embd)


MEGATRON = "Narayanan et al. 2021, Efficient Large-Scale LM Training on GPU Clusters, Table 1"
MEGATRON_ASSUMED = "micro-batch 1, non-interleaved 1F1B, full recompute"

PUBLISHED = (
    PublishedRun("Megatron 145.6B", _gpt(80, 12288, 96), "8xA100-80GB", 192,
                 Layout(pp=8, tp=8, sequence_parallel=False, dp_replicate=24, micro_batches=96,
                        activation_checkpointing="full"),
                 2048, 2304, 148, True, MEGATRON, MEGATRON_ASSUMED),
    PublishedRun("Megatron 529.6B", _gpt(105, 20480, 128), "8xA100-80GB", 315,
                 Layout(pp=35, tp=8, sequence_parallel=False, dp_replicate=9, micro_batches=280,
                        activation_checkpointing="full"),
                 2048, 2520, 163, True, MEGATRON, MEGATRON_ASSUMED),
    PublishedRun("Megatron 1008B", _gpt(128, 25600, 160), "8xA100-80GB", 384,
                 Layout(pp=64, tp=8, sequence_parallel=False, dp_replicate=6, micro_batches=512,
                        activation_checkpointing="full"),
                 2048, 3072, 163, True, MEGATRON, MEGATRON_ASSUMED),
    PublishedRun("MT-NLG 530B", _gpt(105, 20480, 128), "8xA100-80GB", 280,
                 Layout(pp=35, tp=8, sequence_parallel=False, dp_replicate=8, micro_batches=240,
                        activation_checkpointing="full"),
                 2048, 1920, 126, True, "Smith et al. 2022, MT-NLG, section 3.3 (280 DGX nodes)",
                 MEGATRON_ASSUMED),
    PublishedRun("BLOOM 176B", _gpt(70, 14336, 112, vocab=250880), "8xA100-80GB", 48,
                 Layout(pp=12, tp=4, sequence_parallel=False, dp_shard=8, data_parallel="zero1", micro_batch_size=2,
                        micro_batches=128, activation_checkpointing="full"),
                 2048, 2048, 150, True, "BigScience 2022, BLOOM paper section 3.4.2 / training chronicles",
                 "full recompute; 4x100 Gb/s Omni-Path per node", inter_node_gb_s=6.25),
    PublishedRun("Llama 3 405B", ModelArgs(flavour="llama", vocab_size=128256, block_size=8192, n_layer=126,
                                           n_head=128, n_kv_head=8, n_embd=16384, ffn_hidden=53248),
                 "8xH100", 1024,
                 Layout(pp=16, tp=8, sequence_parallel=True, dp_shard=64, data_parallel="zero2",
                        pp_schedule="interleaved_1f1b", pp_stages_per_rank=2, micro_batches=32),
                 8192, 2048, 430, False, "Dubey et al. 2024, The Llama 3 Herd of Models, Table 4 (8,192 GPUs)",
                 "126 layers split evenly (the paper trims the first and last stage), v=2, no recompute"),
)


def compare_published() -> str:
    rows, errors = [], []
    for run in PUBLISHED:
        cluster = load_cluster(run.cluster).with_nodes(run.nodes)
        if run.inter_node_gb_s:
            cluster = dataclasses.replace(cluster, inter_node=Link(run.inter_node_gb_s * GB, cluster.inter_node.latency))
        work = Workload(run.model, run.seq_len, run.global_batch_sequences * run.seq_len, "bf16")
        c = evaluate(work, run.layout, cluster)
        predicted = (c.hardware_flops_per_s if run.counts_recompute else c.model_flops_per_s) / 1e12
        error = predicted / run.reported_tflops - 1
        errors.append(abs(error))
        rows.append([run.name, c.layout.describe(), f"{run.reported_tflops:.0f}", f"{predicted:.0f}", f"{error:+.0%}",
                     f"{c.mfu:.0%}", f"{c.memory.total / 2**30:.0f}", "yes" if c.fits(1.0) else "no"])
    header = ("run", "layout", "reported TF/s", "predicted TF/s", "error", "pred. MFU", "GiB/dev", "fits")
    notes = [f"TF/s per device, counting recomputed FLOPs where the source does (all but Llama 3); mean "
             f"absolute error {sum(errors) / len(errors):.0%}; default calibration, nothing fitted."]
    notes += [f"  {r.name}: {r.source}" + (f"; assumed {r.assumed}" if r.assumed else "") for r in PUBLISHED]
    return table(rows, header) + "\n" + "\n".join(notes)
