"""Fan an ablation grid out over a Ray cluster: one Ray task per planned run.

Each task asks for the CPUs/GPUs its config needs, trains through the same `harness.execution.run_one`
as the local runner and logs to the shared MLflow store itself. Ray re-runs a task whose worker died
(`max_retries`); the retry resumes from the run's epoch checkpoint into the same MLflow run, and a
run that already FINISHED (same config hash) is skipped, so nothing is counted twice. Checkpoints and
caches live under the results directory on each node; a retry on a node that lacks the checkpoint
downloads the run's checkpoint artifact, so no shared disk is needed. The tracking store must be a
server or database every node reaches.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.data import DataCache
from harness.devices import resolve_device
from harness.distributed import SINGLE
from harness.errors import HarnessError, one_line
from harness.execution import RunnerEvents, RunnerOptions, run_one
from harness.planning import PlannedRun
from harness.tracking import names
from harness.tracking.environment import environment_tags, source_tags
from harness.tracking.store import AblationStore
from harness.tracking.uri import absolute_uri, resolve_uri

MAX_RETRIES = 3


def _task(run_json: str, ablation: dict[str, str], options: dict[str, Any], parent_id: str) -> dict[str, Any]:
    """Runs inside a Ray worker: train one planned run (or skip it if it already FINISHED)."""
    run = PlannedRun.model_validate_json(run_json)
    runner_options = RunnerOptions(**{**options, "results_dir": Path(options["results_dir"])})
    store = AblationStore(runner_options.tracking_uri, ablation["name"], ablation["description"], ablation["baseline"])
    if run.config_hash in store.finished_hashes():
        return {"status": "skipped", "reason": "already FINISHED with this config hash", "summary": {}, "run_id": ""}
    device = resolve_device(runner_options.device or run.config.train.device)
    env = {**environment_tags(device), **source_tags(f"harness run {runner_options.source_file}".strip())}
    env[names.EXECUTOR] = f"ray ({socket.gethostname()}, pid {os.getpid()})"
    outcome = run_one(
        run, 0, store, parent_id, env, device, DataCache(runner_options.results_dir), runner_options, RunnerEvents(),
        SINGLE,
    )
    return {"status": outcome.status, "reason": outcome.reason, "summary": outcome.summary, "run_id": outcome.run_id}


def run_on_ray(
    runs: list[PlannedRun],
    ablation: dict[str, str],
    options: RunnerOptions,
    parent_id: str,
    address: str | None,
    on_done: Callable[[PlannedRun, dict[str, Any]], None],
) -> None:
    """Submit every run as a Ray task and report each outcome as it completes."""
    try:
        import ray
    except ImportError:
        raise HarnessError("--executor ray needs Ray: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise HarnessError(f"cannot reach a Ray cluster at {address!r}: {one_line(exc, with_type=False)}") from None
    task_options = {
        "tracking_uri": absolute_uri(resolve_uri(options.tracking_uri)),
        "device": options.device,
        "profile": options.profile,
        "results_dir": str(Path(options.results_dir).resolve()),
        "source_file": options.source_file,
    }
    remote = ray.remote(_task)
    pending: dict[Any, PlannedRun] = {}
    for run in runs:
        train = run.config.train
        device = options.device or train.device
        gpus = 1 if device == "cuda" or (device == "auto" and _cluster_has_gpus(ray)) else 0
        ref = remote.options(num_cpus=train.threads or 1, num_gpus=gpus, max_retries=MAX_RETRIES).remote(
            run.model_dump_json(), ablation, task_options, parent_id
        )
        pending[ref] = run
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            run = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the task failed for good (retries used up)
                cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries what the task raised
                result = {"status": "failed", "reason": f"Ray task failed: {one_line(cause)}", "summary": {},
                          "run_id": ""}
            on_done(run, result)


def _cluster_has_gpus(ray: Any) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
