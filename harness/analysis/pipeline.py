"""The analysis of one trained run: load it, compute every part, log the results into its MLflow run.

`analyze_model` does the computing (no MLflow): robustness under transforms, offset statistics,
sampling-location figures and the effective receptive field, written as files into a directory and
returned with the metrics. `analyze_runs` is what `harness eval` calls: for each FINISHED child run it
loads its checkpoint (`harness.checkpoints.checkpoint_path` of the run's config hash), takes the
resolved config saved in it (else the run's `config.yaml` artifact, else its params), rebuilds the
network, prepares the run's val subset exactly as the runner did, analyses, and logs metrics, artifacts
and the tag `harness.analysis` into the same run (which stays FINISHED). `post_training_analysis` is
the runner's optional hook after training (`analysis.enabled`).
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from harness.analysis import erf as erf_mod
from harness.analysis import offsets as offsets_mod
from harness.analysis import plots
from harness.analysis import robustness as robust_mod
from harness.analysis.sampling import ConvGeometry, capture_offsets, compose_points, conv_geometry, default_chain
from harness.checkpoints import find_checkpoint, load_checkpoint
from harness.config import RunConfig
from harness.data import BatchLoader, DataCache, PreparedData, denormalize
from harness.devices import resolve_device
from harness.errors import HarnessError, one_line
from harness.figures import fig_to_png
from harness.models import build_network
from harness.tracking import names
from harness.tracking.artifacts import fetch_checkpoint
from harness.tracking.store import ChildRun, attach_run, find_finished_runs, log_artifact_dir, read_run_text

PARTS = ("robustness", "offsets", "sampling", "erf")
Progress = Callable[[str, int, int], None]


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    return None


@dataclass
class AnalysisOptions:
    """What to compute and on how much data."""

    parts: Sequence[str] = PARTS
    families: Mapping[str, Sequence[float]] = field(default_factory=lambda: dict(robust_mod.FAMILIES))
    sampling_images: int = 3  # val images drawn in the sampling figure (two positions each)
    erf_images: int = 64  # val images averaged in the ERF (0: all)
    offset_images: int = 0  # val images for the offset statistics (0: all)
    chain: Sequence[int] | None = None  # conv indices composed in the sampling figure (default: top 2 deformable)
    batch_size: int | None = None  # default: max(train.batch_size, 64), as the runner's val loader

    def __post_init__(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise HarnessError(f"unknown analysis part {unknown[0]!r}; choose from {', '.join(PARTS)}")
        if self.sampling_images < 1 or self.erf_images < 0 or self.offset_images < 0:
            raise HarnessError("sampling images must be >= 1; ERF and offset image counts >= 0 (0 = all)")


@dataclass
class AnalysisResult:
    metrics: dict[str, float]
    files: Path  # directory holding the artifacts (its content goes under analysis/ in MLflow)
    robustness: pd.DataFrame | None = None
    offsets: offsets_mod.OffsetStats | None = None
    erf: erf_mod.ErfResult | None = None
    chain: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- computing


def val_loader(
    config: RunConfig, data: PreparedData, device: torch.device, batch_size: int | None = None
) -> BatchLoader:
    """The val loader `harness.train.fit` evaluates with (no augmentation, same batch size, same order)."""
    return BatchLoader(
        data.val_images, data.val_targets, batch_size=batch_size or max(config.train.batch_size, 64),
        shuffle=False, hflip=False, device=device,
    )


def _images(loader: BatchLoader, count: int) -> torch.Tensor:
    n = int(loader.images.shape[0]) if count <= 0 else min(count, int(loader.images.shape[0]))
    x, _ = loader.batch(torch.arange(n), augment=False)
    return x


def _u8(x: torch.Tensor) -> np.ndarray:
    return denormalize(x.unsqueeze(0).float().cpu()).clamp(0, 255).round().byte()[0].permute(1, 2, 0).numpy()


def _positions(
    boxes: np.ndarray, labels: np.ndarray, top: ConvGeometry, out_hw: tuple[int, int], image_size: int,
    class_names: Sequence[str],
) -> list[tuple[np.ndarray, str]]:
    """Output positions of the top layer to draw: the centre of the largest object and a background spot."""
    out: list[tuple[np.ndarray, str]] = []
    ho, wo = out_hw
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) if len(boxes) else np.zeros(0)
    if len(boxes) and areas.max() > 0:
        k = int(np.argmax(areas))
        x0, y0, x1, y1 = boxes[k]
        centre = np.array([(y0 + y1) / 2 - 0.5, (x0 + x1) / 2 - 0.5])  # image index coordinates
        q = np.clip(np.round(top.image_to_out(centre)), 0, [ho - 1, wo - 1])
        size = offsets_mod.REGIONS[offsets_mod.box_region(areas[k] / image_size**2)]
        name = class_names[int(labels[k])] if int(labels[k]) < len(class_names) else str(labels[k])
        out.append((q, f"on {name} ({size})"))
    regions = offsets_mod.region_map(boxes, top, out_hw, image_size)
    background = np.argwhere(regions == 0)
    if len(background):
        # the background spot farthest from objects and from the border (Chebyshev distance, output units)
        objects = np.argwhere(regions != 0)
        border = np.minimum(np.minimum(background[:, 0], ho - 1 - background[:, 0]),
                            np.minimum(background[:, 1], wo - 1 - background[:, 1]))
        if len(objects):
            dist = np.min(np.abs(background[:, None, :] - objects[None, :, :]).max(-1), axis=1)
            score = np.minimum(dist, border + 1)
        else:
            score = border
        pick = background[int(np.argmax(score))]
        out.append((pick.astype(np.float64), "on background"))
    return out


def sampling_panels(
    model: nn.Module, data: PreparedData, loader: BatchLoader, chain: Sequence[int], count: int
) -> list[plots.SamplingPanel]:
    """Panels for the first `count` val images with a box: the largest object's centre and a background spot."""
    geometry = conv_geometry(model, data.image_size)
    boxes = data.boxes("val")
    chosen = [i for i, (b, _) in enumerate(boxes) if len(b) and ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).max() > 0]
    chosen = (chosen or list(range(len(boxes))))[:count]
    if not chosen:
        return []
    x, _ = loader.batch(torch.tensor(chosen), augment=False)
    captured = capture_offsets(model, x, chain)
    top = geometry[max(chain)]
    panels = []
    for row, index in enumerate(chosen):
        fields = {layer: off[row, 0].double().cpu().numpy() for layer, (off, _) in captured.items()}
        out_hw = captured[max(chain)][0].shape[-2:] if max(chain) in captured else _out_hw(model, x[:1], top)
        image = _u8(x[row])
        for q, label in _positions(boxes[index][0], boxes[index][1], top, tuple(out_hw), data.image_size,
                                   data.class_names):
            fixed = compose_points(geometry, chain, q)
            learned = compose_points(geometry, chain, q, fields)
            slot = 1 if label == "on background" else 0
            panels.append(plots.SamplingPanel(image, fixed, learned, f"val image {index}: {label}", row, slot))
    return panels


