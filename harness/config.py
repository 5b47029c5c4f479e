"""The configuration of one training run and of a search, as plain data (pydantic models), and its identity.

A `RunConfig` is everything one run depends on; `config_hash` is its stable identity (what resume and
"already FINISHED" key on). Behaviour lives in the functions that take these models, not in them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.errors import HarnessError
from harness.models import MODELS, arch_names, check_network, known_arch


class Strict(BaseModel):
    """Unknown keys and non-finite numbers (.inf, .nan) are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Range = tuple[float, float]


class SyntheticGeometry(Strict):
    """Ranges the synthetic objects' geometry is drawn from (`harness.data.synth.Geometry`, same defaults).

    rotation in degrees; scale: radius as a fraction of the object's layout cell; stretch: axis ratio
    (>= 1); warp: elastic displacement relative to the radius.
    """

    rotation: Range = (0.0, 360.0)
    scale: Range = (0.2, 0.46)
    stretch: Range = (1.0, 1.8)
    warp: Range = (0.0, 0.16)

    @model_validator(mode="after")
    def _ordered(self) -> SyntheticGeometry:
        for name, minimum in (("rotation", None), ("scale", 0.001), ("stretch", 1.0), ("warp", 0.0)):
            low, high = getattr(self, name)
            if low > high or (minimum is not None and low < minimum):
                at_least = f" and low >= {minimum}" if minimum is not None else ""
                raise ValueError(f"{name} must be [low, high] with low <= high{at_least}, given [{low}, {high}]")
        return self


class SyntheticConfig(Strict):
    """The generated geometry task (`harness data synth`), used when data.source is synthetic.

    train, val and data.test_size's test subset draw from `train_geometry`; `n_ood` images drawn from
    `ood_geometry` are the out-of-distribution set (both or neither).
    """

    n_train: Annotated[int, Field(ge=8)] = 2000
    n_val: Annotated[int, Field(ge=8)] = 500
    seed: int = 0
    train_geometry: SyntheticGeometry = SyntheticGeometry()
    n_ood: Annotated[int, Field(ge=0)] = 0
    ood_geometry: SyntheticGeometry | None = None

    @model_validator(mode="after")
    def _ood_pair(self) -> SyntheticConfig:
        if (self.n_ood > 0) != (self.ood_geometry is not None):
            raise ValueError(f"n_ood ({self.n_ood}) and ood_geometry go together: set both (n_ood > 0) or neither")
        return self


class DataConfig(Strict):
    source: Literal["coco", "synthetic"] = "coco"
    root: str | None = None
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_size: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, le=1)] | None = None
    val_size: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, le=1)] | None = None
    test_size: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, le=1)] | None = None
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
    """The network: `arch` is unet_encoder, small3, resnet18/34/50 or `package.module:factory` (docs/models.md);
    the deformable convs are chosen by `deform_layers` or by `deform_modules` (module-name globs)."""

    arch: str = "unet_encoder"
    width: Annotated[float, Field(gt=0, le=4)] = 0.25
    deform_layers: str | list[int] | list[str] = "none"
    deform_modules: list[str] = Field(default_factory=list)
    offset_channels: Literal["shared", "per_tap"] = "per_tap"
    modulated: bool = False
    offset_groups: Annotated[int, Field(ge=1)] = 1
    backend: Literal["native", "torchvision"] = "native"
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    pretrained: str | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if not known_arch(value):
            raise ValueError(f"unknown arch {value!r}; known: {', '.join(arch_names())}")
        return value

    @model_validator(mode="after")
    def _placement_fits_the_network(self) -> ModelConfig:
        """The placement names convs the chosen network has and can make deformable ("first:99" on 11 layers,
        a glob that matches nothing, a 7×7 conv are errors here), checked on a weightless copy."""
        try:
            check_network(self)
        except HarnessError as exc:
            raise ValueError(f"{exc} ({self.arch})") from None
        if self.arch not in MODELS:  # what is declared is what runs: no key the network would ignore
            for key in ("width", "dropout"):
                if getattr(self, key) != ModelConfig.model_fields[key].default:
                    raise ValueError(f"{key} applies to the harness's own networks ({', '.join(MODELS)}), "
                                     f"not to {self.arch}")
        return self



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
    log_checkpoint: Literal["auto"] | bool = "auto"  # upload last.pt as a run artifact (auto: under 50 MB)
    system_metrics: bool = False  # MLflow's system/ metrics (CPU, memory, GPU) sampled into the run
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


# The validation metrics `fit` reports each epoch: what a search may optimise (docs/tuning.md). Spelled as
# before metric names had prefixes; harness.tracking.names.logged_name maps val_map to the logged val/map.
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
EXECUTION_KEYS = ("profile", "analysis", "train.device", "train.threads", "train.checkpoint", "train.log_checkpoint",
                  "train.channels_last", "train.system_metrics")


def _drop_path(data: dict[str, Any], dotted: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.get(key, {})
    node.pop(keys[-1], None)


# Keys added after runs were first stored, with their defaults: at the default they are left out of the
# identity hash, so the runs a store already FINISHED keep their identity.
LATER_KEY_DEFAULTS: dict[str, Any] = {
    "data.test_size": None,
    "data.synthetic.train_geometry": SyntheticGeometry().model_dump(mode="json"),
    "data.synthetic.n_ood": 0,
    "data.synthetic.ood_geometry": None,
    "model.deform_modules": [],
    "model.pretrained": None,
}


def _get_path(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def config_hash(config: RunConfig) -> str:
    """Stable 12-hex-digit identity of what a run computes (execution-only keys and later keys at their
    defaults left out)."""
    data = config.model_dump(mode="json")
    for key in EXECUTION_KEYS:
        _drop_path(data, key)
    for key, default in LATER_KEY_DEFAULTS.items():
        if _get_path(data, key) == default:
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
