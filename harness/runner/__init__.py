"""Running ablations: every planned run of an ablation file, locally, under torchrun, or as Ray tasks.

- `ablation`: `run_ablation`, the grid in turn (rank 0 leads under torchrun, the other ranks follow).
- `ray_executor`: one Ray task per run.
"""

from harness.execution import RunnerEvents, RunnerOptions, RunOutcome
from harness.runner.ablation import run_ablation

__all__ = ["RunOutcome", "RunnerEvents", "RunnerOptions", "run_ablation"]
