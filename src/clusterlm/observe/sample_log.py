"""Which samples each data-parallel rank reads at every step, written as it trains, so that a test
or an operator can check the data accounting of a run that shrank, grew or restarted.

Each group of workers writes ``out_dir/samples/from-step<S>-dp<D>-rank<R>.jsonl`` (S: the step it
started from, D: its data-parallel size, R: the data-parallel rank), one line per step:
``{"step": k, "samples": [global sample indices read for step k]}``. A group restarted from step
S' replaces the steps after S' of every earlier group: those are recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

from clusterlm.data.loader import TokenLoader
from clusterlm.data.masking import MaskedLoader
from clusterlm.distributed.runtime import Runtime


class SampleLog:
    def __init__(self, out_dir: Path, runtime: Runtime, start_step: int) -> None:
        folder = out_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"from-step{start_step:08d}-dp{runtime.dp_size}-rank{runtime.dp_rank}.jsonl"
        # Line-buffered: a worker killed mid-run leaves every step it began.
        self._file = (folder / name).open("w", buffering=1)

    def record(self, step: int, loader: TokenLoader | MaskedLoader) -> None:
        """The samples ``loader`` is about to read for ``step`` (before ``next_step``)."""
        samples = [
            i for micro_step in range(loader.grad_accum) for i in loader.sample_indices(micro_step)
        ]
        self._file.write(json.dumps({"step": step, "samples": samples}) + "\n")


def open_sample_log(
    enabled: bool, out_dir: str, runtime: Runtime, start_step: int
) -> SampleLog | None:
    """One log per data-parallel rank (tensor- and pipeline-parallel peers read the same
    samples)."""
    if not enabled or runtime.tp_rank or runtime.pp_rank:
        return None
    return SampleLog(Path(out_dir), runtime, start_step)
