"""The mbart encoder-decoder under tensor parallelism equals the plain model: the sharding of its
self- and cross-attention, the logits and every gradient of a padded batch, and greedy and beam
decoding through the cache of each rank's own heads, the argmax of the split logits. Real processes on gloo; every rank builds the
plain reference from the same seed. Tolerance (fp32): relative 1e-5 (training: by relative norm
per tensor); decoded tokens exactly. The vocabulary of 37 does not split evenly over 2 ranks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import loss_parallel

from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.special_tokens import PAD
from clusterlm.models.gpt import ModelArgs
from clusterlm.models.loss import next_token_loss
from clusterlm.models.seq2seq import Seq2SeqTransformer
from clusterlm.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_argmax
from clusterlm.train.decoding import beam_decode, greedy_decode

from .helpers import run_distributed

RTOL = 1e-5
ARGS = {"flavour": "mbart", "n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 32,
        "ffn_hidden": 64, "block_size": 12, "vocab_size": 37}  # fmt: skip
EOT = 0


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    full = candidate.full_tensor() if isinstance(candidate, DTensor) else candidate
    return ((full - reference).norm() / reference.norm()).item()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Sources padded at different lengths, then the decoder's inputs; targets ignore the pads."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, ARGS["vocab_size"], (3, 16), generator=generator)
    tokens[0, 5:8] = PAD  # a short source
    tokens[1, 14:] = PAD  # a short target
    targets = torch.randint(1, ARGS["vocab_size"], (3, 8), generator=generator)
    targets[1, 6:] = IGNORE_INDEX
    return tokens, targets


def _compare(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    reference = Seq2SeqTransformer(ModelArgs(**ARGS))
    model = copy.deepcopy(reference)
    apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,)))

    block = model.layers["dec0"]
    for name in ("attn.wq", "cross.wq", "cross.wk", "cross.wv", "mlp.w1"):
        assert block.get_submodule(name).weight.placements == (Shard(0),), name
    assert block.cross.wo.weight.placements == (Shard(1),)
    assert model.enc_norm.weight.placements == (Replicate(),)
    assert model.output.weight is model.tok_embeddings.weight

    tokens, targets = batch()
    logits = model(tokens)
    assert logits.placements == (Shard(2),)
    expected = reference(tokens)
    assert relative_error(logits, expected) <= RTOL
    assert torch.equal(vocab_parallel_argmax(logits), expected.argmax(-1))  # slices of 19 and 18
    with loss_parallel():
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
    F.cross_entropy(expected.flatten(0, 1), targets.flatten()).backward()
    sharded = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if name.endswith("wk.bias"):  # softmax is shift-invariant per query: only rounding noise
            continue
        assert relative_error(sharded[name].grad, param.grad) <= RTOL, name

    model.eval(), reference.eval()
    with torch.no_grad():  # far from initialization, so decoding does more than repeat one token
        for name, param in reference.named_parameters():
            if "norm" not in name:
                param.mul_(25), sharded[name].mul_(25)
    source = tokens[:, :8]
    greedy = greedy_decode(reference, source, EOT, 6)
    assert torch.equal(greedy_decode(model, source, EOT, 6), greedy)
    beams = beam_decode(reference, source, EOT, 6, beam=3)
    assert torch.equal(beam_decode(model, source, EOT, 6, beam=3), beams)
    assert not torch.equal(beams, greedy) and greedy.unique().numel() > 2


def test_seq2seq_tensor_parallel_equals_the_plain_model():
    run_distributed(_compare, 2, timeout=120)


def _compare_smoothed(rank: int, world_size: int, reduction: str) -> None:
    torch.manual_seed(0)
    reference = Seq2SeqTransformer(ModelArgs(**ARGS))
    model = copy.deepcopy(reference)
    apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    tokens, targets = batch()
    with loss_parallel():
        loss = next_token_loss(model(tokens), targets, reduction, label_smoothing=0.1)
        loss.backward()
    expected = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten(),
                               reduction=reduction, label_smoothing=0.1)  # fmt: skip
    expected.backward()
    assert relative_error(loss, expected) <= RTOL
    sharded = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        if name.endswith("wk.bias"):  # softmax is shift-invariant per query: only rounding noise
            continue
        assert relative_error(sharded[name].grad, param.grad) <= RTOL, name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_label_smoothed_loss_over_the_split_vocabulary(reduction):
    """Label smoothing, which torch's loss_parallel refuses, computed over the vocabulary split
    unevenly on 2 ranks: the loss and every gradient of F.cross_entropy's on the whole logits."""
    run_distributed(_compare_smoothed, 2, reduction, timeout=120)
