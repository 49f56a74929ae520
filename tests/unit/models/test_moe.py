"""The mixture-of-experts block: grouped multiply against the per-expert loop and a per-token
reference, routing, balancing, exact counts and meta-device initialization."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clusterlm.models import ModelArgs, Transformer
from clusterlm.models.counting import param_count, training_flops_per_token
from clusterlm.models.init import seeded_source
from clusterlm.models.loss import next_token_loss
from clusterlm.models.moe import (
    MoE,
    auxiliary_loss,
    balance_loss,
    grouped_mm,
    grouped_mm_supported,
    looped_mm,
    moe_blocks,
    take_expert_stats,
    update_router_biases,
)
from clusterlm.parallel.activation_checkpointing import apply_activation_checkpointing
from clusterlm.parallel.materialize import materialize

ARGS = ModelArgs(
    flavour="llama",
    vocab_size=50,
    block_size=16,
    n_layer=3,
    n_head=2,
    n_kv_head=2,
    n_embd=32,
    ffn_hidden=64,
    moe_experts=4,
    moe_top_k=2,
    moe_shared_experts=1,
    moe_ffn_hidden=16,
    moe_layers="after:1",
)


def model(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(ARGS, **changes))


def test_grouped_mm_equals_the_loop_forward_and_backward():
    x = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    counts = torch.tensor([5, 0, 6, 2])
    assert grouped_mm_supported(x, w)
    grad = torch.randn(13, 8)
    grouped = grouped_mm(x, w, counts)
    grouped.backward(grad)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    looped = looped_mm(x2, w2, counts)
    looped.backward(grad)
    torch.testing.assert_close(grouped, looped)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_the_loop_serves_where_the_grouped_kernel_cannot():
    assert not grouped_mm_supported(torch.randn(3, 6), torch.randn(2, 6, 4))  # 24-byte rows
    assert not grouped_mm_supported(torch.randn(3, 8).double(), torch.randn(2, 8, 8).double())
    x, w = torch.randn(3, 6).double(), torch.randn(2, 6, 4).double()
    torch.testing.assert_close(
        grouped_mm(x, w, torch.tensor([1, 2])), looped_mm(x, w, torch.tensor([1, 2]))
    )


def reference_moe(block: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the top-k experts' SwiGLU outputs weighted by their scores, plus the shared
    MLP's."""
    e = block.experts
    out = []
    for token in x.reshape(-1, x.size(-1)):
        scores = block.router.gate(token).float()
        scores = scores.sigmoid() if block.router.score == "sigmoid" else scores.softmax(-1)
        chosen = (scores + block.router.expert_bias).topk(block.top_k).indices
        weights = scores[chosen]
        if block.router.norm_topk:
            weights = weights / weights.sum()
        y = sum(
            w * ((F.silu(token @ e.w1[i]) * (token @ e.w3[i])) @ e.w2[i])
            for w, i in zip(weights, chosen, strict=True)
        )
        out.append(y + (block.shared(token) if block.shared is not None else 0))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("score,norm", [("sigmoid", True), ("softmax", False), ("softmax", True)])
@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_moe_block_equals_a_per_token_reference(score, norm, kernel, monkeypatch):
    if kernel == "loop":
        monkeypatch.setattr("clusterlm.models.moe.grouped_mm_supported", lambda a, b: False)
    block = moe_blocks(model(moe_score=score, moe_norm_topk=norm))[0]
    block.router.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(block(x), reference_moe(block, x), atol=1e-6, rtol=1e-5)


def test_the_bias_chooses_experts_but_does_not_weigh_them():
    router = moe_blocks(model())[0].router
    x = torch.randn(20, 32)
    weights, experts, scores = router(x)
    router.expert_bias[0] = 10.0  # expert 0 now always chosen
    weights2, experts2, _ = router(x)
    assert (experts2 == 0).any(-1).all()
    raw = scores.gather(-1, experts2)
    torch.testing.assert_close(weights2, raw / raw.sum(-1, keepdim=True))


