"""Two-process DDP pretraining on CPU (gloo), run as real subprocesses.

Lightning's ``strategy="ddp"`` starts rank 1 by running the command line of rank 0 again, so each
test starts a command. One runs the ``lensminer`` CLI. The other runs this file as a script
(``python test_pretrain_ddp.py STORE RUN_DIR OUT_DIR``), which trains with a callback that saves
every step's queue on every rank.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.models.encoder import load_encoder

# 16 rows in 2 shards of 8: each of the 2 ranks reads one shard, 2 batches of 4 per epoch.
N_ROWS, BATCH, WORLD = 16, 4, 2
AUGMENT = AugmentConfig(crop_size=32, jitter=2)
CONFIG = PretrainConfig(
    backbone="resnet18",
    projection_dim=8,
    batch_size=BATCH,
    queue_size=16,
    epochs=2,
    seed=11,
    accelerator="cpu",
    devices=WORLD,
    strategy="ddp",
)
STEPS = 2 * N_ROWS // (BATCH * WORLD)
TIMEOUT_S = 300


def _environment() -> dict[str, str]:
    """Return the environment of a DDP command: one thread, rendezvous on a free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "lo" in {name for _, name in socket.if_nameindex()}:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


class _QueueRecorder(pl.Callback):
    """Save each step's queue, queue pointer, rows and eval-mode keys on every rank.

    The key encoder runs in eval mode, so BatchNorm uses running statistics and each image's
    key does not depend on which images share its shuffled sub-batch. The recorder then embeds
    the step's key views itself and gathers them in rank order: these are the keys the queue
    must hold, column for column.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.encoder_k.eval()
        self._pointer = int(pl_module.queue_ptr)
        self._view_k = pl_module._views(batch)[1]
        self._rows = batch.row_index.clone()

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        keys = pl_module.encoder_k(self._view_k)[1].float().contiguous()
        parts = [torch.empty_like(keys) for _ in range(trainer.world_size)]
        torch.distributed.all_gather(parts, keys)
        self.steps.append(
            {
                "pointer": self._pointer,
                "next_pointer": int(pl_module.queue_ptr),
                "queue": pl_module.queue.detach().clone(),
                "keys": torch.cat(parts),
                "rows": self._rows,
            }
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        record = {"steps": self.steps, "history": pl_module.history}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _train_recorded(store_url: str, run_dir: str, out_dir: str) -> None:
    """Script entry point: train CONFIG under DDP and save each rank's record in ``out_dir``."""
    from lensminer.pretrain import pretrain

    recorder = _QueueRecorder(Path(out_dir))
    pretrain(store_url, run_dir, CONFIG, AUGMENT, callbacks=[recorder])


def test_ddp_cli_run(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    run_dir = tmp_path / "run"
    blob_store(str(run_dir / "cutouts.zarr"))
    lensminer = Path(sys.executable).with_name("lensminer")
    sets = {
        "pretrain.strategy": "ddp",
        "pretrain.devices": WORLD,
        "pretrain.accelerator": "cpu",
        "pretrain.backbone": "resnet18",
        "pretrain.projection_dim": 8,
        "pretrain.batch_size": BATCH,
        "pretrain.queue_size": 16,
        "pretrain.epochs": 2,
        "augment.crop_size": 32,
        "augment.jitter": 2,
    }
    options = [part for key, value in sets.items() for part in ("--set", f"{key}={value}")]
    done = _run([str(lensminer), "pretrain", "--run-dir", str(run_dir), *options], tmp_path)

    # Each rank reads half the rows, so 2 epochs take STEPS steps, not twice as many.
    assert f"after {STEPS} steps" in " ".join(done.stdout.split())  # rich wraps long lines
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "checkpoints",
        "cutouts.zarr",
        "encoder.pt",
    ]
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]

    encoder = load_encoder(str(run_dir / "encoder.pt"))
    assert encoder.metadata["extra"]["steps"] == STEPS
    assert len(encoder.metadata["extra"]["losses"]) == 2
    assert all(np.isfinite(encoder.metadata["extra"]["losses"]))
    with torch.no_grad():
        _, projection = encoder(torch.rand(2, 3, 32, 32))
    assert projection.shape == (2, 8)


def test_ddp_queue_and_keys(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    store_url = blob_store(str(tmp_path / "cutouts.zarr"))
    run_dir, out_dir = tmp_path / "run", tmp_path / "records"
    out_dir.mkdir()
    _run([sys.executable, __file__, store_url, str(run_dir), str(out_dir)], tmp_path)

    records = [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    steps = [record["steps"] for record in records]
    assert [len(rank_steps) for rank_steps in steps] == [STEPS, STEPS]
    assert records[0]["history"] == records[1]["history"]
    assert load_encoder(str(run_dir / "encoder.pt")).metadata["extra"]["steps"] == STEPS

    for index, (first, second) in enumerate(zip(*steps, strict=True)):
        assert torch.equal(first["queue"], second["queue"]), f"queues differ after step {index}"
        assert first["queue"].dtype == torch.float32
        assert first["next_pointer"] == (first["pointer"] + WORLD * BATCH) % CONFIG.queue_size
        assert second["next_pointer"] == first["next_pointer"]
        assert torch.equal(first["keys"], second["keys"])

        # Columns [pointer, pointer + W * B) hold rank 0's keys, then rank 1's, in batch order.
        pointer = first["pointer"]
        enqueued = first["queue"][:, pointer : pointer + WORLD * BATCH].T
        torch.testing.assert_close(
            enqueued, first["keys"], atol=1e-5, rtol=0, msg=f"keys of step {index}"
        )
        assert not set(first["rows"].tolist()) & set(second["rows"].tolist())

    # Without a magnitude column every OK row is drawn once per epoch, split between the ranks.
    per_epoch = STEPS // 2
    for epoch in range(2):
        rows = [
            row
            for rank_steps in steps
            for step in rank_steps[epoch * per_epoch : (epoch + 1) * per_epoch]
            for row in step["rows"].tolist()
        ]
        assert sorted(rows) == list(range(N_ROWS)), f"epoch {epoch} rows"


if __name__ == "__main__":
    _train_recorded(*sys.argv[1:4])
