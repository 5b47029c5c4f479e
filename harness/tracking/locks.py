"""A lock shared by every harness process that writes one store: threads, processes, machines.

sqlite: `flock` on `<database>.lock` (workers on one machine, as sqlite itself needs); PostgreSQL:
`pg_advisory_lock`; MySQL: `GET_LOCK`; other stores (an HTTP tracking server): no lock. Held only for
milliseconds: while a store's schema and experiment are created, and while Optuna trials are counted
and created.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Any

from harness.errors import HarnessError
from harness.tracking.uri import family, mask_url, sqlite_path

_LOCK_KEY = int.from_bytes(hashlib.sha256(b"harness.tune").digest()[:8], "big", signed=True)


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()
_LOCK_ENGINES: dict[str, Any] = {}


class StorageLock:
    """Mutual exclusion between every harness worker of one store (see the module's docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.family = family(url)
        with _THREAD_LOCKS_GUARD:
            self._thread_lock = _THREAD_LOCKS.setdefault(url, threading.Lock())
        self._release: Callable[[], None] | None = None

    @property
    def locks(self) -> bool:
        """Whether this store gets a lock between processes (not an HTTP tracking server, not sqlite in memory)."""
        if self.family == "sqlite":
            return sqlite_path(self.url) is not None
        return self.family in ("postgresql", "mysql")

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
