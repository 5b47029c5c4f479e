"""Optuna storages: which one a command uses, opening it, and the few Optuna internals the harness needs
(kept here, behind public functions).

Trials are created under a storage-wide lock (`harness.tracking.locks`), so any number of workers
(threads of one process, processes, machines) sharing a storage together run exactly the number of
trials asked for. See docs/tuning.md.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

from harness import settings
from harness.errors import HarnessError, one_line
from harness.tracking.locks import StorageLock
from harness.tracking.uri import ensure_writable_dir, family, mask_url, sqlite_path

if TYPE_CHECKING:
    import optuna

DEFAULT_STORAGE = "sqlite:///results/optuna.db"


def resolve_storage(storage: str | None) -> str:
    """--storage, else the `optuna_storage` switch (see harness.settings), else sqlite:///results/optuna.db."""
    return storage or settings.current().optuna_storage or DEFAULT_STORAGE


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
        elif type(exc).__name__ == "OperationalError" and kind != "sqlite":
            hint = " (is the database server running, and does it accept this user and database?)"
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