def _out_hw(model: torch.nn.Module, x: torch.Tensor, layer: ConvGeometry) -> tuple[int, int]:
    shapes: dict[str, tuple[int, int]] = {}
    handle = layer.module.register_forward_hook(lambda _m, _a, out: shapes.setdefault("hw", tuple(out.shape[-2:])))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return shapes["hw"]


def _robustness_part(model: nn.Module, loader: BatchLoader, options: AnalysisOptions, out_dir: Path,
                     result: AnalysisResult, progress: Progress) -> None:
    frame = robust_mod.robustness(
        model, loader, options.families, progress=lambda d, t: progress("robustness", d, t)
    )
    frame.to_csv(out_dir / names.ANALYSIS_ROBUSTNESS, index=False)
    result.metrics.update(robust_mod.robustness_metrics(frame))
    result.robustness = frame


def _offsets_part(model: nn.Module, data: PreparedData, loader: BatchLoader, geometry: list[ConvGeometry],
                  options: AnalysisOptions, out_dir: Path, title: str, result: AnalysisResult,
                  progress: Progress) -> None:
    progress("offset statistics", 0, 1)
    images = _images(loader, options.offset_images)
    boxes = [b for b, _ in data.boxes("val")][: images.shape[0]]
    stats = offsets_mod.offset_statistics(model, images, boxes, data.image_size, loader.batch_size)
    stats.table.to_csv(out_dir / names.ANALYSIS_OFFSET_STATS, index=False)
    hist = stats.histogram_frame()
    hist.to_csv(out_dir / names.ANALYSIS_OFFSET_HIST, index=False)
    series = {
        f"conv{layer} ({'per-tap' if geometry[layer].module.offset_channels == 'per_tap' else 'shared'})":
        (part["bin_lo"].to_numpy(), part["count"].to_numpy())
        for layer, part in hist.groupby("layer")
    }
    fig = plots.histogram_figure(series, f"|Δp| per deformable layer — {title}" if title else "")
    (out_dir / names.ANALYSIS_OFFSET_HIST_PLOT).write_bytes(fig_to_png(fig))
    result.metrics.update(stats.metrics())
    result.offsets = stats
    progress("offset statistics", 1, 1)


