"""Planner memory and time formulas against worked examples and their monotonicity."""

import pytest

from clusterlm.models.counting import training_flops_per_token
from clusterlm.models.gpt import ModelArgs
from clusterlm.plan.cluster import load_cluster
from clusterlm.plan.efficiency import head_flops_per_token
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import (
    buffer_bytes,
    in_flight_microbatches,
    layer_activation_bytes,
    stage_params,
    state_bytes_per_param,
)
from clusterlm.plan.timing import bubble_fraction, step_time
from clusterlm.plan.workload import Workload, load_model_args


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure_1(stage, expected_gb):
    """7.5B parameters, Adam in mixed precision, N = 64: 120 / 31.4 / 16.6 / 1.9 GB per device."""
    per_param = sum(state_bytes_per_param(stage, 64, mixed_precision=True))
    assert 7.5e9 * per_param / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_fp32_training_is_16_bytes_split_4_4_8():
    assert state_bytes_per_param(0, 1, mixed_precision=False) == (4.0, 4.0, 8.0)
    assert state_bytes_per_param(3, 8, mixed_precision=False) == (0.5, 0.5, 1.0)


# A GPT-3-style block (4h MLP, multi-head attention, dropout) in 16-bit, where Korthikanti et al.'s
# formulas apply exactly; our count adds the LayerNorms' fp32 mean and rstd, 16 bytes per token.
S, B, H, A, T = 2048, 2, 1024, 16, 4
GPT3_BLOCK = ModelArgs(
    flavour="gpt2",
    vocab_size=51200,
    block_size=S,
    n_layer=4,
    n_head=A,
    n_kv_head=A,
    n_embd=H,
    ffn_hidden=4 * H,
    dropout=0.1,
)
UNFUSED = Workload(GPT3_BLOCK, S, S * B * 8, "bf16", fused_attention=False)


def _layer(tp=1, sp=False, ac="none", work=UNFUSED):
    # 16-bit weights as in Megatron: FSDP's param_dtype (autocast over fp32 weights keeps more).
    return layer_activation_bytes(
        work,
        Layout(
            tp=tp,
            sequence_parallel=sp,
            activation_checkpointing=ac,
            micro_batch_size=B,
            dp_shard=2,
            data_parallel="zero3",
        ),
    )


def test_activations_match_korthikanti_equations():
    sbh, stats = S * B * H, 16 * S * B
    assert _layer() == sbh * (34 + 5 * A * S / H) + stats
    assert _layer(tp=T) == sbh * (10 + 24 / T + 5 * A * S / (H * T)) + stats
    # torch keeps the sequence-gathered inputs of the column-parallel matmuls (2 of them, 16-bit),
    # which Megatron's sequence parallelism re-gathers in backward.
    gathered = 2 * 2 * sbh * (1 - 1 / T)
    assert _layer(tp=T, sp=True) == pytest.approx(
        sbh / T * (34 + 5 * A * S / H) + stats / T + gathered
    )
    assert _layer(tp=T, sp=True, ac="selective") == pytest.approx(
        sbh / T * 34 + stats / T + gathered
    )
    assert _layer(ac="full") == 2 * sbh


def test_fused_attention_keeps_no_scores_so_selective_saves_nothing():
    fused = Workload(GPT3_BLOCK, S, S * B * 8, "bf16", fused_attention=True)
    assert _layer(work=fused) == _layer(work=fused, ac="selective") < _layer()
    assert _layer(work=fused) - _layer(ac="selective") == 4 * A * S * B  # only the fp32 log-sum-exp


def test_pipeline_in_flight_microbatches_per_schedule():
    assert (
        in_flight_microbatches(Layout(pp=4, micro_batches=16, pp_schedule="gpipe"), "first") == 16
    )
    assert in_flight_microbatches(Layout(pp=4, micro_batches=16, pp_schedule="1f1b"), "first") == 4
    assert in_flight_microbatches(Layout(pp=4, micro_batches=2, pp_schedule="1f1b"), "first") == 2
    interleaved = Layout(
        pp=4, micro_batches=16, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2
    )
    assert in_flight_microbatches(interleaved, "first") == pytest.approx(4 * (1 + 3 / 8))
    assert in_flight_microbatches(interleaved, "last") == 1


def test_a_pipeline_stage_under_fsdp_holds_its_gathered_weights_and_whole_gradients_all_step():
    """torch's pipeline stage turns FSDP's reshard and reduction off in every backward but the
    last, so zero2 and zero3 alike hold the stage's weights and gradients whole (bf16: 2 + 2 bytes
    each)."""
    work = Workload(load_model_args("llama-8b"), 8192, 8192 * 64)
    for data_parallel in ("zero2", "zero3"):
        layout = Layout(pp=4, dp_shard=8, data_parallel=data_parallel, micro_batches=16)
        assert buffer_bytes(work, layout) == 4 * stage_params(work, layout, "first")
    without_pipeline = buffer_bytes(
        work, Layout(dp_shard=8, data_parallel="zero3", micro_batches=16)
    )
    assert (
        without_pipeline < 4 * stage_params(work, Layout(), "first") / 8
    )  # a unit or two, not the model


def test_more_tp_never_increases_parameter_bytes():
    work = Workload(load_model_args("llama-8b"), 8192, 8192 * 64)
    counts = [stage_params(work, Layout(tp=t), stage) for t in (1, 2, 4, 8) for stage in ("first",)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_more_microbatches_never_increase_the_bubble():
    for schedule in ("gpipe", "1f1b", "zbv_zero_bubble"):
        fractions = [
            bubble_fraction(Layout(pp=8, micro_batches=m, pp_schedule=schedule))
            for m in range(1, 65)
        ]
        assert fractions == sorted(fractions, reverse=True)
    assert bubble_fraction(Layout(pp=8, micro_batches=16, pp_schedule="gpipe")) == 7 / 16
    assert (
        bubble_fraction(
            Layout(pp=8, micro_batches=16, pp_schedule="interleaved_1f1b", pp_stages_per_rank=2)
        )
        == 7 / 32
    )


def test_full_recompute_costs_a_third_more_compute_and_cross_node_dp_costs_more():
    cluster = load_cluster("8xH100").with_nodes(2)
    work = Workload(load_model_args("llama-1b"), 4096, 4096 * 64)
    plain = step_time(work, Layout(dp_replicate=16, micro_batches=4), cluster)
    full = step_time(
        work, Layout(dp_replicate=16, micro_batches=4, activation_checkpointing="full"), cluster
    )
    assert full.compute == plain.compute
    blocks = 1 - head_flops_per_token(work) / training_flops_per_token(work.model, 4096)
    assert full.recompute == pytest.approx(
        plain.compute * blocks / 3
    )  # the blocks' forward, not the head's
    one_node = step_time(work, Layout(dp_replicate=8, micro_batches=8), load_cluster("8xH100"))
    assert plain.data_parallel >= one_node.data_parallel
