"""The activation and state formulas against what PyTorch really allocates and saves."""

import pytest
import torch

from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.plan.layout import Layout
from clusterlm.plan.memory import activation_bytes, logits_gradient_bytes
from clusterlm.plan.validate import (
    ValidationCase,
    ValidationResult,
    fitted_calibration,
    measure,
    saved_activation_bytes,
    validation_report,
)
from clusterlm.plan.workload import Workload

SMALL = {
    "gpt2": ModelArgs(flavour="gpt2", vocab_size=256, block_size=128, n_layer=3, n_head=4, n_kv_head=4,
                      n_embd=128, ffn_hidden=512),
    "llama": ModelArgs(flavour="llama", vocab_size=256, block_size=128, n_layer=3, n_head=4, n_kv_head=2,
                       n_embd=128, ffn_hidden=384),
}


@pytest.mark.parametrize("flavour", list(SMALL))
def test_activation_formula_matches_saved_tensor_bytes(flavour):
    """fp32, fused (SDPA) attention: the itemized formula vs the bytes autograd saves, within 15%
    (it is exact for these models today)."""
    args = SMALL[flavour]
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (4, 128))
    measured, _ = saved_activation_bytes(Transformer(args), tokens, tokens.roll(1, 1))
    work, layout = Workload(args, 128, 4 * 128, "fp32"), Layout(micro_batch_size=4)
    predicted = activation_bytes(work, layout, "first") - logits_gradient_bytes(work, layout)
    assert predicted == pytest.approx(measured, rel=0.15)


def test_measured_model_state_is_exactly_16_bytes_per_parameter_in_fp32():
    case = ValidationCase("tiny", SMALL["gpt2"], 64, 2)
    result = measure(case, peak_flops=1e10, steps=1)
    assert result.state_measured == pytest.approx(result.state_predicted, rel=1e-3)
    assert result.activations_predicted == pytest.approx(result.activations_measured, rel=0.15)
    assert result.seconds > 0


def test_efficiency_fit_and_report():
    results = [ValidationResult("a", 4e9, 1.0, 1e10, 1, 1, 1, 1), ValidationResult("b", 1e9, 1.0, 1e10, 1, 1, 1, 1)]
    calibration = fitted_calibration(results)
    assert calibration.compute_efficiency == pytest.approx(0.2)  # geometric mean of 0.4 and 0.1
    assert "fitted compute efficiency 0.200" in validation_report(results, calibration)
