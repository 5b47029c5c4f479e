"""Checkpoints: paths only from a validated hash, atomic writes, plain data read without unpickling code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from harness import checkpoints
from harness.errors import HarnessError


class Payload:
    """Unpickling this runs code: it creates the file named by `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("bad", ["../../etc", "abc", "0123456789AB", "0123456789abc", "", "a/b/c/d/e/f0"])
def test_paths_come_only_from_a_config_hash(tmp_path: Path, bad: str) -> None:
    with pytest.raises(HarnessError, match="not a config hash"):
        checkpoints.checkpoint_path(tmp_path, "abl", bad)
    path = checkpoints.checkpoint_path(tmp_path, "abl", "0123456789ab")
    assert path == tmp_path / "checkpoints" / "abl" / "0123456789ab" / "last.pt"


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", "x" * 65, ".hidden"])
def test_paths_come_only_from_an_ablation_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(HarnessError, match="not an ablation name"):
        checkpoints.checkpoint_path(tmp_path, bad, "0123456789ab")


def test_the_same_config_in_two_ablations_has_two_checkpoints(tmp_path: Path) -> None:
    a = checkpoints.checkpoint_path(tmp_path, "one", "0123456789ab")
    b = checkpoints.checkpoint_path(tmp_path, "two", "0123456789ab")
    checkpoints.save_checkpoint({"epoch": 3}, a)
    checkpoints.save_checkpoint({"epoch": 1}, b)  # a killed run of another ablation cannot overwrite it
    assert checkpoints.saved_epoch(a) == 3 and checkpoints.saved_epoch(b) == 1


def test_a_crafted_checkpoint_does_not_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "last.pt"
    torch.save({"epoch": 1, "model": Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load_checkpoint(path)
    assert not marker.exists()
    assert checkpoints.saved_epoch(path) == 0 and not marker.exists()


def test_atomic_save_keeps_two_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c" / "last.pt"
    checkpoints.save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    checkpoints.save_checkpoint({"epoch": 2, "w": torch.ones(2)}, path)
    assert checkpoints.load_checkpoint(path)["epoch"] == 2
    assert checkpoints.load_checkpoint(checkpoints.previous_path(path))["epoch"] == 1

    def disk_full(state, target) -> None:  # what torch.save does when the disk fills: a partial file, then OSError
        Path(target).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(HarnessError, match=r"cannot write checkpoint .*last.pt: No space left on device"):
        checkpoints.save_checkpoint({"epoch": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "previous.pt"]
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["epoch"] == 2  # written in place, this would be the partial file


def test_a_corrupt_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    checkpoints.save_checkpoint({"epoch": 1}, path)
    checkpoints.save_checkpoint({"epoch": 2}, path)
    path.write_bytes(path.read_bytes()[:40])  # truncated, as a crash during a non-atomic copy leaves it
    with pytest.warns(checkpoints.CheckpointWarning, match=r"checkpoint .*last.pt cannot be read .*moved aside"):
        state = checkpoints.load_resumable(path)
    assert state is not None and state["epoch"] == 1
    assert not path.exists() and any(p.name.startswith("last.pt.corrupt-") for p in tmp_path.iterdir())
    checkpoints.previous_path(path).write_bytes(b"garbage")
    with pytest.warns(checkpoints.CheckpointWarning, match="previous.pt cannot be read"):
        assert checkpoints.load_resumable(path) is None  # nothing readable: start from scratch
    assert not checkpoints.exists(path)


def test_a_checkpoint_holds_its_config_and_plain_data(tmp_path: Path, synth_root: Path) -> None:
    from harness.config import RunConfig
    from harness.data import prepare_data
    from harness.train import fit

    config = RunConfig.model_validate({"train": {"epochs": 1, "batch_size": 16}, "data": {"image_size": 32},
                                       "model": {"deform_layers": "first:1"}})
    data = prepare_data(synth_root, image_size=32, cache_dir=tmp_path / "cache")
    path = tmp_path / "last.pt"
    fit(config, data, lr=1e-3, device=torch.device("cpu"), checkpoint_path=path, trace_dir=tmp_path / "trace")
    state = checkpoints.load_checkpoint(path)  # weights_only=True: everything in it is plain data
    assert RunConfig.model_validate(state["config"]) == config
    assert state["epoch"] == 1 and isinstance(state["profile"], dict | None)
    assert all(isinstance(h, dict) for h in state["history"])
