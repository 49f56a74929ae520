"""Predictions against published large training runs (``clusterlm plan --published``).

The runs, with their sources and the settings we had to assume, are data:
``configs/plan/published-runs.toml``. Megatron-style reports count recomputed FLOPs in "achieved
TFLOP/s" (``counts_recompute``), so the prediction is compared in the same convention. Each
cluster preset's calibration is used unchanged. Rows marked ``fit = true`` are where a preset's
efficiency table came from (``fit_published_efficiency`` refits it: the A100's, from Megatron-LM's
pipeline-free runs); the report counts the others, the independent checks, on their own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from clusterlm.plan.calibration import Calibration
from clusterlm.plan.cluster import GB, Cluster, Link, load_cluster
from clusterlm.plan.efficiency import shape_efficiency
from clusterlm.plan.fit import fit_efficiency
from clusterlm.plan.records import DATA_DIR, layout_from, load_rows, model_from
from clusterlm.plan.report import table
from clusterlm.plan.search import Candidate, evaluate
from clusterlm.plan.timing import StepTime
from clusterlm.plan.workload import Workload

PUBLISHED_RUNS = DATA_DIR / "published-runs.toml"
FIELDS = {
    "name": str,
    "source": str,
    "cluster": str,
    "nodes": int,
    "seq_len": int,
    "global_batch_sequences": int,
    "reported_tflops": float,
    "counts_recompute": bool,
    "model": dict,
    "layout": dict,
}
WITHIN = 0.15  # the error the report counts as a good prediction


def _predict(
    run: dict[str, Any], calibration: Calibration | None = None
) -> tuple[Candidate, float]:
    """The run's predicted candidate and TF/s per device in the source's convention."""
    cluster: Cluster = load_cluster(run["cluster"]).with_nodes(run["nodes"])
    if run.get("intra_node_gb_s"):  # a run's own links where they differ from the preset's
        intra = Link(run["intra_node_gb_s"] * GB, cluster.intra_node.latency)
        cluster = dataclasses.replace(cluster, intra_node=intra)
    if run.get("inter_node_gb_s"):
        inter = Link(run["inter_node_gb_s"] * GB, cluster.inter_node.latency)
        cluster = dataclasses.replace(cluster, inter_node=inter)
    if calibration is not None:
        cluster = dataclasses.replace(cluster, calibration=calibration)
    work = Workload(
        model_from(run), run["seq_len"], run["global_batch_sequences"] * run["seq_len"], "bf16"
    )
    c = evaluate(work, layout_from(run), cluster)
    return c, (c.hardware_flops_per_s if run["counts_recompute"] else c.model_flops_per_s) / 1e12


def fit_published_efficiency(cluster: str, path: str | Path = PUBLISHED_RUNS) -> Calibration:
    """The efficiency table of preset ``cluster`` refitted on its rows marked ``fit``."""
    rows = [
        run
        for run in load_rows(path, "run", FIELDS)
        if run.get("fit") and run["cluster"] == cluster
    ]
    base = load_cluster(cluster).calibration
    return fit_efficiency(
        lambda cal: [_predict(run, cal)[1] / run["reported_tflops"] for run in rows], base
    )


def compare_published(path: str | Path = PUBLISHED_RUNS) -> str:
    rows, errors, notes, shares = [], [], [], []
    for run in load_rows(path, "run", FIELDS):
        c, predicted = _predict(run)
        shares.append(_step_shares(run["name"], c))
        error = predicted / run["reported_tflops"] - 1
        if not run.get("fit"):
            errors.append(abs(error))
        rows.append(
            [
                run["name"] + (" (fit)" if run.get("fit") else ""),
                c.layout.describe(),
                f"{run['reported_tflops']:.0f}",
                f"{predicted:.0f}",
                f"{error:+.0%}",
                f"{c.mfu:.0%}",
                f"{c.memory.total / 2**30:.0f}",
                "yes" if c.fits(1.0) else "no",
            ]
        )
        notes.append(
            f"  {run['name']}: {run['source']}"
            + (f"; assumed {run['assumed']}" if run.get("assumed") else "")
        )
    header = (
        "run",
        "layout",
        "reported TF/s",
        "predicted TF/s",
        "error",
        "pred. MFU",
        "GiB/dev",
        "fits",
    )
    within = sum(e <= WITHIN for e in errors)
    summary = (
        "TF/s per device, counting recomputed FLOPs where the source does; "
        f"on the {len(errors)} runs no calibration was fitted to, "
        f"mean absolute error {sum(errors) / len(errors):.0%}, {within} of "
        f"{len(errors)} within {WITHIN:.0%}; "
        "(fit) rows are where a preset's efficiency table came from. "
        f"Runs: {path}"
    )
    terms = tuple(name.replace("_", " ") for name, _ in StepTime(0, 0, 0, 0, 0, 0).items())
    breakdown = table(shares, ("run", "matmul eff.", *terms), text_columns=1)
    return "\n".join(
        [
            table(rows, header),
            summary,
            "",
            "Where each predicted step goes (% of the step):",
            breakdown,
            "",
            *notes,
        ]
    )


def _step_shares(name: str, c: Candidate) -> list[str]:
    """The run's compute efficiency and each modelled term of its step time, as % of the step."""
    efficiency = shape_efficiency(c.work, c.layout, c.cluster.calibration)
    return [
        name,
        f"{efficiency:.0%}",
        *(f"{seconds / c.time.total:.1%}" for _, seconds in c.time.items()),
    ]