def _sampling_part(model: nn.Module, data: PreparedData, loader: BatchLoader, geometry: list[ConvGeometry],
                   options: AnalysisOptions, out_dir: Path, title: str, result: AnalysisResult,
                   progress: Progress) -> None:
    chain = list(options.chain) if options.chain else default_chain(geometry)
    bad = [i for i in chain if i >= len(geometry)]
    if bad:
        raise HarnessError(f"--chain conv{bad[0]}: the network has conv0..conv{len(geometry) - 1}")
    progress("sampling locations", 0, 1)
    panels = sampling_panels(model, data, loader, chain, options.sampling_images)
    if panels:
        kinds = ", ".join(
            f"conv{i} {'deformable ' + geometry[i].module.offset_channels if geometry[i].deformable else 'fixed'}"
            for i in sorted(chain)
        )
        fig = plots.sampling_figure(panels, chain, f"{title}: sampling locations ({kinds})" if title else kinds)
        (out_dir / names.ANALYSIS_SAMPLING_PLOT).write_bytes(fig_to_png(fig, dpi=120))
        points = [
            {"label": p.label, "fixed": [lvl.tolist() for lvl in p.fixed],
             "learned": [lvl.tolist() for lvl in p.learned]}
            for p in panels
        ]
        (out_dir / names.ANALYSIS_SAMPLING_POINTS).write_text(json.dumps({"chain": chain, "panels": points}))
    result.chain = chain
    progress("sampling locations", 1, 1)


def _erf_part(model: nn.Module, loader: BatchLoader, options: AnalysisOptions, out_dir: Path, title: str,
              result: AnalysisResult, progress: Progress) -> None:
    progress("effective receptive field", 0, 1)
    images = _images(loader, options.erf_images)
    erf = erf_mod.effective_receptive_field(model, images, batch_size=min(loader.batch_size, 32))
    np.save(out_dir / names.ANALYSIS_ERF_MAP, erf.map.astype(np.float32))
    fig = plots.erf_figure(
        [erf.map], [f"{title or 'ERF'}"], [erf.centre],
        f"ERF of conv{erf.layer}'s centre unit, {erf.images} val images; RMS radius {erf.rms_radius:.1f} px",
    )
    (out_dir / names.ANALYSIS_ERF_PLOT).write_bytes(fig_to_png(fig))
    result.metrics.update(erf.metrics())
    result.erf = erf
    progress("effective receptive field", 1, 1)


