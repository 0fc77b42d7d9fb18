"""Tests of brick mode: cutting targets from simulated brick coadds into the cutout store."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.table import Table, vstack
from astropy.wcs import WCS

from lensminer.brick_download import download_from_bricks, shard_bricks
from lensminer.bricks import brick_for, brick_wcs, coadd_path, default_grid
from lensminer.config import BrickConfig, DownloadConfig, SurveyConfig
from lensminer.exceptions import ConfigError, StoreError
from lensminer.infra.sources import SimulatedBrickSource, SimulatedSkySource
from lensminer.infra.survey_server import brick_root, create_app, serve_in_thread
from lensminer.sky import SimulatedSky
from lensminer.stores import RowStatus, open_store

SKY = SimulatedSky(seed=11, lens_fraction=0.2)
BRICK = brick_for(150.1, 2.1)
SIZE = 64
DOWNLOAD = DownloadConfig(shard_rows=4, chunk_rows=2)
# Inside BRICK's box, 27 px from its west edge: a 256 px cutout crosses the image edge.
EDGE = (BRICK.ra1 + 0.002, BRICK.dec + 0.01)


def brick_targets() -> Table:
    """Ten targets at pixel corners of BRICK, so a 64 px cut is centred as the service's."""
    rng = np.random.default_rng(0)
    x = rng.integers(300, 3300, 10) + 0.5
    y = rng.integers(300, 3300, 10) + 0.5
    ra, dec = brick_wcs(BRICK).pixel_to_world_values(x, y)
    return Table(
        {"target_id": [f"t{i}" for i in range(10)], "ra": np.round(ra, 8), "dec": np.round(dec, 8)}
    )


def edge_target() -> Table:
    return Table({"target_id": ["edge"], "ra": [EDGE[0]], "dec": [EDGE[1]]})


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedBrickSource]:
    folder = tmp_path_factory.mktemp("dr9-south")
    source = SimulatedBrickSource(SKY, vstack([brick_targets(), edge_target()]), cache_dir=folder)
    neighbour = brick_for(EDGE[0] - 0.01, EDGE[1])
    for brick in (BRICK, neighbour):
        source.file(brick, f"legacysurvey-{brick.name}-maskbits.fits.fz")
    yield source
    source.close()


@pytest.fixture(scope="module")
def server(mirror: SimulatedBrickSource) -> Iterator[str]:
    with serve_in_thread(create_app(SimulatedSkySource(SKY), bricks=mirror)) as url:
        yield url


@pytest.fixture(scope="module")
def local_store(mirror: SimulatedBrickSource, tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("stores") / "local.zarr")
    download_from_bricks(
        brick_targets(),
        url,
        SurveyConfig(size=SIZE),
        DOWNLOAD,
        BrickConfig(root=str(mirror.cache_dir)),
    )
    return url


def brick_sigma() -> np.ndarray:
    return np.array(SKY.truth(BRICK.ra, BRICK.dec).noise_sigma)


def test_local_rows_ok(local_store: str) -> None:
    group = open_store(local_store, "cutouts")
    assert np.all(group["status"][:] == RowStatus.OK)
    assert group["images"].shape == (10, 3, SIZE, SIZE)
    assert group["images"].dtype == np.float32
    assert group.attrs["download"]["source"] == "bricks"
    assert sorted(group["target_id"][:].tolist()) == sorted(brick_targets()["target_id"].tolist())


def test_local_matches_model(local_store: str) -> None:
    group = open_store(local_store, "cutouts")
    sigma = brick_sigma()
    for image, ra, dec in zip(group["images"][:], group["ra"][:], group["dec"][:], strict=True):
        model = SKY.render(ra, dec, SIZE, 0.262, noise=False)
        residual = image - model
        for band in range(3):
            assert residual[band].std() == pytest.approx(sigma[band], rel=0.15)
            assert np.abs(residual[band]).max() < 6 * sigma[band]


def test_matches_service_cutout(local_store: str, server: str) -> None:
    group = open_store(local_store, "cutouts")
    ra, dec = float(group["ra"][0]), float(group["dec"][0])
    params = {"ra": repr(ra), "dec": repr(dec), "size": SIZE, "pixscale": 0.262, "bands": "grz"}
    response = httpx.get(server + "fits-cutout", params=params, timeout=60)
    service = fits.open(io.BytesIO(response.content))[0].data.astype(np.float32)
    expected = np.hypot(brick_sigma(), np.array(SKY.truth(ra, dec).noise_sigma))
    residual = group["images"][0] - service
    for band in range(3):
        assert residual[band].std() == pytest.approx(expected[band], rel=0.15)
    assert service.sum() == pytest.approx(group["images"][0].sum(), rel=0.05)


def test_http_equals_local(local_store: str, server: str, tmp_path: Path) -> None:
    url = str(tmp_path / "http.zarr")
    summary = download_from_bricks(
        brick_targets(),
        url,
        SurveyConfig(size=SIZE),
        DOWNLOAD,
        BrickConfig(root=brick_root(server)),
    )
    assert summary.counts["OK"] == 10
    assert np.array_equal(
        open_store(url, "cutouts")["images"][:], open_store(local_store, "cutouts")["images"][:]
    )


