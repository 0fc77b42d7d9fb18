"""Time rendering of simulated-sky cutouts, the load that the demo puts on the survey server.

Run on one core::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_sky.py --n 2000
"""

from __future__ import annotations

import argparse
import time

from lensminer.sky import SimulatedSky


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="cutouts to render")
    parser.add_argument("--size", type=int, default=152, help="cutout side in pixels")
    parser.add_argument("--lens-fraction", type=float, default=0.05, help="share of lenses")
    args = parser.parse_args()

    sky = SimulatedSky(seed=0, lens_fraction=args.lens_fraction)
    catalog = sky.catalog(args.n)
    sky.render(float(catalog["ra"][0]), float(catalog["dec"][0]), args.size, 0.262)  # warm-up

    lens_seconds = 0.0
    start = time.perf_counter()
    for row in catalog:
        row_start = time.perf_counter()
        sky.render(float(row["ra"]), float(row["dec"]), args.size, 0.262)
        if row["is_lens"]:
            lens_seconds += time.perf_counter() - row_start
    total = time.perf_counter() - start

    n_lenses = int(catalog["is_lens"].sum())
    print(
        f"{args.n} cutouts of {args.size}x{args.size} grz, {n_lenses} lenses: {total:.1f} s total"
    )
    non_lens_ms = 1e3 * (total - lens_seconds) / max(args.n - n_lenses, 1)
    lens_ms = 1e3 * lens_seconds / max(n_lenses, 1)
    print(f"non-lens {non_lens_ms:.1f} ms each, lens {lens_ms:.1f} ms each")


if __name__ == "__main__":
    main()