def analyze_model(
    model: nn.Module,
    config: RunConfig,
    data: PreparedData,
    device: torch.device,
    out_dir: Path,
    options: AnalysisOptions | None = None,
    progress: Progress = _no_progress,
    title: str = "",
) -> AnalysisResult:
    """Compute every requested part for a trained `model`; write artifacts into `out_dir`."""
    options = options or AnalysisOptions()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    loader = val_loader(config, data, device, options.batch_size)
    geometry = conv_geometry(model, data.image_size)
    deformable = [g.index for g in geometry if g.deformable]
    result = AnalysisResult({}, out_dir)

    if "robustness" in options.parts:
        _robustness_part(model, loader, options, out_dir, result, progress)

    if "offsets" in options.parts and deformable:
        _offsets_part(model, data, loader, geometry, options, out_dir, title, result, progress)
    elif "offsets" in options.parts:
        result.notes.append("no deformable layers: no offset statistics")

    if "sampling" in options.parts and deformable:
        _sampling_part(model, data, loader, geometry, options, out_dir, title, result, progress)
    elif "sampling" in options.parts:
        result.notes.append("no deformable layers: no sampling-location figure")

    if "erf" in options.parts:
        _erf_part(model, loader, options, out_dir, title, result, progress)
    return result


# ------------------------------------------------------------------------------------ loading a run


