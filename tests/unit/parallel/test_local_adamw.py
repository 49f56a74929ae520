"""LocalAdamW: torch's AdamW on plain tensors, bit for bit, and the recipe that builds it."""

import pytest
import torch

from clusterlm.config import OptimConfig
from clusterlm.parallel.local_adamw import LocalAdamW
from clusterlm.train.optim import optimizer_recipe


@pytest.mark.parametrize(
    "kernel",
    [{"fused": True}, {"foreach": True}, {"foreach": False}, {"amsgrad": True}],
    ids=["fused", "foreach", "single-tensor", "amsgrad"],
)
def test_local_adamw_is_torchs_adamw_on_plain_tensors(kernel):
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator) for _ in range(4)]
    grads = [[torch.randn(5, 3, generator=generator) for _ in start] for _ in range(3)]
    stepped = []
    for optimizer_class in (torch.optim.AdamW, LocalAdamW):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = optimizer_class(
            [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}], lr=1e-2, **kernel
        )
        losses = []
        for step_grads in grads:
            for param, grad in zip(params, step_grads, strict=True):
                param.grad = grad.clone()
            losses.append(optimizer.step(lambda: 1.5))
        stepped.append((params, str(optimizer.state_dict()), losses))
    (expected, expected_state, expected_losses), (got, state, losses) = stepped
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert state == expected_state and losses == expected_losses == [1.5] * 3


def test_the_recipe_builds_local_adamw():
    model = torch.nn.Linear(4, 4)
    assert type(optimizer_recipe(model, OptimConfig()).build()) is LocalAdamW
