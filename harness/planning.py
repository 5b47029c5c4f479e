"""Ablation files → validated spec → planned runs: the YAML schema, `--set` overrides and grid expansion.

An ablation has a `base` config, named `variants` (partial overrides of base) and an optional `grid`
of axes (dotted keys → value lists) expanded as a cartesian product with every variant. Each expanded
run's identity is `harness.config.config_hash` of its resolved config, which is what resume keys on.
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from harness import settings
from harness.config import FromStudy, RunConfig, SearchSpec, Strict, config_hash, flatten
from harness.errors import HarnessError
from harness.safeyaml import load_yaml, load_yaml_file, short_repr
from harness.tracking.studies import best_lr_from_study

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
MAX_NAME_LENGTH = 64  # ablation and variant names become file names, MLflow names and Optuna study names
MAX_RUNS = 256  # a grid larger than this is refused unless the caller raises the limit (--max-runs)
MAX_DESCRIPTION = 5000  # characters: the description is an MLflow tag on the experiment and on every parent run


class AblationSpec(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=MAX_NAME_LENGTH)]
    description: Annotated[str, Field(max_length=MAX_DESCRIPTION)] = ""
    baseline: str | None = None
    base: dict[str, Any] = Field(default_factory=dict)
    variants: dict[str, dict[str, Any] | None] = Field(default_factory=lambda: {"default": {}})
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AblationSpec:
        if not self.variants:
            raise ValueError("variants is empty: name at least one variant")
        for variant in self.variants:
            if not _matches(NAME_PATTERN, variant):
                raise ValueError(f"variant name {short_repr(variant)} may hold only letters, digits, '_', '-' and '.'")
            if len(variant) > MAX_NAME_LENGTH:
                raise ValueError(f"variant name {short_repr(variant)} is longer than {MAX_NAME_LENGTH} characters")
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant (variants: {', '.join(self.variants)})")
        for axis, values in self.grid.items():
            if not values:
                raise ValueError(f"grid axis {axis!r} is empty")
        return self

    @property
    def baseline_variant(self) -> str:
        return self.baseline or next(iter(self.variants))


def _matches(pattern: str, text: str) -> bool:
    return re.match(pattern, text) is not None


class PlannedRun(BaseModel):
    """One expanded run: a variant at one grid point, with its resolved config and identity."""

    name: str
    variant: str
    grid: dict[str, Any]
    config: RunConfig
    config_hash: str
    baseline: bool = False
    lr_study: str | None = None  # the Optuna study train.lr was read from (`lr: {from_study: NAME}`)

    @property
    def group(self) -> str:
        """Variant plus the non-seed grid axes: what a report row averages over seeds."""
        parts = [f"{k}={v}" for k, v in self.grid.items() if k != "seed"]
        return " · ".join([self.variant, *parts])


def _loc_part(part: Any) -> bool:
    """Keys and list indices, not pydantic's names for the member of a union that failed."""
    return part != "" and (isinstance(part, int) or str(part).replace("_", "a").isalnum())


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]) if _loc_part(p))
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and first["type"] not in ("model_type",):
            message += f" (given {short_repr(first['input'])})"
    more = len(exc.errors()) - 1
    return f"{source}: {loc}: {message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def load_ablation(path: str | Path) -> AblationSpec:
    """Read and validate an ablation YAML file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"ablation file not found: {path}")
    raw = load_yaml_file(path)
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: an ablation file must be a mapping with name, base, variants, grid")
    try:
        return AblationSpec.model_validate(raw)
    except ValidationError as exc:
        raise HarnessError(format_validation_error(str(path), exc)) from None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key.path=value` items → {key.path: value}; values are parsed as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise HarnessError(f"bad --set {item!r}: expected key.path=value, e.g. train.epochs=2")
        try:
            result[key] = load_yaml(text, f"--set {key}") if text.strip() else None
        except HarnessError:
            raise HarnessError(f"bad --set {short_repr(item)}: the value is not valid YAML") from None
    return result


def _set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Deep-merge override into a copy of base; dotted keys in override are nested paths."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if "." in key:
            _set_path(merged, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _grid_with_overrides(spec: AblationSpec, overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid with `--set grid.<axis>=[...]` applied (those keys are popped from `overrides`)."""
    grid = dict(spec.grid)
    for key in [k for k in overrides if k.startswith("grid.")]:
        values = overrides.pop(key)
        axis = key.removeprefix("grid.")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise HarnessError(f"--set {key}: a grid axis needs at least one value")
        grid[axis] = values
    clash = sorted(set(overrides) & set(grid))
    if clash:
        raise HarnessError(
            f"--set {clash[0]} clashes with the grid axis of the same name: use --set grid.{clash[0]}=[...]"
        )
    return grid


def _check_overrides_keep_variants(spec: AblationSpec, overrides: dict[str, Any]) -> None:
    """`--set` applies to every run; where it would replace what a variant sets, the variants being compared
    would no longer be the ones declared, so that needs `override_variants`."""
    for variant, override in spec.variants.items():
        declared = flatten(override or {})
        for key, value in overrides.items():
            for path, own in declared.items():
                same_key = path == key
                related = path.startswith(key + ".") or key.startswith(path + ".")
                if (same_key and own != value) or related:
                    raise HarnessError(
                        f"--set {key}={short_repr(value)} would replace what variant {variant!r} sets "
                        f"({path}={short_repr(own)}): the variants would no longer be the ones the file "
                        "declares; pass --override-variants to do it anyway"
                    )


