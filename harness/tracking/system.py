"""MLflow's system metrics (names.SYSTEM_PREFIX: CPU, memory, disk, network, GPU) sampled into a run
while it trains, when `train.system_metrics` asks for them: the UI then charts what the machine did."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from harness.tracking.store import ChildRun


@contextlib.contextmanager
def system_metrics(run: ChildRun, enabled: bool) -> Iterator[None]:
    """Sample the machine into `run` while the body runs (every MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    seconds, 10 by default), and once more at its end, so a run shorter than the interval has a sample too;
    a resumed run continues its earlier steps. Nothing when not `enabled`."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, resume_logging=True, tracking_uri=run.client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        with contextlib.suppress(Exception):  # a lost last sample is not a failure of the run
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
