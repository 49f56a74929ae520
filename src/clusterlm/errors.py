"""The one exception type users see as a single line (problem and fix), never a traceback."""


class UserError(Exception):
    """Bad input from the user: config, corpus, checkpoint or launch environment.

    The CLI prints ``error: <message>`` and exits with status 2. The message names the problem and
    the fix in one line.
    """
