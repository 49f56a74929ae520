"""`clusterlm finetune`: fine-tune a pretrained model on a labelled task, in this process or
through torchrun; the run's settings are a training config's (`--config`, dotted overrides)."""

from __future__ import annotations

from clusterlm.cli.options import OVERWRITE, parse_job
from clusterlm.distributed.runtime import leave_process_group
from clusterlm.errors import UserError
from clusterlm.launch import launch
from clusterlm.train.preemption import EXIT_PREEMPTED
from clusterlm.train.trainer import train

DESCRIPTION = (
    "Fine-tune a classifier on a labelled task (`clusterlm prepare --task`): an encoder's pooled "
    "[CLS] state or a decoder's last token feeds a linear head. Reports accuracy and macro-F1 on "
    "the validation split while training and on the test split once at the end."
)


SHORTHANDS = {
    "--task": ("finetune.task", "the labelled task directory"),
    "--init-from": (
        "finetune.init_from",
        "the pretrained run or checkpoint directory; without it (or "
        "model.init_from) the model starts from random weights",
    ),
}


def main(argv: list[str]) -> int:
    job = parse_job(argv, "clusterlm finetune", DESCRIPTION, shorthands=SHORTHANDS, flags=OVERWRITE)
    if job is None:
        return 0
    if not job.cfg.finetune.task:
        raise UserError(
            "clusterlm finetune needs --task DIR, "
            "a directory made by `clusterlm prepare --task ...`"
        )
    if job.launch.launches:
        return launch(job.cfg, job.launch, ["finetune", *argv])
    summary = train(job.cfg)
    leave_process_group()
    test = summary.final.get("test")
    if test is not None and summary.rank == 0:
        print(
            f"done: step {summary.step}, test accuracy {test['accuracy']:.4f}, "
            f"macro-F1 {test['macro_f1']:.4f}, loss {test['loss']:.4f}"
        )
    return EXIT_PREEMPTED if summary.preempted is not None else 0
