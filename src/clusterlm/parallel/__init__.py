"""Functions that take a plain model (and, for multi-process layouts, a device mesh) and return
it parallelized, applied in torchtitan's order: tensor parallel, activation checkpointing,
compile, data parallel / FSDP. ``parallelize`` returns a ``ParallelModel``: what the training
loop needs, so that the loop never asks which strategy it runs."""

from clusterlm.parallel.parallelize import ParallelModel, parallelize

__all__ = ["ParallelModel", "parallelize"]
