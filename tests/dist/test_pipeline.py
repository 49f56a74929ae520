"""Every pipeline schedule trains exactly like one process with the same batch.

Real processes on gloo, each world size spawned once with the schedules looped inside. Each case
trains a tiny 8-layer model (llama, and gpt2 with its tied embedding split across stages) for 10
AdamW steps with gradient clipping, then evaluates one batch; the per-step losses, gradient norms,
evaluation loss and final weights are compared with one process training on the full batch.
Tolerance (fp32): relative 1e-5; the differences are only the order of floating-point sums.
The largest, up to 5e-6 on weights, is exactly that of accumulating the micro-batches' gradients
in one process; the pipeline adds none. Weights are compared per tensor by relative
norm, ||a - b|| <= 1e-5 ||b||, leaving out the key projection's bias: softmax is shift-invariant
per query, so its exact gradient is zero and AdamW turns rounding noise into full-size updates.
One case per world size saves its stages with ``torch.distributed.checkpoint``, and the files are
loaded into a single-process model.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from clusterlm.errors import UserError
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.models.loss import next_token_loss
from clusterlm.parallel.pipeline import (
    SCHEDULES,
    build_schedule,
    clip_grad_norm_across_stages,
    pipeline_eval_loss,
    pipeline_step,
    split_into_stages,
    stage_indices_on_rank,
    stage_layer_ranges,
    stages_per_rank_for,
    sync_tied_gradients,
)

from .helpers import run_distributed

# Loading the stages' checkpoint in the test process, which has no process group, is intended.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS, BATCH, LR, MAX_NORM, RTOL = 10, 8, 1e-3, 0.5, 1e-5
MODELS = {
    flavour: ModelArgs(flavour=flavour, vocab_size=65, block_size=16, n_layer=8, n_head=2,
                       n_kv_head=1 if flavour == "llama" else 2, n_embd=32, ffn_hidden=64)
    for flavour in ("llama", "gpt2")
}


def batches(args: ModelArgs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS training batches and one evaluation batch, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (STEPS + 1, BATCH, args.block_size + 1), generator=generator)
    return [(row[:, :-1], row[:, 1:]) for row in tokens]


def new_model(args: ModelArgs) -> Transformer:
    torch.manual_seed(0)
    return Transformer(args)


def train_single_process(flavour: str) -> dict:
    model = new_model(MODELS[flavour])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    *train, (x_eval, y_eval) = batches(model.args)
    losses, norms = [], []
    for x, y in train:
        optimizer.zero_grad()
        loss = next_token_loss(model(x), y)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = next_token_loss(model(x_eval), y_eval).item()
    return {"losses": losses, "norms": norms, "eval_loss": eval_loss, "state": model.state_dict()}


def _train_pipelined(rank: int, world_size: int, cases: list, checkpoint_dir: str) -> list[dict]:
    pp_group = dist.group.WORLD
    results = []
    for flavour, schedule_name, n_microbatches, save in cases:
        model = new_model(MODELS[flavour])
        stages = split_into_stages(model, pp_group, schedule_name)
        schedule = build_schedule(stages, schedule_name, n_microbatches)
        parameters = [p for stage in stages for p in stage.submod.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.1)
        *train, (x_eval, y_eval) = batches(model.args)
        losses, norms = [], []
        for x, y in train:
            optimizer.zero_grad()
            losses.append(pipeline_step(schedule, stages, n_microbatches, x, y).item())
            sync_tied_gradients(stages)
            norms.append(clip_grad_norm_across_stages(stages, MAX_NORM).item())
            optimizer.step()
        eval_loss = pipeline_eval_loss(stages, x_eval, y_eval).item()
        state = {}
        for stage in stages:
            state.update(get_model_state_dict(stage.submod))
        if save:
            dcp.save(state, checkpoint_id=f"{checkpoint_dir}/{flavour}-{schedule_name}")
        results.append({"losses": losses, "norms": norms, "eval_loss": eval_loss,
                        "state": {name: tensor.clone() for name, tensor in state.items()}})
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the workers; more threads than free cores is far slower
    try:
        return {flavour: train_single_process(flavour) for flavour in MODELS}
    finally:
        torch.set_num_threads(threads)


def assert_weights_equal(state: dict, expected: dict, label: str) -> None:
    assert state.keys() == expected.keys(), label
    for name, tensor in expected.items():
        if not name.endswith("attn.wk.bias"):
            difference = (state[name] - tensor).norm() / tensor.norm()
            assert difference <= RTOL, f"{label} {name}: relative difference {difference:.2e}"


def run_cases(reference, tmp_path, pp: int, cases: list) -> None:
    per_rank = run_distributed(_train_pipelined, pp, cases, str(tmp_path), timeout=240)
    for i, (flavour, schedule_name, n_microbatches, save) in enumerate(cases):
        label = f"pp={pp} {flavour} {schedule_name} x{n_microbatches}"
        expected = reference[flavour]
        state = {}
        for rank_results in per_rank:
            result = rank_results[i]
            assert result["losses"] == pytest.approx(expected["losses"], rel=RTOL), label
            assert result["norms"] == pytest.approx(expected["norms"], rel=RTOL), label
            assert result["eval_loss"] == pytest.approx(expected["eval_loss"], rel=RTOL), label
            state.update(result["state"])
        assert_weights_equal(state, expected["state"], label)
        if save:  # the stages' checkpoint loads into one process under the full model's names
            model = Transformer(MODELS[flavour])
            loaded = get_model_state_dict(model)
            dcp.load(loaded, checkpoint_id=tmp_path / f"{flavour}-{schedule_name}", no_dist=True)
            assert_weights_equal(loaded, expected["state"], f"{label} loaded")


def test_every_schedule_on_2_ranks_equals_single_process(reference, tmp_path):
    cases = [(flavour, name, 4, name == "zbv_zero_bubble") for flavour in MODELS for name in SCHEDULES]
    run_cases(reference, tmp_path, 2, cases)


def test_every_schedule_on_4_ranks_equals_single_process(reference, tmp_path):
    """gpt2 once with the tied pair on ranks 0 and 3, once with both on rank 0 (V); fewer
    micro-batches than stages where the schedule allows it."""
    cases = [("llama", name, 8, False) for name in SCHEDULES]
    cases += [("gpt2", "1f1b", 8, True), ("gpt2", "zbv_zero_bubble", 8, False)]
    cases += [("llama", name, 4, False) for name in ("gpipe", "1f1b", "interleaved_1f1b")]
    run_cases(reference, tmp_path, 4, cases)


def test_stage_layer_ranges_balance_parameters():
    small_vocab = ModelArgs(flavour="llama", vocab_size=8, n_layer=8, n_embd=32, n_head=2, n_kv_head=2,
                            ffn_hidden=64)
    assert stage_layer_ranges(small_vocab, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_layer_ranges(small_vocab, 8) == [range(i, i + 1) for i in range(8)]
    # A table as large as ~2.5 layers: the first and last stage give up layers to the middle ones.
    large_vocab = ModelArgs(flavour="llama", vocab_size=800, n_layer=12, n_embd=32, n_head=2, n_kv_head=2,
                            ffn_hidden=64)
    assert stage_layer_ranges(large_vocab, 4) == [range(0, 2), range(2, 6), range(6, 10), range(10, 12)]
    # gpt2's last stage holds a copy of the tied table, its first also the position table.
    gpt2 = ModelArgs(flavour="gpt2", vocab_size=1000, block_size=64, n_layer=12, n_embd=32, n_head=2,
                     n_kv_head=2, ffn_hidden=64)
    counts = [len(r) for r in stage_layer_ranges(gpt2, 4)]
    assert sum(counts) == 12 and counts[0] < counts[1] and counts[3] < counts[2]
    with pytest.raises(UserError, match="needs at least 8 layers"):
        stage_layer_ranges(ModelArgs(n_layer=4), 8)


def test_stage_placement_and_schedule_requirements():
    assert stage_indices_on_rank("1f1b", 1, 4, 1) == [1]
    assert stage_indices_on_rank("interleaved_1f1b", 1, 4, 2) == [1, 5]
    assert stage_indices_on_rank("zbv_zero_bubble", 1, 4, 2) == [1, 6]
    assert stages_per_rank_for("looped_bfs") == 2 and stages_per_rank_for("gpipe") == 1
    with pytest.raises(UserError, match="gpipe, 1f1b, interleaved_1f1b"):
        stages_per_rank_for("chimera")
    with pytest.raises(UserError, match="at least 2 stages per rank"):
        stages_per_rank_for("interleaved_1f1b", 1)
    with pytest.raises(UserError, match="exactly 2 stages per rank"):
        stages_per_rank_for("dualpipev", 3)
    with pytest.raises(UserError, match="one stage per rank"):
        stages_per_rank_for("1f1b", 2)
