"""What a search reports: options in, trial results and study outcomes out, and the events the CLI draws."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.tune.planning import PlannedStudy


@dataclass
class TuneOptions:
    storage: str | None = None  # default: harness.tracking.optuna_storage.resolve_storage
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow.db
    n_trials: int | None = None  # overrides search.n_trials
    n_jobs: int = 1  # trials run in threads of this process
    device: str | None = None  # overrides train.device
    results_dir: Path = Path("results")  # data caches and the generated synthetic task
    source_file: str = ""
    timeout: float | None = None  # seconds after which no new trial starts (like Optuna's optimize(timeout=))


@dataclass
class TrialResult:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: dict[str, Any]
    value: float | None = None
    epochs: int = 0
    reason: str = ""
    run_id: str = ""


@dataclass
class StudyOutcome:
    name: str
    variant: str
    metric: str
    direction: str
    target: int
    new_trials: int
    counts: dict[str, int]  # trials by state, all workers
    counted: int = 0  # trials that count toward the target (all but WAITING and interrupted ones)
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str = ""
    results: list[TrialResult] = field(default_factory=list)  # this process's trials

    @property
    def best_lr(self) -> float | None:
        return self.best_params.get("lr")

    @property
    def interrupted(self) -> int:
        """FAIL trials that do not count: stopped by Ctrl-C or by their worker's death."""
        return sum(self.counts.values()) - self.counts["WAITING"] - self.counted


class TuneEvents:
    """What `tune` reports while it works; these defaults ignore it (the CLI draws it with rich).

    Called from worker threads.
    """

    def study_started(self, study: PlannedStudy, target: int, counted: int) -> None: ...
    def data_progress(self, phase: str, done: int, total: int) -> None: ...
    def trial_started(self, study: PlannedStudy, number: int, params: dict[str, Any]) -> None: ...
    def epoch(self, study: PlannedStudy, number: int, epoch: int, value: float) -> None: ...
    def trial_finished(self, study: PlannedStudy, result: TrialResult) -> None: ...
    def study_finished(self, outcome: StudyOutcome) -> None: ...
