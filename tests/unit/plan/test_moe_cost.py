"""The planner's mixture of experts: its parameter counts equal the model's, its memory scales
with ep and FSDP as the module says, its FLOPs are the active parameters', and expert
parallelism's all-to-all costs time on every cluster preset."""

import dataclasses

import pytest
import torch

from clusterlm.models import create_model
from clusterlm.models.counting import training_flops_per_token
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.cluster import load_cluster
from clusterlm.plan.layout import Layout, layout_config, layout_from_config, layout_problem
from clusterlm.plan.memory import device_memory, layer_activation_bytes, rank_params
from clusterlm.plan.moe_cost import moe_blocks_held, rank_param_split, routed_params
from clusterlm.plan.timing import step_time
from clusterlm.plan.workload import Workload, load_model_args

MOE = ModelArgs(
    flavour="llama",
    vocab_size=1000,
    block_size=256,
    n_layer=4,
    n_head=8,
    n_kv_head=4,
    n_embd=256,
    ffn_hidden=512,
    moe_experts=16,
    moe_top_k=2,
    moe_shared_experts=1,
    moe_ffn_hidden=128,
    moe_layers="after:1",
)
WORK = Workload(MOE, 256, 256 * 64, "bf16")


def built(args: ModelArgs) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model(args)


def test_the_planners_counts_equal_the_models():
    model = built(MOE)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    assert rank_params(WORK, Layout(), 0) == total
    assert rank_param_split(WORK, Layout(), 0) == (total - routed, routed)
    assert routed == 3 * routed_params(MOE)  # blocks 1, 2 and 3
    preset = load_model_args("moe-cpu", vocab_size=65)
    assert rank_params(Workload(preset, 64, 64 * 12, "fp32"), Layout(), 0) == sum(
        p.numel() for p in built(preset).parameters()
    )
    # pipeline stages hold the blocks the trainer gives them, MoE ones counted as such
    split = [rank_params(WORK, Layout(pp=2), r) for r in range(2)]
    assert sum(split) == total


def test_tp_splits_attention_and_ep_the_routed_experts_only():
    dense, routed = rank_param_split(WORK, Layout(), 0)
    tp_dense, _ = rank_param_split(WORK, Layout(tp=2), 0)
    _, ep_routed = rank_param_split(WORK, Layout(dp_shard=4, data_parallel="zero3", ep=4), 0)
    assert ep_routed == routed / 4
    moe_mlp = 3 * (256 * 16 + 3 * 256 * 128)  # router and shared expert, whole on every tp rank
    assert tp_dense == (dense - moe_mlp) / 2 + moe_mlp


def state(ep: int, data_parallel: str, dp: int = 8) -> tuple[float, float, float]:
    memory = device_memory(WORK, Layout(dp_shard=dp, data_parallel=data_parallel, ep=ep))
    return memory.parameters, memory.gradients, memory.optimizer


def test_memory_scales_with_ep_and_fsdp():
    dense, routed = rank_param_split(WORK, Layout(), 0)
    for ep in (1, 2, 4, 8):
        weights, grads, optimizer = state(ep, "zero1")
        # zero1: the weights and gradients of a rank's experts, 1/ep of them; the optimizer state
        # sharded over the expert-data-parallel group of 8/ep ranks: 1/8 of it whatever ep
        assert weights == pytest.approx(2 * dense + 2 * routed / ep)
        assert optimizer == pytest.approx(12 * (dense + routed) / 8)
        # zero3: everything sharded over all 8 ranks, however the experts are split
        assert sum(state(ep, "zero3")) == pytest.approx(16 * (dense + routed) / 8)
    assert sum(state(1, "zero3", dp=4)) == pytest.approx(2 * sum(state(1, "zero3", dp=8)))


def test_activations_count_the_active_experts():
    layout = Layout(dp_shard=2, data_parallel="zero3", micro_batch_size=2)
    one, two = (
        layer_activation_bytes(dataclasses.replace(WORK, model=m), layout, moe=True)
        for m in (dataclasses.replace(MOE, moe_top_k=1), MOE)
    )
    tokens, e = 256 * 2, 2
    assert two - one == tokens * (
        3 * e * 256 + 4 * e * 128 + 20 + 12
    )  # one more routed copy per token
    assert layer_activation_bytes(WORK, layout, moe=True) != layer_activation_bytes(WORK, layout)


