"""Optuna storages: which one a command uses, opening it, a lock shared by every worker, and the few
Optuna internals the harness needs (kept here, behind public functions).

Trials are created under a storage-wide lock (a lock file beside a sqlite database, an advisory lock on
PostgreSQL / MySQL), so any number of workers (threads of one process, processes, machines) sharing a
storage together run exactly the number of trials asked for. See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness import settings
from harness.errors import HarnessError, one_line
from harness.tracking.uri import ensure_writable_dir, family, mask_url, sqlite_path

if TYPE_CHECKING:
    import optuna

DEFAULT_STORAGE = "sqlite:///results/optuna.db"
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"harness.tune").digest()[:8], "big", signed=True)


def resolve_storage(storage: str | None) -> str:
    """--storage, else the `optuna_storage` switch (see harness.settings), else sqlite:///results/optuna.db."""
    return storage or settings.current().optuna_storage or DEFAULT_STORAGE


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_LOCK_ENGINES: dict[str, Any] = {}


class StorageLock:
    """Mutual exclusion between every `harness tune` worker of one storage: threads, processes, machines.

    sqlite: `flock` on `<database>.lock` (workers on one machine, as sqlite itself needs); PostgreSQL:
    `pg_advisory_lock`; MySQL: `GET_LOCK`. Held only while trials are counted and created (milliseconds).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.family = family(url)
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(url, threading.Lock())
        self._release: Callable[[], None] | None = None

    def __enter__(self) -> StorageLock:
        self._thread_lock.acquire()
        try:
            self._release = self._acquire()
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._release is not None:
                self._release()
        finally:
            self._release = None
            self._thread_lock.release()

    def _acquire(self) -> Callable[[], None]:
        if self.family == "sqlite":
            db = sqlite_path(self.url)
            if db is None:
                return lambda: None
            try:
                import fcntl
            except ImportError:  # not POSIX: one process per sqlite storage
                return lambda: None
            handle = open(db.with_name(db.name + ".lock"), "a+")  # noqa: SIM115 (closed by the release)
            fcntl.flock(handle, fcntl.LOCK_EX)

            def release() -> None:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()

            return release
        if self.family in ("postgresql", "mysql"):
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            with _THREAD_LOCKS_GUARD:
                engine = _LOCK_ENGINES.get(self.url)
                if engine is None:
                    engine = _LOCK_ENGINES[self.url] = create_engine(self.url, poolclass=NullPool)
            connection = engine.connect()
            try:
                if self.family == "postgresql":
                    connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
                    unlock = text("SELECT pg_advisory_unlock(:key)")
                    unlock_args: dict[str, Any] = {"key": _LOCK_KEY}
                else:
                    got = connection.execute(text("SELECT GET_LOCK('harness.tune', 600)")).scalar()
                    if got != 1:
                        raise HarnessError(f"storage {mask_url(self.url)}: waited 600 s for the harness.tune lock")
                    unlock, unlock_args = text("SELECT RELEASE_LOCK('harness.tune')"), {}
            except BaseException:
                connection.close()
                raise

            def release_db() -> None:
                try:
                    connection.execute(unlock, unlock_args)
                finally:
                    connection.close()

            return release_db
        return lambda: None


def open_storage(url: str | None = None, *, create: bool = True) -> optuna.storages.RDBStorage:
    """The Optuna storage at `url` (see `resolve_storage`), checked and ready; a HarnessError when it is not.

    `create=False` (reading) refuses a sqlite file that does not exist instead of creating it.
    """
    import optuna

    url = resolve_storage(url)
    kind = family(url)
    if kind not in ("sqlite", "postgresql", "mysql"):
        raise HarnessError(
            f"unsupported Optuna storage {mask_url(url)!r}: use sqlite:///PATH, postgresql://… or mysql://…"
        )
    engine_kwargs: dict[str, Any] = {}
    if kind == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
        db = sqlite_path(url)
        if db is not None:
            if not db.exists():
                if not create:
                    raise HarnessError(
                        f"no Optuna storage at {db}: run `harness tune` first, or pass the storage URL "
                        f"(--storage / ${settings.variable('optuna_storage')})"
                    )
                ensure_writable_dir(db.parent, f"Optuna storage {url}")
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with StorageLock(url) if create else contextlib.nullcontext():  # schema creation, once
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except HarnessError:
        raise
    except Exception as exc:
        hint = ""
        if isinstance(exc, ModuleNotFoundError):
            drivers = {"psycopg": "psycopg psycopg-binary", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient",
                       "pymysql": "pymysql"}
            hint = f" (install its driver: pip install {drivers.get(exc.name or '', exc.name)})"
        raise HarnessError(f"cannot open Optuna storage {mask_url(url)}: {one_line(exc)}{hint}") from None


def load_study(storage: Any, name: str, url: str) -> optuna.Study:
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        known = ", ".join(sorted(names)[:20]) + (" …" if len(names) > 20 else "") if names else "none"
        raise HarnessError(f"no Optuna study {name!r} in {mask_url(url)} (studies: {known})") from None




def set_trial_attrs(
    study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.Trial, user: dict[str, Any] | None = None,
    system: dict[str, Any] | None = None,
) -> None:
    """Set user and system attributes of any trial of `study`, including one another process started
    (Optuna has a public handle only for the live trial of this process, and no public system attributes)."""
    storage = study._storage
    trial_id = trial._trial_id
    for key, value in (user or {}).items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in (system or {}).items():
        storage.set_trial_system_attr(trial_id, key, value)
