"""Layout search, the `clusterlm plan` command, and its emitted config."""

import dataclasses
import re
import sys

import pytest

from clusterlm.cli.plan import main
from clusterlm.config import build_config, grad_accum_steps
from clusterlm.config.degrees import check_layout
from clusterlm.errors import UserError
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.cluster import load_cluster
from clusterlm.plan.emit import write_config
from clusterlm.plan.layout import Layout, layout_problem
from clusterlm.plan.memory import device_memory
from clusterlm.plan.search import enumerate_layouts, evaluate, search
from clusterlm.plan.workload import Workload, load_model_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture(scope="module")
def llama_1b_on_two_nodes():
    work = Workload(load_model_args("llama-1b"), 8192, 8192 * 64)
    cluster = load_cluster("8xH100").with_nodes(2)
    return work, cluster, search(work, cluster, headroom=0.5)


def test_search_returns_only_layouts_that_fit_by_its_own_model(llama_1b_on_two_nodes):
    work, cluster, result = llama_1b_on_two_nodes
    assert result.ranked and len(result.ranked) < result.considered  # headroom 0.5 rejects some
    for c in result.ranked:
        need = device_memory(work, c.layout).total + cluster.device.reserved_bytes
        assert need <= 0.5 * cluster.device.memory_bytes
    times = [c.time.total for c in result.ranked]
    assert times == sorted(times)


def test_enumerated_layouts_are_valid(llama_1b_on_two_nodes):
    work, cluster, _ = llama_1b_on_two_nodes
    for layout in enumerate_layouts(work, cluster):
        assert layout.pp * layout.dp * layout.cp * layout.tp == 16
        assert work.model.n_kv_head % layout.tp == 0 and layout.tp <= 8
        assert work.model.n_layer % layout.pp == 0
        assert layout.dp * layout.micro_batch_size * layout.micro_batches == work.sequences


def test_layout_problems_are_named():
    work = Workload(load_model_args("llama-8b"), 8192, 8192 * 32)
    cluster = load_cluster("8xH100")
    assert "tp 16 must divide n_head 32 and n_kv_head 8" in layout_problem(
        Layout(tp=16, micro_batches=32), work, cluster.with_nodes(2)
    )
    assert "tp 4 must stay inside a node" in layout_problem(
        Layout(tp=4, dp_replicate=2, micro_batches=16), work, load_cluster("1xH100").with_nodes(8)
    )
    assert "has 8 devices" in layout_problem(Layout(micro_batches=32), work, cluster)
    assert "must equal the global batch" in layout_problem(
        Layout(dp_replicate=8, micro_batches=3), work, cluster
    )
    assert "ddp does not shard" in layout_problem(
        Layout(dp_shard=8, micro_batches=4), work, cluster
    )