def test_flops_count_the_active_experts_only():
    many = dataclasses.replace(MOE, moe_experts=64)
    router = 6 * 3 * 256 * (64 - 16)  # the gate scores every expert
    assert training_flops_per_token(many, 256) - training_flops_per_token(MOE, 256) == router


@pytest.mark.parametrize("preset", ["8xH100", "8xA100-80GB", "1xH100", "1xH200"])
def test_all_to_all_time_on_every_preset(preset):
    cluster = load_cluster(preset).with_nodes(4)
    devices = cluster.world_size
    work = dataclasses.replace(WORK, global_batch_tokens=256 * devices)

    def time(ep: int) -> float:
        layout = Layout(dp_shard=devices, data_parallel="zero3", ep=ep)
        return step_time(work, layout, cluster).expert_parallel

    assert time(1) == 0
    inside = min(cluster.devices_per_node, 4)
    if inside > 1:
        assert time(inside) > 0
    # across nodes the slower network carries the tokens
    spanning = time(devices)
    assert spanning > time(inside) and spanning > 0


def test_layouts_carry_the_experts_and_ep_as_the_trainer_checks_it():
    cfg = layout_config(Layout(dp_shard=2, data_parallel="zero3"), WORK)
    assert (cfg.model.moe_experts, cfg.model.moe_layers) == (16, "after:1")
    cluster = load_cluster("8xH100")
    work = dataclasses.replace(WORK, global_batch_tokens=256 * 8)
    layout = Layout(dp_shard=8, data_parallel="zero3", ep=2)
    assert layout_problem(layout, work, cluster) is None
    assert layout_config(layout, work).parallel.ep == 2
    assert layout_from_config(layout_config(layout, work), 8) == layout
    for refused, message in [
        (dataclasses.replace(layout, ep=16), "must divide the data-parallel sharding degree"),
        (dataclasses.replace(layout, ep=3), "not divisible by parallel.ep"),
        (dataclasses.replace(layout, data_parallel="zero1"), "parallel.ep > 1 runs with"),
    ]:
        assert message in layout_problem(refused, work, cluster)
    assert moe_blocks_held(MOE, (0, 1, 2)) == 2


@pytest.mark.parametrize(
    "precision,weights", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")]
)
def test_activation_count_matches_the_bytes_autograd_saves(precision, weights):
    """A whole MoE model (a dense block among MoE ones would be the dense count, tested
    elsewhere): within 3% today, in fp32, under autocast over fp32 weights and with 16-bit
    weights (FSDP's)."""
    from clusterlm.bench.probes import saved_activation_bytes
    from clusterlm.models.gpt import Transformer
    from clusterlm.plan.memory import activation_bytes, logits_gradient_bytes

    args = dataclasses.replace(MOE, n_embd=128, n_head=4, n_kv_head=2, moe_layers="all")
    torch.manual_seed(0)
    model, tokens = Transformer(args), torch.randint(0, args.vocab_size, (4, 128))
    if weights == "bf16":
        model = model.to(torch.bfloat16)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens)
        return torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), tokens.roll(1, 1).flatten()
        )

    measured, _ = saved_activation_bytes(model, run)
    fsdp = weights == "bf16"  # the planner's layouts with 16-bit weights are FSDP's
    layout = Layout(micro_batch_size=4, dp_shard=2 if fsdp else 1, data_parallel="zero3")
    work = Workload(args, 128, 4 * 128 * (2 if fsdp else 1), precision)
    predicted = activation_bytes(work, layout, "first") - logits_gradient_bytes(work, layout)
    assert predicted == pytest.approx(measured, rel=0.03)


