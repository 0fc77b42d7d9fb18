"""Benchmark of MoCo pretraining throughput against the bare model compute of the same step.

Three timings per step on the same batch size, after warm-up steps:

1. ``pretrain``: the whole training step through :func:`lensminer.pretrain.pretrain` on a
   synthetic FITS cutout store (3 x 152 x 152 float32): shard reads, two augmented views, query
   forward and backward, key forward, momentum update, queue and Lightning's loop.
2. ``moco_compute``: the model work of one MoCo step on views already in memory (query forward
   and backward, key forward, momentum update, SGD step).
3. ``forward_backward``: the query encoder's forward and backward alone.

The overhead of the pipeline is ``pretrain / moco_compute - 1``; the target is below 15 %. The
three timings repeat in ``--rounds`` rounds, and each is the median over rounds.

With ``--gz-decals FOLDER`` it then pretrains on the Galaxy Zoo DECaLS colour PNGs in FOLDER
(``catalog.csv`` with ``png`` and ``ring`` columns), written as a uint8 RGB cutout store resized
to ``--gz-size`` px, once per seed in ``--seeds``. For each seed it reports the loss of the
first and last epoch. It also reports the cosine k-NN accuracy on ``ring`` of the trained
encoder and of a randomly initialised encoder of the same architecture and seed, for
representations and projections and several k. ``test`` is the monitor's split (reference
half against test half), and ``validation`` splits the reference half again, for choosing
settings without the test half.
The summary gives the mean and standard deviation over seeds.

Run from the repository root::

    .venv/bin/python benchmarks/bench_pretrain.py --rows 512 --batch 32 --steps 12 --rounds 3
    .venv/bin/python benchmarks/bench_pretrain.py --skip-throughput --threads 1 \
        --gz-decals /path/to/gz-decals --epochs 20 --seeds 0,1,2

Results go to standard output as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
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
from lensminer.models.encoder import build_encoder, load_encoder
from lensminer.models.moco import (
    embed_evaluation_views,
    info_nce_loss,
    knn_accuracy,
    momentum_update,
    split_halves,
)
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


def _knn_scores(
    encoder: torch.nn.Module,
    subset: Any,
    augment: AugmentConfig,
    seed: int,
    ks: list[int],
) -> dict[str, dict[str, float]]:
    """Return k-NN accuracies on ``ring`` for each feature kind and k, on two splits.

    ``test`` is the monitor's split (reference half against test half). ``validation`` splits
    the reference half again, so that settings can be chosen without looking at the test half.
    """
    representation, projection = embed_evaluation_views(
        encoder, subset.images, image_format="jpeg", bands="grz", augment=augment
    )
    labels = subset.labels
    reference, test = split_halves(labels.numel(), seed)
    inner_reference, inner_test = (
        reference[part] for part in split_halves(reference.numel(), seed)
    )

    scores: dict[str, dict[str, float]] = {}
    for kind, features in (("representation", representation), ("projection", projection)):
        for k in ks:
            name = f"{kind}_k{k}"
            scores[name] = {
                "validation": knn_accuracy(
                    features[inner_reference],
                    labels[inner_reference],
                    features[inner_test],
                    labels[inner_test],
                    k,
                ),
                "test": knn_accuracy(
                    features[reference], labels[reference], features[test], labels[test], k
                ),
            }
    return scores


def _gz_decals_run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    augment = AugmentConfig()
    ks = [10, 20, 50]
    runs = []
    with tempfile.TemporaryDirectory() as run_folder:
        url = str(Path(run_folder) / "gz.zarr")
        rows = _gz_decals_store(url, folder, args.gz_size)
        for seed in args.seeds:
            config = PretrainConfig(
                backbone=args.backbone,
                batch_size=args.batch,
                queue_size=args.batch * args.queue_batches,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                temperature=args.temperature,
                accelerator="cpu",
                knn_k=20,
                seed=seed,
            )
            start = time.perf_counter()
            result = pretrain(url, str(Path(run_folder) / f"run{seed}"), config, augment)
            seconds = time.perf_counter() - start

            # The same architecture and seed as the run's initial weights, without training.
            pl.seed_everything(seed, verbose=False)
            untrained = build_encoder(config, input_size=augment.crop_size)
            untrained = untrained.to(memory_format=torch.channels_last)
            trained = load_encoder(result.encoder_url)
            subset = load_labelled_subset(url, max_rows=config.knn_max_rows, seed=seed)
            runs.append(
                {
                    "seed": seed,
                    "seconds": seconds,
                    "steps": result.steps,
                    "loss_first_epoch": result.losses[0],
                    "loss_last_epoch": result.losses[-1],
                    "knn_monitor_per_epoch": result.knn_accuracy,
                    "trained": _knn_scores(trained, subset, augment, seed, ks),
                    "random_init": _knn_scores(untrained, subset, augment, seed, ks),
                }
            )

    # Mean and standard deviation over seeds of each score.
    summary: dict[str, Any] = {}
    for encoder in ("trained", "random_init"):
        for name in runs[0][encoder]:
            for split in ("validation", "test"):
                values = [run[encoder][name][split] for run in runs]
                summary[f"{encoder}/{name}/{split}"] = [
                    float(np.mean(values)),
                    float(np.std(values)),
                ]
    return {
        "rows": rows,
        "image_side": args.gz_size,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "queue_size": args.batch * args.queue_batches,
        "summary_mean_std": summary,
        "runs": runs,
    }


def _time(step: Callable[[], None], repeats: int) -> float:
    """Return the median seconds of ``repeats`` calls of ``step`` after the warm-up calls."""
    for _ in range(WARMUP_STEPS):
        step()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


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
    parser.add_argument(
        "--gz-size", type=int, default=152, help="Side in pixels the PNGs are resized to."
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[0, 1, 2],
        help="Comma-separated seeds of the Galaxy Zoo DECaLS runs.",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=0.03, help="SGD learning rate of those runs."
    )
    parser.add_argument(
        "--temperature", type=float, default=0.2, help="InfoNCE temperature of those runs."
    )
    parser.add_argument(
        "--queue-batches", type=int, default=8, help="MoCo queue size in batches for those runs."
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="Run only the Galaxy Zoo DECaLS part."
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="Rounds of the three timings, taken in turn."
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "backbone": args.backbone,
        "batch": args.batch,
    }
    if not args.skip_throughput:
        report.update(_throughput(args))
    if args.gz_decals is not None:
        report["gz_decals"] = _gz_decals_run(args.gz_decals, args)
    print(json.dumps(report, indent=2))


def _throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Time the pipeline, the MoCo compute and the bare forward and backward in rounds."""
    config = PretrainConfig(
        backbone=args.backbone,
        batch_size=args.batch,
        queue_size=args.batch * 32,
        epochs=1,
        max_steps=args.steps + WARMUP_STEPS + 1,
        accelerator="cpu",
    )
    augment = AugmentConfig()

    # The model compute alone, on views already in memory: query forward and backward, the
    # momentum update, the key forward in shuffle-BN sub-batches as MoCoV2 runs it, and SGD.
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
            order = torch.randperm(args.batch)
            parts = order.tensor_split(config.shuffle_bn_splits)
            key = torch.empty(args.batch, config.projection_dim)
            key[order] = torch.cat([key_encoder(views[1][part])[1] for part in parts])
        info_nce_loss(query, key, queue, 0.2).backward()
        optimizer.step()

    def forward_backward() -> None:
        optimizer.zero_grad()
        _, query = query_encoder(views[0])
        query.sum().backward()

    # The three timings alternate in rounds, so that the load of other processes on the machine
    # affects them alike. The whole pipeline runs through pretrain() on a synthetic store.
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as folder:
        url = str(Path(folder) / "cutouts.zarr")
        _make_store(url, args.rows)
        for index in range(args.rounds):
            timer = _StepTimer()
            run_dir = str(Path(folder) / f"run{index}")
            pretrain(url, run_dir, config, augment, callbacks=[timer])
            pipeline = float(np.median(timer.seconds[WARMUP_STEPS:]))
            moco = _time(moco_step, args.steps)
            bare = _time(forward_backward, args.steps)
            rounds.append({"pipeline": pipeline, "moco": moco, "bare": bare})

    pipeline = float(np.median([r["pipeline"] for r in rounds]))
    moco = float(np.median([r["moco"] for r in rounds]))
    bare = float(np.median([r["bare"] for r in rounds]))
    return {
        "rounds": args.rounds,
        "pretrain_images_per_second": args.batch / pipeline,
        "moco_compute_images_per_second": args.batch / moco,
        "forward_backward_images_per_second": args.batch / bare,
        "overhead_vs_moco_compute": pipeline / moco - 1.0,
        "overhead_per_round": [r["pipeline"] / r["moco"] - 1.0 for r in rounds],
    }


if __name__ == "__main__":
    main()
