"""Benchmark brick mode against cutout-service mode on the project's survey server (127.0.0.1).

Both modes cut the same targets, a few hundred per brick, in the same run, from one server
process that serves the simulated sky. Every cutout response is delayed by ``--latency``
seconds, as a stand-in for the public service; brick files get the same delay per file. The
bricks are rendered and cached by the server before the clock starts, so the numbers measure
the client side: fetching, decoding, cutting and writing the Zarr store.

Run::

    .venv/bin/python benchmarks/bench_bricks.py --per-brick 300 --bricks 2 --latency 0.2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from astropy.table import Table, vstack

from lensminer.brick_download import download_from_bricks
from lensminer.bricks import brick_for, brick_wcs, coadd_path
from lensminer.config import BrickConfig, DownloadConfig, SurveyConfig
from lensminer.download import download_cutouts

READY_LINE = "LENSMINER_SURVEY_SERVER"


def make_targets(per_brick: int, n_bricks: int, seed: int = 0) -> Table:
    """Draw ``per_brick`` targets uniformly inside each of ``n_bricks`` adjacent bricks."""
    rng = np.random.default_rng(seed)
    tables = []
    ra = 150.1
    for index in range(n_bricks):
        brick = brick_for(ra, 2.1)
        x, y = rng.uniform(100, 3500, (2, per_brick))
        ra_values, dec_values = brick_wcs(brick).pixel_to_world_values(x, y)
        ids = [f"b{index}-{i:05d}" for i in range(per_brick)]
        tables.append(
            Table({"target_id": ids, "ra": np.round(ra_values, 6), "dec": np.round(dec_values, 6)})
        )
        ra = brick.ra2 + 0.01
    return vstack(tables)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-brick", type=int, default=300, help="targets per brick")
    parser.add_argument("--bricks", type=int, default=2, help="bricks with targets")
    parser.add_argument(
        "--latency", type=float, default=0.2, help="seconds added to every response"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight in service mode"
    )
    parser.add_argument(
        "--rate-limit", type=float, default=20.0, help="requests per second in service mode"
    )
    parser.add_argument(
        "--service-rows", type=int, default=200, help="targets fetched in service mode"
    )
    parser.add_argument("--size", type=int, default=152, help="cutout side in pixels")
    parser.add_argument(
        "--quantize-level", type=float, default=None, help="lossy brick files (default lossless)"
    )
    args = parser.parse_args()

    targets = make_targets(args.per_brick, args.bricks)
    work = Path(tempfile.mkdtemp(prefix="bench-bricks-"))
    catalog = work / "targets.csv"
    targets.write(catalog, format="ascii.csv")
    command = [
        sys.executable,
        "-m",
        "lensminer.infra.survey_server",
        "--sky",
        "--bricks-catalog",
        str(catalog),
        "--latency",
        str(args.latency),
    ]
    if args.quantize_level is not None:
        command += ["--bricks-quantize-level", str(args.quantize_level)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line.startswith(READY_LINE):
            raise RuntimeError(f"survey server did not start (first output line {line!r})")
        base_url = line.split()[1]
        root = base_url.removesuffix("/viewer/") + "/dr9/south"

        # Render every brick on the server before timing.
        started = time.perf_counter()
        owners = {
            brick_for(ra, dec).name for ra, dec in zip(targets["ra"], targets["dec"], strict=True)
        }
        for name in sorted(owners):
            httpx.head(coadd_path(root, name, kind="maskbits"), timeout=600)
        render_seconds = time.perf_counter() - started

        survey = SurveyConfig(base_url=base_url, size=args.size)
        download = DownloadConfig(
            concurrency=args.concurrency, rate_limit=args.rate_limit, shard_rows=64, chunk_rows=16
        )

        started = time.perf_counter()
        brick_summary = download_from_bricks(
            targets, str(work / "bricks.zarr"), survey, download, BrickConfig(root=root)
        )
        brick_seconds = time.perf_counter() - started

        subset = targets[:: max(1, len(targets) // args.service_rows)][: args.service_rows]
        started = time.perf_counter()
        service_summary = download_cutouts(subset, str(work / "service.zarr"), survey, download)
        service_seconds = time.perf_counter() - started
    finally:
        child.terminate()
        child.wait(timeout=30)

    print(
        json.dumps(
            {
                "targets": len(targets),
                "bricks": len(owners),
                "server_render_seconds": round(render_seconds, 1),
                "brick_mode": {
                    "rows": brick_summary.n_rows,
                    "seconds": round(brick_seconds, 2),
                    "objects_per_second": round(brick_summary.n_rows / brick_seconds, 1),
                    "counts": brick_summary.counts,
                    "files_read": brick_summary.requests,
                },
                "service_mode": {
                    "rows": service_summary.n_rows,
                    "seconds": round(service_seconds, 2),
                    "objects_per_second": round(service_summary.n_rows / service_seconds, 1),
                    "counts": service_summary.counts,
                },
                "settings": vars(args),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
