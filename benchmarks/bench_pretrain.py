"""Benchmark of MoCo pretraining throughput against the bare model compute of the same step.

Three timings per step on the same batch size, after warm-up steps:

1. ``pretrain``: the whole training step through :func:`lensminer.pretrain.pretrain` on a
   synthetic FITS cutout store (3 x 152 x 152 float32): shard reads, two augmented views, query
   forward and backward, key forward, momentum update, queue and Lightning's loop.
2. ``moco_compute``: the model work of one MoCo step on views already in memory (query forward
   and backward, key forward, momentum update, SGD step).
3. ``forward_backward``: the query encoder's forward and backward alone.

The overhead of the pipeline is ``pretrain / moco_compute - 1``; the target is below 15 %.

With ``--gz-decals FOLDER`` it then pretrains on the Galaxy Zoo DECaLS colour PNGs in FOLDER
(``catalog.csv`` with ``png`` and ``ring`` columns), written as a uint8 RGB cutout store resized
to 152 px. It reports the loss of the first and last epoch, and the k-NN accuracy on ``ring``
against a randomly initialised encoder of the same architecture.

Run from the repository root::

    .venv/bin/python benchmarks/bench_pretrain.py --rows 512 --batch 32 --steps 12 \
        --gz-decals ../shared/data/gz-decals --epochs 10

Results go to standard output as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from astropy.table import Table
from PIL import Image

from lensminer import stores
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.datasets import load_labelled_subset
from lensminer.models.moco import info_nce_loss, labelled_knn_accuracy, momentum_update
from lensminer.models.encoder import build_encoder
from lensminer.pretrain import pretrain

WARMUP_STEPS = 3


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now


def _make_store(url: str, rows: int) -> None:
    layout = stores.CutoutLayout("grz", 152, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i}" for i in range(rows)],
        ra=np.zeros(rows),
        dec=np.zeros(rows),
        layout=layout,
        shard_rows=64,
        chunk_rows=16,
    )
    rng = np.random.default_rng(0)
    for shard in range(stores.shard_count(rows, 64)):
        block = stores.shard_slice(shard, rows, 64)
        count = block.stop - block.start
        group["images"][block] = rng.normal(0, 0.01, (count, 3, 152, 152)).astype(np.float32)
        group["status"][block] = np.ones(count, np.uint8)
        stores.mark_shard_done(group, shard)


def _gz_decals_store(url: str, folder: Path, size: int) -> int:
    """Write the PNGs of a Galaxy Zoo DECaLS folder as a JPEG-layout cutout store; return rows."""
    catalog = Table.read(folder / "catalog.csv", format="ascii.csv")
    images = np.stack(
        [
            np.asarray(
                Image.open(folder / str(name)).convert("RGB").resize((size, size), Image.BILINEAR)
            )
            for name in catalog["png"]
        ]
    ).transpose(0, 3, 1, 2)
    rows = len(catalog)
    layout = stores.CutoutLayout("grz", size, 0.262, "jpeg", "gz-decals", "file://gz-decals")
    group = stores.create_cutout_store(
        url,
        target_id=[str(name) for name in catalog["iauname"]],
        ra=np.zeros(rows),
        dec=np.zeros(rows),
        layout=layout,
        shard_rows=64,
        chunk_rows=16,
        columns={"label": np.asarray(catalog["ring"], dtype=np.int8)},
    )
    group["images"][:] = images
    group["status"][:] = np.ones(rows, np.uint8)
    for shard in range(stores.shard_count(rows, 64)):
        stores.mark_shard_done(group, shard)
    return rows


def _gz_decals_run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = PretrainConfig(
        backbone=args.backbone,
        batch_size=args.batch,
        queue_size=args.batch * 8,
        epochs=args.epochs,
        accelerator="cpu",
        knn_k=20,
        seed=0,
    )
    augment = AugmentConfig()
    with tempfile.TemporaryDirectory() as run_folder:
        url = str(Path(run_folder) / "gz.zarr")
        rows = _gz_decals_store(url, folder, 152)
        start = time.perf_counter()
        result = pretrain(url, str(Path(run_folder) / "run"), config, augment)
        seconds = time.perf_counter() - start

        # The same architecture and seed as the run's initial weights, without training.
        pl.seed_everything(config.seed, verbose=False)
        untrained = build_encoder(config).to(memory_format=torch.channels_last)
        subset = load_labelled_subset(url, max_rows=config.knn_max_rows, seed=config.seed)
        random_accuracy = labelled_knn_accuracy(
            untrained,
            subset,
            image_format="jpeg",
            bands="grz",
            augment=augment,
            k=config.knn_k,
            seed=config.seed,
        )
    return {
        "rows": rows,
        "epochs": result.epochs,
        "steps": result.steps,
        "seconds": seconds,
        "loss_first_epoch": result.losses[0],
        "loss_last_epoch": result.losses[-1],
        "knn_ring_accuracy_per_epoch": result.knn_accuracy,
        "knn_ring_accuracy_random_init": random_accuracy,
    }


def _time(step, repeats: int) -> float:
    for _ in range(WARMUP_STEPS):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="Cutouts in the synthetic store.")
    parser.add_argument("--batch", type=int, default=32, help="Batch size.")
    parser.add_argument("--steps", type=int, default=12, help="Timed steps of each path.")
    parser.add_argument("--backbone", default="resnet18", help="resnet18, resnet34 or resnet50.")
    parser.add_argument(
        "--gz-decals", type=Path, default=None, help="Galaxy Zoo DECaLS folder to pretrain on."
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="Epochs of the Galaxy Zoo DECaLS run."
    )
    args = parser.parse_args()

    config = PretrainConfig(
        backbone=args.backbone,
        batch_size=args.batch,
        queue_size=args.batch * 32,
        epochs=1,
        max_steps=args.steps + WARMUP_STEPS + 1,
        accelerator="cpu",
    )
    augment = AugmentConfig()

    # 1. The whole pipeline.
    with tempfile.TemporaryDirectory() as folder:
        url = str(Path(folder) / "cutouts.zarr")
        _make_store(url, args.rows)
        timer = _StepTimer()
        pretrain(url, str(Path(folder) / "run"), config, augment, callbacks=[timer])
        pipeline = float(np.median(timer.seconds[WARMUP_STEPS:]))

    # 2-3. The model compute alone, on views already in memory.
    torch.manual_seed(0)
    query_encoder = build_encoder(config).to(memory_format=torch.channels_last)
    key_encoder = build_encoder(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        query_encoder.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4
    )
    views = [
        torch.rand(args.batch, 3, 96, 96).contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    ]
    queue = F.normalize(torch.randn(config.projection_dim, config.queue_size), dim=0)

    def moco_step() -> None:
        optimizer.zero_grad()
        _, query = query_encoder(views[0])
        momentum_update(key_encoder, query_encoder, 0.996)
        with torch.no_grad():
            _, key = key_encoder(views[1])
        info_nce_loss(query, key, queue, 0.2).backward()
        optimizer.step()

    def forward_backward() -> None:
        optimizer.zero_grad()
        _, query = query_encoder(views[0])
        query.sum().backward()

    moco = _time(moco_step, args.steps)
    bare = _time(forward_backward, args.steps)

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "backbone": args.backbone,
        "batch": args.batch,
        "pretrain_images_per_second": args.batch / pipeline,
        "moco_compute_images_per_second": args.batch / moco,
        "forward_backward_images_per_second": args.batch / bare,
        "overhead_vs_moco_compute": pipeline / moco - 1.0,
    }
    if args.gz_decals is not None:
        report["gz_decals"] = _gz_decals_run(args.gz_decals, args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
