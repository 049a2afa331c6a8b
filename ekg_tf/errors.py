"""The project's error for bad user input.

`UserError` (a ValueError, so `except ValueError` callers keep working) says what
to fix; the CLIs print it as one `error: ...` line and exit with status 2. Any other
exception is a bug in our code and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a model, data): the message says
    what to fix."""
