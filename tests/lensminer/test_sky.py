"""Tests of the simulated sky: determinism, photometry, noise, lens statistics and rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lenstronomy.LightModel.light_model import LightModel
from scipy import special

from lensminer.sky import (
    SimulatedSky,
    _pixel_grid,
    _sersic_total_flux,
    moffat_kernel,
    render_sersic,
)


@pytest.fixture(scope="module")
def sky() -> SimulatedSky:
    return SimulatedSky(seed=7, lens_fraction=0.05)


@pytest.fixture(scope="module")
def catalog(sky: SimulatedSky):
    return sky.catalog(2000)


def first_position(catalog, is_lens: bool) -> tuple[float, float]:
    row = catalog[catalog["is_lens"] == is_lens][0]
    return float(row["ra"]), float(row["dec"])


def test_render_deterministic(sky: SimulatedSky) -> None:
    first = sky.render(150.1, 2.2, 64, 0.262)
    second = SimulatedSky(seed=7, lens_fraction=0.05).render(150.1, 2.2, 64, 0.262)
    np.testing.assert_array_equal(first, second)


def test_render_differs_between_positions(sky: SimulatedSky) -> None:
    first = sky.render(150.1, 2.2, 64, 0.262)
    second = sky.render(150.1001, 2.2, 64, 0.262)
    assert not np.array_equal(first, second)


def test_render_differs_between_seeds() -> None:
    first = SimulatedSky(seed=1).render(150.1, 2.2, 64, 0.262)
    second = SimulatedSky(seed=2).render(150.1, 2.2, 64, 0.262)
    assert not np.array_equal(first, second)


def test_render_shape_dtype(sky: SimulatedSky) -> None:
    cube = sky.render(10.0, -5.0, 40, 0.262, bands="rz", height=30)
    assert cube.shape == (2, 30, 40)
    assert cube.dtype == np.float32


def test_render_band_subset_matches_full(sky: SimulatedSky) -> None:
    full = sky.render(33.3, 4.4, 48, 0.262)
    np.testing.assert_array_equal(sky.render(33.3, 4.4, 48, 0.262, bands="zg"), full[[2, 0]])


def test_truth_rounds_position(sky: SimulatedSky) -> None:
    assert sky.truth(150.0000001, 2.0) == sky.truth(150.0, 2.0)


def test_truth_ra_wraps(sky: SimulatedSky) -> None:
    assert sky.truth(-10.0, 1.0) == sky.truth(350.0, 1.0)


@pytest.mark.parametrize("ra, dec", [(float("nan"), 0.0), (10.0, 91.0), (10.0, float("inf"))])
def test_truth_rejects_invalid_position(sky: SimulatedSky, ra: float, dec: float) -> None:
    with pytest.raises(ValueError, match="dec|finite"):
        sky.truth(ra, dec)


def test_render_rejects_unknown_band(sky: SimulatedSky) -> None:
    with pytest.raises(ValueError, match="subset"):
        sky.render(1.0, 1.0, 16, 0.262, bands="gri")


def test_flux_matches_magnitude(sky: SimulatedSky, catalog) -> None:
    # A 300 px stamp contains 8 effective radii of every galaxy, where the profile ends.
    for row in catalog[:30]:
        obj = sky.truth(float(row["ra"]), float(row["dec"]))
        image = sky.render(obj.ra, obj.dec, 300, 0.262, noise=False, source=False)
        expected = 10.0 ** ((22.5 - np.array(obj.mags)) / 2.5)
        np.testing.assert_allclose(image.sum(axis=(1, 2)), expected, rtol=0.01)


def test_catalog_magnitudes_match_truth(sky: SimulatedSky, catalog) -> None:
    row = catalog[5]
    obj = sky.truth(float(row["ra"]), float(row["dec"]))
    assert row["mag_z"] == obj.mag_z
    assert row["mag_g"] == pytest.approx(obj.mag_z + obj.r_z + obj.g_r)


def test_noise_sigma_matches_truth(sky: SimulatedSky) -> None:
    obj = sky.truth(200.0, 10.0)
    cube = sky.render(200.0, 10.0, 256, 0.262)
    # The 60 x 60 corner lies more than 80 px (21 arcsec) from the galaxy.
    corners = cube[:, :60, :60].reshape(3, -1)
    np.testing.assert_allclose(corners.std(axis=1), obj.noise_sigma, rtol=0.05)
    # The mean of 3,600 pixels scatters by sigma / 60.
    assert np.all(np.abs(corners.mean(axis=1)) < 4 * np.array(obj.noise_sigma) / 60)


def test_noise_scales_with_pixscale(sky: SimulatedSky) -> None:
    obj = sky.truth(200.0, 10.0)
    cube = sky.render(200.0, 10.0, 256, 0.524)
    corners = cube[:, :40, :40].reshape(3, -1)
    np.testing.assert_allclose(corners.std(axis=1), 2 * np.array(obj.noise_sigma), rtol=0.07)


def test_lens_fraction_within_binomial_error(catalog) -> None:
    n = len(catalog)
    sigma = np.sqrt(0.05 * 0.95 / n)
    assert abs(catalog["is_lens"].mean() - 0.05) < 3 * sigma


def test_catalog_columns(catalog) -> None:
    for column in [
        "target_id",
        "ra",
        "dec",
        "ebv",
        "psfsize_g",
        "psfsize_r",
        "psfsize_z",
        "mag_z",
        "is_lens",
        "label",
    ]:
        assert column in catalog.colnames
    assert catalog["label"].dtype == np.int8
    np.testing.assert_array_equal(catalog["label"], catalog["is_lens"].astype(np.int8))
    assert catalog["target_id"][123] == "sim-000123"
    assert len(set(catalog["target_id"])) == len(catalog)


def test_catalog_within_radius(catalog) -> None:
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    separation = SkyCoord(catalog["ra"], catalog["dec"]).separation(
        SkyCoord(150.0 * u.deg, 2.0 * u.deg)
    )
    assert separation.deg.max() <= 1.0 + 1e-6


def test_catalog_rows_match_truth(sky: SimulatedSky, catalog) -> None:
    for row in catalog[:50]:
        obj = sky.truth(float(row["ra"]), float(row["dec"]))
        assert obj.is_lens == bool(row["is_lens"])
        assert obj.psf_fwhm[0] == row["psfsize_g"]
        assert obj.ebv == row["ebv"]


def test_catalog_seed_changes_positions_only(sky: SimulatedSky) -> None:
    first = sky.catalog(5, seed=1)
    second = sky.catalog(5, seed=2)
    assert not np.array_equal(first["ra"], second["ra"])


def test_lensed_source_only_in_lenses(sky: SimulatedSky, catalog) -> None:
    ra, dec = first_position(catalog, is_lens=True)
    with_source = sky.render(ra, dec, 96, 0.262, noise=False)
    without_source = sky.render(ra, dec, 96, 0.262, noise=False, source=False)
    obj = sky.truth(ra, dec)
    # The lensed source is magnified, so it carries more than its unlensed g flux.
    assert (with_source - without_source)[0].sum() > obj.source_fluxes[0]

    ra, dec = first_position(catalog, is_lens=False)
    np.testing.assert_array_equal(
        sky.render(ra, dec, 96, 0.262, noise=False),
        sky.render(ra, dec, 96, 0.262, noise=False, source=False),
    )


def test_lensed_arcs_near_einstein_radius(sky: SimulatedSky, catalog) -> None:
    ra, dec = first_position(catalog, is_lens=True)
    obj = sky.truth(ra, dec)
    source_light = sky.render(ra, dec, 96, 0.262, noise=False) - sky.render(
        ra, dec, 96, 0.262, noise=False, source=False
    )
    x, y = _pixel_grid(96, 96, 0.262)
    radius = np.hypot(x, y)
    weights = source_light[0]
    mean_radius = (radius * weights).sum() / weights.sum()
    assert 0.6 * obj.theta_e < mean_radius < 1.4 * obj.theta_e


def test_truth_fields(sky: SimulatedSky, catalog) -> None:
    obj = sky.truth(*first_position(catalog, is_lens=True))
    assert obj.galaxy_type == "elliptical"
    assert 1.0 <= obj.theta_e <= 3.0
    assert obj.g_r > 1.3
    data = json.loads(json.dumps(obj.to_dict()))
    assert data["bands"] == "grz"
    assert data["theta_e"] == obj.theta_e


def test_truth_ranges(sky: SimulatedSky, catalog) -> None:
    objects = [sky.truth(float(row["ra"]), float(row["dec"])) for row in catalog[:300]]
    mag_z = np.array([obj.mag_z for obj in objects])
    fwhm = np.array([obj.psf_fwhm for obj in objects])
    sigma = np.array([obj.noise_sigma for obj in objects])
    assert mag_z.min() >= 17.5
    assert mag_z.max() <= 20.5
    assert fwhm.min() >= 1.0
    assert fwhm.max() <= 1.65
    assert sigma.min() >= 0.002
    assert sigma.max() <= 0.01
    assert {obj.galaxy_type for obj in objects} == {"elliptical", "disc"}


def test_sersic_matches_lenstronomy() -> None:
    # Compare inside 4 effective radii, where the taper does not act, at 5x finer pixels than
    # the profile's scale so that pixel integration differs little from point sampling.
    n, r_eff, e1, e2, pixscale = 2.5, 1.5, 0.1, -0.05, 0.05
    x, y = _pixel_grid(121, 121, pixscale)
    fast = render_sersic(x, y, pixscale, n, r_eff, e1, e2)

    light = LightModel(["SERSIC_ELLIPSE"])
    kwargs = [
        {
            "amp": 1.0,
            "R_sersic": r_eff,
            "n_sersic": n,
            "e1": e1,
            "e2": e2,
            "center_x": 0.0,
            "center_y": 0.0,
        }
    ]
    kwargs[0]["amp"] = 1.0 / light.total_flux(kwargs)[0]
    slow = light.surface_brightness(x, y, kwargs) * pixscale**2

    # The tapered profile keeps the total flux, so it is brighter than the untruncated one by
    # the ratio of the untruncated to the tapered total flux.
    b = special.gammaincinv(2 * n, 0.5)
    untruncated = 2 * np.pi * n * np.exp(b) * b ** (-2 * n) * special.gamma(2 * n) * r_eff**2
    ratio = untruncated / _sersic_total_flux(n, r_eff)
    inner = (np.hypot(x, y) > 0.3) & (np.hypot(x, y) < 4 * r_eff)
    np.testing.assert_allclose(fast[inner], slow[inner] * ratio, rtol=0.005)


def test_sersic_taper_share() -> None:
    # For n = 1 almost no light lies beyond 7 effective radii, so taper and normalisation
    # leave the flux inside r_eff at the analytic half.
    n, r_eff, pixscale = 1.0, 1.0, 0.05
    x, y = _pixel_grid(201, 201, pixscale)
    image = render_sersic(x, y, pixscale, n, r_eff, 0.0, 0.0)
    half = image[np.hypot(x, y) < r_eff].sum()
    assert half == pytest.approx(0.5, abs=0.01)


def test_moffat_kernel_fwhm() -> None:
    kernel = moffat_kernel(1.3, 0.05)
    centre = kernel.shape[0] // 2
    profile = kernel[centre] / kernel[centre, centre]
    # The half maximum lies 0.65 arcsec (13 pixels) from the centre.
    assert profile[centre + 13] == pytest.approx(0.5, abs=0.02)
    assert kernel.sum() == pytest.approx(1.0)
    assert kernel.shape[0] % 2 == 1


def test_sky_rejects_invalid_lens_fraction() -> None:
    with pytest.raises(ValueError, match="lens_fraction"):
        SimulatedSky(lens_fraction=1.5)
