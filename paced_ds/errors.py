"""The one exception type for problems a user can fix (bad input, bad config).

A ``UserError`` is printed as one line, ``paced-ds: error: <message>``, and the process
exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names what was wrong and where (file:line, key, rank)."""
