"""Sequence classification on a language model: the model that fine-tuning trains.

- Encoder (bert), BERT's recipe: every example starts with ``[CLS]``; its last hidden state goes
  through a pooler (dense, tanh) and dropout to a linear layer over the labels.
- Decoder (gpt2, llama): under causal attention only the last real token has seen the whole
  passage, so its final hidden state (after the final norm) feeds a linear layer over the
  labels, as GPT-style sequence classifiers do.

Examples are right-padded with ``PAD`` (-1, never a token id): the classifier derives the padding
from it, so a batch stays one int64 tensor through every parallel wrapper. Padded positions are
never attended to (encoder) or come after the position read (decoder), so an example's logits do
not depend on its padding. The backbone's language-model head is removed: it takes no part, and a
parameter without a gradient would stall DDP.

The logits are [B, 1, labels] against labels [B, 1]: one position per example, so the language
model's cross-entropy, evaluation and parallel code apply unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from clusterlm.data.special_tokens import PAD
from clusterlm.models.bert import Encoder
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.models.init import InitRule

BACKBONE = "backbone."  # prefix of the pretrained model's parameter names inside the classifier
HEAD_MODULES = ("pooler", "classifier")


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: Encoder | Transformer, n_labels: int):
        super().__init__()
        args = backbone.args
        self.backbone = backbone
        self.pooler: nn.Sequential | None
        if args.is_encoder:
            assert isinstance(backbone, Encoder)
            backbone.head = None
            self.pooler = nn.Sequential(nn.Linear(args.n_embd, args.n_embd), nn.Tanh())
        else:
            assert isinstance(backbone, Transformer)
            backbone.output = None
            self.pooler = None
        self.dropout = nn.Dropout(args.dropout)
        self.classifier = nn.Linear(args.n_embd, n_labels)

    @property
    def args(self) -> ModelArgs:
        return self.backbone.args

    @property
    def layers(self) -> nn.ModuleDict:
        """The backbone's blocks: what the parallelisms wrap, checkpoint and compile one by one."""
        return self.backbone.layers

    def head_parameters(self) -> list[nn.Parameter]:
        """The parameters fine-tuning adds (pooler and classifier), which may take their own LR."""
        return [
            p
            for name in HEAD_MODULES
            if getattr(self, name) is not None
            for p in getattr(self, name).parameters()
        ]

    def init_rule(self, name: str) -> InitRule:
        """The backbone's own rule for its parameters.

        The head gets N(0, 0.02) weights and zero biases.
        """
        if name.startswith(BACKBONE):
            return self.backbone.init_rule(name[len(BACKBONE) :])
        return InitRule("zeros") if name.endswith("bias") else InitRule("normal", 0.02)

    def freeze_lower_layers(self, count: int) -> None:
        """Stop training the embeddings and the ``count`` lowest blocks (nothing when 0)."""
        if count == 0:
            return
        for name, module in self.backbone.named_children():
            if name.endswith("embeddings") or name == "emb_norm":
                module.requires_grad_(False)
        for block in list(self.layers.values())[:count]:
            block.requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], right-padded with ``PAD`` -> logits [B, 1, labels]."""
        real = tokens != PAD
        ids = tokens.masked_fill(~real, 0)
        if self.args.is_encoder:
            assert isinstance(self.backbone, Encoder) and self.pooler is not None
            hidden = self.backbone.features(ids, padding_mask=real)
            pooled = self.pooler(hidden[:, 0])  # the [CLS] position
        else:
            last = real.sum(dim=1).clamp(min=1) - 1
            hidden = self.backbone.features(ids)
            pooled = hidden[torch.arange(len(tokens), device=tokens.device), last]
        return self.classifier(self.dropout(pooled)).unsqueeze(1)
