"""The one exception type for bad input.

Raise `UserError` for anything a user can fix (a wrong path, a malformed config, a bad seed file). The CLI
prints its message as one line and exits non-zero, with no traceback. The message says what was wrong and
what to do.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit code 2."""
