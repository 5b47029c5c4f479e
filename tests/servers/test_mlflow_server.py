"""docs/scaling.md's recipe on real servers: `harness run` workers on different machines (here: processes
with their own results directories) share one grid through an MLflow tracking server on PostgreSQL, and
`harness report` reads the server from anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ABLATION = "servergrid"


def ablation(path: Path, root: Path, name: str = ABLATION) -> Path:
    path.write_text(f"""
name: {name}
baseline: standard
base:
  data: {{source: coco, root: "{root}", image_size: 32}}
  model: {{arch: small3}}
  train: {{epochs: 2, batch_size: 16, lr: 0.003, threads: 1}}
  profile: {{enabled: false}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1"}}}}
""")
    return path


def harness(*args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})


def children(url: str, name: str) -> list:
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no experiment {name} on {url}"
    return client.search_runs([experiment.experiment_id], "tags.`harness.role` = 'child'")


def test_two_workers_share_a_grid_through_the_tracking_server(mlflow_server, synth_root, tmp_path) -> None:
    file = ablation(tmp_path / "grid.yaml", synth_root)
    workers = [harness("run", str(file), "--tracking-uri", mlflow_server.url, "--results-dir",
                       str(tmp_path / f"results-{i}")) for i in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)

    runs = children(mlflow_server.url, ABLATION)
    assert sorted(r.info.run_name for r in runs) == ["deform", "standard"], "each run trained exactly once"
    assert {r.info.status for r in runs} == {"FINISHED"}
    steps = MlflowClient(mlflow_server.url).get_metric_history(runs[0].info.run_id, "val/map")
    assert sorted(m.step for m in steps) == [1, 2], "each epoch logged once"

    # the report, from a directory that holds nothing of the run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report = harness("report", ABLATION, "--tracking-uri", mlflow_server.url, cwd=elsewhere)
    output = report.communicate(timeout=180)[0]
    assert report.returncode == 0, output[-2000:]
    page = (elsewhere / "reports" / f"{ABLATION}.html").read_text()
    assert "deform" in page and "standard" in page

    # `harness eval` from there too: the checkpoint comes from the run's artifacts on the server
    analysis = harness("eval", ABLATION, "--tracking-uri", mlflow_server.url, "--results-dir",
                       str(elsewhere / "results"), "--only", "offsets", cwd=elsewhere)
    output = analysis.communicate(timeout=180)[0]
    assert analysis.returncode == 0, output[-2000:]
    deform = next(r for r in children(mlflow_server.url, ABLATION) if r.info.run_name == "deform")
    assert "offset/conv0/mean_abs" in deform.data.metrics and deform.info.status == "FINISHED"
