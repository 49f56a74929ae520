"""The convergence study: one model, one token budget, one slowed worker, trained synchronously,
through a parameter server (asynchronous and with bounded staleness) and with local SGD and
DiLoCo; validation loss against wall-clock time and against tokens.

Every run is a real job (torchrun, one process per worker, plus one server rank for ``ps``).
Wall-clock time is measured from the moment training starts (the ``start`` record of the run's
metrics.jsonl, after start-up and model building) to each evaluation. The runs log and evaluate
every ``eval_interval`` steps, a multiple of every H, so that the loss reports (all-reduces) add
no synchronization the local methods would not make anyway.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlm.config.degrees import check_layout
from clusterlm.errors import UserError
from clusterlm.files import atomic_write_json, atomic_write_with
from clusterlm.interop.pretrained_shape import load_config
from clusterlm.launch import LaunchOptions
from clusterlm.launch.torchrun import job_environment, torchrun_command

# A small but real budget: 240 steps of a 2-layer, 64-wide GPT on 4 x 8 x 64 tokens per step.
STUDY_DEFAULTS = {
    "model.n_layer": "2",
    "model.n_head": "4",
    "model.n_embd": "64",
    "model.block_size": "64",
    "training.steps": "240",
    "training.micro_batch_size": "8",
    "training.eval_interval": "48",
    "training.log_interval": "48",
    "training.eval_batches": "8",
    "training.threads": "1",
    "optim.lr": "3e-3",
    "optim.min_lr": "3e-4",
    "optim.warmup_steps": "24",
    "checkpoint.interval": "0",
    "metrics.progress": "none",
    "metrics.tensorboard": "false",
    "metrics.plot": "false",
    "metrics.peak_flops": "1e12",
}
TARGET_NATS = 0.05  # "reaches the synchronous run's final val loss": within this much


@dataclass(frozen=True)
class Variant:
    name: str
    settings: dict[str, str]
    servers: int = 0

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_").replace("=", "")


@dataclass
class Outcome:
    name: str
    processes: int
    val: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, tokens, val loss)
    last: dict[str, Any] = field(default_factory=dict)  # the final train record

    def summary(self, servers: int) -> dict[str, Any]:
        seconds, tokens, loss = self.val[-1]
        pushes = self.last.get("ps_pushes")
        return {
            "name": self.name,
            "processes": self.processes,
            "final_val_loss": loss,
            "wall_s": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "staleness_max": self.last.get("staleness_max"),
            "staleness_mean": self.last.get("staleness_mean"),
            "pushes_per_s_per_server": pushes / seconds if pushes and servers else None,
            # the busiest server's time applying updates, over the run's: 1.0 would make it the
            # bottleneck
            "server_utilization": self.last["ps_server_busy_s"] / seconds
            if pushes and servers
            else None,
            "curve": [{"seconds": s, "tokens": t, "val_loss": v} for s, t, v in self.val],
        }


VARIANTS = [
    Variant("ddp", {"parallel.data_parallel": "ddp"}),
    Variant("ps async", {"parallel.data_parallel": "ps", "parallel.ps_staleness": "-1"}, servers=1),
    Variant("ssp s=1", {"parallel.data_parallel": "ps", "parallel.ps_staleness": "1"}, servers=1),
    Variant("ssp s=4", {"parallel.data_parallel": "ps", "parallel.ps_staleness": "4"}, servers=1),
    Variant("local_sgd H=4", {"parallel.data_parallel": "local_sgd", "parallel.local_steps": "4"}),
    Variant(
        "local_sgd H=16", {"parallel.data_parallel": "local_sgd", "parallel.local_steps": "16"}
    ),
    Variant("diloco H=16", {"parallel.data_parallel": "diloco", "parallel.local_steps": "16"}),
]


def select(names: str | None) -> list[Variant]:
    if not names:
        return VARIANTS
    chosen = [v for v in VARIANTS if v.slug in names.split(",")]
    if len(chosen) != len(names.split(",")):
        raise UserError(
            f"--runs takes a comma list of: {','.join(v.slug for v in VARIANTS)}; got {names!r}"
        )
    return chosen


def run_settings(
    config: str | None,
    overrides: dict[str, str],
    variant: Variant,
    nproc: int,
    slow: str,
    out: Path,
) -> dict[str, str]:
    """The run's settings (study defaults < the user's overrides < the variant's), checked for
    its number of processes before anything starts."""
    values = {
        **STUDY_DEFAULTS,
        **overrides,
        **variant.settings,
        "training.slow_ranks": slow,
        "training.out_dir": str(out / "runs" / variant.slug),
        "parallel.ps_servers": str(max(variant.servers, 1)),
    }
    check_layout(load_config(config, dict(values)), nproc + variant.servers)
    return values


def run_variant(
    config: str | None, values: dict[str, str], processes: int, name: str, timeout_s: float
) -> Outcome:
    out = Path(values["training.out_dir"])
    (out / "metrics.jsonl").unlink(missing_ok=True)
    argv = [
        "train",
        *(["--config", config] if config else []),
        *[a for key, value in values.items() for a in (f"--{key}", value)],
    ]
    command = torchrun_command(LaunchOptions(nproc=processes), argv)
    env = job_environment(
        LaunchOptions(nproc=processes),
        {**os.environ, "OMP_NUM_THREADS": "1"},
        values.get("parallel.data_parallel") == "ps",
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "job.log", "w") as log:
        code: int | str
        try:
            code = subprocess.call(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            code = "a timeout"
    if code != 0:
        raise UserError(
            f"run {name!r} failed ({code}); see {out / 'job.log'}; command: {shlex.join(command)}"
        )
    return read_outcome(out / "metrics.jsonl", name, processes)


def read_outcome(path: Path, name: str, processes: int) -> Outcome:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    start = next(r["time"] for r in records if r["kind"] == "start")
    outcome = Outcome(name, processes)
    outcome.val = [
        (r["time"] - start, r["tokens"], r["val_loss"]) for r in records if r["kind"] == "eval"
    ]
    outcome.last = [r for r in records if r["kind"] == "train"][-1]
    return outcome


def compare_to_synchronous(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per run: the first time its val loss came within TARGET_NATS of the synchronous run's
    final one, as a fraction of the synchronous run's wall time; and the best such run."""
    sync = next((r for r in results if r["name"] == "ddp"), None)
    if sync is None:
        return {}
    target = sync["final_val_loss"] + TARGET_NATS
    ratios: dict[str, float | None] = {}
    for r in results:
        reached = [p["seconds"] for p in r["curve"] if p["val_loss"] <= target]
        ratios[r["name"]] = reached[0] / sync["wall_s"] if reached else None
    candidates = {n: q for n, q in ratios.items() if n != "ddp" and q is not None}
    best = min(candidates, key=candidates.__getitem__) if candidates else None
    return {
        "target_val_loss": target,
        "time_to_target_vs_ddp": ratios,
        "best": best,
        "met_0.7x": best is not None and candidates[best] <= 0.7,
    }


