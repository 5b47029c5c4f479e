"""Runs that start together on one data subset log it as a dataset input at the same moment: on a
tracking server with a PostgreSQL back end all but one insert fails on the dataset's unique key; the
harness tries again and every run records its input."""

from __future__ import annotations

import threading

from mlflow.entities import Dataset, DatasetInput
from mlflow.tracking import MlflowClient

from harness.tracking.artifacts import log_datasets
from harness.tracking.store import ChildRun

ROUNDS = 8


def test_runs_logging_one_new_dataset_at_once_all_record_it(mlflow_server) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("datasets-race")
    errors: list[BaseException] = []
    runs = []
    for round_ in range(ROUNDS):
        dataset = Dataset(name="coco/train2017", digest=f"race{round_:04d}", source_type="local", source="{}")
        pair = [ChildRun(client, client.create_run(experiment).info.run_id) for _ in range(3)]
        runs += pair
        barrier = threading.Barrier(len(pair))

        def log(run: ChildRun, dataset: Dataset = dataset, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                log_datasets(run, [DatasetInput(dataset)])
            except BaseException as exc:  # reported below, with the round
                errors.append(exc)

        threads = [threading.Thread(target=log, args=(run,)) for run in pair]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[:2]
    for run in runs:
        inputs = client.get_run(run.run_id).inputs.dataset_inputs
        assert [i.dataset.digest for i in inputs] == [f"race{runs.index(run) // 3:04d}"]
