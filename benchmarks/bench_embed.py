"""Benchmark of the Dask embedding path against a bare loop, and of its peak memory.

Three measurements, all on synthetic uint8 RGB stores (``image_format="jpeg"``) in a temporary
folder:

1. Throughput: images per second of ``embed_cutouts`` on a LocalCluster (workers warmed up) and
   with the synchronous scheduler, against a bare single-process loop of the same encoder over
   the same batches already in memory (``evaluation_view`` + forward pass, no I/O). The bare
   loop and the synchronous path use torch's default thread count; each Dask worker process
   runs one thread.
2. Peak memory: the largest resident set of the driver and its worker processes, summed, while
   embedding ``--memory-rows`` stores (10,000 and 100,000 rows by default).
3. Projection: the per-image cost of the bare loop for the default ``PretrainConfig`` on 96 px
   crops, scaled to 76 million cutouts; the output names the backbone and stem it measured.

Run from the repository root::

    .venv/bin/python benchmarks/bench_embed.py --rows 4096 --memory-rows 10000 100000

Results go to standard output as JSON. With the defaults the run takes about 15 minutes on a
2-core x86_64 machine, most of it embedding the 100,000-row store.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from lensminer.models.encoder import Encoder, build_encoder, export_encoder

from lensminer import stores
from lensminer.augment import evaluation_view
from lensminer.config import AugmentConfig, EmbedConfig, PretrainConfig
from lensminer.embed import embed_cutouts

SURVEY_ROWS = 76_000_000


class PeakMemory:
    """Sample the summed resident set size of this process and its children every ``interval`` s."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        root = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_store(url: str, n_rows: int, size: int, shard_rows: int, seed: int = 0) -> str:
    """Write a complete uint8 RGB cutout store of random images, one shard at a time."""
    rng = np.random.default_rng(seed)
    layout = stores.CutoutLayout("grz", size, 0.262, "jpeg", "ls-dr9", "http://127.0.0.1/viewer/")
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i:07d}" for i in range(n_rows)],
        ra=rng.uniform(0, 360, n_rows),
        dec=rng.uniform(-30, 30, n_rows),
        layout=layout,
        shard_rows=shard_rows,
        chunk_rows=shard_rows,
    )
    for index in range(stores.shard_count(n_rows, shard_rows)):
        rows = stores.shard_slice(index, n_rows, shard_rows)
        group["images"][rows] = rng.integers(
            0, 256, (rows.stop - rows.start, 3, size, size), dtype=np.uint8
        )
    group["status"][:] = np.full(n_rows, int(stores.RowStatus.OK), np.uint8)
    for index in range(stores.shard_count(n_rows, shard_rows)):
        stores.mark_shard_done(group, index)
    return url


def bare_loop_rate(encoder: Encoder, images: np.ndarray, batch_size: int, crop_size: int) -> float:
    """Return images per second of evaluation_view and forward over uint8 images (N, 3, S, S)."""
    encoder = encoder.to(memory_format=torch.channels_last).eval()
    batches = [
        torch.from_numpy(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)
    ]
    with torch.inference_mode():
        encoder(
            evaluation_view(
                batches[0], image_format="jpeg", bands="grz", crop_size=crop_size
            ).contiguous(memory_format=torch.channels_last)
        )
        started = time.perf_counter()
        for batch in batches:
            view = evaluation_view(batch, image_format="jpeg", bands="grz", crop_size=crop_size)
            encoder(view.contiguous(memory_format=torch.channels_last))
        seconds = time.perf_counter() - started
    return images.shape[0] / seconds


