"""Waiting out a tracking server that went away: which failures are retried, and a server that never answered
is reported at once."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness import settings
from harness.errors import HarnessError
from harness.tracking.retry import RetryingClient, unreachable


def test_only_failures_to_reach_the_server_are_retried() -> None:
    refused = MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
                              "HTTPConnectionPool(host='h', port=5000): Max retries exceeded with url: /x "
                              "(Caused by NewConnectionError('Failed to establish a new connection: [Errno 111] "
                              "Connection refused'))")
    assert unreachable(refused)
    assert not unreachable(MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST"))
    assert not unreachable(ValueError("bad value"))


def test_a_server_that_never_answered_fails_at_once(harness_env, monkeypatch: pytest.MonkeyPatch) -> None:
    harness_env(tracking_retry_s="120")
    for key, value in settings.MLFLOW_DEFAULTS.items():  # what the harness sets before it makes a client
        monkeypatch.setenv(key, value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    client = RetryingClient(MlflowClient(url), url)
    started = time.monotonic()
    with pytest.raises(MlflowException, match="Connection refused|Max retries"):
        client.search_experiments()
    assert time.monotonic() - started < 20, "a wrong --tracking-uri is not waited for"


def test_retry_and_upload_switches(harness_env) -> None:
    current = harness_env(tracking_retry_s="30", checkpoint_upload_every="3")
    assert (current.tracking_retry_s, current.checkpoint_upload_every) == (30.0, 3)
    with pytest.raises(HarnessError, match="HARNESS_CHECKPOINT_UPLOAD_EVERY='1.5': expected a number >= 0"):
        harness_env(checkpoint_upload_every="1.5")
