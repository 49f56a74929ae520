"""Tensor (and sequence) parallel training equals the plain single-process model.

Real processes on gloo; each world size is spawned once and runs every configuration inside. Every
rank also builds the plain reference model from the same seed and trains it on the same batches.
Tolerance (fp32): relative 1e-5 on losses, and per tensor on gradients and weights by relative
norm, ||a - b|| <= 1e-5 ||b||; the differences are only the order of floating-point sums in the
sharded matmuls and reductions. The key projection's bias is left out of the comparisons: softmax
is shift-invariant per query, so its exact gradient is zero and only rounding noise is left in it,
which AdamW turns into full-size updates of random sign (its gradient is checked to be ~0 instead).
The query projection's bias is nearly as ill-conditioned at this scale (near-uniform attention makes
its gradient a difference of near-equal terms, some elements ~1e-8, the size of AdamW's eps, where
rounding noise moves the update directly): its gradient meets 1e-5, its trained weights 1e-3.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from clusterlm.errors import UserError
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.parallel.tensor_parallel import apply_tensor_parallel

from .helpers import run_distributed

RTOL = 1e-5
# Weights after AdamW steps: the update divides by the root of the second moment, so rounding
# differences in near-zero gradient entries move weights more than losses (as in training.py).
# On an Intel Xeon (AVX-512, AMX) llama tp4's w1 differed by 2.95e-5 after 10 steps; losses by < 1e-5.
WEIGHT_RTOL = 5e-5
QUERY_BIAS_RTOL = 1e-3
STEPS = 10
BATCH = 4
SEED = 1234
GPT2 = {"flavour": "gpt2", "n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 32, "ffn_hidden": 128,
        "block_size": 16, "vocab_size": 64}
LLAMA = {"flavour": "llama", "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "ffn_hidden": 96,
         "block_size": 16, "vocab_size": 64}
# tp = 4 needs whole KV heads per rank: grouped-query attention with 8 query heads over 4 KV heads.
LLAMA_TP4 = {**LLAMA, "n_head": 8, "n_kv_head": 4, "n_embd": 64}


def configurations(tp: int) -> list[tuple[str, dict, bool]]:
    llama = LLAMA if tp == 2 else LLAMA_TP4
    cases = [(name, values, sp) for sp in (False, True) for name, values in (("gpt2", GPT2), ("llama", llama))]
    # A vocabulary that does not split evenly, on the tied head under sequence parallel.
    return [*cases, ("gpt2-vocab65", {**GPT2, "vocab_size": 65}, True)]


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    return ((candidate - reference).norm() / reference.norm()).item()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of this rank's parameter shards, bytes of those that are replicated on every rank)."""
    total = replicated = 0
    for p in model.parameters():  # a tied matrix is yielded once
        local = p.to_local() if isinstance(p, DTensor) else p
        size = local.numel() * local.element_size()
        total += size
        if not isinstance(p, DTensor) or all(isinstance(pl, Replicate) for pl in p.placements):
            replicated += size
    return total, replicated


