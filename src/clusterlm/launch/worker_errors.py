"""How a worker started by the launcher's agent (``clusterlm.launch.agent``) hands its one-line
error to the agent, which prints it once for the whole job.

torchrun gives every worker a file to report its failure in (``TORCHELASTIC_ERROR_FILE``) and
reads those files when the group fails. A worker whose command fails with a ``UserError`` writes
its line there, in torchrun's format plus the line itself under ``USER_ERROR``, instead of printing
it; so N workers that find the same bad input do not print it N times. Only under the agent
(``AGENT_VARIABLE`` set): a worker of a plain torchrun prints its line as usual. Imported by
every command (``clusterlm.cli``), so it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

EXIT_USER_ERROR = 2  # the status of a command, or a job, that failed on bad input
AGENT_VARIABLE = "CLUSTERLM_AGENT"  # set by the agent for its workers
USER_ERROR = "clusterlm_user_error"  # the key of the line in the error file


def report_to_agent(message: str) -> bool:
    """Write a worker's one-line error for the agent; False (nothing written) when this process
    is not a worker of the agent, and should print the line itself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(AGENT_VARIABLE) != "1" or not path:
        return False
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "message": f"UserError: {message}",
                    "timestamp": int(time.time()),
                    USER_ERROR: message,
                },
                f,
            )
    except OSError:
        return False
    return True


def user_error(error_file_data: Any) -> str | None:
    """The line a worker reported (``report_to_agent``), from the data torchrun read of its error
    file."""
    if isinstance(error_file_data, dict) and isinstance(error_file_data.get(USER_ERROR), str):
        return error_file_data[USER_ERROR]
    return None
