"""training.precision = auto: bf16 only where the CPU computes it natively, a warning for an
explicit bf16 on a CPU that emulates it, and the resolved precision in checkpoints, metrics and
resume; and training.attention = auto on a CPU in bf16: the faster of the flash and math kernels,
probed once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from clusterlm.checkpoint.resume import find_checkpoint
from clusterlm.cli import main as cli
from clusterlm.config import build_config
from clusterlm.errors import UserError
from clusterlm.hardware import rates as hardware
from clusterlm.parallel import precision as precision_module
from clusterlm.parallel.precision import resolve_precision, settle_attention, settle_precision
from clusterlm.train.inference import load_for_inference
from clusterlm.train.trainer import train

CPU = torch.device("cpu")
NATIVE = {torch.float32: 200e9, torch.bfloat16: 440e9}  # a Zen 4 with AVX512-BF16, as probed
EMULATED = {torch.float32: 70e9, torch.bfloat16: 1e9}  # a Zen 3 with AVX2 only


def probing(monkeypatch, rates):
    monkeypatch.setattr(
        precision_module, "cpu_peak_flops", lambda dtype, remeasure=False: rates[dtype]
    )


def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    probing(monkeypatch, NATIVE)
    assert resolve_precision("auto", CPU) == ("bf16", None)
    assert resolve_precision("bf16", CPU) == ("bf16", None)
    probing(monkeypatch, EMULATED)
    assert resolve_precision("auto", CPU) == ("fp32", None)
    assert resolve_precision("fp32", CPU) == ("fp32", None)


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_both_rates(monkeypatch, capsys):
    probing(monkeypatch, EMULATED)
    assert settle_precision("bf16", CPU) == "bf16"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "1.0 GFLOP/s" in lines[0] and "70.0 GFLOP/s" in lines[0]
    assert settle_precision("bf16", CPU, announce=False) == "bf16" and not capsys.readouterr().err


def test_a_cpu_restricted_to_avx2_probes_its_own_rates_and_trains_in_fp32(tmp_path):
    """The probe cache is keyed by CPU model and allowed instruction set: a run that narrows torch
    and oneDNN to AVX2 (as on a Zen 3, which emulates bf16) measures afresh, beside another CPU's
    figures, and resolves auto to fp32."""
    cache = tmp_path / "clusterlm" / "cpu_peak.json"
    cache.parent.mkdir()
    cache.write_text(
        json.dumps(
            {f"another CPU|avx512|threads=1|{dtype}": rate for dtype, rate in NATIVE.items()}
        )
    )
    probe = (
        "import torch; from clusterlm.parallel.precision import resolve_precision; "
        "print(resolve_precision('auto', torch.device('cpu'))[0])"
    )
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path),
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
    }
    resolved = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env=env,
    ).stdout.strip()
    assert resolved == "fp32"
    keys = json.loads(cache.read_text())
    assert len(keys) == 4 and sum("|avx2|onednn=avx2|" in key for key in keys) == 2


def test_attention_auto_on_a_cpu_in_bf16_takes_the_faster_kernel_probed_once(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    probed = []

    def seconds(shape, dtype, kernel):
        probed.append((shape, kernel))
        return {"flash": 5.5, "math": 1.9}[kernel] * (
            1 if shape[2] <= 64 else {"flash": 0.2, "math": 1}[kernel]
        )

    monkeypatch.setattr(hardware, "_attention_seconds", seconds)
    short, longer = (12, 4, 64, 32), (8, 12, 256, 64)
    assert settle_attention("auto", "bf16", CPU, short) == "math"
    assert settle_attention("auto", "bf16", CPU, longer) == "flash"
    assert (
        settle_attention("auto", "bf16", CPU, short) == "math" and len(probed) == 4
    )  # cached on disk
    # Not probed: fp32 (flash is the faster there), an explicit kernel, a GPU, and scores too
    # large for math.
    assert settle_attention("auto", "fp32", CPU, short) == "auto"
    assert settle_attention("math", "bf16", CPU, longer) == "math"
    assert settle_attention("auto", "bf16", torch.device("cuda"), short) == "auto"
    assert settle_attention("auto", "bf16", CPU, (4, 12, 1024, 64)) == "flash" and len(probed) == 4
    # torch's CPU flash kernel has no dropout: math, unprobed, and an explicit flash is refused
    assert settle_attention("auto", "bf16", CPU, longer, dropout=0.1) == "math" and len(probed) == 4
    with pytest.raises(UserError, match="training.attention = flash has no attention dropout"):
        settle_attention("flash", "bf16", CPU, longer, dropout=0.1)
    assert settle_attention("flash", "bf16", torch.device("cuda"), longer, dropout=0.1) == "flash"


def test_the_attention_probe_times_both_kernels():
    assert 0 < hardware._attention_seconds((2, 2, 16, 8), torch.bfloat16, "math") < 10
    assert 0 < hardware._attention_seconds((2, 2, 16, 8), torch.bfloat16, "flash") < 10


@pytest.mark.parametrize("rates,resolved", [(EMULATED, "fp32"), (NATIVE, "bf16")])
def test_checkpoints_and_metrics_record_the_resolved_precision_and_auto_resumes(
    rates, resolved, monkeypatch, tmp_path, corpus_dir, capsys
):
    probing(monkeypatch, rates)
    data = tmp_path / "data"
    assert cli(["prepare", str(corpus_dir), "--out", str(data), "--workers", "1"]) == 0
    values = {
        "model.n_layer": 1,
        "model.n_head": 2,
        "model.n_embd": 16,
        "model.block_size": 16,
        "training.micro_batch_size": 2,
        "training.eval_batches": 1,
        "training.steps": 2,
        "metrics.progress": "lines",
        "metrics.tensorboard": False,
        "metrics.plot": False,
        "metrics.peak_flops": 1e12,
        "data.dir": str(data),
        "training.out_dir": str(tmp_path / "run"),
    }
    assert build_config(None, values).training.precision == "auto"
    train(build_config(None, values))
    found = find_checkpoint(str(tmp_path / "run"))
    assert found.state["config"]["training"]["precision"] == resolved
    assert found.state["config"]["training"]["attention"] == (
        "auto"
        if resolved == "fp32"
        else hardware.cpu_attention_kernel((2, 2, 16, 8), torch.bfloat16)
    )
    assert load_for_inference(found, device="cpu").cfg.training.precision == resolved
    summary = train(
        build_config(None, {**values, "training.steps": 3, "checkpoint.resume": "auto"})
    )
    assert summary.resumed_from.endswith("step_00000002")
    captured = capsys.readouterr()
    described = [
        line for line in (captured.out + captured.err).splitlines() if "parameters" in line
    ]
    assert described and all(f"cpu, {resolved}, peak" in line for line in described)
