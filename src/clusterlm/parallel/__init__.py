"""Functions that take a plain model (and, for multi-process layouts, a device mesh) and return
it parallelized, applied in torchtitan's order: tensor parallel, activation checkpointing,
compile, data parallel / FSDP."""

from clusterlm.parallel.parallelize import parallelize

__all__ = ["parallelize"]
