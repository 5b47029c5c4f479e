"""Ownership of child runs on one store: which process trains a config when several start it together."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.tracking import names
from harness.tracking.locks import StorageLock
from harness.tracking.store import CLAIM_PREFIX, AblationStore

HASH = "abc123def456"


def _store(tmp_path: Path) -> AblationStore:
    return AblationStore(f"sqlite:///{tmp_path}/mlflow.db", "owners")


def _child(store: AblationStore, name: str):
    parent = store.start_parent("parent", {})
    return store.start_child(parent, name, {"seed": 0}, {names.CONFIG_HASH: HASH})


def test_a_new_run_loses_to_a_finished_run_of_its_config(tmp_path: Path) -> None:
    store = _store(tmp_path)
    done = _child(store, "first")
    store.client.set_terminated(done.run_id, status="FINISHED")
    late = _child(store, "second")
    assert not store.first_claim(late, HASH)
    assert store.client.get_run(late.run_id).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in store.children()] == [done.run_id]


def test_a_new_run_loses_to_an_earlier_run_a_live_process_trains(tmp_path: Path) -> None:
    store = _store(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        earlier = store.client.create_run(store.experiment_id, run_name="theirs", tags={
            names.ROLE: names.CHILD, names.CONFIG_HASH: HASH})
        store.client.log_param(earlier.info.run_id, f"{CLAIM_PREFIX}0", f"{os.uname().nodename} {sleeper.pid} 0")
        time.sleep(0.01)
        mine = _child(store, "mine")
        assert not store.first_claim(mine, HASH)
        sleeper.kill()
        sleeper.wait()
        again = _child(store, "mine again")  # its owner died: the earlier run no longer counts
        assert store.first_claim(again, HASH)
    finally:
        sleeper.kill()


def test_a_new_run_wins_when_nothing_else_trains_its_config(tmp_path: Path) -> None:
    store = _store(tmp_path)
    mine = _child(store, "mine")
    assert store.first_claim(mine, HASH)
    assert store.client.get_run(mine.run_id).info.lifecycle_stage == "active"


def test_deciding_and_taking_a_run_is_exclusive_between_processes(tmp_path: Path) -> None:
    """While one worker holds the store, another waits."""
    store = _store(tmp_path)
    inside: list[str] = []

    def other() -> None:
        with StorageLock(store.uri):
            inside.append("other")

    with store.exclusive():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        assert inside == [], "a second holder entered while the first held the store"
    thread.join(5)
    assert inside == ["other"]


@pytest.mark.parametrize(("uri", "locks"), [
    ("sqlite:////tmp/x/mlflow.db", True), ("postgresql://u@127.0.0.1/db", True),
    ("mysql+pymysql://u@h/db", True), ("http://127.0.0.1:5000", False), ("sqlite://", False),
])
def test_which_stores_lock(uri: str, locks: bool) -> None:
    assert StorageLock(uri).locks is locks