def throughput(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Compare the Dask path, the synchronous path and the bare loop on one store and one encoder.

    The three runs alternate ``--repeats`` times and the medians are reported, so that load from
    other processes on the machine affects all three alike.
    """
    from distributed import Client, LocalCluster

    pretrain = PretrainConfig(backbone="resnet18", small_stem=False)
    augment = AugmentConfig(crop_size=args.size)
    torch.manual_seed(0)
    encoder = build_encoder(pretrain, input_size=args.size)
    encoder_url = export_encoder(
        encoder, str(folder / "encoder.pt"), config=pretrain, augment=augment
    )
    cutouts_url = make_store(str(folder / "throughput.zarr"), args.rows, args.size, args.shard_rows)
    warmup_url = make_store(
        str(folder / "warmup.zarr"), 4 * args.shard_rows, args.size, args.shard_rows, seed=1
    )
    images = stores.open_store(cutouts_url, "cutouts")["images"][:]
    synchronous = EmbedConfig(batch_size=args.batch_size, scheduler="synchronous")
    local = EmbedConfig(
        batch_size=args.batch_size, scheduler="local", n_workers=args.workers, threads_per_worker=1
    )

    rates: dict[str, list[float]] = {"bare": [], "synchronous": [], "dask": []}
    started = time.perf_counter()
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        startup = time.perf_counter() - started

        # Warm up: load the encoder in every process and run the first passes, which are slower.
        bare_loop_rate(encoder, images, args.batch_size, args.size)
        embed_cutouts(warmup_url, encoder_url, str(folder / "warm-sync.zarr"), synchronous, augment)
        embed_cutouts(
            warmup_url, encoder_url, str(folder / "warm-dask.zarr"), local, augment, client=client
        )

        for repeat in range(args.repeats):
            rates["bare"].append(bare_loop_rate(encoder, images, args.batch_size, args.size))
            summary = embed_cutouts(
                cutouts_url, encoder_url, str(folder / f"sync-{repeat}.zarr"), synchronous, augment
            )
            rates["synchronous"].append(args.rows / summary.seconds)
            summary = embed_cutouts(
                cutouts_url,
                encoder_url,
                str(folder / f"dask-{repeat}.zarr"),
                local,
                augment,
                client=client,
            )
            rates["dask"].append(args.rows / summary.seconds)

    median = {name: float(np.median(values)) for name, values in rates.items()}
    return {
        "rows": args.rows,
        "image_size_px": args.size,
        "model": "resnet18, standard stem",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "bare_loop_img_per_s": round(median["bare"], 1),
        "synchronous_img_per_s": round(median["synchronous"], 1),
        "dask_local_img_per_s": round(median["dask"], 1),
        "dask_workers": args.workers,
        "dask_over_bare": round(median["dask"] / median["bare"], 3),
        "synchronous_over_bare": round(median["synchronous"] / median["bare"], 3),
        "all_img_per_s": {
            name: [round(value, 1) for value in values] for name, values in rates.items()
        },
        "dask_cluster_startup_s": round(startup, 2),
    }


def peak_memory(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Embed a store of each size in ``--memory-rows`` on a new LocalCluster; record peak memory."""
    pretrain = PretrainConfig(backbone="resnet18", small_stem=False)
    augment = AugmentConfig(crop_size=args.size)
    torch.manual_seed(0)
    encoder_url = export_encoder(
        build_encoder(pretrain, input_size=args.size),
        str(folder / "encoder.pt"),
        config=pretrain,
        augment=augment,
    )
    local = EmbedConfig(
        batch_size=args.batch_size, scheduler="local", n_workers=args.workers, threads_per_worker=1
    )

    results = {}
    for n_rows in args.memory_rows:
        cutouts_url = make_store(
            str(folder / f"memory-{n_rows}.zarr"), n_rows, args.size, args.shard_rows
        )
        with PeakMemory() as memory:
            summary = embed_cutouts(
                cutouts_url, encoder_url, str(folder / f"memory-{n_rows}-e.zarr"), local, augment
            )
        results[str(n_rows)] = {
            "peak_rss_mib": round(memory.peak_bytes / 2**20, 1),
            "seconds": round(summary.seconds, 1),
            "img_per_s": round(n_rows / summary.seconds, 1),
        }
    return results


def projection(args: argparse.Namespace) -> dict[str, Any]:
    """Time the default ``PretrainConfig`` encoder on 96 px crops and scale it to the survey."""
    pretrain = PretrainConfig()
    torch.manual_seed(0)
    encoder = build_encoder(pretrain, input_size=96)
    images = np.random.default_rng(0).integers(
        0, 256, (args.projection_rows, 3, 96, 96), dtype=np.uint8
    )
    rate = bare_loop_rate(encoder, images, 64, 96)
    core_seconds = SURVEY_ROWS / rate * torch.get_num_threads()
    return {
        "model": f"{pretrain.backbone}, small_stem={pretrain.small_stem}, 96 px",
        "rows_measured": args.projection_rows,
        "torch_threads": torch.get_num_threads(),
        "img_per_s": round(rate, 1),
        "survey_rows": SURVEY_ROWS,
        "estimated_core_hours": round(core_seconds / 3600, 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="Rows of the throughput store.")
    parser.add_argument(
        "--memory-rows",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="Row counts of the peak-memory stores; none skips the measurement.",
    )
    parser.add_argument(
        "--projection-rows", type=int, default=256, help="Images timed for the projection."
    )
    parser.add_argument(
        "--size", type=int, default=64, help="Image side in pixels (also the crop)."
    )
    parser.add_argument("--shard-rows", type=int, default=256, help="Rows per shard.")
    parser.add_argument("--batch-size", type=int, default=128, help="Images per forward pass.")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Alternating timed runs of each path."
    )
    args = parser.parse_args()

    report: dict[str, Any] = {
        "machine": f"{psutil.cpu_count()} CPU cores, {platform.machine()}, "
        f"torch {torch.__version__}",
        "load_average_at_start": [round(load, 2) for load in psutil.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as folder:
        report["throughput"] = throughput(Path(folder), args)
        if args.memory_rows:
            report["peak_memory"] = peak_memory(Path(folder), args)
    report["projection"] = projection(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
