"""Data-parallel training: `harness run --nproc 2` under torchrun with the gloo backend on CPU, and the
gradient synchronisation of a data-parallel step (this file also runs as that step's worker process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from harness.data import BatchLoader


def test_loader_shards_cover_every_sample_once_per_epoch():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(10, dtype=torch.uint8)
    targets = torch.zeros(10, 2)
    seen = []
    for rank in range(3):
        g = torch.Generator().manual_seed(7)
        loader = BatchLoader(images, targets, batch_size=2, hflip=False, generator=g, rank=rank, world_size=3,
                             mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
        assert len(loader) == 2  # ceil(10 / 3) = 4 samples per rank, 2 batches
        seen += [int(v) for x, _ in loader for v in x[:, 0, 0, 0].round()]
    assert sorted(set(seen)) == list(range(10))
    assert len(seen) == 12  # padded with 2 repeats, like DistributedSampler


def test_two_process_gloo_run_logs_once(tmp_path, synth_root):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    file = tmp_path / "ddp.yaml"
    file.write_text(f"""
name: ddp
base:
  data: {{source: coco, root: "{synth_root}", image_size: 32}}
  model: {{arch: small3, deform_layers: "first:1"}}
  train: {{epochs: 2, batch_size: 16, lr: 0.003}}
variants:
  deform: {{}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "harness", "run", str(file), "--tracking-uri", uri, "--results-dir",
         str(tmp_path / "results"), "--nproc", "2", "--no-profile"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ddp")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'child'")
    assert len(runs) == 1, "only rank 0 logs"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/map")] == [1, 2]
    assert run.data.metrics["data/train_images"] == 64
    assert 0 <= run.data.metrics["best/val/map"] <= 1


# --- gradient synchronisation ---------------------------------------------------------------------------
# Two gloo processes, started with the environment torchrun gives them, each build the harness's trainer
# (`build_trainer`, which wraps the model with `wrap_for_training`) and take optimizer steps with
# `train_step` on their own half of each batch. With gradients averaged across the ranks, every rank ends
# with the same weights, equal to one process stepping on the whole (concatenated) batch.

WORLD, BATCH, STEPS, LR = 2, 8, 2, 0.2


def _step_config(deform: str = "first:1"):
    from harness.config import RunConfig

    return RunConfig.model_validate({
        "seed": 3,
        "model": {"arch": "small3", "deform_layers": deform, "dropout": 0.0},
        "train": {"optimizer": "sgd", "momentum": 0.9, "lr": LR, "weight_decay": 1e-3, "offset_lr_mult": 0.5},
    })


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g), (torch.rand(BATCH, 5, generator=g) < 0.4).float())
            for _ in range(STEPS)]


def _trained_weights(mode: str, context, shard: slice) -> dict[str, torch.Tensor]:
    """The parameters after STEPS steps of `train_step` from the seeded initial model, in `mode`.

    In "eval" mode batch norm uses its running statistics, so every sample's loss is independent of
    the others and the averaged gradients equal the whole batch's. In "train" mode each rank's batch
    norm normalises by its own half (DDP without SyncBatchNorm), so the reference steps on the two
    halves' losses averaged, each half normalised by its own statistics.
    """
    from harness.train import build_trainer, seed_everything, train_step

    config = _step_config()
    seed_everything(config.seed)
    trainer = build_trainer(config, num_classes=5, lr=LR, device=torch.device("cpu"), context=context)
    trainer.model.train(mode == "train")
    for x, y in _batches():
        if mode == "train" and not context.enabled:  # the single-process reference for per-rank BN
            trainer.optimizer.zero_grad(set_to_none=True)
            loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(trainer.model(x[h]), y[h])
                       for h in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH))) / 2
            loss.backward()
            trainer.optimizer.step()
        else:
            train_step(trainer, x[shard], y[shard])
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _rank_main(out_dir: str) -> None:
    """One rank (RANK/WORLD_SIZE/MASTER_* in the environment, as torchrun sets them)."""
    from harness.distributed import init_from_env, shutdown

    torch.set_num_threads(1)
    context = init_from_env("cpu")
    assert context.world_size == WORLD
    per_rank = BATCH // WORLD
    shard = slice(context.rank * per_rank, (context.rank + 1) * per_rank)
    weights = {mode: _trained_weights(mode, context, shard) for mode in ("eval", "train")}
    torch.save(weights, Path(out_dir) / f"rank{context.rank}.pt")
    shutdown(context)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_data_parallel_step_synchronises_gradients(tmp_path):
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(WORLD), "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        from harness.distributed import SINGLE
        from harness.train import build_trainer, seed_everything

        torch.set_num_threads(1)
        seed_everything(_step_config().seed)
        initial = {n: p.detach().clone() for n, p in build_trainer(
            _step_config(), num_classes=5, lr=LR, device=torch.device("cpu")).model.named_parameters()}
        reference = {mode: _trained_weights(mode, SINGLE, slice(None)) for mode in ("eval", "train")}
        for proc in procs:
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, output[-3000:]
    finally:
        for proc in procs:  # a rank left waiting for a failed peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for mode in ("eval", "train"):
        moved = max((reference[mode][n] - initial[n]).abs().max().item() for n in initial)
        assert moved > 1e-2, "the steps should change the weights"
        for name, ref in reference[mode].items():
            assert torch.equal(ranks[0][mode][name], ranks[1][mode][name]), f"{mode} {name}: ranks differ"
            torch.testing.assert_close(ranks[0][mode][name], ref, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, mode=mode, name=name: f"{mode} {name}: {m}")


if __name__ == "__main__":
    _rank_main(sys.argv[1])