def check_case(name: str, values: dict, sequence_parallel: bool, mesh, checkpoint_dir: str | None) -> dict:
    tp = mesh.size()
    torch.manual_seed(SEED)
    reference = Transformer(ModelArgs(**values))
    model = copy.deepcopy(reference)
    apply_tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    label = f"{name} tp={tp} sp={sequence_parallel}"

    assert all(isinstance(p, DTensor) for p in model.parameters()), label
    if values["flavour"] == "gpt2":
        assert model.output.weight is model.tok_embeddings.weight, f"{label}: tie lost"

    generator = torch.Generator().manual_seed(SEED + 1)
    batches = [torch.randint(values["vocab_size"], (BATCH, values["block_size"] + 1), generator=generator)
               for _ in range(STEPS)]

    def loss_of(net, batch, parallel: bool):
        x, y = batch[:, :-1], batch[:, 1:]
        logits = net(x)
        if not parallel:
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        assert isinstance(logits, DTensor) and logits.placements[0].is_shard(dim=2), label
        with loss_parallel():
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
        return loss

    # (a) one forward and backward: loss and every full gradient.
    ref_loss = loss_of(reference, batches[0], parallel=False)
    ref_loss.backward()
    loss = loss_of(model, batches[0], parallel=True)
    assert loss.full_tensor().item() == pytest.approx(ref_loss.item(), rel=RTOL), label
    ref_params = dict(reference.named_parameters())
    for param_name, param in model.named_parameters():
        grad, ref_grad = full(param.grad), ref_params[param_name].grad
        if param_name.endswith("attn.wk.bias"):
            assert grad.abs().max() < 1e-6, f"{label}: {param_name}"
        else:
            assert relative_error(grad, ref_grad) <= RTOL, f"{label}: gradient of {param_name}"
    reference.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)

    # (b) AdamW with gradient clipping: per-step losses and final weights. Both AdamW paths run on
    # DTensors: the per-parameter loop (CPU default) for gpt2, the fused kernel for llama.
    options = {"lr": 3e-3, "weight_decay": 0.1, "fused": values["flavour"] == "llama"}
    ref_opt = torch.optim.AdamW(reference.parameters(), **options)
    opt = torch.optim.AdamW(model.parameters(), **options)
    for step, batch in enumerate(batches):
        ref_loss = loss_of(reference, batch, parallel=False)
        ref_loss.backward()
        loss = loss_of(model, batch, parallel=True)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        assert loss.full_tensor().item() == pytest.approx(ref_loss.item(), rel=RTOL), f"{label}: step {step}"
    for param_name, param in model.named_parameters():
        if not param_name.endswith("attn.wk.bias"):
            error = relative_error(full(param.detach()), ref_params[param_name].detach())
            bound = QUERY_BIAS_RTOL if param_name.endswith("attn.wq.bias") else WEIGHT_RTOL
            assert error <= bound, f"{label}: weight {param_name} after {STEPS} steps: {error:.2e}"

    # (c) parameter bytes on this rank against 1/tp of the whole plus the replicated parameters.
    plain_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    rank_bytes, replicated_bytes = local_bytes(model)
    expected = (plain_bytes - replicated_bytes) / tp + replicated_bytes
    assert abs(rank_bytes - expected) <= 0.1 * expected, label

    if checkpoint_dir is not None:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint_dir)
    weights = {n: p.detach().clone() for n, p in reference.named_parameters()}
    return {"label": label, "plain_bytes": plain_bytes, "rank_bytes": rank_bytes,
            "replicated_bytes": replicated_bytes, "expected_bytes": expected, "weights": weights}


def _tp_rank(rank: int, world_size: int, checkpoint_dir: str) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    start = time.perf_counter()
    results = []
    for name, values, sequence_parallel in configurations(world_size):
        # The DCP check runs on the tied model with sequence parallel: the hardest layout to undo.
        save = world_size == 2 and name == "gpt2" and sequence_parallel
        results.append(check_case(name, values, sequence_parallel, mesh, checkpoint_dir if save else None))

    # (d) configurations whose heads do not split evenly are refused.
    errors = []
    # 3 query heads do not split over 2 or 4 ranks; tp / 2 KV heads do not split over tp ranks.
    for values in ({**LLAMA, "n_head": 3, "n_kv_head": 3, "n_embd": 48}, {**LLAMA, "n_kv_head": world_size // 2}):
        model = Transformer(ModelArgs(**values))
        with pytest.raises(UserError) as info:
            apply_tensor_parallel(model, mesh)
        errors.append(str(info.value))
    return {"cases": results, "errors": errors, "seconds": time.perf_counter() - start}


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # the 1-process DCP load
def test_tensor_parallel_equals_single_process(tp, tmp_path, capsys):
    results = run_distributed(_tp_rank, tp, str(tmp_path / "dcp"), timeout=120)
    with capsys.disabled():
        print(f"\ntp={tp}: {results[0]['seconds']:.1f} s in the workers; per-rank parameter bytes (rank 0)")
        for case in results[0]["cases"]:
            print(f"  {case['label']:<32} plain {case['plain_bytes']:>7}  rank {case['rank_bytes']:>7}  "
                  f"expected {case['expected_bytes']:>9.0f}  (replicated {case['replicated_bytes']})")
    for rank_result in results:
        errors = rank_result["errors"]
        assert errors[0].startswith("model.n_head = 3 ") and f"parallel.tp = {tp}" in errors[0]
        assert errors[1].startswith(f"model.n_kv_head = {tp // 2} ") and f"parallel.tp = {tp}" in errors[1]
    if tp == 2:
        check_checkpoint_loads_into_plain_model(tmp_path / "dcp", results[0]["cases"])


def check_checkpoint_loads_into_plain_model(checkpoint_dir, cases) -> None:
    """The 2-rank DTensor checkpoint loads into the plain model and a plain AdamW in one process."""
    expected = next(case["weights"] for case in cases if case["label"] == "gpt2 tp=2 sp=True")
    model = Transformer(ModelArgs(**GPT2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert model.output.weight is model.tok_embeddings.weight
    for name, param in model.named_parameters():
        if not name.endswith(("attn.wk.bias", "attn.wq.bias")):
            assert relative_error(param.detach(), expected[name]) <= RTOL, name
    assert optimizer.state[model.output.weight]["step"].item() == STEPS
