"""One training run, read top to bottom: seed → model → optimizer → epochs (train, evaluate, checkpoint).

`fit` knows nothing of MLflow or Optuna: it reports each epoch to an `on_epoch` callback (which may
raise to stop, as a pruned trial does) and resumes from its own checkpoint file, which also holds the
resolved config. `train_step` is one optimisation step; `harness bench model` times the same function.

Selection and reporting are kept apart: val picks the epoch (best val_map), whose weights are kept; the
held-out sets (test, ood) are evaluated once, after training, with those weights, beside the chance
baseline (the label prior) on the headline set (test when there is one, else val).
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.allocator import steady_heap
from harness.checkpoints import load_resumable, save_checkpoint
from harness.config import RunConfig
from harness.data import BatchLoader, PreparedData
from harness.distributed import SINGLE, DistContext, barrier, gather_cat, mean_over_ranks
from harness.metrics import (
    HIGHER_IS_BETTER,
    average_precision,
    label_prior_metrics,
    mean_average_precision,
    multilabel_metrics,
)
from harness.models import ModelCost, build_network, measure_cost, offset_parameters
from harness.profiling import ProfileSummary, ProfileWindow
from harness.tracking import names

EpochCallback = Callable[[int, dict[str, float]], None]
StepCallback = Callable[[int, int], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class PeakMemory:
    """Samples this process's RSS in a background thread: the peak during a run, not the process's life."""

    def __init__(self, interval_s: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak_bytes = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


def build_optimizer(model: nn.Module, config: RunConfig, lr: float) -> torch.optim.Optimizer:
    """Main parameters at `lr`; offset/mask predictors at `lr * offset_lr_mult` (their own group)."""
    train = config.train
    offset_ids = {id(p) for p in offset_parameters(model)}
    main = [p for p in model.parameters() if id(p) not in offset_ids]
    groups: list[dict[str, Any]] = [{"params": main, "lr": lr, "name": "main"}]
    if offset_ids:
        groups.append(
            {"params": list(offset_parameters(model)), "lr": lr * train.offset_lr_mult, "name": "offsets"}
        )
    if train.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=train.weight_decay)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=train.momentum, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LRScheduler:
    train = config.train
    if train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
    if train.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def predict(
    model: nn.Module, loader: BatchLoader, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
    context: DistContext = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Sigmoid scores and targets of every rank's share (concatenated in rank order) and the mean BCE loss."""
    model.eval()
    scores, targets, loss_sum, count = [], [], 0.0, 0
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        loss_sum += F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum").item() / y.shape[1]
        count += y.shape[0]
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(y.cpu())
    loss = mean_over_ranks(loss_sum / max(count, 1), count, context)
    return gather_cat(torch.cat(scores), context), gather_cat(torch.cat(targets), context), loss


def evaluate(
    model: nn.Module, loader: BatchLoader, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
    context: DistContext = SINGLE,
) -> dict[str, float]:
    """Validation loss and every multi-label metric, as names.val_of names (over every rank's share of val)."""
    scores, targets, loss = predict(model, loader, amp_dtype, channels_last, context)
    metrics = multilabel_metrics(scores, targets)
    return {names.VAL_LOSS: loss, **{names.val_of(k): v for k, v in metrics.items()}}


@dataclass
class FitResult:
    """`summary` holds the run-level (step 0) metrics, the held-out ones among them; `per_class_ap` is
    the PER_CLASS_AP_ARTIFACT document of the selected epoch on the headline set."""

    history: list[dict[str, float]]
    summary: dict[str, float]
    profile: ProfileSummary | None
    model_summary: str
    resumed_from: int = 0
    per_class_ap: dict[str, Any] | None = None


