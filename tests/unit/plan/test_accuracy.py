"""Planner accuracy: efficiency by matmul shape and device kind, explicit recomputation and
communication exposure, the trainer's stage balancing, and the stored GPU and published data."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from clusterlm.cli import main as cli
from clusterlm.errors import UserError
from clusterlm.hardware import device_kind, resolve_device
from clusterlm.models.counting import training_flops_per_token
from clusterlm.parallel.pipeline import SCHEDULES, stage_layer_ranges
from clusterlm.parallel.precision import Precision
from clusterlm.plan.calibration import Calibration, check_device
from clusterlm.plan.cluster import load_cluster
from clusterlm.plan.efficiency import shape_efficiency
from clusterlm.plan.gpu_data import GPU_MEASUREMENTS, compare_gpu_data, fit_gpu_efficiency
from clusterlm.plan.layout import Layout
from clusterlm.plan.published import PUBLISHED_RUNS, compare_published, fit_published_efficiency
from clusterlm.plan.search import SEARCHED_SCHEDULES, SKIPPED_SCHEDULES, evaluate
from clusterlm.plan.stages import rank_share
from clusterlm.plan.timing import BUBBLE_DIVISOR, step_time
from clusterlm.plan.workload import Workload, load_model_args

GPT2 = Workload(load_model_args("gpt2-124m"), 1024, 16384)
LLAMA = Workload(load_model_args("llama-1b"), 8192, 16384)
TABLE = Calibration(compute_efficiency=0.8, efficiency_half_width=1500)


def test_efficiency_grows_with_model_width_and_is_constant_without_a_table():
    narrow, wide = (
        shape_efficiency(GPT2, Layout(micro_batch_size=16), TABLE),
        shape_efficiency(LLAMA, Layout(micro_batch_size=2), TABLE),
    )
    assert 0 < narrow < wide < 0.8
    # tp splits a block's multiplies but not its width d; only the head's vocabulary side narrows
    split = shape_efficiency(GPT2, Layout(micro_batch_size=16, tp=4), TABLE)
    assert split == pytest.approx(narrow, rel=0.02) and split <= narrow
    assert (
        shape_efficiency(GPT2, Layout(micro_batch_size=16), Calibration(compute_efficiency=0.5))
        == 0.5
    )


def test_recomputation_and_tensor_parallel_exposure_are_their_own_terms():
    cluster = load_cluster("8xH100")
    work = Workload(load_model_args("llama-1b"), 4096, 4096 * 16)
    base = Layout(tp=8, sequence_parallel=True, micro_batch_size=2, micro_batches=8)
    plain, selective = (
        step_time(work, base, cluster),
        step_time(work, dataclasses.replace(base, activation_checkpointing="selective"), cluster),
    )
    assert plain.recompute == 0 and selective.compute == plain.compute
    args = work.model
    rerun = (
        4 * args.n_layer * args.n_embd * 4096 / training_flops_per_token(args, 4096)
    )  # QK^T and AV again
    assert selective.recompute == pytest.approx(plain.compute * rerun)

    def exposed(share: float) -> float:
        calibration = dataclasses.replace(cluster.calibration, tp_exposed=share)
        return step_time(
            work, base, dataclasses.replace(cluster, calibration=calibration)
        ).tensor_parallel

    # The layers' collectives scale with the exposed share; the sequence-slice gradients' one
    # all-reduce after backward has nothing to hide behind.
    assert exposed(1.0) == plain.tensor_parallel
    assert exposed(1.0) - exposed(0.5) == pytest.approx(2 * (exposed(0.5) - exposed(0.25)))
    assert exposed(0.5) > plain.tensor_parallel / 2


def test_pipeline_messages_of_the_steady_state_hide_behind_compute():
    cluster = load_cluster("8xH100").with_nodes(2)
    args = load_model_args("llama-8b")
    few, many = (
        step_time(
            Workload(args, 4096, 4096 * m), Layout(pp=16, micro_batches=m), cluster
        ).pipeline_p2p
        for m in (16, 64)
    )
    assert many == pytest.approx(few, rel=0.01)  # only the fill and drain are exposed


def test_the_planner_splits_stages_as_the_trainer_does():
    args = load_model_args("llama-1b")
    ranges = stage_layer_ranges(args, 4)
    layout = Layout(pp=4)
    assert [rank_share(args, layout, r).layers for r in range(4)] == [len(r) for r in ranges]
    assert rank_share(args, layout, 0).embedding and rank_share(args, layout, 3).head
    v = Layout(pp=2, pp_schedule="zbv_zero_bubble", pp_stages_per_rank=2)
    first = rank_share(args, v, 0)
    assert first.embedding and first.head  # a V puts the first and the last stage on rank 0


def test_stored_gpu_measurements_are_predicted_within_ten_percent():
    report = compare_gpu_data()
    errors = [float(e) for e in re.findall(r"H200\s+\S+\s+\S+\s+([+-]\d+\.\d)%", report)]
    assert len(errors) == 3 and all(abs(e) <= 10 for e in errors)
    assert "3 of 3 measurements" in report


def test_the_activation_ratios_measured_on_the_gpu_are_the_planners_itemized_count():
    """GPT-2 saved 1.21x and llama-1b 2.11x Korthikanti's 34*s*b*h: the formula misses what these
    blocks keep (SwiGLU, fp32 RMSNorm, autocast's copies), which the planner counts."""
    lines = [
        line for line in compare_gpu_data().splitlines() if "saved activations per block" in line
    ]
    errors = [float(e) for line in lines for e in re.findall(r"\(([+-]\d+\.\d)%\)$", line)]
    assert len(lines) == len(errors) == 2 and all(abs(e) <= 10 for e in errors)
    assert "2.11x Korthikanti's 34*s*b*h, planner 2.2" in lines[1]


def test_missing_fields_and_other_device_kinds_get_one_line(tmp_path):
    text = GPU_MEASUREMENTS.read_text()
    missing = tmp_path / "gpu.toml"
    missing.write_text(text.replace("step_ms = 36.3\n", "", 1))
    with pytest.raises(UserError, match=r"#1 \(GPT-2 124M.*missing field 'step_ms'"):
        compare_gpu_data(missing)
    mistyped = tmp_path / "mistyped.toml"
    mistyped.write_text(
        text.replace("activations_vs_korthikanti = 1.21", 'activations_vs_korthikanti = "1.21x"')
    )
    with pytest.raises(
        UserError, match=r"#1 .*activations_vs_korthikanti must be a float, got '1.21x'"
    ):
        compare_gpu_data(mistyped)
    other = tmp_path / "other.toml"
    other.write_text(text.replace('cluster = "1xH200"', 'cluster = "8xA100-80GB"', 1))
    with pytest.raises(UserError, match="measured on H200 but cluster 8xA100-80GB"):
        compare_gpu_data(other)
    cpu = Calibration(compute_efficiency=0.3, device="CPU AMD EPYC (2 threads)")
    with pytest.raises(UserError, match="was measured on CPU AMD EPYC"):
        compare_gpu_data(calibration=cpu, calibration_source="cal.json")
    check_device(
        dataclasses.replace(cpu, device="NVIDIA H100 80GB HBM3"), "H100-SXM5-80GB", "cal.json"
    )
    assert (
        device_kind("NVIDIA H200") == "H200"
        and device_kind("CPU AMD EPYC (4 threads)") == "cpu amd epyc"
    )


def test_published_runs_print_figure_prediction_and_error(tmp_path, capsys):
    report = compare_published()
    assert report.count("%") >= 6 and "Llama 3 405B" in report and "Narayanan et al. 2021" in report
    broken = tmp_path / "runs.toml"
    broken.write_text(PUBLISHED_RUNS.read_text().replace("reported_tflops = 148\n", "", 1))
    assert cli(["plan", "--published", str(broken)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "Megatron 145.6B" in err[0]
        and "missing field 'reported_tflops'" in err[0]
    )


def test_published_runs_are_predicted_within_fifteen_percent():
    report = compare_published()
    rows = [line for line in report.splitlines()[2:] if re.search(r"\s[+-]\d+%\s", line)]
    errors = {
        line.split("  ")[0]: int(re.search(r"\s([+-]\d+)%\s", line).group(1)) for line in rows
    }
    checks = {name: error for name, error in errors.items() if not name.endswith("(fit)")}
    assert len(checks) == 7 and len(errors) == 11
    # DeepSeek-V3 hides its experts' all-to-all behind compute (DualPipe), which the planner
    # exposes as clusterlm's trainer would: the one run it predicts slower, counted in the summary.
    dense = {name: error for name, error in errors.items() if "(MoE)" not in name}
    assert all(abs(error) <= 15 for error in dense.values()), errors
    assert errors["DeepSeek-V3 671B (MoE)"] < 0 and "6 of 7 within 15%" in report


def test_efficiency_tables_are_what_their_data_refits():
    a100, h200 = fit_published_efficiency("8xA100-80GB"), fit_gpu_efficiency("1xH200")
    for fitted, preset in ((a100, "8xA100-80GB"), (h200, "1xH200"), (h200, "8xH100")):
        table = load_cluster(preset).calibration
        assert fitted.compute_efficiency == pytest.approx(table.compute_efficiency, abs=1e-3)
        assert fitted.efficiency_half_width == table.efficiency_half_width


def test_the_search_tries_or_names_every_schedule_the_trainer_accepts():
    searched = {name for name, _ in SEARCHED_SCHEDULES}
    assert searched | set(SKIPPED_SCHEDULES) == set(SCHEDULES) and not searched & set(
        SKIPPED_SCHEDULES
    )
    assert set(BUBBLE_DIVISOR) == set(SCHEDULES)  # every schedule has its bubble model
    cluster, work = load_cluster("8xH100"), Workload(load_model_args("llama-1b"), 4096, 4096 * 32)

    def predicted(schedule):
        layout = Layout(
            pp=4,
            dp_shard=2,
            data_parallel="zero2",
            pp_schedule=schedule,
            pp_stages_per_rank=2,
            micro_batches=16,
        )
        candidate = evaluate(work, layout, cluster)
        return candidate.time.total, candidate.memory.total

    (bfs_time, bfs_memory), (interleaved_time, interleaved_memory) = (
        predicted("looped_bfs"),
        predicted("interleaved_1f1b"),
    )
    assert bfs_time == pytest.approx(interleaved_time) and bfs_memory > interleaved_memory
    assert predicted("dualpipev") == pytest.approx(predicted("zbv_zero_bubble"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_gpu_only_options_on_a_cpu_get_one_line():
    with pytest.raises(UserError, match="no CUDA device is visible; use cpu or auto") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="fp16 needs a CUDA device; use bf16 on CPU") as err:
        Precision("fp16", torch.device("cpu"))
    assert "\n" not in str(err.value)
