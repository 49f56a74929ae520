"""Without a process group SyncBatchNorm is nn.BatchNorm, bit for bit; conversion keeps state."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from clusterlm.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm


def _train_then_eval(norm: nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Outputs, input and parameter gradients of 3 training steps and one eval step, and buffers."""
    seen = []
    for step in range(4):
        norm.train(step < 3)
        x = (
            torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 2 + 1
        ).requires_grad_()
        out = norm(x)
        out.pow(2).sum().backward()
        seen += [out.detach(), x.grad, *(p.grad.clone() for p in norm.parameters())]
    return seen + list(norm.buffers())


@pytest.mark.parametrize(
    ("reference", "shape", "options"),
    [
        (nn.BatchNorm1d, (6, 4), {}),
        (nn.BatchNorm1d, (6, 4, 5), {"momentum": None}),
        (nn.BatchNorm2d, (3, 4, 5, 2), {"eps": 1e-3, "bias": False}),
        (nn.BatchNorm3d, (2, 4, 3, 2, 2), {"affine": False, "track_running_stats": False}),
    ],
)
def test_single_process_equals_batchnorm(
    reference: type[nn.Module], shape: tuple[int, ...], options: dict[str, Any]
) -> None:
    expected = _train_then_eval(reference(4, **options), shape)
    actual = _train_then_eval(SyncBatchNorm(4, **options), shape)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


def test_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match="at least 2D"):
        SyncBatchNorm(3)(torch.randn(3))


def test_convert_swaps_every_batchnorm_and_keeps_its_state() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3),
        nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4, momentum=None, affine=False)),
        nn.BatchNorm3d(2, track_running_stats=False),
    )  # fmt: skip
    model[1].weight.requires_grad_(False)
    model[1].running_mean.fill_(0.5)
    model[1].num_batches_tracked.fill_(7)
    model.eval()
    originals = [model[1], model[2][1], model[3]]
    keys = model.state_dict().keys()

    converted = convert_sync_batchnorm(model)

    assert converted is model
    assert converted.state_dict().keys() == keys
    for old, new in zip(originals, [model[1], model[2][1], model[3]], strict=True):
        assert type(new) is SyncBatchNorm and new.process_group is None
        assert (new.num_features, new.eps, new.momentum) == (
            old.num_features,
            old.eps,
            old.momentum,
        )
        assert (new.affine, new.track_running_stats, new.training) == (
            old.affine,
            old.track_running_stats,
            False,
        )
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert getattr(new, name) is getattr(old, name)  # shared, not copied
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    assert model[1].num_batches_tracked.item() == 7


def test_convert_a_bare_layer_returns_a_new_layer_and_leaves_sync_layers_alone() -> None:
    layer = nn.BatchNorm1d(3)
    converted = convert_sync_batchnorm(layer)
    assert type(converted) is SyncBatchNorm and converted.weight is layer.weight
    already = SyncBatchNorm(3)
    assert convert_sync_batchnorm(already) is already
