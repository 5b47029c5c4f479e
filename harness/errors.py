"""The one exception type for user mistakes, and the one way an exception becomes a line of text.

The CLI prints a `HarnessError` as a single line and exits with status 2 (1 for `TrackingUnreachable`, an
outage rather than a mistake); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HarnessError(Exception):
    """A mistake in user input (a path, a file, a key, a value) explained in one line."""


class TrackingUnreachable(HarnessError):
    """The tracking server stopped answering for longer than the harness waits for it: nothing more can be
    logged, so the command stops (one line, exit status 1); what it left RUNNING the next command resumes."""


def one_line(exc: BaseException, *, with_type: bool = True, limit: int = 500) -> str:
    """`exc` as one line: 'TypeName: first line of its message' (the type alone when the message is empty).

    MLflow exceptions keep their text in `.message`; it is used where present.
    """
    text = str(getattr(exc, "message", None) or exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    if not first:
        return type(exc).__name__
    line = f"{type(exc).__name__}: {first}" if with_type else first
    return line[:limit]


class HarnessWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line)."""
