"""clusterlm: train Transformer language models from one process to a GPU cluster."""

__version__ = "0.1.0"
