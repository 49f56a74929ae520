"""Plain ``nn.Module`` models and their exact parameter and FLOP counts."""

from torch import nn

from clusterlm.models.bert import Encoder
from clusterlm.models.counting import param_count, training_flops_per_token
from clusterlm.models.gpt import ModelArgs, Transformer


def create_model(args: ModelArgs) -> nn.Module:
    """The model ``args.flavour`` names: the ``bert`` encoder or a decoder."""
    return Encoder(args) if args.is_encoder else Transformer(args)


__all__ = ["Encoder", "ModelArgs", "Transformer", "create_model", "param_count", "training_flops_per_token"]
