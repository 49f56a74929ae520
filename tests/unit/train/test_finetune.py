"""The fine-tuning model and its pieces: the classifier's padding convention, freezing, the head's
learning rate, example batches and macro-F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterlm.config import build_config
from clusterlm.data.classification import ExampleStream, evaluation_batches
from clusterlm.data.masking import IGNORE_INDEX
from clusterlm.data.special_tokens import PAD
from clusterlm.models import ModelArgs, create_model
from clusterlm.models.classifier import SequenceClassifier
from clusterlm.models.counting import classifier_flops_per_token
from clusterlm.train.finetune import finetune_recipe
from clusterlm.train.task_metrics import macro_f1


def _classifier(flavour: str, labels: int = 3) -> SequenceClassifier:
    torch.manual_seed(0)
    args = ModelArgs(
        flavour=flavour,
        vocab_size=20,
        block_size=16,
        n_layer=2,
        n_head=2,
        n_kv_head=2,
        n_embd=16,
        ffn_hidden=32,
    )
    return SequenceClassifier(create_model(args), labels).eval()


@pytest.mark.parametrize("flavour", ["bert", "gpt2", "llama"])
def test_logits_do_not_depend_on_padding(flavour):
    model = _classifier(flavour)
    example = torch.tensor(
        [[21 if flavour == "bert" else 3, 5, 7, 9, 4]]
    )  # an encoder's rows start with [CLS]
    padded = torch.cat([example, torch.full((1, 11), PAD)], dim=1)
    batch = torch.cat([padded, torch.randint(0, 20, (1, 16))])
    with torch.no_grad():
        alone, together = model(example), model(batch)
    assert alone.shape == (1, 1, 3) and together.shape == (2, 1, 3)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)


def test_language_model_head_is_removed_and_head_parameters_are_the_new_ones():
    encoder, decoder = _classifier("bert"), _classifier("gpt2")
    assert encoder.backbone.head is None and decoder.backbone.output is None
    assert {id(p) for p in decoder.head_parameters()} == {
        id(p) for p in decoder.classifier.parameters()
    }
    assert len(encoder.head_parameters()) == 4  # pooler weight and bias, classifier weight and bias


def test_freezing_stops_the_embeddings_and_lowest_blocks():
    model = _classifier("bert")
    model.freeze_lower_layers(1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        n.startswith(
            (
                "backbone.tok_",
                "backbone.pos_",
                "backbone.type_",
                "backbone.emb_norm",
                "backbone.layers.0.",
            )
        )
        for n in frozen
    )
    assert all(p.requires_grad for p in model.backbone.layers["1"].parameters())
    assert all(p.requires_grad for p in model.head_parameters())


def test_head_learning_rate_is_a_scale_of_the_schedule():
    cfg = build_config(None, {"optim.lr": 1e-3, "finetune.head_lr": 5e-3})
    model = _classifier("gpt2")
    groups = finetune_recipe(model, cfg).param_groups
    head = {id(p) for p in model.head_parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # no group mixes head and backbone
        assert group.get("lr_scale", 1.0) == (pytest.approx(5.0) if in_head == {True} else 1.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in model.parameters())


class _Split:
    """The reader's TaskSplit shape: concatenated tokens, offsets, labels."""

    def __init__(self, examples, labels):
        self.tokens = np.concatenate(examples)
        self.offsets = np.cumsum([0] + [len(e) for e in examples])
        self.labels = np.array(labels)

    def __len__(self):
        return len(self.labels)

    def example(self, i):
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def test_example_rows_start_with_cls_are_cut_to_fit_and_padded():
    split = _Split([np.arange(1, 4), np.arange(1, 10)], [1, 0])
    x, y = ExampleStream(split, cls_id=99).batch([0, 1, -1], 6, torch.device("cpu"))
    assert x.tolist() == [
        [99, 1, 2, 3, PAD, PAD],
        [99, 1, 2, 3, 4, 5],
        [99, PAD, PAD, PAD, PAD, PAD],
    ]
    assert y.tolist() == [[1], [0], [IGNORE_INDEX]]  # the filler row counts for nothing


def test_evaluation_shares_cover_every_example_once_in_equal_lengths():
    split = _Split([np.array([i + 1]) for i in range(7)], list(range(7)))
    stream = ExampleStream(split, cls_id=None)
    seen, lengths = [], []
    for rank in range(3):
        rows = [x for x, _ in evaluation_batches(stream, 1, 2, rank, 3, torch.device("cpu"))]
        lengths.append(sum(len(x) for x in rows))
        seen += [int(v) - 1 for x in rows for v in x[:, 0] if v != PAD and v != 0]
    assert sorted(seen) == list(range(7)) and len(set(lengths)) == 1


def test_macro_f1_matches_a_worked_example():
    # truth 0,0,1,1,2 predicted 0,1,1,1,0: F1 per label 2*1/(2+2), 2*2/(2+3), 0
    confusion = torch.zeros(3, 3)
    for true, predicted in zip([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], strict=True):
        confusion[true, predicted] += 1
    assert macro_f1(confusion) == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
    confusion = torch.zeros(4, 4)
    confusion[0, 0] = confusion[1, 1] = (
        2  # labels 2 and 3 absent from truth and predictions: left out
    )
    assert macro_f1(confusion) == pytest.approx(1.0)


@pytest.mark.parametrize("flavour", ["bert", "gpt2", "llama"])
def test_flop_count_is_the_classifiers_own(flavour):
    """6 x every weight used per token (the token tables are lookups once the LM head is gone),
    the head once per sequence, plus the attention term."""
    model, seq = _classifier(flavour, labels=5), 16
    head = {id(p) for p in model.head_parameters()}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    per_token = sum(p.numel() for p in model.parameters() if id(p) not in head | lookups)
    per_sequence = sum(p.numel() for p in model.parameters() if id(p) in head)
    args = model.args
    expected = 6 * per_token + 6 * per_sequence / seq + 12 * args.n_layer * args.n_embd * seq
    assert classifier_flops_per_token(args, seq, 5) == pytest.approx(expected)
