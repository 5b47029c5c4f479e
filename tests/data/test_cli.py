"""`harness data info|synth|prepare|download` through the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main


def test_info_json(synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", str(synth_root), "--split", "train2017", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 64 and out["num_classes"] == 8 and out["images_without_annotations"] == 0
    assert [c["name"] for c in out["categories"]][:2] == ["disk", "ring"]
    assert sum(c["annotations"] for c in out["categories"]) == out["annotations"]


def test_info_table_on_coco_mini(coco_mini_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", str(coco_mini_root)]) == 0
    out = capsys.readouterr().out
    assert "344 images" in out and "2 images without annotations" in out and "80 categories" in out
    assert "toothbrush" in out and "person" in out


def test_info_missing_root_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "Traceback" not in err and err.count("\n") == 1


def test_synth_and_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--n-train", "12", "--n-val", "6", "--size", "16", "--seed", "3"]) == 0
    assert len(list((out / "train2017").glob("*.png"))) == 12
    assert "wrote 12 train + 6 val images" in capsys.readouterr().out
    assert main(["data", "synth", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    args = ["data", "prepare", str(out), "--train-size", "0.5", "--val-size", "all", "--image-size", "8",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    assert "train 6 / val 6 images" in capsys.readouterr().out
    assert main(args) == 0
    assert "cache hit train=True val=True" in capsys.readouterr().out
    assert main([*args[:3], "--train-size", "half"]) == 2
    assert "--train-size 'half'" in capsys.readouterr().err


def test_download_command(server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "download", "--split", "val2017", "--dest", str(tmp_path / "coco"),
                 "--base-url", server.url, "--no-verify"])
    assert code == 0
    assert (tmp_path / "coco" / "annotations" / "instances_val2017.json").is_file()
    assert len(list((tmp_path / "coco" / "val2017").iterdir())) == 3
    assert "val2017 ready" in capsys.readouterr().out