def test_balance_loss_is_one_for_even_loads_and_trains_the_router():
    scores = torch.full((8, 4), 0.25)
    assert balance_loss(torch.tensor([4, 4, 4, 4]), scores).item() == pytest.approx(1.0)
    m = model(moe_balance="aux_loss", moe_aux_loss_coeff=0.5)
    m(torch.randint(0, 50, (2, 16)))
    aux = auxiliary_loss(m)
    assert aux is not None and auxiliary_loss(m) is None  # taken once
    aux.backward()
    gates = [block.router.gate.weight.grad for block in moe_blocks(m)]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)


def test_no_aux_loss_without_aux_loss_balancing():
    m = model()
    m(torch.randint(0, 50, (2, 16)))
    assert auxiliary_loss(m) is None


def test_bias_update_moves_towards_even_loads():
    m = model(moe_bias_rate=0.1)
    loads = torch.tensor([[1.0, 5.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]])
    update_router_biases(m, loads)
    biases = [block.router.expert_bias.tolist() for block in moe_blocks(m)]
    assert biases[0] == pytest.approx([0.1, -0.1, 0.0, 0.0])
    assert biases[1] == [0.0, 0.0, 0.0, 0.0]


def test_counts_are_recorded_once_per_training_forward():
    """Eval forwards and the recompute of activation checkpointing add nothing."""
    tokens = torch.randint(0, 50, (2, 16))
    plain = model()
    plain(tokens).sum().backward()
    expected = take_expert_stats(plain, tokens.device)
    assert expected[:, :4].sum(1).tolist() == [2 * 16 * 2] * 2  # tokens x top-k per block
    assert expected[:, -1].tolist() == [1.0, 1.0]
    checkpointed = model()
    apply_activation_checkpointing(checkpointed, "full")
    checkpointed(tokens).sum().backward()
    with torch.no_grad():
        checkpointed.eval()
        checkpointed(tokens)
    torch.testing.assert_close(take_expert_stats(checkpointed, tokens.device), expected)


def test_counts_match_the_modules_parameters():
    m = model()
    total = sum(p.numel() for p in m.parameters())
    per_expert = 3 * 32 * 16
    assert param_count(ARGS) == total
    assert param_count(ARGS, active=True) == total - 2 * (4 - 2) * per_expert  # 2 MoE blocks
    dense = dataclasses.replace(ARGS, moe_experts=0)
    assert param_count(dense) == sum(p.numel() for p in Transformer(dense).parameters())
    # FLOPs follow the active parameters: the 2 unused experts per block cost nothing.
    wider = dataclasses.replace(ARGS, moe_experts=8)
    assert (
        training_flops_per_token(wider, 16) - training_flops_per_token(ARGS, 16) == 6 * 2 * 32 * 4
    )


def test_meta_init_per_shard_equals_direct_init():
    direct = model()
    direct.reset_parameters(seed=7)
    with torch.device("meta"):
        meta = Transformer(ARGS)
    materialize(meta, seeded_source(meta.init_rule, 7), torch.device("cpu"))
    for (name, a), b in zip(direct.state_dict().items(), meta.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    std = meta.get_parameter("layers.1.mlp.experts.w2").std().item()
    assert std == pytest.approx(0.02 / (2 * 3) ** 0.5, rel=0.1)  # a residual projection


def test_bf16_autocast_and_selective_checkpointing_run_the_experts():
    tokens = torch.randint(0, 50, (2, 16))
    reference = model()(tokens)
    checkpointed = model()
    apply_activation_checkpointing(checkpointed, "selective")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = checkpointed(tokens)
    logits.float().sum().backward()
    assert checkpointed.get_parameter("layers.1.mlp.experts.w2").grad is not None
    torch.testing.assert_close(logits.float(), reference, atol=0.1, rtol=0.05)


def test_compiled_loss_equals_eager_with_the_same_loads():
    """torch.compile of forward, balance loss and language-model loss together, as one process
    trains with training.compile: the same loss and the same recorded loads."""
    m = model(moe_balance="aux_loss")
    tokens, targets = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))

    def loss_fn(x, y):
        logits = m(x)
        balance = auxiliary_loss(m)
        assert balance is not None
        return next_token_loss(logits, y) + balance

    eager = loss_fn(tokens, targets)
    eager_loads = take_expert_stats(m, tokens.device)
    compiled = torch.compile(loss_fn)(tokens, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(take_expert_stats(m, tokens.device), eager_loads)
