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
(``catalog.csv`` with ``png``, ``ring`` and ``*_fraction`` columns), resized to ``--gz-size`` px,
once per seed in ``--seeds``. By default the store contains the uint8 RGB pixels, which get only the
geometric and noise augmentations. With ``--gz-flux`` it contains g, r, z pseudo-fluxes from
inverting the viewer stretch (:func:`lensminer.rgb.viewer_rgb_inverse`), so training applies
every physical augmentation, while the evaluation views (centre crop and stretch) reproduce the
PNG pixels. The PNGs were not made with the viewer stretch, so these fluxes are not calibrated:
they only let reddening, PSF blur and noise act on plausible band images. For each seed it reports
the loss of the first and last epoch and the per-epoch k-NN monitor. It then scores the frozen
features of the trained encoder and of a randomly initialised encoder of the same architecture
and seed, for representations and projections and k of 10 and 20:

- ``auc``: the ROC AUC on ``ring`` of the k-NN vote share, the primary monitor;
- ``accuracy``: the k-NN accuracy on ``ring``, as the per-epoch monitor measures it;
- ``r_<column>``: the Pearson r between each vote-fraction column and its k-NN mean.

The rows are split in halves with the seed. ``test`` scores classify the test half against the
reference half. ``validation`` scores use the reference half alone, leave-one-out, so settings
can be chosen without the test half. The summary gives the mean and standard deviation over
seeds of both encoders and of their paired difference, which shares the split.

Run from the repository root::

    .venv/bin/python benchmarks/bench_pretrain.py --rows 512 --batch 32 --steps 12 --rounds 3
    .venv/bin/python benchmarks/bench_pretrain.py --skip-throughput --threads 2 \
        --gz-decals /path/to/gz-decals --gz-flux

The defaults of the Galaxy Zoo DECaLS run were chosen on the validation scores of the RGB
store, and the pseudo-flux store uses them unchanged. They are 20
epochs of batch 32 on PNGs resized to 112 px, a queue of 64 keys and temperature 0.5. The key
momentum is 0.99, the learning rate 0.03 with one warm-up epoch, and the seeds 0, 1 and 2.
``docs/benchmarks.md`` records the scores of both stores with these settings.

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
    knn_roc_auc,
    momentum_update,
    split_halves,
)
from lensminer.pretrain import pretrain
from lensminer.rgb import viewer_rgb_inverse

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


def _gz_decals_store(url: str, folder: Path, size: int, *, as_flux: bool = False) -> Table:
    """Write the PNGs of a Galaxy Zoo DECaLS folder as a JPEG-layout cutout store.

    With ``as_flux`` the store is a FITS-layout one instead, holding the pseudo-fluxes of
    :func:`lensminer.rgb.viewer_rgb_inverse`, so that training applies every physical
    augmentation.

    Returns
    -------
    Table
        The catalog, one row per store row in the same order.
    """
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
    image_format = "fits" if as_flux else "jpeg"
    if as_flux:
        augment = AugmentConfig()
        images = viewer_rgb_inverse(
            images,
            "grz",
            scales=dict(zip("grz", augment.rgb_scales, strict=True)),
            offset=augment.rgb_offset,
            q=augment.rgb_q,
        )
    layout = stores.CutoutLayout("grz", size, 0.262, image_format, "gz-decals", "file://gz-decals")
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
    return catalog


def _knn_regression_r(
    train_features: torch.Tensor,
    train_values: torch.Tensor,
    test_features: torch.Tensor,
    test_values: torch.Tensor,
    k: int,
    leave_one_out: bool,
) -> float:
    """Return the Pearson r between test values and the mean value of their k nearest rows."""
    train = F.normalize(train_features, dim=1)
    test = F.normalize(test_features, dim=1)
    similarity = test @ train.T
    if leave_one_out:
        similarity.fill_diagonal_(float("-inf"))
    _, index = similarity.topk(k, dim=1)
    predicted = train_values[index].mean(dim=1)
    return float(np.corrcoef(predicted.numpy(), test_values.numpy())[0, 1])


def _monitor_scores(
    encoder: torch.nn.Module,
    subset: Any,
    fractions: dict[str, torch.Tensor],
    augment: AugmentConfig,
    seed: int,
    ks: list[int],
) -> dict[str, dict[str, float]]:
    """Score an encoder's frozen features by k-NN on ``ring`` and the vote-fraction columns.

    The rows are split by :func:`split_halves` with the run's seed. ``validation`` scores
    use the reference half alone, leave-one-out, so that settings are chosen without the test
    half. ``test`` scores classify the test half against the reference half, as the per-epoch
    monitor does. For ``ring`` there are the k-NN accuracy and the ROC AUC of the vote share.
    For each vote-fraction column there is the Pearson r of the k-NN mean fraction.
    """
    image_format = "jpeg" if subset.images.dtype == torch.uint8 else "fits"
    representation, projection = embed_evaluation_views(
        encoder, subset.images, image_format=image_format, bands="grz", augment=augment
    )
    labels = subset.labels
    reference, test = split_halves(labels.numel(), seed)

    scores: dict[str, dict[str, float]] = {}
    for kind, features in (("representation", representation), ("projection", projection)):
        features_ref, labels_ref = features[reference], labels[reference]
        features_test, labels_test = features[test], labels[test]
        for k in ks:
            name = f"{kind}_k{k}"
            scores[name] = {
                "validation_auc": knn_roc_auc(
                    features_ref, labels_ref, features_ref, labels_ref, k, leave_one_out=True
                ),
                "validation_accuracy": knn_accuracy(
                    features_ref, labels_ref, features_ref, labels_ref, k, leave_one_out=True
                ),
                "test_auc": knn_roc_auc(features_ref, labels_ref, features_test, labels_test, k),
                "test_accuracy": knn_accuracy(
                    features_ref, labels_ref, features_test, labels_test, k
                ),
            }
            for column, values in fractions.items():
                values_ref, values_test = values[reference], values[test]
                scores[name][f"validation_r_{column}"] = _knn_regression_r(
                    features_ref, values_ref, features_ref, values_ref, k, leave_one_out=True
                )
                scores[name][f"test_r_{column}"] = _knn_regression_r(
                    features_ref, values_ref, features_test, values_test, k, leave_one_out=False
                )
    return scores


