"""Store addresses: which MLflow store a command uses, whether it can be used, and sqlite URL parsing.

One resolver and one reachability check for every command (writers create a missing sqlite store,
readers never do), and one sqlite-URL parser shared by MLflow stores, Optuna storages and Ray workers.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from harness.errors import HarnessError

DEFAULT_TRACKING_URI = "sqlite:///results/mlflow.db"
DATABASE_FAMILIES = ("postgresql", "mysql", "mssql", "sqlite")


def resolve_uri(uri: str | None = None) -> str:
    """`uri` (--tracking-uri), else $MLFLOW_TRACKING_URI, else the embedded sqlite store under results/."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def family(url: str) -> str:
    """The database family of a SQLAlchemy URL ('postgresql+psycopg://…' → 'postgresql'); '' without a scheme."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    base = scheme.split("+")[0]
    return {"postgres": "postgresql", "mariadb": "mysql"}.get(base, base)


def sqlite_path(url: str) -> Path | None:
    """The database file of a sqlite URL (`sqlite:///relative.db`, `sqlite:////abs.db`, with or without a
    driver such as `sqlite+pysqlite`); None for other schemes and in-memory databases."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] != "sqlite":
        return None
    rest = rest.split("?", 1)[0]
    if not rest.startswith("/"):
        return None
    rest = rest[1:]
    if rest in ("", "/") or rest.lstrip("/").startswith(":memory:") or rest.startswith("file:"):
        return None
    return Path(unquote(rest))


def absolute_uri(uri: str) -> str:
    """A sqlite URL with its file made absolute (for workers that run in another directory); others as given."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    scheme = uri.split("://", 1)[0]
    query = "?" + uri.split("?", 1)[1] if "?" in uri else ""
    return f"{scheme}:///{path.resolve()}{query}"


def mask_url(url: str) -> str:
    """The URL with its password hidden (for messages and tags)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        parsed = urlparse(url)
        if parsed.password:
            return url.replace(f":{parsed.password}@", ":***@", 1)
        return url


def ensure_writable_dir(directory: Path, what: str) -> None:
    """Create `directory` if needed; a one-line error naming `what` when it cannot be created or written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"{what}: cannot create {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise HarnessError(f"{what}: {directory} is not writable")


def _check_sqlite(uri: str, create: bool) -> None:
    path = sqlite_path(uri)
    if path is None:
        if create:
            return
        raise HarnessError(f"tracking URI {uri!r} names no database file to read runs from")
    if not path.exists():
        if create:
            ensure_writable_dir(path.parent, f"tracking URI {uri}")
            return
        if not path.parent.is_dir():
            raise HarnessError(f"no MLflow store at {uri}: directory {path.parent} does not exist")
        raise HarnessError(f"no MLflow store at {uri}: {path} does not exist")
    try:
        with sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise HarnessError(f"{path} is not an MLflow sqlite store ({exc})") from None
    if not create and not {"experiments", "runs", "metrics"} <= tables:
        raise HarnessError(f"{path} is not an MLflow store (no experiments/runs/metrics tables)")


def _check_server(uri: str, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:  # noqa: S310
            if response.status >= 400:
                raise HarnessError(f"MLflow tracking server {uri} answered {response.status}")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise HarnessError(f"MLflow tracking server {uri} answered {exc.code}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HarnessError(f"cannot reach MLflow tracking server {uri}: {reason}") from None


def check_store(uri: str, *, create: bool, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the store at `uri` cannot be used (before anything is logged).

    `create=True` (writers) accepts a missing sqlite file whose directory can be written; `create=False`
    (readers) requires an existing MLflow store and never creates anything.
    """
    scheme = family(uri)
    if scheme == "sqlite":
        _check_sqlite(uri, create)
        return
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
        return
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        path = Path(unquote(urlparse(uri).path) if uri.startswith("file:") else uri)
        if create:
            raise HarnessError(f"tracking URI {uri}: MLflow's file store takes no new runs (it is in maintenance "
                               "mode); use sqlite:///PATH or a tracking server (http://HOST:PORT)")
        if not path.is_dir():
            raise HarnessError(f"no MLflow store at {uri}: {path} is not a directory")
        return
    if scheme in DATABASE_FAMILIES:
        return  # database back ends: the first query reports a connection problem
    raise HarnessError(f"unsupported tracking URI {uri!r}")
