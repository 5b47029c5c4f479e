"""The one exception type for user mistakes.

The CLI prints a `HarnessError` as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class HarnessError(Exception):
    """A mistake in user input (a path, a file, a key, a value) explained in one line."""
