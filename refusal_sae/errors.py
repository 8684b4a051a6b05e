"""One exception type for every mistake a user can fix.

The CLI turns a `UserError` into a single line on stderr and exit status 2, so its message must name
the file, field or value at fault and say what to do. Anything else that escapes is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input, bad config or bad files on disk; the message is the whole report."""
