"""Benchmark of Dask embedding and the Prefect embed flow against a bare loop, and peak memory.

Three measurements, all on synthetic uint8 RGB stores (``image_format="jpeg"``) in a temporary
folder:

1. Throughput: images per second of four paths over one store and one encoder.
   ``embed_cutouts`` runs on a warmed-up LocalCluster of worker processes and with the
   synchronous scheduler. The whole Prefect ``embed_flow`` runs on a local Dask task runner of
   thread workers. The bare loop runs the same encoder in one process over the same batches
   already in memory (``evaluation_view`` + forward pass, no I/O). The bare loop and the
   synchronous path use torch's default thread count, and each Dask worker process runs one
   thread. A flow run's time covers the whole call: flow and task run records, the start of its
   own LocalCluster, the store preparation, the shards and the verification. The flow reports
   to ``PREFECT_API_URL`` when it is set, and otherwise to a ``prefect server`` that the
   benchmark starts on 127.0.0.1 with a temporary PREFECT_HOME.
2. Peak memory: the largest resident set of the driver and its worker processes, summed, while
   embedding ``--memory-rows`` stores (10,000 and 100,000 rows by default).
3. Projection: the per-image cost of the bare loop for the default ``PretrainConfig`` on 96 px
   crops, scaled to 76 million cutouts. The output names the backbone and stem it measured.

Run from the repository root::

    .venv/bin/python benchmarks/bench_embed.py --rows 4096 --memory-rows 10000 100000

Results go to standard output as JSON. With the defaults the run takes about 15 minutes on a
2-core x86_64 machine, most of it embedding the 100,000-row store; the four Prefect flow runs
add an estimated one and a half minutes. ``--memory-rows`` with no value skips the memory runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import torch

from lensminer import stores
from lensminer.augment import evaluation_view
from lensminer.config import AugmentConfig, EmbedConfig, PretrainConfig
from lensminer.embed import embed_cutouts
from lensminer.models.encoder import Encoder, build_encoder, export_encoder

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


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prefect_api(folder: Path, timeout: float = 120) -> Iterator[str]:
    """Yield the Prefect API URL that flows of this benchmark report to.

    That is ``PREFECT_API_URL`` when it is set. Otherwise a ``prefect server`` starts on
    127.0.0.1 with its PREFECT_HOME in ``folder`` and stops on exit, after this process has
    sent its queued logs and events, so that the exit of the interpreter does not wait on them.
    """
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return

    home = folder / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Path(sys.executable).parent / "prefect"
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(api_url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"prefect server at {api_url} did not become healthy (exit code "
                        f"{server.poll()}, limit {timeout} s); see {home / 'server.log'}"
                    )
                time.sleep(0.25)

            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                try:
                    yield api_url
                finally:
                    with contextlib.suppress(RuntimeError):  # no log worker was started
                        APILogWorker.instance().drain()
                    EventsWorker.drain_all()
        finally:
            server.terminate()
            server.wait(timeout=60)


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def embed_flow_seconds(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
) -> float:
    """Run the Prefect ``embed_flow`` on the task runner ``embed`` selects; return wall seconds."""
    from lensminer.flows.pipeline import embed_flow, embed_task_runner

    started = time.perf_counter()
    runner = embed_task_runner(embed)
    embed_flow.with_options(task_runner=runner)(
        cutouts_url, encoder_url, embeddings_url, embed, augment
    )
    return time.perf_counter() - started


def throughput(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Compare the Dask path, the synchronous path, the Prefect flow and the bare loop.

    All four embed one store with one encoder.

    The four runs alternate ``--repeats`` times and the medians are reported, so that load from
    other processes on the machine affects all four alike.
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
    flow_threads = EmbedConfig(
        batch_size=args.batch_size,
        scheduler="local",
        processes=False,
        n_workers=args.workers,
        threads_per_worker=1,
    )

    rates: dict[str, list[float]] = {"bare": [], "synchronous": [], "dask": [], "prefect_flow": []}
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
        embed_flow_seconds(
            warmup_url, encoder_url, str(folder / "warm-flow.zarr"), flow_threads, augment
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
            seconds = embed_flow_seconds(
                cutouts_url, encoder_url, str(folder / f"flow-{repeat}.zarr"), flow_threads, augment
            )
            rates["prefect_flow"].append(args.rows / seconds)

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
        "prefect_flow_img_per_s": round(median["prefect_flow"], 1),
        "prefect_flow_runner": f"local Dask, {args.workers} thread workers",
        "dask_over_bare": round(median["dask"] / median["bare"], 3),
        "synchronous_over_bare": round(median["synchronous"] / median["bare"], 3),
        "prefect_flow_over_bare": round(median["prefect_flow"] / median["bare"], 3),
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
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="Workers of each LocalCluster: processes for embed_cutouts, threads for the flow.",
    )
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
        with prefect_api(Path(folder)) as api_url:
            report["prefect_api_url"] = api_url
            report["throughput"] = throughput(Path(folder), args)
        if args.memory_rows:
            report["peak_memory"] = peak_memory(Path(folder), args)
    report["projection"] = projection(args)
    report["load_average_at_end"] = [round(load, 2) for load in psutil.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
