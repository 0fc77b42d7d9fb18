"""Tests of FITS and JPEG cutout parsing on real Legacy Survey files and crafted responses."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from lensminer.cutout_io import parse_fits_cutout, parse_jpeg_cutout, read_fits_cutout_file
from lensminer.exceptions import CutoutParseError
from lensminer.stores import RowStatus

# Pixel scales of the real files, from |CD1_1| * 3600 in their headers.
REAL_FILES = {
    "example_a.fits": (424, 0.1),
    "example_b.fits": (424, 0.101364),
    "example_bad_pix.fits": (424, 0.130249),
    "example_c.fits": (424, 0.143230),
    "temp_extended.fits": (424, 1.0),
    "temp_small.fits": (225, 0.262),
}


def fits_bytes(
    cube: np.ndarray,
    *,
    bands: str | None = "grz",
    pixscale: float | None = 0.262,
    extra: list[fits.ImageHDU] | None = None,
) -> bytes:
    header = fits.Header()
    if bands is not None:
        header["BANDS"] = bands
    if pixscale is not None:
        header["CD1_1"], header["CD2_2"] = -pixscale / 3600, pixscale / 3600
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(cube.astype(">f4"), header=header), *(extra or [])]).writeto(
        buffer
    )
    return buffer.getvalue()


def noise_cube(shape: tuple[int, ...] = (3, 8, 8)) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 0.01, shape).astype(np.float32) + 0.001


# Real files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_real_file_parses(shared_data: Path, name: str) -> None:
    size, pixscale = REAL_FILES[name]
    path = shared_data / "decals-fits" / name

    parsed = read_fits_cutout_file(path)
    checked = parse_fits_cutout(path.read_bytes(), bands="grz", size=size, pixscale=pixscale)

    assert parsed.image.shape == (3, size, size)
    assert parsed.image.dtype == np.dtype(np.float32)
    assert parsed.image.dtype.isnative
    assert parsed.bands == "grz"
    assert parsed.pixscale == pytest.approx(pixscale, rel=1e-5)
    np.testing.assert_array_equal(checked.image, fits.getdata(path).astype(np.float32))


def test_real_file_truncated(shared_data: Path) -> None:
    with pytest.raises(CutoutParseError, match="truncated"):
        read_fits_cutout_file(shared_data / "decals-fits" / "example_incomplete.fits")


def test_real_file_bad_pixels(shared_data: Path) -> None:
    parsed = read_fits_cutout_file(shared_data / "decals-fits" / "example_bad_pix.fits")
    clean = read_fits_cutout_file(shared_data / "decals-fits" / "example_a.fits")

    assert parsed.n_bad_pixels > 0
    assert clean.n_bad_pixels == 0
    assert parsed.status == RowStatus.OK


def test_real_file_wrong_pixscale(shared_data: Path) -> None:
    data = (shared_data / "decals-fits" / "temp_small.fits").read_bytes()
    with pytest.raises(
        CutoutParseError, match="pixel scale is 0.26200 arcsec/pixel, requested 0.13100"
    ):
        parse_fits_cutout(data, bands="grz", size=225, pixscale=0.131)


# Crafted responses --------------------------------------------------------------------------


def test_fits_nan_pixels_zeroed() -> None:
    cube = noise_cube()
    cube[0, 1, 1] = np.nan
    cube[2, 3, 4] = np.inf

    parsed = parse_fits_cutout(fits_bytes(cube), bands="grz", size=8, pixscale=0.262)

    assert parsed.n_bad_pixels == 2
    assert parsed.image[0, 1, 1] == 0.0
    assert np.isfinite(parsed.image).all()


def test_fits_all_zero_no_coverage() -> None:
    parsed = parse_fits_cutout(fits_bytes(np.zeros((3, 8, 8))), bands="grz", size=8, pixscale=0.262)
    assert parsed.status == RowStatus.NO_COVERAGE


def test_fits_single_band_2d() -> None:
    parsed = parse_fits_cutout(
        fits_bytes(noise_cube((8, 8)), bands="r"), bands="r", size=8, pixscale=0.262
    )
    assert parsed.image.shape == (1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bands": "gri"}, "header has bands 'grz', requested 'gri'"),
        ({"size": 16}, r"shape \(3, 8, 8\), expected \(3, 16, 16\)"),
        ({"pixscale": 0.5}, "pixel scale"),
    ],
)
def test_fits_mismatch_rejected(kwargs: dict, message: str) -> None:
    request = {"bands": "grz", "size": 8, "pixscale": 0.262, **kwargs}
    with pytest.raises(CutoutParseError, match=message):
        parse_fits_cutout(fits_bytes(noise_cube()), **request)


def test_fits_band_count_mismatch_without_header() -> None:
    with pytest.raises(CutoutParseError, match="expected"):
        parse_fits_cutout(fits_bytes(noise_cube(), bands=None), bands="gr", size=8, pixscale=0.262)


@pytest.mark.parametrize(
    "body", [b"", b"<html>busy</html>", b"no such layer", b"SIMPLE  = garbage"]
)
def test_fits_not_fits(body: bytes) -> None:
    with pytest.raises(CutoutParseError, match="not (valid )?FITS"):
        parse_fits_cutout(body, bands="grz", size=8, pixscale=0.262)


@pytest.mark.parametrize("keep", [2880, 3000, 2880 + 3 * 64 * 4 - 1])
def test_fits_truncated(keep: int) -> None:
    data = fits_bytes(noise_cube())
    with pytest.raises(CutoutParseError, match="truncated"):
        parse_fits_cutout(data[:keep], bands="grz", size=8, pixscale=0.262)


def test_fits_missing_padding_accepted() -> None:
    data = fits_bytes(noise_cube())
    unpadded = data[: 2880 + 3 * 64 * 4]
    assert parse_fits_cutout(unpadded, bands="grz", size=8, pixscale=0.262).image.shape == (3, 8, 8)


def test_fits_invvar_and_maskbits() -> None:
    invvar = fits.ImageHDU(np.full((3, 8, 8), 4.0, ">f4"))
    invvar.header["IMAGETYP"] = "INVVAR"
    maskbits = fits.ImageHDU(np.full((8, 8), 2, ">i2"))
    maskbits.header["IMAGETYP"] = "MASKBITS"

    parsed = parse_fits_cutout(
        fits_bytes(noise_cube(), extra=[invvar, maskbits]), bands="grz", size=8, pixscale=0.262
    )

    assert parsed.invvar is not None and parsed.invvar.shape == (3, 8, 8)
    assert parsed.maskbits is not None and parsed.maskbits.dtype == np.int32


def plane_hdus(
    invvar_shape: tuple[int, ...] = (3, 8, 8),
    maskbits_shape: tuple[int, ...] = (8, 8),
    maskbits_dtype: str = ">i2",
) -> tuple[fits.ImageHDU, fits.ImageHDU]:
    """Return INVVAR and MASKBITS extensions with seeded values, as the service appends them."""
    rng = np.random.default_rng(5)
    invvar = fits.ImageHDU(rng.uniform(100.0, 900.0, invvar_shape).astype(">f4"))
    invvar.header["IMAGETYP"] = "INVVAR"
    maskbits = fits.ImageHDU(rng.integers(0, 1 << 14, maskbits_shape).astype(maskbits_dtype))
    maskbits.header["IMAGETYP"] = "MASKBITS"
    return invvar, maskbits


def test_fits_requested_planes_values() -> None:
    invvar, maskbits = plane_hdus()

    parsed = parse_fits_cutout(
        fits_bytes(noise_cube(), extra=[invvar, maskbits]),
        bands="grz",
        size=8,
        pixscale=0.262,
        invvar=True,
        maskbits=True,
    )

    assert parsed.invvar is not None
    assert parsed.invvar.dtype == np.dtype(np.float32)
    assert parsed.invvar.dtype.isnative
    np.testing.assert_array_equal(parsed.invvar, invvar.data.astype(np.float32))
    assert parsed.maskbits is not None
    assert parsed.maskbits.dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(parsed.maskbits, maskbits.data.astype(np.int32))


@pytest.mark.parametrize(
    ("keep", "request_flags", "message"),
    [
        ("maskbits", {"invvar": True}, "no INVVAR HDU, but the request set invvar=1"),
        ("invvar", {"maskbits": True}, "no MASKBITS HDU, but the request set maskbits=1"),
        ("none", {"invvar": True, "maskbits": True}, "no INVVAR HDU"),
    ],
)
def test_fits_requested_plane_missing(keep: str, request_flags: dict, message: str) -> None:
    invvar, maskbits = plane_hdus()
    extra = {"invvar": [invvar], "maskbits": [maskbits], "none": []}[keep]
    with pytest.raises(CutoutParseError, match=message):
        parse_fits_cutout(
            fits_bytes(noise_cube(), extra=extra),
            bands="grz",
            size=8,
            pixscale=0.262,
            **request_flags,
        )


@pytest.mark.parametrize(
    ("planes", "message"),
    [
        (plane_hdus(invvar_shape=(2, 8, 8)), r"INVVAR plane has shape \(2, 8, 8\), expected"),
        (plane_hdus(maskbits_shape=(8, 7)), r"MASKBITS plane has shape \(8, 7\), expected"),
        (plane_hdus(maskbits_dtype=">f4"), "MASKBITS plane has dtype float32"),
    ],
)
def test_fits_plane_mismatch_rejected(planes: tuple, message: str) -> None:
    with pytest.raises(CutoutParseError, match=message):
        parse_fits_cutout(
            fits_bytes(noise_cube(), extra=list(planes)),
            bands="grz",
            size=8,
            pixscale=0.262,
            invvar=True,
            maskbits=True,
        )


def test_fits_truncated_extension() -> None:
    # 2500 bytes less leaves 612 of the 768 INVVAR data bytes (its padding is gone too).
    invvar = fits.ImageHDU(np.full((3, 8, 8), 4.0, ">f4"))
    invvar.header["IMAGETYP"] = "INVVAR"
    data = fits_bytes(noise_cube(), extra=[invvar])
    with pytest.raises(CutoutParseError, match="truncated"):
        parse_fits_cutout(data[:-2500], bands="grz", size=8, pixscale=0.262)


def jpeg_bytes(size: int) -> bytes:
    rng = np.random.default_rng(2)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    return buffer.getvalue()


def test_jpeg_parses() -> None:
    data = jpeg_bytes(16)
    parsed = parse_jpeg_cutout(data, size=16)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)

    assert parsed.image.shape == (3, 16, 16)
    assert parsed.image.dtype == np.uint8
    np.testing.assert_array_equal(parsed.image, expected)


def test_jpeg_wrong_size() -> None:
    with pytest.raises(CutoutParseError, match="16x16 pixels, requested 32x32"):
        parse_jpeg_cutout(jpeg_bytes(16), size=32)


def test_jpeg_truncated() -> None:
    with pytest.raises(CutoutParseError, match="truncated"):
        parse_jpeg_cutout(jpeg_bytes(64)[:300], size=64)


def test_jpeg_not_jpeg() -> None:
    with pytest.raises(CutoutParseError, match="not JPEG"):
        parse_jpeg_cutout(b"<html>error</html>", size=16)