def _mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values))]


def _gz_decals_run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    augment = AugmentConfig()
    ks = [10, 20]
    queue_size = args.batch * args.queue_batches
    runs = []
    with tempfile.TemporaryDirectory() as run_folder:
        url = str(Path(run_folder) / "gz.zarr")
        catalog = _gz_decals_store(url, folder, args.gz_size, as_flux=args.gz_flux)
        for seed in args.seeds:
            config = PretrainConfig(
                backbone=args.backbone,
                batch_size=args.batch,
                queue_size=queue_size,
                epochs=args.epochs,
                learning_rate=args.learning_rate,
                temperature=args.temperature,
                momentum=args.momentum,
                warmup_epochs=args.warmup_epochs,
                accelerator="cpu",
                knn_k=20,
                knn_max_rows=args.monitor_rows,
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

            # Every labelled row, whatever the per-epoch monitor read.
            subset = load_labelled_subset(url, max_rows=None, seed=seed)
            rows = subset.row_index.numpy()
            fractions = {
                column: torch.as_tensor(np.asarray(catalog[column], dtype=np.float32)[rows])
                for column in catalog.colnames
                if column.endswith("_fraction")
            }
            scores = {
                encoder: _monitor_scores(model, subset, fractions, augment, seed, ks)
                for encoder, model in (("trained", trained), ("random_init", untrained))
            }
            runs.append(
                {
                    "seed": seed,
                    "seconds": seconds,
                    "steps": result.steps,
                    "loss_first_epoch": result.losses[0],
                    "loss_last_epoch": result.losses[-1],
                    "knn_monitor_per_epoch": result.knn_accuracy,
                    **scores,
                }
            )

    # Mean and standard deviation over seeds of each score, and of the paired difference
    # trained minus random init. Both encoders of a seed are scored on the same split, so
    # the part of the spread that the split causes in both cancels in the difference.
    summary: dict[str, Any] = {}
    for name, metrics in runs[0]["trained"].items():
        for metric in metrics:
            trained = [run["trained"][name][metric] for run in runs]
            untrained = [run["random_init"][name][metric] for run in runs]
            summary[f"{name}/{metric}"] = {
                "trained": _mean_std(trained),
                "random_init": _mean_std(untrained),
                "difference": _mean_std(list(np.subtract(trained, untrained))),
            }
    return {
        "rows": len(catalog),
        "image_side": args.gz_size,
        "pseudo_flux": args.gz_flux,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "temperature": args.temperature,
        "momentum": args.momentum,
        "warmup_epochs": args.warmup_epochs,
        "queue_size": queue_size,
        "seconds_per_seed": _mean_std([run["seconds"] for run in runs]),
        "loss_first_epoch": _mean_std([run["loss_first_epoch"] for run in runs]),
        "loss_last_epoch": _mean_std([run["loss_last_epoch"] for run in runs]),
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
        "--epochs", type=int, default=20, help="Epochs of the Galaxy Zoo DECaLS run."
    )
    parser.add_argument(
        "--gz-size", type=int, default=112, help="Side in pixels the PNGs are resized to."
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
        "--temperature", type=float, default=0.5, help="InfoNCE temperature of those runs."
    )
    parser.add_argument(
        "--queue-batches", type=int, default=2, help="MoCo queue size in batches for those runs."
    )
    parser.add_argument(
        "--momentum", type=float, default=0.99, help="Key-encoder EMA momentum of those runs."
    )
    parser.add_argument(
        "--warmup-epochs", type=float, default=1.0, help="Linear warm-up epochs of those runs."
    )
    parser.add_argument(
        "--monitor-rows",
        type=int,
        default=2000,
        help="Labelled rows the per-epoch k-NN monitor reads at most (the scores use all).",
    )
    parser.add_argument(
        "--gz-flux",
        action="store_true",
        help="Train on pseudo-fluxes from inverting the viewer stretch of the PNGs, "
        "with every physical augmentation.",
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="Run only the Galaxy Zoo DECaLS part."
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader worker processes of the timed pretraining runs.",
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
        num_workers=args.num_workers,
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
