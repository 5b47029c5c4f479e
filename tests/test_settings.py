"""The HARNESS_* switches: read once, typed, reported; MLflow's defaults set without overriding the user."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness import settings


def test_defaults_when_nothing_is_set(harness_env) -> None:
    current = harness_env(**{f: None for f in ("coco_root", "optuna_storage", "cache_dir", "native", "fused", "cpp",
                                               "triton", "split", "steady_heap")})
    assert current == settings.Settings()
    assert current.native and current.cpp and not current.triton and not current.split
    assert current.cache_dir == Path.home() / ".cache" / "harness"
    assert current.switches() == "{}"


def test_read_once_until_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    before = settings.current()
    monkeypatch.setenv(settings.variable("triton"), "1")
    assert settings.current() is before  # not re-read behind the caller's back
    assert settings.reload().triton and settings.current().triton


@pytest.mark.parametrize(("text", "value"), [("0", False), ("false", False), ("off", False), ("1", True),
                                             ("yes", True), ("", True)])
def test_flags(harness_env, text: str, value: bool) -> None:
    assert harness_env(native=text).native is value


def test_switches_name_only_what_differs(harness_env, tmp_path: Path) -> None:
    current = harness_env(cpp="0", split="1", cache_dir=str(tmp_path), coco_root=None)
    assert json.loads(current.switches()) == {"HARNESS_CACHE_DIR": str(tmp_path), "HARNESS_CPP": "0",
                                              "HARNESS_SPLIT": "1"}


def test_mlflow_defaults_leave_user_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    settings.apply_mlflow_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "99"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == settings.MLFLOW_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