@dataclass
class Selection:
    """The epoch the held-out sets are evaluated at: the first with the best val_map so far, and a CPU
    copy of its weights (kept in the checkpoint, so a resumed run evaluates the same weights)."""

    epoch: int = 0
    score: float = -math.inf
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, epoch: int, score: float, model: nn.Module) -> None:
        """Keep `model`'s weights when `score` beats every earlier epoch's."""
        if score > self.score or self.weights is None:
            self.epoch, self.score = epoch, score
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def summarise_history(history: list[dict[str, float]]) -> dict[str, float]:
    """Best and final of every val metric, the best epoch (by val/map) and epoch-time means: the run's
    step-0 summary (names.best_of, names.final_of)."""
    summary: dict[str, float] = {}
    if not history:
        return summary
    for key in history[-1]:
        if not key.startswith(names.VAL_PREFIX):
            continue
        values = [h[key] for h in history if key in h]
        higher = HIGHER_IS_BETTER.get(key.removeprefix(names.VAL_PREFIX), True)
        summary[names.best_of(key)] = max(values) if higher else min(values)
        summary[names.final_of(key)] = values[-1]
    best = max(range(len(history)), key=lambda i: history[i].get(names.VAL_MAP, -math.inf))
    summary[names.BEST_EPOCH] = float(history[best].get("epoch", best + 1))
    summary[names.MEAN_EPOCH_TIME] = float(np.mean([h[names.EPOCH_TIME] for h in history]))
    summary[names.MEAN_TRAIN_IMAGES_PER_S] = float(np.mean([h[names.TRAIN_IMAGES_PER_S] for h in history]))
    summary[names.TOTAL_DATA_WAIT] = float(np.sum([h[names.DATA_WAIT] for h in history]))
    return summary


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss: the run failed (its rate is too high, or its data is bad)."""


def check_finite(record: dict[str, float], epoch: int) -> None:
    """A non-finite train or val loss ends the run: no later epoch, checkpoint or metric is trusted."""
    for key in (names.TRAIN_LOSS, names.VAL_LOSS):
        if not math.isfinite(record[key]):
            raise DivergedError(f"diverged at epoch {epoch}: {key.replace('/', ' ')} is {record[key]}")


@dataclass
class Trainer:
    """What one optimisation step needs. `model` is the network itself (checkpoints, evaluation);
    `train_model` is what the step calls: the model, or DistributedDataParallel around it."""

    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    grad_clip: float | None = None


def wrap_for_training(model: nn.Module, device: torch.device, context: DistContext = SINGLE) -> nn.Module:
    """The module a training step calls: the model, or DistributedDataParallel around it under torchrun
    (which averages the ranks' gradients in backward)."""
    if not context.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def train_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step: forward under autocast, BCE loss, backward (scaled under fp16), optional gradient
    clipping, optimiser step. Returns the detached loss; a non-finite loss raises FloatingPointError."""
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    trainer.optimizer.zero_grad(set_to_none=True)
    amp = trainer.amp_dtype
    with torch.autocast(trainer.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = trainer.train_model(x)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    trainer.scaler.scale(loss).backward()
    if trainer.grad_clip:
        trainer.scaler.unscale_(trainer.optimizer)
        nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    return loss.detach()


def train_epoch(
    trainer: Trainer, loader: BatchLoader, epoch: int, window: ProfileWindow | None = None,
    on_step: StepCallback | None = None,
) -> tuple[float, int]:
    """Every step of one epoch (inside the profiler window when one is given): (sum of losses × batch, images)."""
    trainer.model.train()
    steps = len(loader)
    loss_sum, seen = 0.0, 0
    with window if window is not None else contextlib.nullcontext():
        for step, (x, y) in enumerate(loader, start=1):
            try:
                loss = train_step(trainer, x, y)
            except FloatingPointError as exc:
                raise DivergedError(f"diverged at epoch {epoch}: train {exc} at step {step}") from None
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            if window is not None:
                window.step()
            if on_step is not None:
                on_step(step, steps)
    return loss_sum, seen


def _loaders(
    config: RunConfig, data: PreparedData, generator: torch.Generator, device: torch.device, context: DistContext
) -> tuple[BatchLoader, BatchLoader]:
    """Train batches (each rank its share of every batch) and val batches (each rank its share of val)."""
    train = BatchLoader(
        data.train_images, data.train_targets, batch_size=max(1, config.train.batch_size // context.world_size),
        shuffle=True, hflip=config.data.hflip, random_resized_crop=config.data.random_resized_crop,
        generator=generator, device=device, rank=context.rank, world_size=context.world_size,
    )
    return train, _eval_loader(config, data.val_images, data.val_targets, device, context)


def _eval_loader(
    config: RunConfig, images: torch.Tensor, targets: torch.Tensor, device: torch.device, context: DistContext
) -> BatchLoader:
    """Evaluation batches in a fixed order, each rank its share (rows rank, rank + world size, …)."""
    return BatchLoader(
        images[context.rank :: context.world_size], targets[context.rank :: context.world_size],
        batch_size=max(config.train.batch_size, 64), shuffle=False, hflip=False, device=device,
    )


def _checkpoint_state(
    epoch: int, config: RunConfig, trainer: Trainer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator, history: list[dict[str, float]], profile: ProfileSummary | None,
    selection: Selection,
) -> dict[str, Any]:
    """Tensors and plain data only: the checkpoint is read back with weights_only=True."""
    return {
        "epoch": epoch, "config": config.model_dump(mode="json"), "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
        "profile": profile.to_dict() if profile is not None else None, "scaler": trainer.scaler.state_dict(),
        "selected_epoch": selection.epoch, "selected_score": selection.score, "selected_model": selection.weights,
    }


def _restore(
    path: Path, trainer: Trainer, scheduler: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
    selection: Selection,
) -> tuple[int, list[dict[str, float]], ProfileSummary | None]:
    """Load the run's newest readable checkpoint into the training state and `selection`: (last epoch,
    history, profile summary); (0, [], None) when there is none (an unreadable one is moved aside with a
    warning). A checkpoint without selected weights offers its own epoch's as the first candidate."""
    state = load_resumable(path, map_location=trainer.device)
    if state is None:
        return 0, [], None
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    profile = ProfileSummary.from_dict(state["profile"]) if state.get("profile") else None
    history = [names.with_logged_names(record) for record in state["history"]]  # older checkpoints: flat names
    if state.get("selected_model") is not None:
        selection.epoch, selection.score = int(state["selected_epoch"]), float(state["selected_score"])
        selection.weights = {k: v.cpu() for k, v in state["selected_model"].items()}
    elif history:
        selection.offer(int(state["epoch"]), history[-1].get(names.VAL_MAP, -math.inf), trainer.model)
    return int(state["epoch"]), history, profile


