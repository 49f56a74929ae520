"""Plain-text tables for the planner's answers."""

from __future__ import annotations

from clusterlm.plan.search import Candidate
from clusterlm.plan.units import gib

COLUMNS = (
    "#",
    "layout",
    "weights",
    "grads",
    "optim",
    "activ",
    "buffers",
    "total GiB",
    "step s",
    "tokens/s",
    "MFU",
)


def table(rows: list[list[str]], header: tuple[str, ...], text_columns: int = 2) -> str:
    """Columns padded to their widest cell; the first ``text_columns`` left-aligned, numbers
    right."""
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(
            str(x).ljust(w) if i < text_columns else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [list(header), *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def candidate_row(rank: int, c: Candidate) -> list[str]:
    m = c.memory
    return [
        str(rank),
        c.layout.describe(),
        gib(m.parameters),
        gib(m.gradients),
        gib(m.optimizer),
        gib(m.activations),
        gib(m.buffers),
        gib(m.total),
        f"{c.time.total:.3f}",
        f"{c.tokens_per_s:,.0f}",
        f"{c.mfu:.1%}",
    ]


def candidates_table(candidates: list[Candidate]) -> str:
    return table([candidate_row(i + 1, c) for i, c in enumerate(candidates)], COLUMNS)


def time_breakdown(c: Candidate) -> str:
    parts = [
        f"{name.replace('_', ' ')} {seconds * 1e3:.0f} ms"
        for name, seconds in c.time.items()
        if seconds > 0
    ]
    return "step time: " + ", ".join(parts)
