"""Benchmark the download stage against the project's survey server on 127.0.0.1.

Two measurements, each against a server in its own process (so its memory and CPU are not
counted with the client's):

throughput
    Cutouts per second from a server that adds ``--latency`` seconds to every response: the
    concurrent :func:`lensminer.download.download_cutouts` against a plain sequential loop of
    single ``httpx`` requests, in the same run.
memory
    Peak traced Python memory (tracemalloc) of ``download_cutouts`` for each target count in
    ``--counts``, with no added latency. The shard size is fixed, so the peak should not grow
    with the number of targets.

Run::

    .venv/bin/python benchmarks/bench_download.py throughput --n 200 --latency 0.2 --concurrency 32
    .venv/bin/python benchmarks/bench_download.py memory --counts 1000 20000 --size 32
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from astropy.table import Table

from lensminer.config import DownloadConfig, SurveyConfig
from lensminer.cutout_io import parse_fits_cutout
from lensminer.download import cutout_request, download_cutouts

READY_LINE = "LENSMINER_SURVEY_SERVER"


@contextmanager
def survey_server(latency: float) -> Iterator[str]:
    """Start the simulated-sky survey server in a child process and yield its base URL."""
    command = [
        sys.executable,
        "-m",
        "lensminer.infra.survey_server",
        "--sky",
        "--latency",
        str(latency),
    ]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.startswith(READY_LINE):
            raise RuntimeError(f"survey server did not start (first output line {line!r})")
        yield line.split()[1]
    finally:
        child.terminate()
        child.wait(timeout=10)


def make_targets(n: int, seed: int = 0) -> Table:
    rng = np.random.default_rng(seed)
    return Table(
        {
            "target_id": [f"bench-{i:06d}" for i in range(n)],
            "ra": np.round(rng.uniform(149.0, 151.0, n), 6),
            "dec": np.round(rng.uniform(1.0, 3.0, n), 6),
        }
    )


def sequential_rate(base_url: str, survey: SurveyConfig, targets: Table) -> float:
    """Return cutouts per second of a loop that sends one request at a time and parses it."""
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=60.0) as client:
        for row in targets:
            endpoint, params = cutout_request(survey, row["ra"], row["dec"])
            response = client.get(endpoint, params=params)
            response.raise_for_status()
            parse_fits_cutout(
                response.content, bands=survey.bands, size=survey.size, pixscale=survey.pixscale
            )
    return len(targets) / (time.perf_counter() - started)


def run_throughput(args: argparse.Namespace) -> dict[str, object]:
    targets = make_targets(args.n)
    download = DownloadConfig(
        concurrency=args.concurrency,
        rate_limit=1000.0,
        timeout=60.0,
        shard_rows=args.shard_rows,
        chunk_rows=16,
    )
    with survey_server(args.latency) as url, tempfile.TemporaryDirectory() as folder:
        survey = SurveyConfig(base_url=url, size=args.size)
        sequential = sequential_rate(url, survey, targets[: args.n_sequential])
        summary = download_cutouts(targets, str(Path(folder) / "cutouts.zarr"), survey, download)
    concurrent = args.n / summary.seconds
    return {
        "measure": "throughput",
        "latency_s": args.latency,
        "size_px": args.size,
        "concurrency": args.concurrency,
        "sequential_cutouts_per_s": round(sequential, 2),
        "concurrent_cutouts_per_s": round(concurrent, 2),
        "speedup": round(concurrent / sequential, 1),
        "counts": summary.counts,
    }


def run_memory(args: argparse.Namespace) -> dict[str, object]:
    results: dict[str, object] = {
        "measure": "memory",
        "size_px": args.size,
        "shard_rows": args.shard_rows,
    }
    download = DownloadConfig(
        concurrency=args.concurrency,
        rate_limit=10_000.0,
        timeout=60.0,
        shard_rows=args.shard_rows,
        chunk_rows=16,
    )
    with survey_server(0.0) as url:
        survey = SurveyConfig(base_url=url, size=args.size)

        # A first small download fills import-time and library caches, which would otherwise
        # count towards the first measured peak only.
        with tempfile.TemporaryDirectory() as folder:
            download_cutouts(
                make_targets(args.shard_rows, seed=1),
                str(Path(folder) / "warm.zarr"),
                survey,
                download,
            )

        for count in args.counts:
            targets = make_targets(count, seed=count)
            with tempfile.TemporaryDirectory() as folder:
                tracemalloc.start()
                summary = download_cutouts(
                    targets, str(Path(folder) / "cutouts.zarr"), survey, download
                )
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
            results[f"peak_mib_{count}"] = round(peak / 2**20, 1)
            results[f"cutouts_per_s_{count}"] = round(count / summary.seconds, 1)
            results[f"ok_{count}"] = summary.counts["OK"]
    first, last = args.counts[0], args.counts[-1]
    results["peak_ratio"] = round(results[f"peak_mib_{last}"] / results[f"peak_mib_{first}"], 2)  # type: ignore[operator]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("measure", choices=["throughput", "memory"])
    parser.add_argument(
        "--n", type=int, default=200, help="targets of the concurrent throughput run"
    )
    parser.add_argument(
        "--n-sequential", type=int, default=40, help="targets of the sequential loop"
    )
    parser.add_argument(
        "--latency", type=float, default=0.2, help="seconds the server adds to each response"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--size", type=int, default=64, help="cutout side in pixels")
    parser.add_argument("--shard-rows", type=int, default=256, help="rows per shard")
    parser.add_argument(
        "--counts",
        type=int,
        nargs="+",
        default=[1000, 20000],
        help="target counts of the memory run",
    )
    args = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    result = run_throughput(args) if args.measure == "throughput" else run_memory(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