@pytest.fixture(scope="module")
def edge_store(mirror: SimulatedBrickSource, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Store of a 256 px cutout of the edge target, with invvar and maskbits."""
    url = str(tmp_path_factory.mktemp("stores") / "edge.zarr")
    survey = SurveyConfig(size=256, invvar=True, maskbits=True)
    download_from_bricks(
        edge_target(), url, survey, DOWNLOAD, BrickConfig(root=str(mirror.cache_dir))
    )
    return url


def test_edge_filled_from_neighbour(edge_store: str) -> None:
    group = open_store(edge_store, "cutouts")
    image = group["images"][0]
    model = SKY.render(EDGE[0], EDGE[1], 256, 0.262, noise=False)
    x, _ = brick_wcs(BRICK).world_to_pixel_values(*EDGE)
    assert group["status"][0] == RowStatus.OK
    assert x + 128 > 3600  # the cutout crosses the image edge
    assert np.count_nonzero(image == 0) == 0
    assert np.abs(image - model).max() < 7 * brick_sigma().max()


def test_rerun_skips_done_shards(mirror: SimulatedBrickSource, tmp_path: Path) -> None:
    url = str(tmp_path / "rerun.zarr")
    bricks = BrickConfig(root=str(mirror.cache_dir))
    first = download_from_bricks(brick_targets(), url, SurveyConfig(size=SIZE), DOWNLOAD, bricks)
    second = download_from_bricks(brick_targets(), url, SurveyConfig(size=SIZE), DOWNLOAD, bricks)
    assert first.shards_written == 3
    assert second.shards_written == 0
    assert second.shards_skipped == 3

    # A shard whose flag is down (a crash before the flag) is cut again, and only that one.
    open_store(url, "cutouts", mode="r+")["shard_done"][1] = False
    assert list(shard_bricks(url, default_grid())) == [1]
    third = download_from_bricks(brick_targets(), url, SurveyConfig(size=SIZE), DOWNLOAD, bricks)
    assert third.shards_written == 1
    assert third.counts["OK"] == 10


def test_no_coverage_outside_footprint(server: str, tmp_path: Path) -> None:
    targets = Table({"target_id": ["far"], "ra": [20.0], "dec": [-30.0]})
    url = str(tmp_path / "far.zarr")
    summary = download_from_bricks(
        targets, url, SurveyConfig(size=SIZE), DOWNLOAD, BrickConfig(root=brick_root(server))
    )
    group = open_store(url, "cutouts")
    assert summary.counts["NO_COVERAGE"] == 1
    assert "not found" in str(group["reason"][0])
    assert not group["images"][0].any()


def test_s3_destination(
    mirror: SimulatedBrickSource, s3_endpoint: dict[str, object], local_store: str
) -> None:
    url = "s3://lensminer-test/bricks/cutouts.zarr"
    summary = download_from_bricks(
        brick_targets(),
        url,
        SurveyConfig(size=SIZE),
        DOWNLOAD,
        BrickConfig(root=str(mirror.cache_dir)),
        storage_options=s3_endpoint,
    )
    stored = open_store(url, "cutouts", storage_options=s3_endpoint)
    assert summary.counts["OK"] == 10
    assert np.array_equal(stored["images"][:], open_store(local_store, "cutouts")["images"][:])


def test_pixscale_must_be_native(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pixscale"):
        download_from_bricks(
            brick_targets(),
            str(tmp_path / "x.zarr"),
            SurveyConfig(pixscale=0.5),
            DOWNLOAD,
            BrickConfig(root=str(tmp_path)),
        )


def test_jpeg_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_format"):
        download_from_bricks(
            brick_targets(),
            str(tmp_path / "x.zarr"),
            SurveyConfig(image_format="jpeg"),
            DOWNLOAD,
            BrickConfig(root=str(tmp_path)),
        )


# Optional planes ----------------------------------------------------------------------------

PLANES = SurveyConfig(size=SIZE, invvar=True, maskbits=True)


@pytest.fixture(scope="module")
def planes_store(server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Brick-mode store with invvar and maskbits, cut over HTTP from the simulated brick server."""
    url = str(tmp_path_factory.mktemp("stores") / "planes.zarr")
    download_from_bricks(
        brick_targets(), url, PLANES, DOWNLOAD, BrickConfig(root=brick_root(server))
    )
    return url


def read_file(path: str) -> tuple[np.ndarray, WCS]:
    """Decode a coadd file with astropy alone, as a reference."""
    with fits.open(path) as hdus:
        hdu = next(hdu for hdu in hdus if hdu.is_image and hdu.data is not None)
        return np.asarray(hdu.data), WCS(hdu.header, naxis=2)


def cut_file(data: np.ndarray, wcs: WCS, ra: float, dec: float, size: int) -> np.ndarray:
    x, y = wcs.world_to_pixel_values(ra, dec)
    return Cutout2D(data, (float(x), float(y)), size, wcs=wcs, mode="partial").data


def test_planes_layout(planes_store: str) -> None:
    group = open_store(planes_store, "cutouts")
    assert np.all(group["status"][:] == RowStatus.OK)
    assert group.attrs["planes"] == ["invvar", "maskbits"]
    assert group["invvar"].shape == (10, 3, SIZE, SIZE)
    assert group["maskbits"].shape == (10, SIZE, SIZE)
    assert group["maskbits"].dtype == np.int32


def test_planes_images_unchanged(planes_store: str, local_store: str) -> None:
    np.testing.assert_array_equal(
        open_store(planes_store, "cutouts")["images"][:],
        open_store(local_store, "cutouts")["images"][:],
    )


def test_planes_match_coadd_files(planes_store: str, mirror: SimulatedBrickSource) -> None:
    group = open_store(planes_store, "cutouts")
    root = str(mirror.cache_dir)
    invvar_files = [read_file(coadd_path(root, BRICK, band, "invvar")) for band in "grz"]
    maskbits_file = read_file(coadd_path(root, BRICK, kind="maskbits"))
    for row in range(group.attrs["n_rows"]):
        ra, dec = float(group["ra"][row]), float(group["dec"][row])
        for band_index, (data, wcs) in enumerate(invvar_files):
            expected = cut_file(data, wcs, ra, dec, SIZE)
            np.testing.assert_array_equal(group["invvar"][row, band_index], expected)
        expected_mask = cut_file(*maskbits_file, ra, dec, SIZE)
        np.testing.assert_array_equal(group["maskbits"][row], expected_mask)


def test_planes_invvar_analytic(planes_store: str) -> None:
    invvar = open_store(planes_store, "cutouts")["invvar"][:]
    expected = 1.0 / brick_sigma() ** 2
    for band in range(3):
        np.testing.assert_allclose(invvar[:, band], expected[band], rtol=1e-5)


def test_edge_planes_from_neighbour(edge_store: str) -> None:
    group = open_store(edge_store, "cutouts")
    invvar, maskbits = group["invvar"][0], group["maskbits"][0]
    neighbour = brick_for(EDGE[0] - 0.01, EDGE[1])
    owner_value = 1.0 / brick_sigma() ** 2
    neighbour_value = 1.0 / np.array(SKY.truth(neighbour.ra, neighbour.dec).noise_sigma) ** 2

    assert maskbits.shape == (256, 256)
    assert not maskbits.any()
    for band in range(3):
        from_owner = np.isclose(invvar[band], owner_value[band], rtol=1e-5)
        from_neighbour = np.isclose(invvar[band], neighbour_value[band], rtol=1e-5)
        assert np.all(from_owner | from_neighbour)
        assert from_neighbour.any()


def test_missing_maskbits_file_fails_rows(mirror: SimulatedBrickSource, tmp_path: Path) -> None:
    # A mirror of BRICK's image and invvar files, without its maskbits file.
    source = Path(coadd_path(str(mirror.cache_dir), BRICK, "g")).parent
    partial = Path(coadd_path(str(tmp_path / "partial"), BRICK, "g")).parent
    partial.mkdir(parents=True)
    for path in source.glob("*-image-*.fits.fz"):
        (partial / path.name).symlink_to(path)
    for path in source.glob("*-invvar-*.fits.fz"):
        (partial / path.name).symlink_to(path)

    url = str(tmp_path / "partial.zarr")
    summary = download_from_bricks(
        brick_targets(),
        url,
        PLANES,
        DOWNLOAD,
        BrickConfig(root=str(tmp_path / "partial"), workers=1),
    )
    group = open_store(url, "cutouts")

    assert summary.counts["FAILED"] == 10
    assert (
        f"has images but no {coadd_path(str(tmp_path / 'partial'), BRICK, kind='maskbits')}"
        in str(group["reason"][0])
    )
    assert summary.requests == 6  # 3 images and 3 invvar files, read once for all rows
    assert group["shard_done"][:].all()
    assert not group["images"][:].any()


def test_missing_invvar_file_fails_rows(mirror: SimulatedBrickSource, tmp_path: Path) -> None:
    source = Path(coadd_path(str(mirror.cache_dir), BRICK, "g")).parent
    partial = Path(coadd_path(str(tmp_path / "partial"), BRICK, "g")).parent
    partial.mkdir(parents=True)
    for path in source.glob("*-image-*.fits.fz"):
        (partial / path.name).symlink_to(path)

    url = str(tmp_path / "partial.zarr")
    summary = download_from_bricks(
        brick_targets()[:1],
        url,
        SurveyConfig(size=SIZE, invvar=True),
        DOWNLOAD,
        BrickConfig(root=str(tmp_path / "partial")),
    )

    assert summary.counts["FAILED"] == 1
    assert "has a g-band image but no" in str(open_store(url, "cutouts")["reason"][0])


def test_other_planes_rejected(local_store: str, mirror: SimulatedBrickSource) -> None:
    with pytest.raises(
        StoreError, match=r"optional planes \[\], but this run requests \['invvar'\]"
    ):
        download_from_bricks(
            brick_targets(),
            local_store,
            SurveyConfig(size=SIZE, invvar=True),
            DOWNLOAD,
            BrickConfig(root=str(mirror.cache_dir)),
        )
