"""The argument parser every command uses: usage mistakes become one-line UserErrors. Kept apart
from options.py (which imports the config tree, and with it torch) so that quick commands such as
`clusterlm jobs` start in a fraction of a second."""

from __future__ import annotations

import argparse

from clusterlm.errors import UserError


class Parser(argparse.ArgumentParser):
    """Usage mistakes become one-line UserErrors like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}; see `{self.prog} --help`")
