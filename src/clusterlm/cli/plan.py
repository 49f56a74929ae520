"""`clusterlm plan`: memory, time and the fastest parallel layout for a model on a cluster.

clusterlm plan --model llama-8b --cluster 8xH100 --nodes 4 --global-batch-tokens 4M --seq 8192
clusterlm plan --published                  # predictions against published large runs
clusterlm plan --validate         # train tiny models in 1-4 process layouts here, fit, compare
clusterlm plan --validate --gpu-data        # predictions against the stored GPU measurements
clusterlm plan --model nano-cpu --vocab-size 65 --cluster cpu \
--calibration runs/plan-calibration.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from clusterlm.bench.layout_runs import evidence, run_validation
from clusterlm.cli.options import Parser
from clusterlm.errors import UserError
from clusterlm.files import check_output_path
from clusterlm.models.counting import param_count
from clusterlm.plan.calibration import check_device, load_calibration, save_calibration
from clusterlm.plan.cluster import Cluster, load_cluster, preset_names
from clusterlm.plan.emit import write_config
from clusterlm.plan.fit import fit_calibration
from clusterlm.plan.gpu_data import GPU_MEASUREMENTS, compare_gpu_data
from clusterlm.plan.published import PUBLISHED_RUNS, compare_published
from clusterlm.plan.report import candidates_table, time_breakdown
from clusterlm.plan.search import SearchResult, explain, nodes_needed, runner_up, search
from clusterlm.plan.units import GIB, human, parse_batch_tokens, parse_train_tokens
from clusterlm.plan.validation import validation_report
from clusterlm.plan.workload import PRECISIONS, Workload, load_model_args


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="clusterlm plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_workload_arguments(p)
    _add_search_arguments(p)
    _add_validation_arguments(p)
    return p


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """What is trained on what: the model, the cluster, the batch and the precision."""
    p.add_argument(
        "--model", help="model preset (configs/NAME.toml, e.g. llama-8b) or config TOML path"
    )
    p.add_argument(
        "--vocab-size", type=int, default=0, help="vocabulary size where the config leaves it 0"
    )
    p.add_argument(
        "--cluster",
        default="8xH100",
        help=f"cluster preset or TOML path; presets: {', '.join(preset_names())}",
    )
    p.add_argument("--nodes", type=int, help="number of nodes (default: the cluster file's)")
    p.add_argument(
        "--global-batch-tokens",
        default="4M",
        help="tokens per optimizer step; binary suffixes (4M = 4*2^20)",
    )
    p.add_argument("--seq", type=int, help="sequence length (default: the model's block_size)")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument(
        "--unfused-attention",
        action="store_true",
        help="assume attention stores its s x s scores (no FlashAttention/SDPA kernel)",
    )
    p.add_argument(
        "--expert-imbalance",
        type=float,
        default=1.0,
        help="a mixture of experts: routed tokens on the busiest expert-parallel rank over the "
        "mean (1 = balanced; training's moe_load_imbalance is an upper bound)",
    )


def _add_search_arguments(p: argparse.ArgumentParser) -> None:
    """How layouts are judged and ranked, and what is done with the best one."""
    p.add_argument(
        "--headroom", type=float, default=0.9, help="fraction of device memory a layout may use"
    )
    p.add_argument(
        "--calibration", help="JSON calibration file (from --validate --calibration-out)"
    )
    p.add_argument(
        "--efficiency",
        type=float,
        help="compute efficiency (achieved/peak FLOP/s), overrides calibration",
    )
    p.add_argument("--top", type=int, default=10, help="rows of the ranking to print")
    p.add_argument(
        "--train-tokens",
        help="training run length for time and device-hours (decimal suffixes: 15T)",
    )
    p.add_argument(
        "--emit-config", metavar="OUT.toml", help="write the best layout as a clusterlm config"
    )


def _add_validation_arguments(p: argparse.ArgumentParser) -> None:
    """The planner's predictions against published runs, stored measurements or runs here."""
    p.add_argument(
        "--published",
        nargs="?",
        const=str(PUBLISHED_RUNS),
        metavar="RUNS.toml",
        help="compare predictions with published training runs (default: the project's list)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="train a tiny GPT in 1-4 process layouts on this machine and compare with the planner",
    )
    p.add_argument(
        "--gpu-data",
        nargs="?",
        const=str(GPU_MEASUREMENTS),
        metavar="MEASUREMENTS.toml",
        help="with --validate: compare with stored GPU measurements instead of training here",
    )
    p.add_argument(
        "--calibration-out",
        metavar="FILE.json",
        default="runs/plan-calibration.json",
        help="with --validate: where to write the fitted calibration "
        "(default runs/plan-calibration.json)",
    )
    p.add_argument(
        "--validate-steps",
        type=int,
        default=15,
        help="with --validate: timed steps per layout and round",
    )
    p.add_argument(
        "--validate-rounds",
        type=int,
        default=3,
        help="with --validate: rounds over all layouts; each keeps its least disturbed round",
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.published:
        print(compare_published(args.published))
        return 0
    if args.gpu_data and not args.validate:
        raise UserError(
            "--gpu-data goes with --validate: clusterlm plan --validate --gpu-data [FILE]"
        )
    if args.gpu_data:
        calibration = load_calibration(args.calibration) if args.calibration else None
        print(compare_gpu_data(args.gpu_data, calibration, args.calibration or ""))
        return 0
    if args.validate:
        return _validate(args.calibration_out, args.validate_steps, args.validate_rounds)
    return _plan(args)


def _plan(args: argparse.Namespace) -> int:
    """Search the layouts of one model on one cluster; print the ranking and the best layout."""
    _check_options(args)
    model = load_model_args(args.model, args.vocab_size)
    cluster = _cluster(args)
    seq = args.seq or model.block_size
    work = Workload(
        model,
        seq,
        parse_batch_tokens(args.global_batch_tokens),
        args.precision,
        fused_attention=not args.unfused_attention,
        expert_imbalance=args.expert_imbalance,
    )
    if args.expert_imbalance != 1.0 and not model.moe_experts:
        raise UserError(
            f"--expert-imbalance applies to a mixture of experts; {args.model} is dense: "
            "leave it out"
        )

    result = search(work, cluster, args.headroom)
    print(
        f"{args.model} on {cluster.nodes} x {cluster.name} "
        f"({cluster.world_size} x {cluster.device.name}, "
        f"{cluster.device.memory_bytes / GIB:.0f} GiB): {work.global_batch_tokens:,} tokens/step = "
        f"{work.sequences} x {seq}, {work.precision}; {result.considered} layouts considered, "
        f"{len(result.ranked)} fit in {args.headroom:.0%} of memory"
    )
    if model.moe_experts:
        print(
            f"a mixture of experts: {human(param_count(model))} parameters, "
            f"{human(param_count(model, active=True))} active per token"
        )
    if not result.ranked:
        print(_nothing_fits(work, cluster, result, args.headroom))
        return 1
    print(candidates_table(result.ranked[: args.top]))
    best = result.ranked[0]
    if model.moe_experts:
        experts = model.moe_experts // best.layout.ep
        print(f"expert parallelism: ep {best.layout.ep}, {experts} routed experts per rank")
    print(time_breakdown(best))
    other = runner_up(result)
    if other is not None:
        print(explain(best, other))
    if args.train_tokens:
        tokens = parse_train_tokens(args.train_tokens)
        seconds = tokens / best.tokens_per_s
        print(
            f"{human(tokens)} training tokens: {seconds / 86400:,.1f} days, "
            f"{seconds / 3600 * cluster.world_size:,.0f} device-hours"
        )
    if args.emit_config:
        write_config(args.emit_config, best)
        print(f"wrote {args.emit_config}")
    return 0


def _cluster(args: argparse.Namespace) -> Cluster:
    """The cluster of --cluster and --nodes, with the calibration of --calibration and
    --efficiency where given."""
    cluster = load_cluster(args.cluster)
    if args.nodes is not None:
        cluster = cluster.with_nodes(args.nodes)
    calibration = cluster.calibration
    if args.calibration:
        calibration = load_calibration(args.calibration)
        check_device(calibration, cluster.device.name, args.calibration)
    if args.efficiency is not None:
        calibration = dataclasses.replace(calibration, compute_efficiency=args.efficiency)
    return dataclasses.replace(cluster, calibration=calibration)


def _check_options(args: argparse.Namespace) -> None:
    if not args.model:
        raise UserError("--model is required; e.g. --model llama-8b (or --published / --validate)")
    if not 0 < args.headroom <= 1:
        raise UserError(f"--headroom must be in (0, 1], got {args.headroom}")
    if args.top <= 0:
        raise UserError(f"--top must be positive, got {args.top}")
    if args.emit_config:
        # before the search, not after
        check_output_path(args.emit_config, "--emit-config", directory=False)


def _validate(calibration_out: str, steps: int, rounds: int) -> int:
    """Measure, fit the calibration on the cases marked for fitting, print the comparison, save."""
    if steps < 1 or rounds < 1:
        raise UserError(
            f"--validate-steps and --validate-rounds must be positive, got {steps} and {rounds}"
        )
    results, links = run_validation(
        steps=steps, rounds=rounds, progress=lambda line: print(line, file=sys.stderr, flush=True)
    )
    calibration = dataclasses.replace(
        fit_calibration(results), device=results[0].cluster.device.name
    )
    print(validation_report(results, calibration, links))
    save_calibration(calibration_out, calibration, evidence(results, calibration, links))
    print(f"wrote {calibration_out}")
    return 0


def _nothing_fits(work: Workload, cluster: Cluster, result: SearchResult, headroom: float) -> str:
    if result.smallest is None:
        return (
            "no layout can run this: check that the global batch splits over the devices and that "
            "heads and layers divide by the parallel degrees"
        )
    need = result.smallest.memory.total + cluster.device.reserved_bytes
    have = headroom * cluster.device.memory_bytes
    nodes = nodes_needed(work, cluster, headroom)
    more = f"use {nodes} nodes" if nodes else "use devices with more memory"
    return (
        f"nothing fits: the smallest need is {need / GIB:.1f} GiB per device "
        f"(`{result.smallest.layout.describe()}`) against {have / GIB:.1f} GiB available; "
        f"{more}, or a shorter --seq / smaller --global-batch-tokens"
    )
