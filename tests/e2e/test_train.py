"""The trainer as a user runs it: learning, exact resume, checkpoint safety, eval and generate."""

import math
import os
import re
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, records

from clusterlm import checkpoint
from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli import main as cli
from clusterlm.config import build_config
from clusterlm.parallel.compiling import separate_compile_cache
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import train


def config(data_dir: Path, out_dir: Path, **overrides):
    values = {**TINY, "data.dir": str(data_dir), "training.out_dir": str(out_dir)}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return build_config(None, values)


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out_dir, "train")}


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    model = load_for_inference(find_checkpoint(str(out_dir)), device="cpu").model.parts[0]
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_decreases(data_dir, tmp_path):
    summary = train(config(data_dir, tmp_path, training__steps=60, optim__lr=3e-3))
    curve = losses(tmp_path)
    assert curve[60] < 0.7 * curve[1]
    assert summary.val_loss < math.log(40)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_is_exact(data_dir, tmp_path):
    """40 steps straight == 20 steps, stop, resume for 20: every loss and every weight, bit for bit.
    Dropout and gradient accumulation are on, so RNG and loader state are both exercised."""
    common = dict(
        training__steps=40,
        model__dropout=0.1,
        training__tokens_per_step=2 * 4 * 32,
        checkpoint__interval=20,
        optim__decay_steps=40,
    )  # the stopped run has the same LR schedule
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(config(data_dir, straight, **common))
    train(config(data_dir, resumed, **{**common, "training__steps": 20}))
    summary = train(config(data_dir, resumed, **common, checkpoint__resume="auto"))
    assert summary.resumed_from.endswith("step_00000020")
    assert losses(straight) == losses(resumed)
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_matches(mode, data_dir, tmp_path):
    """Recomputation replays dropout masks and gives the same losses (up to matmul reordering)."""
    train(config(data_dir, tmp_path / "plain", training__steps=5, model__dropout=0.1))
    train(
        config(
            data_dir,
            tmp_path / "ac",
            training__steps=5,
            model__dropout=0.1,
            training__activation_checkpointing=mode,
        )
    )
    plain, ac = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    for step in plain:
        assert ac[step] == pytest.approx(plain[step], rel=1e-6)


def test_bf16_trains(data_dir, tmp_path):
    train(
        config(data_dir, tmp_path, training__steps=30, training__precision="bf16", optim__lr=3e-3)
    )
    curve = losses(tmp_path)
    assert curve[30] < 0.8 * curve[1]


def test_corrupt_and_partial_checkpoints_are_never_loaded(data_dir, tmp_path, capsys):
    cfg = config(
        data_dir, tmp_path, training__steps=4, checkpoint__interval=2, checkpoint__keep_last=3
    )
    train(cfg)
    root = tmp_path / "checkpoints"
    newest = root / "step_00000004"
    blob = next(newest.glob("*.distcp"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    (root / ".step_00000006.abc.tmp").mkdir()  # an interrupted save: never complete
    assert checkpoint.resolve_resume("auto", root).path.name == "step_00000002"
    assert "skipping step_00000004" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(newest)]) == 2
    assert "fails its sha256" in capsys.readouterr().err


