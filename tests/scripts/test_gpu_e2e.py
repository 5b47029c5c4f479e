"""scripts/gpu_e2e.sh, the one call a lent GPU machine gets: its CPU dry run trains, evaluates and
reports the shipped GPU ablation end to end, so the GPU call fails only on what is GPU-specific."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.planning import load_ablation

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_ablation_is_the_issue_s_three_variants_at_128px_bf16() -> None:
    spec = load_ablation(ROOT / "ablations" / "gpu_e2e.yaml")
    assert set(spec.variants) == {"standard", "deform_first2", "deform_all"}
    assert spec.base["data"]["image_size"] == 128
    assert spec.base["train"]["amp"] == "bf16" and spec.base["train"]["channels_last"] is True


@pytest.mark.slow
def test_dry_run_trains_evaluates_reports_and_summarises(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "GPU_E2E_DRY": "1", "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_e2e.sh")], env=env, capture_output=True, text=True, timeout=240
    )
    log = (out / "log.txt").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "Traceback" not in log
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"standard", "deform_first2", "deform_all"}
    assert all(row["runs"] == 1 and row["images_per_s"] > 0 for row in summary.values())
    assert summary["standard"]["vs_standard"] == pytest.approx(1.0)
    assert (out / "report.html").stat().st_size > 10_000
    assert "deform\\_all" in (out / "report.md").read_text()  # Markdown-escaped
