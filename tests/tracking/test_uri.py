"""harness.tracking.uri: the one resolver, sqlite-URL parser and reachability check of every store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.tracking import uri


def test_resolve_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert uri.resolve_uri() == "sqlite:///results/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert uri.resolve_uri() == "sqlite:////x/y.db"
    assert uri.resolve_uri("http://h:5000") == "http://h:5000"


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///results/mlflow.db", Path("results/mlflow.db")),
        ("sqlite:////abs/m.db", Path("/abs/m.db")),
        ("sqlite+pysqlite:///rel/o.db?timeout=5", Path("rel/o.db")),
        ("sqlite:///a%20b.db", Path("a b.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("postgresql://u:p@h/db", None),
        ("results/mlflow.db", None),
    ],
)
def test_one_sqlite_url_parser(url: str, path: Path | None) -> None:
    assert uri.sqlite_path(url) == path


def test_absolute_uri_for_workers_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert uri.absolute_uri("sqlite:///r/m.db") == f"sqlite:///{tmp_path}/r/m.db"
    assert uri.sqlite_path(uri.absolute_uri("sqlite:///r/m.db")) == tmp_path / "r" / "m.db"
    assert uri.absolute_uri("http://h:5000") == "http://h:5000"


def test_writers_create_readers_refuse_a_missing_sqlite_store(tmp_path: Path) -> None:
    target = f"sqlite:///{tmp_path}/new/dir/mlflow.db"
    with pytest.raises(HarnessError, match="does not exist"):
        uri.check_store(target, create=False)
    assert not (tmp_path / "new").exists()
    uri.check_store(target, create=True)
    assert (tmp_path / "new" / "dir").is_dir() and not (tmp_path / "new" / "dir" / "mlflow.db").exists()


def test_a_file_that_is_not_sqlite_is_refused_for_writing_too(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(HarnessError, match="not an MLflow sqlite store"):
        uri.check_store(f"sqlite:///{tmp_path}/junk.db", create=True)
    with sqlite3.connect(tmp_path / "other.db") as conn:
        conn.execute("CREATE TABLE other (x)")
    uri.check_store(f"sqlite:///{tmp_path}/other.db", create=True)  # an empty store: MLflow creates its tables
    with pytest.raises(HarnessError, match="not an MLflow store"):
        uri.check_store(f"sqlite:///{tmp_path}/other.db", create=False)


def test_password_masked_in_messages() -> None:
    assert "secret" not in uri.mask_url("postgresql://user:secret@db.example:5432/optuna")
    assert uri.family("postgresql+psycopg://u@h/db") == "postgresql" and uri.family("mariadb://h/x") == "mysql"