def test_incompatible_checkpoint_names_the_setting(data_dir, tmp_path, capsys):
    train(config(data_dir, tmp_path, training__steps=2))
    args = [
        "train",
        "--data.dir",
        str(data_dir),
        "--training.out_dir",
        str(tmp_path),
        "--resume",
        "auto",
        "--training.steps",
        "4",
        "--metrics.progress",
        "none",
    ]
    args += [f"--{k}={v}" for k, v in TINY.items() if k != "model.n_layer"] + [
        "--model.n_layer",
        "3",
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "model.n_layer = 2" in err and "\n" not in err


def test_eval_and_generate_from_a_run(data_dir, tmp_path, capsys):
    train(config(data_dir, tmp_path, training__steps=20, optim__lr=3e-3))
    assert cli(["eval", "--run", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "val loss" in out and "perplexity" in out
    args = [
        "generate",
        "--run",
        str(tmp_path),
        "--prompt",
        "thou",
        "--max-new-tokens",
        "40",
        "--seed",
        "3",
    ]
    assert cli(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("thou") and len(first) > 40
    assert cli(args) == 0
    assert capsys.readouterr().out == first  # same seed, same sample
    assert cli([*args, "--beam", "3", "--length-penalty", "0.5"]) == 0
    beamed = capsys.readouterr().out
    assert beamed.startswith("thou") and len(beamed) > len("thou")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--training.stepz", "3"], "did you mean 'training.steps'"),
        (["train", "--data.dir", "/nonexistent/data"], "no prepared data"),
        (["train", "--config", "missing.toml"], "not found"),
        (["train", "--optim.lr", "-1"], "optim.lr must be positive"),
        (["eval", "--run", "/nonexistent/run"], "no complete checkpoint"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out_dir, runs/default, is then the test's own
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0, err


def test_bench_train_prints_figures_for_both_variants(data_dir, capsys):
    args = [
        "bench",
        "train",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--warmup",
        "1",
        "--data.dir",
        str(data_dir),
        "--against",
        "optim.fused=false",
        "--breakdown",
    ] + [f"--{k}={v}" for k, v in TINY.items()]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "config" in out and "speed-up over baseline" in out
    assert "tokens/s" in out and "activations per layer" in out
    for variant in ("baseline", "config"):
        line = next(
            line for line in out.splitlines() if line.startswith(f"step breakdown, {variant} ")
        )
        parts = [
            re.fullmatch(r"([a-z ]+) ([0-9.]+) \(([0-9]+)%\)", part).groups()
            for part in line.split(": ", 1)[1].split(" | ")
        ]
        shares = {name: share for name, _, share in parts}
        times = {name: float(ms) for name, ms, _ in parts}
        assert set(shares) == {
            "matmul",
            "attention",
            "compiled kernels",
            "optimizer",
            "other ops",
            "outside ops",
        }
        # times, not shares: on a loaded machine a small optimizer step rounds to 0%
        assert times["matmul"] > 0 and times["optimizer"] > 0
        assert (
            97 <= sum(map(int, shares.values())) <= 103
        )  # every millisecond of the step, once (rounding)


def test_gpu_breakdown_splits_kernel_time_by_kind_and_counts_the_device_idle_between_kernels():
    from clusterlm.bench.breakdown import busy_seconds, kernel_breakdown, kernel_kind

    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert (
        kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>")
        == "attention"
    )
    assert (
        kernel_kind(
            "void at::native::(anonymous namespace)::"
            "multi_tensor_apply_kernel<FusedAdamMathFunctor>"
        )
        == "optimizer"
    )
    assert kernel_kind("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "communication"
    assert kernel_kind("Memcpy HtoD (Pinned -> Device)") == "data"
    assert kernel_kind("triton_per_fused_native_layer_norm_0") == "other kernels"
    # Two steps of 10 ms: a matmul overlapping an NCCL kernel on another stream counts once as busy.
    kernels = [
        (0.000, 0.004, "ampere_bf16_s16816gemm"),
        (0.003, 0.006, "ncclDevKernel_ReduceScatter"),
        (0.008, 0.009, "flash_bwd_kernel"),
        (0.010, 0.014, "ampere_bf16_s16816gemm"),
        (0.016, 0.017, "Memcpy HtoD (Pageable -> Device)"),
    ]
    assert busy_seconds((start, end) for start, end, _ in kernels) == pytest.approx(0.012)
    spent = kernel_breakdown(kernels, wall=0.010, steps=2)
    assert spent == pytest.approx(
        {
            "matmul": 0.004,
            "attention": 0.0005,
            "optimizer": 0.0,
            "communication": 0.0015,
            "data": 0.0005,
            "other kernels": 0.0,
            "idle gaps": 0.004,
        }
    )


@pytest.mark.parametrize(
    "op, kind",
    [
        ("aten::addmm", "matmul"),
        ("aten::bmm", "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("## Call CompiledFxGraph fotvqkoae36bx", "compiled kernels"),
        ("graph_0_cpp_fused_add_0", "compiled kernels"),
        ("aten::_fused_adamw_", "optimizer"),
        ("Optimizer.step#AdamW.step", "optimizer"),
        ("aten::native_layer_norm", "other ops"),
    ],
)
def test_breakdown_sorts_operators_by_kind_of_work(op, kind):
    from clusterlm.bench.breakdown import work_kind

    assert work_kind(op) == kind


def test_compiled_forward_and_loss_with_math_attention_train_like_eager(data_dir, tmp_path):
    """One process compiles tokens -> loss as one graph; with the plain-matmul attention the
    compiler fuses the softmax. Same losses as eager fp32 up to the compiler's reordering of
    float sums (relative 1e-4)."""
    train(config(data_dir, tmp_path / "eager", training__steps=4))
    train(
        config(
            data_dir,
            tmp_path / "compiled",
            training__steps=4,
            training__compile=True,
            training__attention="math",
        )
    )
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled.keys() == eager.keys()
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4)
    names = final_weights(tmp_path / "compiled").keys()
    assert names == final_weights(tmp_path / "eager").keys()  # the model itself is not wrapped


def test_a_run_restricted_to_an_instruction_set_compiles_into_a_cache_of_its_own(
    monkeypatch, tmp_path
):
    """torch's compiled-graph cache ignores ATEN_CPU_CAPABILITY (an AVX-512 graph reused under
    AVX2 gave NaN losses), so a compiling run that sets it caches apart; a named cache is kept.
    (Checked by hand: the speedrun config, compiled, under ATEN_CPU_CAPABILITY=avx2 then trains
    like eager.)"""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    separate_compile_cache()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    separate_compile_cache()
    default, own = os.path.split(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert own == "isa-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default)  # what importing torch's compiler writes
    separate_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == os.path.join(default, own)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    separate_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_tracks_fp32(precision, data_dir, tmp_path):
    """On a GPU, bf16 autocast and fp16 with a gradient scaler follow the fp32 run: every loss of 30
    steps within 3% (16-bit matmul rounding), and MFU is taken against the GPU peak table."""
    common = dict(training__steps=30, optim__lr=3e-3, training__device="cuda")
    train(config(data_dir, tmp_path / "fp32", **common))
    train(config(data_dir, tmp_path / precision, training__precision=precision, **common))
    reference, mixed = losses(tmp_path / "fp32"), losses(tmp_path / precision)
    assert mixed[30] < 0.8 * mixed[1]
    for step in reference:
        assert mixed[step] == pytest.approx(reference[step], rel=3e-2), step
    from clusterlm.hardware import gpu_peak_flops

    if gpu_peak_flops(torch.cuda.get_device_name()):
        assert all(r["mfu"] > 0 for r in records(tmp_path / precision, "train"))


@cuda
def test_fp16_scaler_skips_an_overflowing_step_and_backs_off():
    from clusterlm.parallel.precision import Precision

    precision = Precision("fp16", torch.device("cuda"))
    weight = torch.nn.Parameter(torch.ones(4, device="cuda"))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scale = precision.scaler.get_scale()
    precision.scale((weight * float("inf")).sum()).backward()
    precision.unscale(optimizer)
    precision.step([optimizer])
    assert torch.equal(weight.detach(), torch.ones(4, device="cuda"))  # the step was skipped
    assert precision.scaler.get_scale() == scale / 2


@cuda
def test_compiled_training_on_cuda_matches_eager(data_dir, tmp_path):
    """The compiled step on a GPU (Triton kernels, the GPU's own SDPA choice) gives eager's fp32
    losses within relative 1e-3 (TF32 stays off, so only the order of float sums differs)."""
    common = dict(training__steps=6, training__device="cuda")
    train(config(data_dir, tmp_path / "eager", **common))
    train(config(data_dir, tmp_path / "compiled", training__compile=True, **common))
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3)


@cuda
def test_flash_attention_on_cuda_trains(data_dir, tmp_path):
    train(
        config(
            data_dir,
            tmp_path,
            training__steps=30,
            optim__lr=3e-3,
            training__device="cuda",
            training__precision="bf16",
            training__attention="flash",
        )
    )
    curve = losses(tmp_path)
    assert curve[30] < 0.8 * curve[1]


@cuda
def test_more_processes_than_gpus_is_one_line(monkeypatch):
    from clusterlm.distributed.runtime import setup_runtime
    from clusterlm.errors import UserError

    gpus = torch.cuda.device_count()
    monkeypatch.setenv("WORLD_SIZE", str(gpus + 1))
    monkeypatch.setenv("LOCAL_RANK", str(gpus))
    with pytest.raises(UserError, match=f"this node has {gpus}; launch at most {gpus} processes"):
        setup_runtime(build_config(None, {"training.device": "cuda"}))