def build_trainer(
    config: RunConfig, num_classes: int, lr: float, device: torch.device, context: DistContext = SINGLE
) -> Trainer:
    """The network of `config` on `device` with its optimiser, gradient scaler and precision settings."""
    model = build_network(config.model, num_classes)
    model.to(device)
    if config.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return Trainer(
        model=model, train_model=wrap_for_training(model, device, context),
        optimizer=build_optimizer(model, config, lr),
        scaler=torch.amp.GradScaler(device.type, enabled=config.train.amp == "fp16"), device=device,
        amp_dtype=AMP_DTYPES.get(config.train.amp), channels_last=config.train.channels_last,
        grad_clip=config.train.grad_clip,
    )


def fit(
    config: RunConfig,
    data: PreparedData,
    *,
    lr: float,
    device: torch.device,
    checkpoint_path: Path | None = None,
    trace_dir: Path | None = None,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    context: DistContext = SINGLE,
) -> FitResult:
    """Train one configuration on prepared data and return its per-epoch history and summary.

    Under torchrun (`context.enabled`) every rank calls this: the model is wrapped in DDP, each rank
    trains on its share of every batch, only rank 0 writes the checkpoint and calls `on_epoch`. After
    the last epoch the selected (best val_map) weights are evaluated on the held-out sets
    (`evaluate_selected`); their metrics join the summary.
    """
    steady_heap()  # epoch times measure compute, not page faults (see harness.allocator)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.seed)
    trainer = build_trainer(config, data.num_classes, lr, device, context)
    cost = measure_cost(trainer.model, config.data.image_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    scheduler = build_scheduler(trainer.optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader, val_loader = _loaders(config, data, generator, device, context)

    history: list[dict[str, float]] = []
    profile: ProfileSummary | None = None
    resumed_from = 0
    selection = Selection()
    if checkpoint_path is not None:
        resumed_from, history, profile = _restore(checkpoint_path, trainer, scheduler, generator, selection)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_train = data.train_images.shape[0]
    with PeakMemory() as memory:
        for epoch in range(resumed_from + 1, config.train.epochs + 1):
            profiled = profile is None and trace_dir is not None and context.is_main
            window = ProfileWindow(config.profile, trace_dir, len(train_loader)) if profiled else None
            started = time.perf_counter()
            loss_sum, seen = train_epoch(trainer, train_loader, epoch, window, on_step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - started
            if window is not None and window.summary is not None:
                profile = window.summary
            record = {
                "epoch": float(epoch),
                names.TRAIN_LOSS: mean_over_ranks(loss_sum / max(seen, 1), seen, context),
                **evaluate(trainer.model, val_loader, trainer.amp_dtype, trainer.channels_last, context),
                names.EPOCH_TIME: epoch_time,
                names.TRAIN_IMAGES_PER_S: n_train / epoch_time if epoch_time > 0 else 0.0,
                names.DATA_WAIT: float(train_loader.wait_seconds),
                names.LR: trainer.optimizer.param_groups[0]["lr"],
            }
            check_finite(record, epoch)
            history.append(record)
            selection.offer(epoch, record[names.VAL_MAP], trainer.model)
            scheduler.step()
            if checkpoint_path is not None and config.train.checkpoint and context.is_main:
                state = _checkpoint_state(epoch, config, trainer, scheduler, generator, history, profile, selection)
                save_checkpoint(state, checkpoint_path)
            barrier(context)  # no rank runs ahead of the checkpoint
            if on_epoch is not None and context.is_main:
                on_epoch(epoch, record)

    held_out, per_class_ap = evaluate_selected(config, data, trainer, selection, context)
    result = _result(config, trainer, history, profile, memory.peak_bytes, cost, resumed_from)
    result.summary.update(held_out)
    result.per_class_ap = per_class_ap
    return result


def _result(
    config: RunConfig, trainer: Trainer, history: list[dict[str, float]], profile: ProfileSummary | None,
    peak_bytes: int, cost: ModelCost, resumed_from: int,
) -> FitResult:
    """The run's summary metrics (history, memory, size, profile) and its model summary text."""
    summary = summarise_history(history)
    summary[names.PEAK_RSS_MB] = peak_bytes / 2**20
    if trainer.device.type == "cuda":
        summary[names.PEAK_CUDA_MB] = torch.cuda.max_memory_allocated(trainer.device) / 2**20
    summary[names.PARAMS] = float(cost.params)
    summary[names.FLOPS_PER_IMAGE] = float(cost.flops_per_image)
    if profile is not None:
        summary[names.PROFILE_DEFORM_SHARE] = profile.deform_share
        summary[names.PROFILE_STEP_MS] = profile.step_ms
    model_summary = (
        f"{trainer.model}\n\nparameters: {cost.params:,}\nforward FLOPs per image at {config.data.image_size}px: "
        f"{cost.flops_per_image:,}\ndeformable conv layers: {trainer.model.deform_indices}\n"
    )
    return FitResult(history, summary, profile, model_summary, resumed_from)


SIZE_LIMITS = (32.0**2, 96.0**2)  # COCO's area rule: small below 32², medium below 96², large above


def size_buckets(areas: np.ndarray) -> np.ndarray:
    """Index into names.OBJECT_SIZES of each area (COCO's rule); -1 for NaN (an image without objects)."""
    buckets = np.searchsorted(np.asarray(SIZE_LIMITS), np.asarray(areas, dtype=np.float64), side="right")
    return np.where(np.isnan(areas), -1, buckets)


def _rank_order(n: int, context: DistContext) -> torch.Tensor:
    """Which row of a set each row of `predict`'s output is (rank shares concatenated in rank order)."""
    rows = torch.arange(n)
    return torch.cat([rows[r :: context.world_size] for r in range(context.world_size)])


def per_class_ap_document(split: str, epoch: int, classes: list[str], scores: torch.Tensor,
                          targets: torch.Tensor) -> dict[str, Any]:
    """The PER_CLASS_AP_ARTIFACT JSON: AP per class (null without a positive) and its positive count."""
    ap = average_precision(scores.double(), targets.double())
    return {
        "split": split, "epoch": epoch, "classes": classes,
        "ap": [None if math.isnan(v) else float(v) for v in ap.tolist()],
        "support": [int(v) for v in targets.sum(0).tolist()],
    }


def evaluate_selected(
    config: RunConfig, data: PreparedData, trainer: Trainer, selection: Selection, context: DistContext = SINGLE,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Held-out metrics at the selected epoch (step 0 of the run) and the per-class AP document.

    test/ and ood/ metrics for the sets `data` has; chance/ ones (the label prior of train) and the mAP per
    dominant object size (COCO data only: the synthetic objects' areas are not COCO pixel areas) on the
    headline set, test when there is one, else val. Every rank takes part (the scores are gathered).
    """
    if selection.weights is None:
        return {}, None
    trainer.model.load_state_dict(selection.weights)
    sets = {"val": (data.val_images, data.val_targets, names.val_of),
            "test": (data.test_images, data.test_targets, names.test_of),
            "ood": (data.ood_images, data.ood_targets, names.ood_of)}
    headline = "test" if data.test_images is not None else "val"
    summary: dict[str, float] = {names.SELECTED_EPOCH: float(selection.epoch)}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for which, (images, targets, name_of) in sets.items():
        if images is None or targets is None or (which == "val" and headline != "val"):
            continue
        loader = _eval_loader(config, images, targets, trainer.device, context)
        scores, gathered, loss = predict(trainer.model, loader, trainer.amp_dtype, trainer.channels_last, context)
        order = _rank_order(images.shape[0], context)
        outputs[which] = (scores[order.argsort()], gathered[order.argsort()])
        if which != "val":
            summary[name_of("loss")] = loss
            summary.update({name_of(k): v for k, v in multilabel_metrics(scores, gathered).items()})
    scores, targets = outputs[headline]
    name_of = sets[headline][2]
    summary.update({names.chance_of(k): v for k, v in label_prior_metrics(data.train_targets, targets).items()})
    if config.data.source == "coco":
        buckets = size_buckets(data.largest_areas(headline))
        for index, size in enumerate(names.OBJECT_SIZES):
            rows = torch.from_numpy(buckets == index)
            if rows.any():
                value = mean_average_precision(scores[rows], targets[rows])
                summary[names.by_size(name_of("map"), size)] = float(value)
    document = per_class_ap_document(headline, selection.epoch, data.class_names, scores, targets)
    return summary, document
