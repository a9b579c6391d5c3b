"""User-facing errors.

Anything the user can fix (a bad flag, a malformed file, a missing path) raises `UsageError`
with a one-line message naming the file, field or flag. The CLI turns it into that line on
stderr and exit code 2; everything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""
