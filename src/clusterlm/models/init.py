"""Initial values that do not depend on how the model is split.

Every parameter's values are a function of (seed, parameter name, position): a random matrix is
drawn in blocks of rows, each block from its own generator seeded by (seed, name, block). Any
piece of a parameter, a tensor-parallel slice, an FSDP shard or a pipeline stage's layers, can
therefore be produced on its own, without the rest of the model, and every layout starts from
the weights of one process with the same seed.

A ``ParamSource`` is that contract: ``source(name, shape, index)`` returns the float32 values of
the full model's parameter ``name`` (full shape ``shape``) at ``index``, one slice per dimension.
``seeded_source`` draws them; a pretrained checkpoint's reader (``clusterlm.interop``) is another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ParamSource = Callable[[str, tuple[int, ...], tuple[slice, ...]], torch.Tensor]

# Rows per generator block: about 2^20 values, so a block costs ~4 MB and at most two partial
# blocks are drawn beyond any slice.
BLOCK_VALUES = 1 << 20


@dataclass(frozen=True)
class InitRule:
    """How a parameter starts: ``normal`` (mean 0, ``std``), ``ones`` or ``zeros``."""

    kind: str
    std: float = 0.0


def _block_seed(seed: int, name: str, block: int) -> int:
    # hashlib, not hash(): Python randomizes string hashes per process.
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _normal_rows(
    seed: int, name: str, shape: tuple[int, ...], rows: slice, std: float
) -> torch.Tensor:
    """Rows ``rows`` of the full normal matrix ``name`` (later dimensions whole), block by block
    into one tensor, so at most one block is held beyond the result."""
    width = 1
    for size in shape[1:]:
        width *= size
    per_block = max(1, BLOCK_VALUES // max(width, 1))
    start, stop = rows.indices(shape[0])[:2]
    out = torch.empty(max(stop - start, 0), *shape[1:])
    for block in range(start // per_block, (stop - 1) // per_block + 1 if stop > start else 0):
        first = block * per_block
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.empty(min(per_block, shape[0] - first), *shape[1:]).normal_(
            0.0, std, generator=generator
        )
        lo, hi = max(start, first), min(stop, first + len(values))
        out[lo - start : hi - start] = values[lo - first : hi - first]
    return out


def seeded_source(rule_of: Callable[[str], InitRule], seed: int) -> ParamSource:
    """Initial values by each parameter's rule (``Transformer.init_rule``).

    They are drawn per (seed, name).
    """

    def source(name: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
        rule = rule_of(name)
        if rule.kind != "normal":
            size = [len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True)]
            return torch.ones(size) if rule.kind == "ones" else torch.zeros(size)
        rows = _normal_rows(seed, name, shape, index[0], rule.std)
        key = (slice(None), *index[1:])  # every row drawn, the columns ``index`` asks for
        return rows[key] if len(index) > 1 else rows

    return source


@torch.no_grad()
def fill_parameters(
    module: nn.Module, source: ParamSource, canonical: Callable[[str], str] = str
) -> None:
    """Fill every (whole, local) parameter of ``module`` from ``source``; ``canonical`` maps a
    parameter's name in ``module`` to its name in the full model."""
    for name, param in module.named_parameters():
        whole = tuple(slice(0, n) for n in param.shape)
        param.copy_(source(canonical(name), tuple(param.shape), whole))
