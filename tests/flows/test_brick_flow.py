"""Brick mode through Prefect: one task per shard gives the same store as the library driver."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from lensminer.brick_download import download_from_bricks
from lensminer.bricks import brick_for, brick_wcs
from lensminer.config import BrickConfig, DownloadConfig, SurveyConfig
from lensminer.flows.pipeline import brick_download_flow
from lensminer.infra.sources import SimulatedBrickSource
from lensminer.sky import SimulatedSky
from lensminer.stores import open_store

pytestmark = pytest.mark.slow

SKY = SimulatedSky(seed=5, lens_fraction=0.2)
BRICK = brick_for(150.1, 2.1)


@pytest.fixture(scope="module")
def targets_and_mirror(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.integers(300, 3300, 10) + 0.5
    y = rng.integers(300, 3300, 10) + 0.5
    ra, dec = brick_wcs(BRICK).pixel_to_world_values(x, y)
    targets = Table(
        {
            "target_id": [f"b{i}" for i in range(10)],
            "ra": np.round(ra, 8),
            "dec": np.round(dec, 8),
            "label": (np.arange(10) % 2).astype("int8"),
        }
    )
    folder = tmp_path_factory.mktemp("dr9-south")
    source = SimulatedBrickSource(SKY, targets, cache_dir=folder)
    source.file(BRICK, f"legacysurvey-{BRICK.name}-image-g.fits.fz")
    table_url = str(folder / "targets.csv")
    targets.write(table_url, format="ascii.csv")
    yield table_url, targets, BrickConfig(root=str(folder))
    source.close()


def test_flow_matches_library_driver(targets_and_mirror, tmp_path, prefect_harness):
    table_url, targets, bricks = targets_and_mirror
    survey = SurveyConfig(size=48)
    download = DownloadConfig(shard_rows=4, chunk_rows=2)

    summary = brick_download_flow(table_url, str(tmp_path / "flow.zarr"), survey, download, bricks)
    download_from_bricks(targets, str(tmp_path / "driver.zarr"), survey, download, bricks)

    flow_store = open_store(str(tmp_path / "flow.zarr"), "cutouts")
    driver_store = open_store(str(tmp_path / "driver.zarr"), "cutouts")
    assert summary["counts"]["OK"] == 10
    assert summary["shards_written"] == 3
    assert flow_store["target_id"][:].tolist() == driver_store["target_id"][:].tolist()
    np.testing.assert_array_equal(flow_store["images"][:], driver_store["images"][:])
    np.testing.assert_array_equal(flow_store["label"][:], driver_store["label"][:])


def test_flow_rerun_cuts_nothing(targets_and_mirror, tmp_path, prefect_harness):
    table_url, _, bricks = targets_and_mirror
    survey = SurveyConfig(size=48)
    download = DownloadConfig(shard_rows=4, chunk_rows=2)
    url = str(tmp_path / "flow.zarr")
    brick_download_flow(table_url, url, survey, download, bricks)

    rerun = brick_download_flow(table_url, url, survey, download, bricks)
    assert rerun["shards_written"] == 0
    assert rerun["shards_skipped"] == 3
