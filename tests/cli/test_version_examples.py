"""`harness --version` and `harness examples DIR`."""

from __future__ import annotations

from pathlib import Path

import torch

from harness import __version__
from harness.cli import main
from harness.cli.examples import example_files

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version_names_harness_torch_cuda_and_the_kernel(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert f"harness {__version__}" in out and f"torch {torch.__version__}" in out
    assert "CUDA: " in out and "DCN kernel (CPU): " in out


def test_examples_are_the_repository_ablations_byte_for_byte():
    shipped = example_files()
    source = {p.name: p.read_bytes() for p in sorted((REPO_ROOT / "ablations").glob("*.yaml"))}
    assert shipped == source and "quickstart.yaml" in shipped


def test_examples_writes_them_and_they_validate(tmp_path, capsys):
    out = tmp_path / "examples"
    assert main(["examples", str(out)]) == 0
    assert {p.name for p in out.glob("*.yaml")} == set(example_files())
    assert main(["run", str(out / "quickstart.yaml"), "--dry-run"]) == 0
    assert "dry run: nothing trained" in capsys.readouterr().out


def test_examples_refuses_to_replace_a_changed_file(tmp_path, capsys):
    (tmp_path / "quickstart.yaml").write_text("mine")
    assert main(["examples", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "quickstart.yaml").read_text() == "mine"
    assert main(["examples", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "quickstart.yaml").read_bytes() == (REPO_ROOT / "ablations" / "quickstart.yaml").read_bytes()
