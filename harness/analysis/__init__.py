"""Why deformable convolution helps: robustness, sampling locations, offset statistics, receptive fields.

- `robustness`: val metrics under controlled rotation, scale, stretch and shear.
- `sampling`: layer geometry and the learned sampling points, composed through consecutive layers.
- `offsets`: |Δp|, effective dilation and tap spread per deformable layer, by object size and background.
- `erf`: gradient-based effective receptive fields.
- `pipeline`: analyse a trained run and log into its MLflow run (`harness eval`).
- `section`: the report's HTML section, read from MLflow only.

docs/analysis.md lists every number and name.
"""

from __future__ import annotations

import os
from typing import Any

ANALYSIS_ENV = "HARNESS_ANALYSIS"


def analysis_requested(config: Any) -> bool:
    """Post-training analysis is on when the config says so (`analysis.enabled`) or $HARNESS_ANALYSIS=1."""
    section = getattr(config, "analysis", None)
    return bool(getattr(section, "enabled", False)) or os.environ.get(ANALYSIS_ENV) == "1"


def post_training_analysis(
    child: Any, config: Any, data: Any, checkpoint: Any, device: Any, run: Any, distributed: bool = False
) -> None:
    """The runner's hook after a run's results are logged: analyse its checkpoint into the same MLflow run.

    A no-op unless `analysis_requested(config)`. Never fails the run: an error is recorded in the tag
    `harness.analysis_failure` (rerun it with `harness eval`). Skipped under torchrun (the other ranks
    would wait at the next barrier); run `harness eval` afterwards.
    """
    if not analysis_requested(config):
        return
    if distributed:
        child.set_tags({"harness.analysis_failure": "skipped under torchrun; run harness eval"})
        return
    if not getattr(config.train, "checkpoint", True) or not checkpoint.is_file():
        child.set_tags({"harness.analysis_failure": "no checkpoint to analyse (train.checkpoint: false)"})
        return
    from harness.analysis.pipeline import after_training

    try:
        after_training(child, config, data, checkpoint, device, run.name, getattr(run, "group", ""))
    except Exception as exc:  # the training result stands; the analysis can be redone with harness eval
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
        child.set_tags({"harness.analysis_failure": reason})