def test_cli_prints_table_and_emits_a_loadable_config(tmp_path, capsys):
    out = tmp_path / "best.toml"
    code = main(
        [
            "--model",
            "llama-1b",
            "--cluster",
            "8xH100",
            "--global-batch-tokens",
            "512K",
            "--seq",
            "4096",
            "--top",
            "3",
            "--train-tokens",
            "1T",
            "--emit-config",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "tokens/s" in printed and "MFU" in printed and "faster than the runner-up" in printed
    assert "device-hours" in printed
    config = tomllib.loads(out.read_text())
    assert config["model"]["n_layer"] == 16 and config["model"]["vocab_size"] == 128256
    parallel, training = config["parallel"], config["training"]
    assert parallel["pp"] * parallel["dp_replicate"] * parallel["dp_shard"] * parallel["tp"] == 8
    assert parallel["data_parallel"] in ("ddp", "zero1", "zero2", "zero3", "hsdp")
    assert training["tokens_per_step"] == 512 * 1024 and training["seq_len"] == 4096
    assert training["activation_checkpointing"] in ("none", "selective", "full")
    cfg = build_config(str(out), {})  # the trainer accepts it as it is
    dp = cfg.parallel.dp_replicate * cfg.parallel.dp_shard
    assert (
        dp * cfg.training.micro_batch_size * grad_accum_steps(cfg, dp) * 4096
        == training["tokens_per_step"]
    )
    assert cfg.parallel.pp == 1 or grad_accum_steps(cfg, dp) == 1


def test_nothing_fits_says_the_smallest_need_and_what_to_add(tmp_path, capsys):
    small = tmp_path / "small.toml"  # one 24 GiB device per node, no host to offload to
    small.write_text(
        "nodes = 1\ndevices_per_node = 1\n[device]\nmemory_gib = 24\npeak_tflops = { bf16 = 165 }\n"
        "[intra_node]\nbandwidth_gb_s = 32\nlatency_us = 5\n"
        "[inter_node]\nbandwidth_gb_s = 12.5\nlatency_us = 20\n"
    )
    code = main(
        [
            "--model",
            "llama-8b",
            "--cluster",
            str(small),
            "--global-batch-tokens",
            "64K",
            "--seq",
            "8192",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1
    assert re.search(
        r"nothing fits: the smallest need is [\d.]+ GiB per device .* use \d+ nodes", printed
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "no-such-model"], "model 'no-such-model' not found"),
        (["--model", "nano-cpu"], "pass --vocab-size"),
        (
            ["--model", "llama-1b", "--cluster", "no-such-cluster"],
            "cluster 'no-such-cluster' not found",
        ),
        (
            ["--model", "llama-1b", "--global-batch-tokens", "1000", "--seq", "4096"],
            "not a multiple of --seq",
        ),
        (["--model", "llama-1b", "--seq", "100000"], "exceeds the model's context"),
        (["--model", "llama-1b", "--global-batch-tokens", "lots"], "is not a number"),
        (
            ["--model", "llama-1b", "--efficiency", "1.5"],
            "compute_efficiency must be a number in (0, 1]",
        ),
        ([], "--model is required"),
    ],
)
def test_bad_input_is_one_user_error_line(argv, message):
    with pytest.raises(UserError) as err:
        main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


# Experts too big for one device even under zero3 unless split: 8 MoE blocks of 64 experts of
# Mixtral's width on one 8 x H100 node.
BIG_MOE = ModelArgs(
    flavour="llama",
    vocab_size=32000,
    block_size=4096,
    n_layer=8,
    n_head=32,
    n_kv_head=8,
    n_embd=4096,
    ffn_hidden=14336,
    moe_experts=64,
    moe_top_k=2,
    moe_ffn_hidden=14336,
    moe_layers="all",
    moe_balance="aux_free",
)


def _trainer_accepts(candidate, path) -> None:
    """The layout's emitted config loads and passes every check the trainer makes."""
    write_config(path, candidate)
    cfg = build_config(str(path), {})
    check_layout(cfg, candidate.layout.world_size)
    assert cfg.parallel.ep == candidate.layout.ep and cfg.model.moe_experts == BIG_MOE.moe_experts


def test_search_splits_experts_that_fit_no_other_way(tmp_path):
    work = Workload(BIG_MOE, 4096, 4096 * 16)
    cluster = load_cluster("8xH100")
    candidates = [evaluate(work, layout, cluster) for layout in enumerate_layouts(work, cluster)]
    split = [c for c in candidates if c.layout.ep > 1]
    assert {c.layout.ep for c in split} == {2, 4, 8}
    assert not any(c.fits(0.9) for c in candidates if c.layout.ep == 1)
    result = search(work, cluster)
    assert result.ranked and all(c.layout.ep > 1 for c in result.ranked)
    for c in split:
        assert (
            c.layout.data_parallel in ("zero2", "zero3", "hsdp") and not c.layout.sequence_parallel
        )
        assert BIG_MOE.moe_experts % c.layout.ep == 0 and c.layout.dp_shard % c.layout.ep == 0
    for i, c in enumerate({c.layout.describe(): c for c in split}.values()):
        if i % 7 == 0:  # a spread of them: each config build reads and checks a TOML file
            _trainer_accepts(c, tmp_path / f"{i}.toml")


def test_search_never_splits_a_dense_model(llama_1b_on_two_nodes):
    work, cluster, _ = llama_1b_on_two_nodes
    assert all(layout.ep == 1 for layout in enumerate_layouts(work, cluster))


def test_plan_of_the_moe_preset_prints_and_emits_its_ep(tmp_path, capsys):
    out = tmp_path / "moe.toml"
    argv = ["--model", "moe-cpu", "--vocab-size", "65", "--cluster", "8xH100", "--seq", "64"]
    assert main([*argv, "--global-batch-tokens", "8192", "--emit-config", str(out)]) == 0
    ep = re.search(
        r"expert parallelism: ep (\d+), (\d+) routed experts per rank", capsys.readouterr().out
    )
    assert ep and int(ep[1]) * int(ep[2]) == 16
    cfg = build_config(str(out), {})
    check_layout(cfg, 8)
    assert cfg.parallel.ep == int(ep[1]) and cfg.model.moe_experts == 16


def test_search_splits_the_encoder_decoder_by_tensor_parallel_without_sequence_parallel(tmp_path):
    """The trainer runs mbart under tp, not sp, cp or pp: those layouts are all it is offered, and
    its tp traffic counts the decoder blocks' cross-attention (5 reductions a layer, not 2; with
    half as many decoder blocks, 3.5). The emitted config keeps the decoder's depth."""
    mbart = ModelArgs(flavour="mbart", n_layer=12, n_head=16, n_kv_head=16, n_embd=1024,
                      ffn_hidden=4096, block_size=1024, vocab_size=250027)  # fmt: skip
    work, cluster = Workload(mbart, 1024, 1024 * 64), load_cluster("8xH100")
    layouts = list(enumerate_layouts(work, cluster))
    assert {layout.tp for layout in layouts} == {1, 2, 4, 8}
    assert not any(layout.sequence_parallel or layout.cp > 1 or layout.pp > 1 for layout in layouts)
    tp2 = next(layout for layout in layouts if layout.tp == 2)
    gpt2 = Workload(dataclasses.replace(mbart, flavour="gpt2"), 1024, 1024 * 64)
    traffic = evaluate(work, tp2, cluster).time.tensor_parallel
    assert traffic == pytest.approx(2.5 * evaluate(gpt2, tp2, cluster).time.tensor_parallel)
    shallow = Workload(dataclasses.replace(mbart, decoder_layers=6), 1024, 1024 * 64)
    traffic = evaluate(shallow, tp2, cluster).time.tensor_parallel
    assert traffic == pytest.approx(1.75 * evaluate(gpt2, tp2, cluster).time.tensor_parallel)
    write_config(tmp_path / "mbart.toml", evaluate(shallow, tp2, cluster))
    emitted = build_config(str(tmp_path / "mbart.toml"), {}).model
    assert (emitted.flavour, emitted.n_layer, emitted.decoder_layers) == ("mbart", 12, 6)
