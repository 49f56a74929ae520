"""Plain ``nn.Module`` models and their exact parameter and FLOP counts."""

from clusterlm.models.counting import param_count, training_flops_per_token
from clusterlm.models.gpt import ModelArgs, Transformer

__all__ = ["ModelArgs", "Transformer", "param_count", "training_flops_per_token"]
