"""Optuna learning-rate searches (`harness tune`): one study per variant, trials trained by `harness.train.fit`.

An ablation file's `search:` section (`harness.config.SearchSpec`) names the ranges, the objective (a val
metric, best over epochs), the number of trials, the sampler and the pruner. Each variant (and each
non-seed grid point) gets its own study `<ablation>.<variant>[/<axis>=<value>...]`, trained at the
first seed of the grid. Every epoch is reported to Optuna, so a pruner can stop a bad rate early; the
trial's true end state (COMPLETE, PRUNED, FAIL) is kept in Optuna and mirrored in MLflow (a parent run
per study, a nested run per trial). Storage, locks and reading studies live in `harness.tracking`
(`optuna_storage`, `studies`), since planning reads studies too (`train.lr: {from_study: NAME}`).

- `planning`: which studies an ablation asks for.
- `trials`: the workers that create, train and close trials.
- `search`: `tune`, one study after another.
- `results`: options, outcomes and the events the CLI draws.
"""

from harness.tune.planning import PlannedStudy, plan_studies, resolve_search, split_overrides, study_name
from harness.tune.results import StudyOutcome, TrialResult, TuneEvents, TuneOptions
from harness.tune.search import tune

__all__ = [
    "PlannedStudy",
    "StudyOutcome",
    "TrialResult",
    "TuneEvents",
    "TuneOptions",
    "plan_studies",
    "resolve_search",
    "split_overrides",
    "study_name",
    "tune",
]
