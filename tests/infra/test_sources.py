"""Tests of the image sources: real FITS cutouts and Galaxy Zoo pictures served from a folder."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from PIL import Image

from lensminer.exceptions import SurveyServerError
from lensminer.infra.sources import ImageDirectorySource, parse_iauname
from lensminer.infra.survey_server import create_app, serve_in_thread

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def fits_source(shared_data: Path) -> ImageDirectorySource:
    return ImageDirectorySource(shared_data / "decals-fits")


@pytest.fixture(scope="module")
def picture_source(shared_data: Path) -> ImageDirectorySource:
    folder = shared_data / "gz-decals"
    return ImageDirectorySource(folder, catalog=folder / "catalog.csv")


@pytest.fixture(scope="module")
def fits_url(fits_source: ImageDirectorySource) -> Iterator[str]:
    with serve_in_thread(create_app(fits_source)) as url:
        yield url


@pytest.fixture(scope="module")
def picture_url(picture_source: ImageDirectorySource) -> Iterator[str]:
    with serve_in_thread(create_app(picture_source)) as url:
        yield url


def file_centre(path: Path) -> tuple[float, float, float, np.ndarray]:
    """Return CRVAL1, CRVAL2, the pixscale in arcsec and the data of a centred cutout file."""
    with fits.open(path) as hdul:
        header, data = hdul[0].header, hdul[0].data.astype(np.float32)
    return header["CRVAL1"], header["CRVAL2"], abs(header["CD1_1"]) * 3600, data


def test_iauname_parses() -> None:
    ra, dec = parse_iauname("J000411.19+020924.0")
    assert ra == pytest.approx(15 * (0 + 4 / 60 + 11.19 / 3600))
    assert dec == pytest.approx(2 + 9 / 60 + 24.0 / 3600)
    assert parse_iauname("J001240.06-000210.4")[1] == pytest.approx(-(2 / 60 + 10.4 / 3600))


def test_iauname_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="IAU name"):
        parse_iauname("galaxy_12.png")


def test_truncated_file_skipped_with_warning(
    shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lensminer.infra.sources"):
        source = ImageDirectorySource(shared_data / "decals-fits")
    assert "example_incomplete.fits" in caplog.text
    names = {path.name for path in source.fits_paths}
    assert "example_incomplete.fits" not in names
    assert "example_a.fits" in names


@pytest.mark.parametrize("name", ["example_a.fits", "example_c.fits", "temp_small.fits"])
def test_native_request_returns_file(fits_url: str, shared_data: Path, name: str) -> None:
    ra, dec, pixscale, data = file_centre(shared_data / "decals-fits" / name)
    params = {"ra": repr(ra), "dec": repr(dec), "pixscale": repr(pixscale), "size": data.shape[-1]}
    response = httpx.get(fits_url + "fits-cutout", params=params, timeout=30)
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(
        fits.getdata(io.BytesIO(response.content)).astype(np.float32), data
    )


def test_offset_request_shifts_pixels(fits_source: ImageDirectorySource, shared_data: Path) -> None:
    ra, dec, pixscale, data = file_centre(shared_data / "decals-fits" / "example_c.fits")
    # Centred 10 px north of the file's centre pixel 211.5, a 100 px cutout starts at file row
    # 211.5 + 10 - 49.5 = 172 and column 211.5 - 49.5 = 162.
    cube = fits_source.image(ra, dec + 10 * pixscale / 3600, 100, 100, pixscale, "grz")
    np.testing.assert_allclose(cube, data[:, 172:272, 162:262], rtol=1e-5, atol=1e-6)


def test_pixscale_change_keeps_flux(fits_source: ImageDirectorySource, shared_data: Path) -> None:
    ra, dec, pixscale, data = file_centre(shared_data / "decals-fits" / "example_c.fits")
    # A 200 x 200 native region resampled to pixels twice as wide.
    cube = fits_source.image(ra, dec, 100, 100, 2 * pixscale, "grz")
    native = data[:, 112:312, 112:312].sum(axis=(1, 2))
    np.testing.assert_allclose(cube.sum(axis=(1, 2)), native, rtol=0.02)


def test_same_centre_prefers_closer_pixscale(
    fits_source: ImageDirectorySource, shared_data: Path
) -> None:
    # example_a (0.1 arcsec/px) and temp_small (0.262 arcsec/px) share their centre.
    ra, dec, _, small = file_centre(shared_data / "decals-fits" / "temp_small.fits")
    np.testing.assert_array_equal(fits_source.image(ra, dec, 225, 225, 0.262, "grz"), small)


def test_outside_footprint_is_none(fits_source: ImageDirectorySource) -> None:
    assert fits_source.image(300.0, -60.0, 32, 32, 0.262, "grz") is None


def test_outside_footprint_serves_zeros(fits_url: str) -> None:
    response = httpx.get(fits_url + "fits-cutout", params={"ra": 300, "dec": -60, "size": 32})
    assert response.status_code == 200
    assert not fits.getdata(io.BytesIO(response.content)).any()


def test_picture_served_by_iauname(picture_url: str, shared_data: Path) -> None:
    row = Table.read(shared_data / "gz-decals" / "catalog.csv", format="ascii.csv")[0]
    ra, dec = parse_iauname(row["iauname"])
    response = httpx.get(picture_url + "jpeg-cutout", params={"ra": ra, "dec": dec, "size": 424})
    assert response.status_code == 200
    served = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)
    original = np.asarray(
        Image.open(shared_data / "gz-decals" / row["png"]).convert("RGB"), dtype=np.float64
    )
    assert np.abs(served - original).mean() < 3.0


def test_picture_resized(picture_source: ImageDirectorySource, shared_data: Path) -> None:
    row = Table.read(shared_data / "gz-decals" / "catalog.csv", format="ascii.csv")[1]
    ra, dec = parse_iauname(row["iauname"])
    assert picture_source.picture(ra, dec, 64, 48, 0.262, "grz").shape == (48, 64, 3)


def test_picture_fits_request_rejected(picture_url: str, shared_data: Path) -> None:
    row = Table.read(shared_data / "gz-decals" / "catalog.csv", format="ascii.csv")[0]
    ra, dec = parse_iauname(row["iauname"])
    response = httpx.get(picture_url + "fits-cutout", params={"ra": ra, "dec": dec, "size": 64})
    assert response.status_code == 400
    assert "jpeg-cutout" in response.text


def test_picture_with_pixscale_cuts_region(shared_data: Path) -> None:
    folder = shared_data / "gz-decals"
    source = ImageDirectorySource(folder, png_pixscale=0.2)
    row = Table.read(folder / "catalog.csv", format="ascii.csv")[0]
    ra, dec = parse_iauname(row["iauname"])
    original = np.asarray(Image.open(folder / row["png"]).convert("RGB"))
    np.testing.assert_array_equal(source.picture(ra, dec, 424, 424, 0.2, "grz"), original)
    # Half the side at the same scale is the central part of the picture.
    np.testing.assert_array_equal(
        source.picture(ra, dec, 212, 212, 0.2, "grz"), original[106:318, 106:318]
    )


def test_missing_folder_rejected(tmp_path: Path) -> None:
    with pytest.raises(SurveyServerError, match="not found"):
        ImageDirectorySource(tmp_path / "absent")