def test_plan_prints_total_and_active_parameters_of_a_mixture(capsys):
    from clusterlm.cli import main as cli

    argv = ["plan", "--model", "moe-cpu", "--vocab-size", "65", "--cluster", "8xH100"]
    assert cli([*argv, "--global-batch-tokens", "8192", "--seq", "64", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "a mixture of experts: 3.63M parameters, 878K active per token" in out
    assert cli([*argv, "--expert-imbalance", "1.3", "--seq", "64", "--top", "2"]) == 0
    dense = ["plan", "--model", "nano-cpu", "--vocab-size", "65", "--cluster", "8xH100"]
    capsys.readouterr()
    assert cli([*dense, "--expert-imbalance", "1.3"]) != 0
    assert "applies to a mixture of experts" in capsys.readouterr().err
    assert cli([*argv, "--expert-imbalance", "0.5"]) != 0
    assert "at least 1" in capsys.readouterr().err


def test_routing_kernels_are_counted_per_block_and_grow_with_the_tokens():
    from clusterlm.plan.moe_cost import routing_kernels

    one = routing_kernels(WORK, Layout(), 1024, r=4)
    assert one[0] == 28 + 23  # forward and backward calls
    assert routing_kernels(WORK, Layout(), 2048, r=4) == (one[0], pytest.approx(2 * one[1]))
    split = routing_kernels(WORK, Layout(dp_shard=2, data_parallel="zero3", ep=2), 1024, r=4)
    assert split[0] == one[0] + 10 + 4 and split[1] > one[1]  # the order and gathers by expert
    full = routing_kernels(WORK, Layout(activation_checkpointing="full"), 1024, r=4)
    assert full[0] == 2 * 28 + 23  # the forward reruns


def test_expert_parallel_sends_the_counts_before_the_tokens():
    from clusterlm.plan import collectives
    from clusterlm.plan.moe_cost import all_to_all_seconds

    cluster = load_cluster("8xH100")
    layout = Layout(dp_shard=8, data_parallel="zero3", ep=4)
    group = collectives.mesh_group(layout, "ep", cluster)
    tokens = 256.0
    routed = tokens * MOE.moe_top_k * MOE.n_embd * WORK.activation_bytes
    per_block = 4 * collectives.all_to_all(routed, group, cluster) + collectives.all_to_all(
        MOE.moe_experts * 8, group, cluster
    )
    assert all_to_all_seconds(WORK, layout, cluster, tokens, 3) == pytest.approx(3 * per_block)


def test_the_routing_takes_its_counted_calls_at_the_measured_routing_rate():
    """Where the probe timed the MoE block's routing, its calls take that rate, bytes included;
    elsewhere the element-wise launch and bytes rates."""
    from clusterlm.bench.layout_runs import local_cluster
    from clusterlm.plan.cluster import Link
    from clusterlm.plan.elementwise import micro_batch_seconds
    from clusterlm.plan.moe_cost import routing_kernels

    work = dataclasses.replace(WORK, precision="fp32")
    layout = Layout(micro_batch_size=2)
    tokens = 2 * work.seq_len
    rates = {"linear": 1e11, "attention": 1e11, "launch": 1e5, "elementwise": 1e10}

    def seconds(kinds: dict[str, float]) -> float:
        cluster = local_cluster(1, {"fp32": 1e11}, Link(1e9, 1e-4), cores=2, rates={"fp32": kinds})
        return micro_batch_seconds(work, layout, cluster.device, MOE.n_layer, 3)

    calls, nbytes = routing_kernels(work, layout, tokens, r=4)
    assert seconds(rates) == pytest.approx(3 * (calls / 1e5 + nbytes / 1e10))
    assert seconds({**rates, "routing": 2e4}) == pytest.approx(3 * calls / 2e4)


def test_the_optimizer_steps_the_state_the_rank_holds_at_the_measured_rate():
    from clusterlm.bench.layout_runs import local_cluster
    from clusterlm.plan.cluster import Link
    from clusterlm.plan.elementwise import optimizer_seconds
    from clusterlm.plan.memory import device_memory

    work = dataclasses.replace(WORK, precision="fp32")
    rates = {"fp32": {"linear": 1e11, "attention": 1e11, "optimizer": 1e8}}
    device = local_cluster(1, {"fp32": 1e11}, Link(1e9, 1e-4), cores=2, rates=rates).device
    for layout in (Layout(), Layout(dp_shard=4, data_parallel="zero3", ep=2)):
        held = device_memory(work, layout).optimizer / 8  # fp32 AdamW: two moments per parameter
        assert optimizer_seconds(work, layout, device) == pytest.approx(held / 1e8)
    assert optimizer_seconds(work, Layout(), load_cluster("8xH100").device) == 0.0


def test_the_busiest_rank_share_is_read_from_the_loads_per_expert():
    from clusterlm.plan.moe_cost import rank_imbalance

    balanced = [[10, 10, 10, 10]]
    assert rank_imbalance(balanced, 2) == 1.0
    # rank 0 holds experts 0-1 (30 tokens), rank 1 experts 2-3 (10): 30 over a mean of 20
    assert rank_imbalance([[20, 10, 5, 5]], 2) == pytest.approx(1.5)
    # one rank per expert: the per-expert imbalance itself; blocks are averaged
    assert rank_imbalance([[20, 10, 5, 5], [10, 10, 10, 10]], 4) == pytest.approx((2.0 + 1.0) / 2)
    assert rank_imbalance([[0, 0, 0, 0]], 2) == 1.0  # no tokens routed: nothing to wait for
    assert rank_imbalance([], 2) == 1.0


def test_expert_parallelism_runs_at_the_busiest_ranks_pace():
    """Imbalance costs the busiest rank's extra routed tokens, computed and received, under ep
    only: without it every rank runs every expert on its own tokens."""
    from clusterlm.errors import UserError
    from clusterlm.plan.moe_cost import all_to_all_seconds, extra_moe_flops_per_token

    skewed = dataclasses.replace(WORK, expert_imbalance=1.5)
    ep, no_ep = Layout(dp_shard=4, data_parallel="zero2", ep=2), Layout(dp_shard=4)
    routed = MOE.moe_top_k * 3 * MOE.n_embd * MOE.moe_ffn_hidden
    extra = extra_moe_flops_per_token(skewed, ep, 3) - extra_moe_flops_per_token(WORK, ep, 3)
    assert extra == pytest.approx(6 * 3 * routed * 0.5)
    assert extra_moe_flops_per_token(skewed, no_ep, 3) == extra_moe_flops_per_token(WORK, no_ep, 3)
    cluster = load_cluster("8xH100")
    assert all_to_all_seconds(skewed, ep, cluster, 256, 3) > all_to_all_seconds(
        WORK, ep, cluster, 256, 3
    )
    assert step_time(skewed, ep, cluster).total > step_time(WORK, ep, cluster).total
    assert step_time(skewed, no_ep, cluster).total == step_time(WORK, no_ep, cluster).total
    with pytest.raises(UserError, match="at least 1"):
        dataclasses.replace(WORK, expert_imbalance=0.9)


def test_the_first_fsdp_unit_has_nothing_to_hide_behind():
    """The routed experts of every block in one unit (a model under ``parallel.bucket_mb``) are
    gathered right after the root and reduced just before it: however long the compute, their
    collectives stay on the critical path."""
    from clusterlm.plan import collectives, fsdp

    cluster = load_cluster("8xH100")
    layout = Layout(dp_shard=8, data_parallel="zero2", ep=2, bucket_mb=1000)
    units = fsdp.stage_units(WORK, layout, 0, fsdp.parameter_tensors(MOE))
    *blocks, root = units
    assert len(blocks) == 1 and blocks[0].experts
    group = collectives.expert_data_group(layout, cluster)
    experts = blocks[0].params
    floor = collectives.all_gather(experts * 2, group, cluster)
    floor += collectives.reduce_scatter(experts * 4, group, cluster)
    shard = collectives.mesh_group(layout, "dp_shard_cp", cluster)
    floor += collectives.all_gather(root.params * 2, shard, cluster)
    floor += collectives.reduce_scatter(root.params * 4, shard, cluster)
    exposed = fsdp.exposed_seconds(units, layout, cluster, 2, 4, forward=10.0, backward=20.0)
    assert exposed == pytest.approx(floor)


def test_experts_over_one_rank_pass_fsdps_buffers_but_move_no_bytes():
    """ep equal to the data-parallel degree leaves each expert group one rank: FSDP still wraps
    the experts (``data_parallel._shard_experts``) and copies them through its buffers, so the
    planner counts their tensor passes; their collectives cost nothing."""
    from clusterlm.plan import fsdp

    cluster = load_cluster("8xH100")
    tensors = fsdp.parameter_tensors(MOE)
    whole = Layout(dp_shard=2, data_parallel="zero2", ep=2, bucket_mb=1000)
    *blocks, root = fsdp.stage_units(WORK, whole, 0, tensors)
    assert len(blocks) == 1 and blocks[0].experts and blocks[0].tensors == 3 * 3
    moe_blocks = moe_blocks_held(MOE, tuple(range(MOE.n_layer)))
    assert blocks[0].params == pytest.approx(moe_blocks * routed_params(MOE) / 2)
    assert fsdp.exposed_seconds([*blocks, root], whole, cluster, 2, 4, 1.0, 2.0) == (
        pytest.approx(fsdp.exposed_seconds([root], whole, cluster, 2, 4, 1.0, 2.0))
    )
    dense = dataclasses.replace(MOE, moe_experts=0, moe_top_k=0, moe_shared_experts=0)
    dense_layout = dataclasses.replace(whole, ep=1)
    passes = fsdp.tensor_passes(WORK, whole, tensors)
    assert passes > fsdp.tensor_passes(
        dataclasses.replace(WORK, model=dense), dense_layout, fsdp.parameter_tensors(dense)
    )
