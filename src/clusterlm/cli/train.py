"""`clusterlm train`: train a model from a config, in this process or through torchrun."""

from __future__ import annotations

import math

from clusterlm.cli.options import OVERWRITE, parse_job
from clusterlm.distributed.runtime import leave_process_group
from clusterlm.launch import launch
from clusterlm.train.preemption import EXIT_PREEMPTED
from clusterlm.train.trainer import train


def main(argv: list[str]) -> int:
    job = parse_job(argv, "clusterlm train", "Train a language model.", flags=OVERWRITE)
    if job is None:
        return 0
    if job.launch.launches:
        return launch(job.cfg, job.launch, ["train", *argv])
    summary = train(job.cfg)
    leave_process_group()
    if summary.val_loss is not None and summary.rank == 0:
        print(
            f"done: step {summary.step}, val loss {summary.val_loss:.4f} "
            f"(perplexity {math.exp(summary.val_loss):.2f})"
        )
    return EXIT_PREEMPTED if summary.preempted is not None else 0