def study(
    config: str | None,
    overrides: dict[str, str],
    nproc: int,
    straggler: int | None,
    factor: float,
    out: Path,
    runs: str | None,
    timeout_s: float,
    on_result=None,
) -> dict[str, Any]:
    """Run the chosen variants one after another; returns what convergence.json holds."""
    if straggler is not None and not 0 <= straggler < nproc:
        raise UserError(f"--straggler names a worker rank, 0 to {nproc - 1}; got {straggler}")
    slow = f"{straggler}:{factor}" if straggler is not None else ""
    planned = [(v, run_settings(config, overrides, v, nproc, slow, out)) for v in select(runs)]
    results = []
    for variant, values in planned:
        outcome = run_variant(config, values, nproc + variant.servers, variant.name, timeout_s)
        results.append(outcome.summary(variant.servers))
        if on_result:
            on_result(results[-1])
    return {
        "nproc": nproc,
        "straggler": straggler,
        "slowdown": factor,
        "settings": {**STUDY_DEFAULTS, **overrides},
        "runs": results,
        "comparison": compare_to_synchronous(results),
    }


def write_outputs(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """convergence.json and convergence.png (val loss against wall time and against tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = atomic_write_json(out / "convergence.json", report)
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in report["runs"]:
        curve = run["curve"]
        by_time.plot(
            [p["seconds"] for p in curve],
            [p["val_loss"] for p in curve],
            marker="o",
            label=run["name"],
        )
        by_tokens.plot(
            [p["tokens"] for p in curve],
            [p["val_loss"] for p in curve],
            marker="o",
            label=run["name"],
        )
    target = report["comparison"].get("target_val_loss")
    for ax, label in (
        (by_time, "wall-clock seconds since training started"),
        (by_tokens, "tokens"),
    ):
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    by_time.set_ylabel("validation loss (nats)")
    straggler = (
        f", rank {report['straggler']} at {report['slowdown']:g}x"
        if report["straggler"] is not None
        else ""
    )
    by_time.set_title(f"{report['nproc']} workers{straggler}")
    by_tokens.legend()
    fig.tight_layout()
    png_path = out / "convergence.png"
    try:
        atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return json_path, png_path


def format_row(run: dict[str, Any]) -> str:
    def number(key: str, width: int, spec: str) -> str:
        return format(run[key], f">{width}{spec}") if run[key] is not None else f"{'-':>{width}}"

    return (
        f"{run['name']:<15} {run['processes']:>5} {run['final_val_loss']:>8.4f} "
        f"{run['wall_s']:>7.1f} {run['tokens_per_s']:>9,.0f} "
        f"{number('staleness_max', 6, '.0f')} {number('staleness_mean', 7, '.2f')} "
        f"{number('pushes_per_s_per_server', 15, '.1f')} {number('server_utilization', 11, '.0%')}"
    )


HEADER = (
    f"{'run':<15} {'procs':>5} {'val loss':>8} {'wall s':>7} {'tokens/s':>9} "
    f"{'st max':>6} {'st mean':>7} {'pushes/s/server':>15} {'server busy':>11}"
)
