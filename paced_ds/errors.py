"""The one exception type for problems a user can fix (bad input, bad config).

A ``UserError`` is printed as one line, ``paced-ds: error: <message>``, and the process
exits with status 2; anything else is a bug and keeps its traceback, followed by
:data:`BUG_NOTE`, with status 1.
"""

BUG_NOTE = ("paced-ds: this is a bug in paced-ds, not a problem with your input or settings; please report it "
            "with the traceback above")


class UserError(Exception):
    """Bad input: the message names what was wrong and where (file:line, key, rank)."""
