"""The launcher's agent: torchrun itself (``torch.distributed.run``) run in this process, with a
rendezvous store bound where it should listen (``clusterlm.launch.rendezvous``), and so that a job
whose workers fail on bad input ends with one line instead of torchrun's report.

``clusterlm train --nproc N`` starts ``python -m clusterlm.launch.agent <torchrun's options> -m
clusterlm ...`` where it used to start ``python -m torch.distributed.run`` with the same options.
A worker that fails with a ``UserError`` writes its line to its torchrun error file instead of
printing it (``clusterlm.launch.worker_errors``). When the group fails, torchrun raises
``ChildFailedError`` with every worker's failure: if a worker reported a line, and no worker
failed otherwise before it (the workers torchrun then stops with a signal are its consequence),
the agent prints the line of the lowest such rank, once, and exits with status 2, as a single
process does. The messages torchrun's process code logs while a failing group stops ("failed
(exitcode: 2) local_rank: ...", "Sending process ... closing signal") are held back until the
outcome is known: dropped after a reported line, shown before torchrun's full report after any
other failure, which keeps its traceback and error files as plain torchrun gives them.

Filtering torchrun's stderr from outside instead would have to recognize its report by its text
and would hold back the workers' own output; running torchrun's ``run`` in process gives the
failures as data.
"""

from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.run import parse_args, run

from clusterlm.launch.rendezvous import register_bound_backend
from clusterlm.launch.worker_errors import AGENT_VARIABLE, EXIT_USER_ERROR, user_error

PROCESS_LOGGER = (
    "torch.distributed.elastic.multiprocessing.api"  # logs each failed and stopped worker
)


class HeldBack(logging.Filter):
    """Keeps a logger's records until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, entry: logging.LogRecord) -> bool:
        self.records.append(entry)
        return False

    def release(self, logger: logging.Logger) -> None:
        logger.removeFilter(self)
        for entry in self.records:
            logger.handle(entry)


def reported_line(err: ChildFailedError) -> str | None:
    """The line to print for a failed group, or None when it failed for another reason first."""
    reported = {
        rank: (line, failure.timestamp)
        for rank, failure in err.failures.items()
        if (line := user_error(failure.error_file_data)) is not None
    }
    if not reported:
        return None
    first = min(timestamp for _, timestamp in reported.values())
    earlier = [
        rank
        for rank, failure in err.failures.items()
        if rank not in reported and failure.timestamp < first
    ]
    return None if earlier else reported[min(reported)][0]


@record
def main(argv: list[str] | None = None) -> None:
    os.environ[AGENT_VARIABLE] = (
        "1"  # the workers inherit it: they report a UserError to this process
    )
    # Rank 0 hosts the ranks' store, bound (clusterlm.distributed.listeners): torchrun's shared
    # agent store would listen on every interface.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    register_bound_backend()
    logger = logging.getLogger(PROCESS_LOGGER)
    held = HeldBack()
    logger.addFilter(held)
    try:
        run(parse_args(argv))
    except ChildFailedError as err:
        line = reported_line(err)
        if line is None:
            held.release(logger)
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    held.release(logger)


if __name__ == "__main__":
    main()