def _unflatten(params: Mapping[str, str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, text in params.items():
        if key.startswith(names.PREFIX):  # the harness's own bookkeeping (claims), not config keys
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError:
            node[parts[-1]] = text
    return nested


def run_config(
    saved: Mapping[str, Any] | None, config_text: str | None, params: Mapping[str, str], run_name: str
) -> RunConfig:
    """The run's resolved config: the one saved in its checkpoint, else its config.yaml artifact, else
    rebuilt from its params."""
    try:
        if saved is not None:
            return RunConfig.model_validate(saved)
        if config_text is not None:
            return RunConfig.model_validate(yaml.safe_load(config_text))
        if params:
            return RunConfig.model_validate(_unflatten(params))
    except (ValidationError, yaml.YAMLError) as exc:
        raise HarnessError(f"run {run_name}: its config does not validate: {one_line(exc, with_type=False)}") from None
    raise HarnessError(f"run {run_name} has neither a config.yaml artifact nor params to rebuild its config from")


def build_model(config: RunConfig, num_classes: int) -> nn.Module:
    """The run's network as training built it, without pretrained weights (the checkpoint replaces them)."""
    return build_network(config.model, num_classes, load_pretrained_weights=False)


def read_checkpoint(checkpoint: Path, run_name: str) -> dict[str, Any]:
    """A run's checkpoint (tensors and plain data only); a one-line error when it is missing or unreadable."""
    if not checkpoint.is_file():
        raise HarnessError(_no_checkpoint(run_name, checkpoint))
    try:
        return load_checkpoint(checkpoint)
    except HarnessError:
        raise
    except Exception as exc:  # truncated file, not a checkpoint, or one that holds objects (not loaded)
        reason = one_line(exc, with_type=False).removeprefix("Weights only load failed. ")
        raise HarnessError(f"checkpoint {checkpoint} of run {run_name} cannot be loaded: {reason}") from None


def load_trained(config: RunConfig, num_classes: int, state: Mapping[str, Any], checkpoint: Path,
                 run_name: str) -> nn.Module:
    """The trained network: `config`'s architecture with the checkpoint's weights."""
    model = build_model(config, num_classes)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as exc:
        raise HarnessError(f"checkpoint {checkpoint} of run {run_name} cannot be loaded: "
                           f"{one_line(exc, with_type=False)}") from None
    return model


def _no_checkpoint(run_name: str, checkpoint: Path) -> str:
    return (f"run {run_name} has no checkpoint at {checkpoint} (trained with another --results-dir, "
            "or with train.checkpoint: false?)")


@dataclass
class RunAnalysis:
    run_id: str
    name: str
    result: AnalysisResult


def analyze_runs(
    ref: str,
    tracking_uri: str | None = None,
    results_dir: Path = Path("results"),
    options: AnalysisOptions | None = None,
    device: str = "cpu",
    data_root: Path | None = None,
    progress: Progress = _no_progress,
    on_run: Callable[[int, int, str], None] | None = None,
) -> list[RunAnalysis]:
    """`harness eval REF`: analyse every finished run `ref` names and log the results into it.

    Every run is checked (config, checkpoint) before any is analysed, so a bad reference costs nothing.
    """
    options = options or AnalysisOptions()
    records = find_finished_runs(tracking_uri, ref)
    torch_device = resolve_device(device)
    plans = []
    for record in records:
        handle = attach_run(tracking_uri, record.run_id)
        config_hash = record.tags.get(names.CONFIG_HASH)
        if not config_hash:
            raise HarnessError(f"run {record.name} ({record.run_id}) has no {names.CONFIG_HASH} tag")
        local = find_checkpoint(results_dir, record.experiment, config_hash)
        checkpoint = fetch_checkpoint(handle, local, tracking_uri)  # from the run's artifacts when not local
        state = read_checkpoint(checkpoint, record.name)
        saved = state.get("config")
        config_text = None if saved is not None else read_run_text(handle, names.CONFIG_ARTIFACT)
        config = run_config(saved, config_text, record.params, record.name)
        if data_root is not None and config.data.source == "coco":
            config.data.root = str(data_root)
        plans.append((record, handle, config, checkpoint, state))

    cache = DataCache(results_dir)
    done = []
    for position, (record, handle, config, checkpoint, state) in enumerate(plans):
        if on_run is not None:
            on_run(position, len(plans), record.name)
        data = cache.get(config.data, progress)
        model = load_trained(config, data.num_classes, state, checkpoint, record.name)
        title = record.tags.get(names.GROUP) or record.name
        with tempfile.TemporaryDirectory(prefix="harness-analysis-") as tmp:
            result = analyze_model(model, config, data, torch_device, Path(tmp), options, progress, title)
            log_analysis(handle, result, options, data)
        done.append(RunAnalysis(record.run_id, record.name, result))
    return done


def log_analysis(handle: ChildRun, result: AnalysisResult, options: AnalysisOptions, data: PreparedData) -> None:
    """Metrics (step 0), artifacts under analysis/ and the tag harness.analysis into one run."""
    handle.log_metrics(result.metrics, step=0)
    if any(result.files.iterdir()):
        log_artifact_dir(handle, result.files, names.ANALYSIS_ARTIFACT_DIR)
    handle.set_tags({names.ANALYSIS: json.dumps({
        "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "parts": list(options.parts),
        "val_images": int(data.val_images.shape[0]),
        "chain": result.chain,
        "families": {k: list(v) for k, v in robust_mod.check_families(options.families).items()},
        "notes": result.notes,
    })})


def post_training_analysis(
    handle: ChildRun, config: RunConfig, data: PreparedData, checkpoint: Path, device: torch.device, name: str,
    title: str = "", distributed: bool = False,
) -> None:
    """The runner's hook after a run's results are logged: analyse its checkpoint into the same MLflow run.

    A no-op unless `analysis.enabled`. Never fails the run: an error is recorded in the tag
    `harness.analysis_failure` (rerun it with `harness eval`). Skipped under torchrun (the other ranks
    would wait at the next barrier); run `harness eval` afterwards.
    """
    if not config.analysis.enabled:
        return
    if distributed:
        handle.set_tags({names.ANALYSIS_FAILURE: "skipped under torchrun; run harness eval"})
        return
    if not config.train.checkpoint or not checkpoint.is_file():
        handle.set_tags({names.ANALYSIS_FAILURE: "no checkpoint to analyse (train.checkpoint: false)"})
        return
    try:
        options = AnalysisOptions()
        model = load_trained(config, data.num_classes, read_checkpoint(checkpoint, name), checkpoint, name)
        with tempfile.TemporaryDirectory(prefix="harness-analysis-") as tmp:
            result = analyze_model(model, config, data, device, Path(tmp), options, title=title or name)
            log_analysis(handle, result, options, data)
    except Exception as exc:  # the training result stands; the analysis can be redone with harness eval
        handle.set_tags({names.ANALYSIS_FAILURE: one_line(exc)})
