"""User-facing errors.

Anything a user can fix (a path, a flag, a file) raises `UserError` with one message that names the culprit and
says what to do. The CLI prints it without a traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (files, flags, data), reported as one clear message."""
