"""Plain ``nn.Module`` models and their exact parameter and FLOP counts."""

from typing import cast

from torch import nn

from clusterlm.models.bert import Encoder
from clusterlm.models.counting import param_count, training_flops_per_token
from clusterlm.models.gpt import ModelArgs, Transformer
from clusterlm.models.seq2seq import Seq2SeqTransformer, is_seq2seq


def create_model(args: ModelArgs) -> Encoder | Transformer | Seq2SeqTransformer:
    """The model ``args.flavour`` names: the ``bert`` encoder, the ``mbart`` encoder–decoder or a
    decoder."""
    if is_seq2seq(args):
        return Seq2SeqTransformer(args)
    return Encoder(args) if args.is_encoder else Transformer(args)


def model_args(model: nn.Module) -> ModelArgs:
    """The ``ModelArgs`` of a model (a decoder, an encoder, a classifier, a pipeline stage)."""
    # A plain attribute (a property on the classifier); nn.Module's stubs type any as
    # Tensor | Module.
    return cast(ModelArgs, model.args)


def model_layers(model: nn.Module) -> nn.ModuleDict:
    """A model's blocks, keyed by layer index: what the parallelisms wrap one by one."""
    layers = model.layers
    assert isinstance(layers, nn.ModuleDict)
    return layers


__all__ = [
    "Encoder",
    "ModelArgs",
    "Seq2SeqTransformer",
    "Transformer",
    "create_model",
    "model_args",
    "model_layers",
    "param_count",
    "training_flops_per_token",
]
