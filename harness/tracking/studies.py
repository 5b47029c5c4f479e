"""Reading Optuna studies: the best learning rate (`train.lr: {from_study: NAME}`), study names, and each
study's trials as a DataFrame for the report."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError
from harness.tracking import names as tracking_names
from harness.tracking.optuna_storage import load_study, open_storage, resolve_storage

if TYPE_CHECKING:
    import optuna
    import pandas as pd


def best_lr_from_study(name: str, storage: str | None = None) -> float:
    """The learning rate of the best COMPLETE trial of study `name` (what `lr: {from_study: NAME}` trains at).

    `storage` defaults as in `resolve_storage`. A HarnessError when
    the storage or study does not exist, or the study has no completed trial.
    """
    import optuna

    url = resolve_storage(storage)
    study = load_study(open_storage(url, create=False), name, url)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        counts = state_counts(study.get_trials(deepcopy=False))
        summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no trials"
        raise HarnessError(f"Optuna study {name!r} has no completed trial yet ({summary}): run `harness tune` on it")
    best = study.best_trial
    if "lr" not in best.params:
        raise HarnessError(f"Optuna study {name!r} did not search lr (its params: {', '.join(best.params)})")
    return float(best.params["lr"])


def study_names(storage: str | None = None) -> list[str]:
    """Every study in the storage, sorted."""
    import optuna

    return sorted(optuna.get_all_study_names(open_storage(storage, create=False)))


def study_frames(storage: str | None = None, names: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Each study's trials as a DataFrame, for plots of lr vs objective and of the optimisation history.

    Columns: `number`, `state` (COMPLETE/PRUNED/FAIL/RUNNING/WAITING), `value` (the objective: best over
    epochs; a pruned trial's last reported value), `params_<name>` per searched parameter (`params_lr`, …),
    `intermediate_values` ({epoch: metric value}), `datetime_start`, `datetime_complete`, `duration_s`,
    `mlflow_run_id`, `failure`. `frame.attrs` holds `metric`, `direction`, `ablation`, `variant`,
    `best_trial`, `best_value` and `best_params` (None when no trial completed).
    """
    import optuna
    import pandas as pd

    url = resolve_storage(storage)
    opened = open_storage(url, create=False)
    wanted = names if names is not None else sorted(optuna.get_all_study_names(opened))
    frames: dict[str, pd.DataFrame] = {}
    for name in wanted:
        study = load_study(opened, name, url)
        rows = []
        for t in study.get_trials(deepcopy=False):
            start, end = t.datetime_start, t.datetime_complete
            rows.append({
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"params_{k}": v for k, v in t.params.items()},
                "intermediate_values": dict(sorted(t.intermediate_values.items())),
                "datetime_start": start,
                "datetime_complete": end,
                "duration_s": (end - start).total_seconds() if start and end else None,
                "mlflow_run_id": t.user_attrs.get(tracking_names.TRIAL_RUN_ID),
                "failure": t.user_attrs.get(tracking_names.TRIAL_FAILURE),
            })
        frame = pd.DataFrame(rows, columns=_frame_columns(rows)).sort_values("number").reset_index(drop=True)
        attrs = study.user_attrs
        best = best_trial(study)
        frame.attrs.update({
            "metric": attrs.get(tracking_names.STUDY_METRIC), "direction": study.direction.name.lower(),
            "ablation": attrs.get(tracking_names.STUDY_ABLATION), "variant": attrs.get(tracking_names.STUDY_VARIANT),
            "best_trial": best.number if best else None, "best_value": best.value if best else None,
            "best_params": dict(best.params) if best else None,
        })
        frames[name] = frame
    return frames


def _frame_columns(rows: list[dict[str, Any]]) -> list[str]:
    fixed = ["number", "state", "value"]
    params = sorted({k for row in rows for k in row if k.startswith("params_")},
                    key=lambda k: (k != "params_lr", k))
    rest = ["intermediate_values", "datetime_start", "datetime_complete", "duration_s", "mlflow_run_id", "failure"]
    return fixed + params + rest


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no COMPLETE trial
        return None


def state_counts(trials: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


