"""Compiling with ``torch.compile``: each block on its own, and a compiled-graph cache kept apart
for runs whose CPU kernels are restricted."""

from __future__ import annotations

import os

from torch import nn

from clusterlm.models import model_layers


def separate_compile_cache() -> None:
    """torch's compiled-graph cache does not key on ``ATEN_CPU_CAPABILITY``: a graph generated for
    AVX-512, reused by a run restricted to AVX2, is built for AVX2 and computes NaN. Such a run
    caches apart, unless it names its own cache directory (torch writes the default into the
    environment when first imported, so the default counts as unnamed)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return
    # Imported here: importing the compiler takes seconds, and only such a run needs it.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR", default)) == default:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default, f"isa-{capability.lower()}")


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: every block has the same graph, so it compiles once and
    is reused, and the blocks stay separate modules for wrapping and checkpoint names."""
    for block in model_layers(model).children():
        block.compile()
