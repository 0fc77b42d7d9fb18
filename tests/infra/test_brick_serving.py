"""Tests of simulated brick coadds served by the local survey server over real HTTP."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lensminer.bricks import BRICK_PIXELS, brick_for, brick_wcs, coadd_path
from lensminer.infra.sources import SimulatedBrickSource, SimulatedSkySource
from lensminer.infra.survey_server import brick_root, create_app, serve_in_thread
from lensminer.sky import SimulatedSky

SKY = SimulatedSky(seed=5, lens_fraction=0.0)
BRICK = brick_for(150.1, 2.1)
# Targets at pixel centres of the brick, away from each other: (x, y) 0-based.
PIXELS = [(900.0, 1000.0), (2500.0, 1500.0), (1700.0, 2900.0)]


def target_table() -> Table:
    x, y = np.array(PIXELS).T
    ra, dec = brick_wcs(BRICK).pixel_to_world_values(x, y)
    return Table({"target_id": ["a", "b", "c"], "ra": np.round(ra, 7), "dec": np.round(dec, 7)})


@pytest.fixture(scope="module")
def bricks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedBrickSource]:
    source = SimulatedBrickSource(SKY, target_table(), cache_dir=tmp_path_factory.mktemp("bricks"))
    yield source
    source.close()


@pytest.fixture(scope="module")
def root(bricks: SimulatedBrickSource) -> Iterator[str]:
    with serve_in_thread(create_app(SimulatedSkySource(SKY), bricks=bricks)) as url:
        yield brick_root(url)


@pytest.fixture(scope="module")
def served_r(root: str) -> fits.HDUList:
    response = httpx.get(coadd_path(root, BRICK, "r"), timeout=120)
    assert response.status_code == 200, response.text
    return fits.open(io.BytesIO(response.content))


def test_bricks_table_lists_target_brick(root: str) -> None:
    response = httpx.get(root + "/survey-bricks.fits", timeout=30)
    table = Table.read(io.BytesIO(response.content), format="fits")
    assert response.status_code == 200
    assert BRICK.name in table["BRICKNAME"].tolist()
    assert set(table.colnames) >= {
        "BRICKNAME",
        "BRICKID",
        "RA",
        "DEC",
        "RA1",
        "RA2",
        "DEC1",
        "DEC2",
    }


def test_served_header_has_brick_wcs(served_r: fits.HDUList) -> None:
    header = served_r[1].header
    assert served_r[1].data.shape == (BRICK_PIXELS, BRICK_PIXELS)
    assert header["CTYPE1"] == "RA---TAN"
    assert header["CRVAL1"] == pytest.approx(BRICK.ra)
    assert header["CRVAL2"] == pytest.approx(BRICK.dec)
    assert header["CRPIX1"] == pytest.approx((BRICK_PIXELS + 1) / 2)
    matrix = WCS(header).pixel_scale_matrix
    assert matrix[0, 0] == pytest.approx(-0.262 / 3600)
    assert matrix[1, 1] == pytest.approx(0.262 / 3600)
    assert matrix[0, 1] == 0.0
    assert header["BRICKNAM"] == BRICK.name


def test_stamp_at_wcs_pixel(served_r: fits.HDUList) -> None:
    image = served_r[1].data.astype(np.float32)
    targets = target_table()
    for (x, y), row in zip(PIXELS, targets, strict=True):
        model = SKY.render(row["ra"], row["dec"], 33, 0.262, "r", noise=False)[0]
        window = image[int(y) - 16 : int(y) + 17, int(x) - 16 : int(x) + 17]
        sigma = SKY.truth(BRICK.ra, BRICK.dec).noise_sigma[1]
        residual = window - model
        peak = np.unravel_index(np.argmax(window), window.shape)
        assert max(abs(peak[0] - 16), abs(peak[1] - 16)) <= 1, peak
        assert np.abs(residual).max() < 6 * sigma
        assert residual.std() == pytest.approx(sigma, rel=0.15)


def test_lossless_equals_render(bricks: SimulatedBrickSource, served_r: fits.HDUList) -> None:
    image, _ = bricks.render(BRICK, "r")
    assert np.array_equal(served_r[1].data, image[0])


def test_invvar_and_maskbits_served(root: str) -> None:
    invvar = fits.open(
        io.BytesIO(httpx.get(coadd_path(root, BRICK, "g", "invvar"), timeout=60).content)
    )
    maskbits = httpx.get(coadd_path(root, BRICK, kind="maskbits"), timeout=60)
    sigma = SKY.truth(BRICK.ra, BRICK.dec).noise_sigma[0]
    assert invvar[1].data[0, 0] == pytest.approx(1 / sigma**2, rel=1e-6)
    assert maskbits.status_code == 200


def test_range_request(root: str) -> None:
    response = httpx.get(coadd_path(root, BRICK, "r"), headers={"Range": "bytes=0-79"}, timeout=60)
    assert response.status_code == 206
    assert response.content.startswith(b"SIMPLE  =")
    assert len(response.content) == 80


def test_outside_footprint_404(root: str) -> None:
    far = brick_for(20.0, -30.0)
    response = httpx.get(coadd_path(root, far, "r"), timeout=30)
    assert response.status_code == 404
    assert "outside the served footprint" in response.text


def test_bad_file_name_404(root: str) -> None:
    response = httpx.get(
        f"{root}/coadd/{BRICK.directory}/{BRICK.name}/legacysurvey-{BRICK.name}-image.fits",
        timeout=30,
    )
    assert response.status_code == 404


def test_catalog_needs_ra_dec() -> None:
    from lensminer.exceptions import SurveyServerError

    with pytest.raises(SurveyServerError, match="ra and dec"):
        SimulatedBrickSource(SKY, Table({"x": [1.0]}))
