"""Which Optuna studies an ablation's `search:` section asks for: one per variant and non-seed grid point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from harness.config import SearchSpec
from harness.errors import HarnessError
from harness.planning import AblationSpec, PlannedRun, format_validation_error, merge


@dataclass
class PlannedStudy:
    """One study: a variant at one non-seed grid point, trained at its first seed."""

    name: str
    variant: str
    grid: dict[str, Any]  # the non-seed grid point
    run: PlannedRun  # the first-seed run whose config every trial starts from
    search: SearchSpec


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`--set` items → (`search.*` keys without the prefix, every other key)."""
    search = {k.removeprefix("search."): v for k, v in overrides.items() if k.startswith("search.")}
    return search, {k: v for k, v in overrides.items() if not k.startswith("search.")}


def resolve_search(spec: AblationSpec, overrides: dict[str, Any] | None = None, source: str = "ablation") -> SearchSpec:
    """The file's `search:` section with `--set search.<key>=...` applied; a HarnessError if it has none."""
    if spec.search is None:
        raise HarnessError(
            f"{source}: no `search:` section, so there is nothing to tune (see docs/tuning.md for its keys)"
        )
    if not overrides:
        return spec.search
    merged = merge(spec.search.model_dump(mode="json", exclude_none=True), overrides)
    try:
        return SearchSpec.model_validate(merged)
    except ValidationError as exc:
        raise HarnessError(format_validation_error(f"{source} with --set", exc, "search")) from None


def study_name(ablation: str, variant: str, grid: dict[str, Any]) -> str:
    """`<ablation>.<variant>`, plus `/<axis>=<value>` per non-seed grid axis."""
    return f"{ablation}.{variant}" + "".join(f"/{k}={v}" for k, v in grid.items() if k != "seed")


def plan_studies(spec: AblationSpec, search: SearchSpec, runs: list[PlannedRun]) -> list[PlannedStudy]:
    """Group expanded runs into studies (variant × non-seed grid point), each at its first run's seed."""
    studies: dict[str, PlannedStudy] = {}
    for run in runs:
        point = {k: v for k, v in run.grid.items() if k != "seed"}
        name = study_name(spec.name, run.variant, point)
        if name not in studies:
            studies[name] = PlannedStudy(name, run.variant, point, run, search)
    return list(studies.values())