class _StudyRates:
    """`lr: {from_study: NAME}` resolved once per study, before any run is planned."""

    def __init__(self, storage: str | None) -> None:
        self.storage = storage
        self.rates: dict[str, float] = {}

    def resolve(self, config: RunConfig) -> str | None:
        lr = config.train.lr
        if not isinstance(lr, FromStudy):
            return None
        if lr.from_study not in self.rates:
            self.rates[lr.from_study] = best_lr_from_study(lr.from_study, self.storage)
        config.train.lr = self.rates[lr.from_study]
        return lr.from_study


def expand(
    spec: AblationSpec,
    overrides: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    source: str = "ablation",
    *,
    max_runs: int | None = None,
    override_variants: bool = False,
    storage: str | None = None,
) -> list[PlannedRun]:
    """Every (variant × grid point) run with its validated config, in file order: the one validation
    pass that `list`, `--dry-run`, `run`, `tune` and the Ray executor share.

    `overrides` come from `--set`: `grid.<axis>` keys replace a grid axis, every other key is applied
    to each run's config last (refused where a variant sets the key, unless `override_variants`).
    `data_root` (or the `coco_root` switch of harness.settings) fills `data.root` where unset.
    `lr: {from_study: NAME}` is resolved here from the Optuna `storage`, so the rate enters the config
    hash. More than `max_runs` (default MAX_RUNS) runs, or two runs with one config hash, are refused.
    """
    overrides = dict(overrides or {})
    grid = _grid_with_overrides(spec, overrides)
    if not override_variants:
        _check_overrides_keep_variants(spec, overrides)
    limit = MAX_RUNS if max_runs is None else max_runs
    total = len(spec.variants) * math.prod(len(values) for values in grid.values())
    if total > limit:
        raise HarnessError(f"{source}: the grid expands to {total:,} runs, more than {limit:,}: "
                           f"pass --max-runs {total} to run them all, or --only to choose")
    root = str(data_root) if data_root is not None else settings.current().coco_root
    axes = list(grid)
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*(grid[a] for a in axes))]
    rates = _StudyRates(storage)
    runs: list[PlannedRun] = []
    for variant, variant_override in spec.variants.items():
        for point in points:
            merged = merge(merge(merge(spec.base, variant_override), point), overrides)
            try:
                config = RunConfig.model_validate(merged)
            except ValidationError as exc:
                raise HarnessError(format_validation_error(f"{source}: variant {variant!r}", exc)) from None
            if data_root is not None and config.data.source == "coco":
                config.data.root = str(data_root)
            elif config.data.root is None and root and config.data.source == "coco":
                config.data.root = root
            study = rates.resolve(config)
            name = "/".join([variant, *(f"{k}={v}" for k, v in point.items())])
            runs.append(
                PlannedRun(
                    name=name, variant=variant, grid=point, config=config, config_hash=config_hash(config),
                    baseline=variant == spec.baseline_variant, lr_study=study,
                )
            )
    _check_distinct(runs, source)
    return runs


def _check_distinct(runs: list[PlannedRun], source: str) -> None:
    """Two planned runs with one config hash would train the same model under two names."""
    seen: dict[str, str] = {}
    for run in runs:
        if run.config_hash in seen:
            raise HarnessError(
                f"{source}: runs {seen[run.config_hash]!r} and {run.name!r} have the same config "
                f"(hash {run.config_hash}): they would train the same model; make them differ or drop one"
            )
        seen[run.config_hash] = run.name


def select(runs: list[PlannedRun], patterns: list[str] | None) -> list[PlannedRun]:
    """Runs whose variant or full name matches any glob in `patterns` (all runs when none)."""
    if not patterns:
        return runs
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.variant, p)
                                     for p in patterns)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(r.name, pattern) or fnmatch.fnmatchcase(r.variant, pattern) for r in runs):
            variants = sorted({r.variant for r in runs})
            raise HarnessError(f"--only {pattern!r} matches no run; variants: {', '.join(variants)}")
    return chosen


def shard(runs: list[PlannedRun], spec_text: str | None) -> list[PlannedRun]:
    """`--shard i/n`: the runs this worker takes (every n-th run, starting at i, 0-based)."""
    if not spec_text:
        return runs
    index_text, _, count_text = spec_text.partition("/")
    if not (index_text.isdigit() and count_text.isdigit()) or not 0 <= int(index_text) < int(count_text):
        raise HarnessError(f"bad --shard {spec_text!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    index, count = int(index_text), int(count_text)
    return [run for position, run in enumerate(runs) if position % count == index]


def resolve_lr(config: RunConfig) -> float:
    """A number, or the best rate of an Optuna study (`lr: {from_study: NAME}`)."""
    lr = config.train.lr
    if isinstance(lr, float | int):
        return float(lr)
    return best_lr_from_study(lr.from_study)
