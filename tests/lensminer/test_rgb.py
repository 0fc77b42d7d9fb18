"""Tests of the viewer's asinh RGB stretch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from lensminer.rgb import fits_to_picture, to_uint8, viewer_rgb, viewer_rgb_inverse

SCALES = {"g": 6.0, "r": 3.4, "z": 2.2}
PLANES = {"z": 0, "r": 1, "g": 2}


def reference_pixel(values: dict[str, float], offset: float = 0.03, q: float = 20.0) -> list[float]:
    """Stretch one pixel with plain Python, following the viewer's formula term by term."""
    scaled = {band: max(0.0, flux * SCALES[band] + offset) for band, flux in values.items()}
    mean = sum(scaled.values()) / len(scaled)
    rgb = [0.0, 0.0, 0.0]
    for band, value in scaled.items():
        channel = 0.0 if mean == 0 else value * math.asinh(q * mean) / math.sqrt(q) / mean
        rgb[PLANES[band]] = min(1.0, max(0.0, channel))
    return rgb


def test_viewer_rgb_matches_reference() -> None:
    rng = np.random.default_rng(0)
    flux = rng.normal(0.0, 0.5, size=(3, 9, 7)).astype(np.float32)
    flux[:, 0, 0] = -10.0  # every band floored to 0, so I = 0
    flux[:, 0, 1] = 50.0  # saturates

    rgb = viewer_rgb(flux)

    expected = np.zeros((3, 9, 7))
    for row in range(9):
        for column in range(7):
            pixel = {band: float(flux[index, row, column]) for index, band in enumerate("grz")}
            expected[:, row, column] = reference_pixel(pixel)
    np.testing.assert_allclose(rgb, expected, rtol=1e-5, atol=1e-6)


def test_viewer_rgb_black_when_mean_zero() -> None:
    rgb = viewer_rgb(np.full((3, 2, 2), -1.0))
    assert np.all(rgb == 0.0)


def test_viewer_rgb_shape_dtype_and_batch() -> None:
    rng = np.random.default_rng(1)
    batch = rng.normal(0.0, 0.1, size=(4, 3, 8, 8))
    rgb = viewer_rgb(batch.astype(np.float32))
    assert rgb.shape == (4, 3, 8, 8)
    assert rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[2], viewer_rgb(batch[2].astype(np.float32)), rtol=1e-6)


def test_viewer_rgb_band_order_independent() -> None:
    rng = np.random.default_rng(2)
    flux = rng.normal(0.0, 0.3, size=(3, 5, 5))
    np.testing.assert_allclose(
        viewer_rgb(flux[::-1], bands="zrg"), viewer_rgb(flux, bands="grz"), rtol=1e-12
    )


def test_viewer_rgb_rejects_band_mismatch() -> None:
    with pytest.raises(ValueError, match="expected"):
        viewer_rgb(np.zeros((2, 4, 4)), bands="grz")


def test_viewer_rgb_rejects_unknown_band() -> None:
    with pytest.raises(ValueError, match="no viewer colour plane"):
        viewer_rgb(np.zeros((3, 4, 4)), bands="gry")


def test_inverse_recovers_unclipped_flux() -> None:
    # Fluxes whose scaled values stay positive and whose planes stay below 1.
    rng = np.random.default_rng(4)
    flux = rng.uniform(0.0, 0.05, size=(2, 3, 6, 6))
    rgb = viewer_rgb(flux, "grz")
    assert rgb.max() < 1.0
    np.testing.assert_allclose(viewer_rgb_inverse(rgb, "grz"), flux, rtol=1e-4, atol=1e-6)


def test_inverse_then_stretch_is_identity() -> None:
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(3, 3, 5, 5), dtype=np.uint8)
    flux = viewer_rgb_inverse(rgb, "grz")
    np.testing.assert_allclose(viewer_rgb(flux, "grz") * 255.0, rgb, atol=1e-3)


def test_inverse_black_is_floor() -> None:
    flux = viewer_rgb_inverse(np.zeros((3, 1, 1)), "grz")
    expected = [-0.03 / SCALES[band] for band in "grz"]
    np.testing.assert_allclose(flux[:, 0, 0], expected, rtol=1e-6)


def test_inverse_grey_pixel_analytic() -> None:
    # A grey pixel m in every plane has I = sinh(sqrt(q) m) / q and v = I in every band.
    m, q = 0.4, 20.0
    flux = viewer_rgb_inverse(np.full((3, 1, 1), m), "grz")
    intensity = math.sinh(math.sqrt(q) * m) / q
    expected = [(intensity - 0.03) / SCALES[band] for band in "grz"]
    np.testing.assert_allclose(flux[:, 0, 0], expected, rtol=1e-6)


def test_inverse_rejects_two_planes() -> None:
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 3, H, W\)"):
        viewer_rgb_inverse(np.zeros((2, 4, 4)), "grz")


def test_to_uint8_rounds_and_clips() -> None:
    values = np.array([-0.5, 0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(to_uint8(values), np.array([0, 0, 128, 255, 255], dtype=np.uint8))


def test_fits_to_picture_flips_rows() -> None:
    flux = np.zeros((3, 4, 5), dtype=np.float32)
    flux[2, 0, 0] = 5.0  # bright z pixel at FITS row 0 (south), column 0 (east)
    picture = fits_to_picture(flux)
    assert picture.shape == (4, 5, 3)
    assert picture.dtype == np.uint8
    assert picture[-1, 0, 0] == 255
    assert picture[0, 0, 0] < 255


@pytest.mark.shared_data
def test_viewer_rgb_on_real_cutout(shared_data: Path) -> None:
    flux = fits.getdata(shared_data / "decals-fits" / "example_a.fits").astype(np.float32)
    rgb = viewer_rgb(flux)

    assert rgb.shape == (3, 424, 424)
    assert float(rgb.min()) >= 0.0
    assert float(rgb.max()) <= 1.0
    # The galaxy at the centre is brighter than the sky in every plane.
    centre = rgb[:, 200:224, 200:224].mean(axis=(1, 2))
    corner = rgb[:, :40, :40].mean(axis=(1, 2))
    assert np.all(centre > corner)
    rows, columns = (5, 100, 212, 300), (7, 150, 212, 400)
    for row, column in zip(rows, columns, strict=True):
        pixel = {band: float(flux[index, row, column]) for index, band in enumerate("grz")}
        np.testing.assert_allclose(
            rgb[:, row, column], reference_pixel(pixel), rtol=1e-5, atol=1e-6
        )
