"""The rendered HTML report travels with the runs it describes: `harness report` logs each ablation's page
as an artifact of its parent runs (names.report_artifact), so the MLflow UI shows it beside comparison.csv."""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness.errors import one_line
from harness.tracking import names
from harness.tracking.query import Store


def parent_run_ids(store: Store, experiment_id: str) -> list[str]:
    """The parent runs (one per `harness run` invocation) of an ablation's experiment."""
    runs = store.client.search_runs([experiment_id], filter_string=f"tags.`{names.ROLE}` = '{names.PARENT}'",
                                    max_results=1000)
    return [run.info.run_id for run in runs]


def attach_report(store: Store, experiment_id: str, ablation: str, html: str) -> tuple[int, str]:
    """Log `html` as report/<ablation>.html on every parent run of the experiment, replacing an earlier
    one; the runs' status stays as it is. Returns (runs given the page, why the first failure failed or "")."""
    artifact = names.report_artifact(ablation)
    folder, file_name = artifact.rsplit("/", 1)
    attached, failure = 0, ""
    with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
        local = Path(tmp, file_name)
        local.write_text(html, encoding="utf-8")
        for run_id in parent_run_ids(store, experiment_id):
            try:
                store.client.log_artifact(run_id, str(local), folder)
                attached += 1
            except Exception as exc:  # a store that refuses artifacts leaves the written report standing
                failure = failure or one_line(exc)
    return attached, failure
