"""A tracking server that answered once and then stops answering (restarted, redeployed, a network blip) is
waited for, so a run in the middle of training does not fail or hang RUNNING because of it.

MLflow's HTTP client already retries a request a few times within seconds (`MLFLOW_HTTP_REQUEST_*`, set
in `harness.settings`); a restart takes longer. `RetryingClient` wraps an `MlflowClient` and retries a
call that failed to reach the server, with exponential backoff, for up to the `tracking_retry_s` switch's
seconds. Only failures where the request never got an answer (connection refused or reset, 502/503/504)
are retried; a server that never answered is reported at once, so a wrong
`--tracking-uri` is still a quick one-line error. After the wait runs out the error is a `TrackingUnreachable`
and later calls try once until the server answers again.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from harness import settings
from harness.errors import HarnessWarning, TrackingUnreachable, one_line

MAX_PAUSE_S = 10.0
# how a call that never reached the server reads, after MLflow's own retries (requests/urllib3 texts)
UNREACHABLE = ("Max retries exceeded", "Connection refused", "Connection aborted", "Connection reset",
               "RemoteDisconnected", "Failed to establish a new connection", "too many 502", "too many 503",
               "too many 504", "ConnectionError")


class TrackingRetryWarning(HarnessWarning):
    """The tracking server stopped answering; the harness waits for it."""


# how a database says that a concurrent transaction inserted the same row first (PostgreSQL, sqlite, MySQL)
DUPLICATE_KEY = ("UniqueViolation", "duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def _says(exc: BaseException, markers: tuple[str, ...]) -> bool:
    text = f"{type(exc).__name__}: {getattr(exc, 'message', '')} {exc}"
    return any(marker in text for marker in markers)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` says the server was not reached (worth retrying), not that it refused the request."""
    return _says(exc, UNREACHABLE)


def duplicate_key(exc: BaseException) -> bool:
    """Whether `exc` says another writer inserted the same row first (tried again, the row is there)."""
    return _says(exc, DUPLICATE_KEY)


class RetryingClient:
    """An `MlflowClient` whose calls wait out a tracking server that went away (see the module docstring)."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client, self._uri = client, uri
        self._answered = False  # the server answered a call of this client: it exists, so wait for it
        self._gave_up = False  # the last wait ran out: try once until it answers again
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value) or name.startswith("_"):
            return value
        return functools.partial(self._call, value)

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        budget = settings.current().tracking_retry_s
        started, pause, warned = time.monotonic(), 1.0, False
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as exc:
                if not unreachable(exc) or not self._answered or budget <= 0 or self._gave_up:
                    raise
                waited = time.monotonic() - started
                if waited >= budget:
                    with self._lock:
                        self._gave_up = True
                    switch = f"{settings.variable('tracking_retry_s')}={budget:g}"
                    raise TrackingUnreachable(f"tracking server {self._uri} did not answer for {waited:.0f} s "
                                              f"({switch}): {one_line(exc)[:200]}; rerun the command once it "
                                              "answers: what was left RUNNING there is resumed") from None
                if not warned:
                    warnings.warn(TrackingRetryWarning(f"tracking server {self._uri} does not answer "
                                                       f"({method.__name__}); retrying for up to {budget:g} s"),
                                  stacklevel=2)
                    warned = True
                time.sleep(min(pause, budget - waited, MAX_PAUSE_S))
                pause *= 2
                continue
            with self._lock:
                self._answered, self._gave_up = True, False
            return result
