"""mBART's ``final_logits_bias`` on import: a transformers-saved model carries it as zeros, which
clusterlm's encoder-decoder (no output bias) equals, logits at 1e-5; a non-zero one is refused
with one line naming it."""

from __future__ import annotations

import pytest
import torch

from clusterlm.errors import UserError
from clusterlm.interop import hf_model_config, hf_source
from clusterlm.models import ModelArgs, create_model
from clusterlm.models.init import fill_parameters

transformers = pytest.importorskip("transformers")


def _saved(directory, bias: float) -> torch.nn.Module:
    config = transformers.MBartConfig(
        vocab_size=40, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=24, activation_function="gelu_pytorch_tanh", dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MBartForConditionalGeneration(config).eval()
    model.final_logits_bias.fill_(bias)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def test_a_zero_bias_imports_with_equal_logits(tmp_path):
    theirs = _saved(tmp_path, 0.0)
    ours = create_model(ModelArgs(**hf_model_config(tmp_path)))
    fill_parameters(ours, hf_source(tmp_path))
    tokens = torch.randint(2, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=tokens[:, :8], decoder_input_ids=tokens[:, 8:]).logits
        torch.testing.assert_close(ours.eval()(tokens), expected, rtol=0, atol=1e-5)


def test_a_non_zero_bias_is_refused(tmp_path):
    _saved(tmp_path, 0.25)
    with pytest.raises(UserError, match=r"final_logits_bias is non-zero .* 0\.25\)") as err:
        hf_source(tmp_path)
    assert "\n" not in str(err.value)
