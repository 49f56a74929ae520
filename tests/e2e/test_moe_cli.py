"""A mixture of experts trained through the CLI: the preset is valid, a tiny MoE trains, its
expert loads reach metrics.jsonl, and a resumed run continues exactly (routing biases included)."""

import math

from launch_helpers import TINY, clusterlm
from train_helpers import TINY_ARGS, records, train_cli

from clusterlm.cli import main as cli
from clusterlm.config import build_config

MOE = [
    "--model.flavour=llama",
    "--model.moe_experts=4",
    "--model.moe_top_k=2",
    "--model.moe_shared_experts=1",
    "--model.moe_ffn_hidden=16",
    "--model.moe_layers=after:1",
    "--model.moe_bias_rate=0.01",
]


def test_the_preset_is_valid():
    cfg = build_config("configs/moe-cpu.toml", {})
    assert (cfg.model.moe_experts, cfg.model.moe_top_k, cfg.model.moe_shared_experts) == (16, 2, 1)


def test_a_tiny_moe_trains_and_reports_its_experts(data_dir, tmp_path):
    assert train_cli(data_dir, tmp_path, 6, *MOE) == 0
    train = records(tmp_path, "train")
    assert len(train) == 6 and all(math.isfinite(r["loss"]) for r in train)
    last = train[-1]
    assert list(last["moe_tokens_per_expert"]) == ["1"]  # block 1 only: after:1
    # 4 sequences of 32 tokens, 2 experts each, one step per log window.
    assert sum(last["moe_tokens_per_expert"]["1"]) == 4 * 32 * 2
    assert last["moe_load_imbalance"] == last["moe_load_imbalance_layer1"] >= 1.0
    assert last["moe_aux_loss"] > 0
    sample = ["generate", "--run", str(tmp_path), "--prompt", "the", "--max-new-tokens", "5"]
    assert cli(sample) == 0
    assert cli(["export", "hf", "--run", str(tmp_path), "--out", str(tmp_path / "hf")]) != 0
    assert not (tmp_path / "hf").exists()


def test_aux_loss_balancing_trains_and_resumes_exactly(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    aux = [*MOE[:-1], "--model.moe_balance=aux_loss", "--model.moe_aux_loss_coeff=0.1"]
    common = ["--optim.decay_steps=6"]
    assert train_cli(data_dir, straight, 6, *aux, *common) == 0
    assert train_cli(data_dir, resumed, 4, *aux, *common) == 0
    assert train_cli(data_dir, resumed, 6, *aux, *common, "--checkpoint.resume=auto") == 0
    loss = {r["step"]: r["loss"] for r in records(straight, "train")}
    assert loss == {r["step"]: r["loss"] for r in records(resumed, "train")}


def test_aux_free_biases_resume_exactly(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_cli(data_dir, straight, 6, *MOE, "--optim.decay_steps=6") == 0
    assert train_cli(data_dir, resumed, 4, *MOE, "--optim.decay_steps=6") == 0
    assert (
        train_cli(data_dir, resumed, 6, *MOE, "--optim.decay_steps=6", "--checkpoint.resume=auto")
        == 0
    )
    loss = {r["step"]: r["loss"] for r in records(straight, "train")}
    assert loss == {r["step"]: r["loss"] for r in records(resumed, "train")}


def test_bench_train_reports_the_experts_against_a_dense_baseline(data_dir, capsys):
    dense = (
        "model.moe_experts=0,model.moe_shared_experts=0,model.moe_ffn_hidden=0,model.moe_layers=all"
    )
    bench = ["bench", "train", "--steps=2", "--rounds=1", "--warmup=1", f"--against={dense}"]
    assert cli([*bench, "--data.dir", str(data_dir), *TINY_ARGS, *MOE[:-1]]) == 0
    out = capsys.readouterr().out
    assert "speed-up over baseline" in out
    assert "experts (config): load imbalance" in out and "experts (baseline)" not in out


def test_a_trained_mixture_exports_as_mixtral_unless_its_routing_biases_moved(
    data_dir, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    mixtral = [*MOE[:3], "--model.moe_ffn_hidden=16", "--model.moe_score=softmax"]
    aux_loss, aux_free = tmp_path / "aux_loss", tmp_path / "aux_free"
    assert train_cli(data_dir, aux_loss, 2, *mixtral, "--model.moe_balance=aux_loss") == 0
    assert cli(["export", "hf", "--run", str(aux_loss), "--out", str(tmp_path / "hf")]) == 0
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(loaded).__name__ == "MixtralForCausalLM" and not any(info.values()), info
    assert train_cli(data_dir, aux_free, 2, *mixtral, "--model.moe_bias_rate=0.01") == 0
    capsys.readouterr()
    assert cli(["export", "hf", "--run", str(aux_free), "--out", str(tmp_path / "refused")]) != 0
    assert "routing biases" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_bench_train_reports_the_all_to_all_of_expert_parallelism(launch_data_dir):
    """ep2 on 2 launched processes against ep1: the all-to-all line for the ep variant only."""
    result = clusterlm(
        *("bench", "train", "--nproc", "2", "--steps", "2", "--rounds", "1", "--warmup", "1"),
        *("--data.dir", str(launch_data_dir), *TINY, *MOE[:-1]),
        *("--parallel.data_parallel", "zero2", "--parallel.ep", "2", "--against", "parallel.ep=1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "experts over ep 2" in result.stdout
    assert "all-to-all (config):" in result.stdout and "all-to-all (baseline)" not in result.stdout


def test_bench_train_times_steps_from_a_trained_checkpoint(data_dir, tmp_path, capsys):
    """``--resume`` starts the timed steps from a checkpoint (a run directory's newest), leaving
    the run as it was; a directory without one gets one line."""
    assert train_cli(data_dir, tmp_path / "run", 2, *MOE) == 0
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    bench = ["bench", "train", "--steps=1", "--rounds=1", "--warmup=1", "--data.dir", str(data_dir)]
    resumed = [*bench, *TINY_ARGS, *MOE, "--resume", str(tmp_path / "run")]
    assert cli(resumed) == 0
    out = capsys.readouterr().out
    assert "experts (config): load imbalance" in out
    assert f"timed from the checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000002'}" in out
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    (tmp_path / "empty").mkdir()
    assert cli([*bench, *TINY_ARGS, *MOE, "--resume", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err
    assert "holds no complete checkpoint" in err and len(err.strip().splitlines()) == 1


def test_launched_bench_train_resumes_from_a_run_directory(launch_data_dir, tmp_path):
    """Under --nproc the run directory becomes its newest checkpoint before the workers start;
    a directory without one is one line, printed once."""
    model = (*TINY, *MOE[:-1], "--data.dir", str(launch_data_dir))
    run = tmp_path / "run"
    trained = clusterlm(
        *("train", "--nproc", "2", *model, "--training.out_dir", str(run)),
        *("--training.steps", "2", "--checkpoint.interval", "2"),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    bench = ("bench", "train", "--nproc", "2", "--steps", "1", "--rounds", "1", "--warmup", "1")
    result = clusterlm(*bench, *model, "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"timed from the checkpoint {run / 'checkpoints' / 'step_00000002'}" in result.stdout
    (tmp_path / "empty").mkdir()
    refused = clusterlm(*bench, *model, "--resume", str(tmp_path / "empty"))
    assert refused.returncode == 2
    assert refused.stderr.count("holds no complete checkpoint") == 1
