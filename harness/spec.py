"""Ablation files: the YAML schema (pydantic), `--set` overrides, and expansion into runs.

An ablation has a `base` config, named `variants` (partial overrides of base) and an optional `grid`
of axes (dotted keys → value lists) expanded as a cartesian product with every variant. Each expanded
run's identity is a stable hash of its resolved config, which is what resume keys on.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import HarnessError
from harness.models import MODELS

DATA_ROOT_ENV = "HARNESS_COCO_ROOT"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(Strict):
    """The generated geometry task (`harness data synth`), used when data.source is synthetic."""

    n_train: Annotated[int, Field(ge=8)] = 2000
    n_val: Annotated[int, Field(ge=8)] = 500
    seed: int = 0


class DataConfig(Strict):
    source: Literal["coco", "synthetic"] = "coco"
    root: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_size: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, le=1)] | None = None
    val_size: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, le=1)] | None = None
    subset_seed: int = 0
    image_size: Annotated[int, Field(ge=32, le=1024)] = 64
    resize: Literal["squash", "center-crop", "letterbox"] = "squash"
    drop_empty: bool = False
    include_crowd: bool = True
    strict_images: bool = False
    hflip: bool = True
    random_resized_crop: tuple[float, float] | None = None
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("random_resized_crop")
    @classmethod
    def _crop_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError(f"random_resized_crop must be (low, high) with 0 < low <= high <= 1, given {value}")
        return value


class ModelConfig(Strict):
    arch: str = "unet_encoder"
    width: Annotated[float, Field(gt=0, le=4)] = 0.25
    deform_layers: str | list[int] = "none"
    offset_channels: Literal["shared", "per_tap"] = "per_tap"
    modulated: bool = False
    offset_groups: Annotated[int, Field(ge=1)] = 1
    backend: Literal["native", "torchvision"] = "native"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value not in MODELS:
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(sorted(MODELS))}")
        return value


class FromStudy(Strict):
    """`lr: {from_study: NAME}`: train with the best learning rate an Optuna study found."""

    from_study: str


class TrainConfig(Strict):
    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 32
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Field(gt=0)] | FromStudy = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_size: Annotated[int, Field(ge=1)] = 10
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    offset_lr_mult: Annotated[float, Field(ge=0)] = 1.0
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: Annotated[int, Field(ge=1)] | None = None
    checkpoint: bool = True
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False


class ProfileConfig(Strict):
    enabled: bool = True
    wait: Annotated[int, Field(ge=0)] = 1
    warmup: Annotated[int, Field(ge=0)] = 1
    active: Annotated[int, Field(ge=1)] = 3
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False
    top_n: Annotated[int, Field(ge=1)] = 25


class AnalysisConfig(Strict):
    """After training, analyse the run (`harness eval`): robustness, offsets, sampling points, ERF."""

    enabled: bool = False


class RunConfig(Strict):
    """Everything one training run depends on."""

    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    profile: ProfileConfig = ProfileConfig()
    analysis: AnalysisConfig = AnalysisConfig()


# The validation metrics `fit` reports each epoch: what a search may optimise (docs/tuning.md).
SEARCH_METRICS = (
    "val_loss", "val_map", "val_micro_f1", "val_micro_precision", "val_micro_recall", "val_macro_f1",
    "val_macro_precision", "val_macro_recall", "val_cp", "val_cr", "val_cf1", "val_op", "val_or", "val_of1",
)


class FloatRange(Strict):
    """A searched float: `{low, high, log}` (log-uniform by default)."""

    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (low is {self.low}); set log: false to search from 0")
        return self

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


class IntChoices(Strict):
    """A searched integer picked from a list: `{choices: [16, 32, 64]}`."""

    choices: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]

    @field_validator("choices")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"choices must be distinct, given {value}")
        return value

    def contains(self, value: float) -> bool:
        return value in self.choices


class Objective(Strict):
    """What a trial scores: the best value over epochs of one validation metric."""

    metric: str = "val_map"
    direction: Literal["maximize", "minimize"] | None = None  # default: minimize val_loss, maximize the rest

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in SEARCH_METRICS:
            raise ValueError(f"unknown metric {value!r}; valid: {', '.join(SEARCH_METRICS)}")
        return value

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        if self.direction is not None:
            return self.direction
        return "minimize" if self.metric == "val_loss" else "maximize"


def _named(value: Any) -> Any:
    """`median` is short for `{name: median}` (samplers and pruners)."""
    return {"name": value} if isinstance(value, str) else value


class SamplerSpec(Strict):
    name: Literal["tpe"] = "tpe"
    seed: int = 0
    n_startup_trials: Annotated[int, Field(ge=0)] = 10

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _named(value)


class MedianPrunerSpec(Strict):
    name: Literal["median"] = "median"
    n_startup_trials: Annotated[int, Field(ge=0)] = 5
    n_warmup_steps: Annotated[int, Field(ge=0)] = 0
    interval_steps: Annotated[int, Field(ge=1)] = 1


class HyperbandPrunerSpec(Strict):
    name: Literal["hyperband"]
    min_resource: Annotated[int, Field(ge=1)] = 1
    max_resource: Annotated[int, Field(ge=1)] | None = None  # default: train.epochs
    reduction_factor: Annotated[int, Field(ge=2)] = 3


class NoPrunerSpec(Strict):
    name: Literal["none"]


PrunerSpec = Annotated[MedianPrunerSpec | HyperbandPrunerSpec | NoPrunerSpec, Field(discriminator="name")]


class SearchSpec(Strict):
    """The `search:` section: one Optuna study per variant (and non-seed grid point), `harness tune`."""

    lr: FloatRange
    weight_decay: FloatRange | None = None
    batch_size: IntChoices | None = None
    offset_lr_mult: FloatRange | None = None
    objective: Objective = Objective()
    n_trials: Annotated[int, Field(ge=1)] = 20
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = MedianPrunerSpec()
    enqueue: list[dict[str, float]] = Field(default_factory=list)

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_shorthand(cls, value: Any) -> Any:
        return _named(value)

    @property
    def space(self) -> dict[str, FloatRange | IntChoices]:
        """The searched train.* keys and their ranges, in a fixed order (lr first)."""
        names = ("lr", "weight_decay", "batch_size", "offset_lr_mult")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @model_validator(mode="after")
    def _enqueued_in_space(self) -> SearchSpec:
        space = self.space
        for index, params in enumerate(self.enqueue):
            for key, value in params.items():
                if key not in space:
                    raise ValueError(f"enqueue[{index}]: {key!r} is not searched (searched: {', '.join(space)})")
                if not space[key].contains(value):
                    raise ValueError(f"enqueue[{index}]: {key}={value:g} is outside its range")
        return self


# Keys that change how a run executes but not what it computes: left out of the identity hash.
_EXECUTION_KEYS = ("profile", "analysis", "train.device", "train.threads", "train.checkpoint", "train.channels_last")


class AblationSpec(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
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
                raise ValueError(f"variant name {variant!r} may hold only letters, digits, '_', '-' and '.'")
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
    import re

    return re.match(pattern, text) is not None


class PlannedRun(BaseModel):
    """One expanded run: a variant at one grid point, with its resolved config and identity."""

    name: str
    variant: str
    grid: dict[str, Any]
    config: RunConfig
    config_hash: str
    baseline: bool = False

    @property
    def group(self) -> str:
        """Variant plus the non-seed grid axes: what a report row averages over seeds."""
        parts = [f"{k}={v}" for k, v in self.grid.items() if k != "seed"]
        return " · ".join([self.variant, *parts])


def _format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if "input" in first and first["type"] not in ("model_type",):
            message += f" (given {first['input']!r})"
    more = len(exc.errors()) - 1
    return f"{source}: {loc}: {message}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def load_ablation(path: str | Path) -> AblationSpec:
    """Read and validate an ablation YAML file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"ablation file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HarnessError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: an ablation file must be a mapping with name, base, variants, grid")
    try:
        return AblationSpec.model_validate(raw)
    except ValidationError as exc:
        raise HarnessError(_format_validation_error(str(path), exc)) from None


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key.path=value` items → {key.path: value}; values are parsed as YAML scalars/lists."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise HarnessError(f"bad --set {item!r}: expected key.path=value, e.g. train.epochs=2")
        try:
            result[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise HarnessError(f"bad --set {item!r}: the value is not valid YAML") from None
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


def _merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """Deep-merge override into a copy of base; dotted keys in override are nested paths."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if "." in key:
            _set_path(merged, key, copy.deepcopy(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _drop_path(data: dict[str, Any], dotted: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.get(key, {})
    node.pop(keys[-1], None)


def config_hash(config: RunConfig) -> str:
    """Stable 12-hex-digit identity of what a run computes (execution-only keys left out)."""
    data = config.model_dump(mode="json")
    for key in _EXECUTION_KEYS:
        _drop_path(data, key)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} → {'train.lr': 1e-3} (lists and None kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def expand(
    spec: AblationSpec,
    overrides: dict[str, Any] | None = None,
    data_root: str | Path | None = None,
    source: str = "ablation",
) -> list[PlannedRun]:
    """Every (variant × grid point) run with its validated config, in file order.

    `overrides` come from `--set`: `grid.<axis>` keys replace a grid axis, every other key is applied
    to each run's config last. `data_root` (or $HARNESS_COCO_ROOT) fills `data.root` where unset.
    """
    overrides = dict(overrides or {})
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

    root = str(data_root) if data_root is not None else os.environ.get(DATA_ROOT_ENV)
    axes = list(grid)
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*(grid[a] for a in axes))]
    runs: list[PlannedRun] = []
    for variant, variant_override in spec.variants.items():
        for point in points:
            merged = _merge(_merge(_merge(spec.base, variant_override), point), overrides)
            try:
                config = RunConfig.model_validate(merged)
            except ValidationError as exc:
                raise HarnessError(_format_validation_error(f"{source}: variant {variant!r}", exc)) from None
            if data_root is not None and config.data.source == "coco":
                config.data.root = str(data_root)
            elif config.data.root is None and root and config.data.source == "coco":
                config.data.root = root
            name = "/".join([variant, *(f"{k}={v}" for k, v in point.items())])
            runs.append(
                PlannedRun(
                    name=name, variant=variant, grid=point, config=config, config_hash=config_hash(config),
                    baseline=variant == spec.baseline_variant,
                )
            )
    return runs


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
