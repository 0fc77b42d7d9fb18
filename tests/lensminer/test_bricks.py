"""Tests of the brick grid, brick WCS and coadd paths."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs.utils import proj_plane_pixel_scales

from lensminer.bricks import (
    BRICK_PIXELS,
    BrickGrid,
    brick_for,
    brick_name,
    brick_wcs,
    bricks_for,
    coadd_path,
    default_grid,
)
from lensminer.exceptions import ConfigError


def owns(brick, ra: float, dec: float) -> bool:
    """Slow reference: whether the brick's RA/Dec box contains the position."""
    ra = ra % 360.0
    in_dec = brick.dec1 <= dec < brick.dec2 or (dec == 90.0 and brick.dec2 == 90.0)
    return in_dec and brick.ra1 <= ra < brick.ra2


def test_brick_for_known_name() -> None:
    brick = brick_for(0.1, -0.2)
    assert brick.name == "0001m002"
    assert brick.directory == "000"
    assert brick.dec == -0.25


def test_brick_name_encodes_centre() -> None:
    assert brick_name(112.6, 22.25) == "1126p222"
    assert brick_name(0.125, -0.25) == "0001m002"


def test_brick_for_matches_reference() -> None:
    rng = np.random.default_rng(0)
    ra = rng.uniform(0.0, 360.0, 2000)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, 2000)))
    bricks = bricks_for(ra, dec)
    for brick, r, d in zip(bricks, ra, dec, strict=True):
        assert owns(brick, r, d), (brick, r, d)


def test_vectorised_equals_scalar() -> None:
    rng = np.random.default_rng(1)
    ra = rng.uniform(0.0, 360.0, 50)
    dec = rng.uniform(-89.0, 89.0, 50)
    assert [brick.name for brick in bricks_for(ra, dec)] == [
        brick_for(r, d).name for r, d in zip(ra, dec, strict=True)
    ]


def test_brick_width_near_quarter_degree() -> None:
    grid = default_grid()
    widths = (grid.ra2 - grid.ra1) * np.cos(np.radians(grid.dec))
    rows = np.abs(grid.dec) < 80.0
    assert np.all(np.abs(widths[rows] - 0.25) < 0.01)
    assert np.all(np.isclose(grid.dec2 - grid.dec1, 0.25) | (np.abs(grid.dec) == 90.0))


def test_ra_wrap() -> None:
    assert brick_for(360.0, 1.0) == brick_for(0.0, 1.0)
    assert brick_for(-0.01, 1.0) == brick_for(359.99, 1.0)
    assert brick_for(359.99999, 1.0).ra2 == pytest.approx(360.0)
    assert brick_for(720.05, 1.0) == brick_for(0.05, 1.0)


def test_poles_single_brick() -> None:
    north = {brick_for(ra, 89.95).name for ra in (0.0, 90.0, 180.0, 300.0)}
    south = {brick_for(ra, -90.0).name for ra in (0.0, 123.0)}
    assert north == {brick_for(0.0, 90.0).name}
    assert len(south) == 1
    assert brick_for(10.0, 90.0).dec2 == 90.0
    assert brick_for(10.0, -90.0).dec1 == -90.0


def test_invalid_dec_rejected() -> None:
    with pytest.raises(ValueError, match="dec must be in"):
        brick_for(10.0, 91.0)
    with pytest.raises(ValueError, match="finite"):
        brick_for(float("nan"), 0.0)


def test_brick_wcs_centre_and_scale() -> None:
    brick = brick_for(150.1, 2.1)
    wcs = brick_wcs(brick)
    ra, dec = wcs.pixel_to_world_values((BRICK_PIXELS - 1) / 2, (BRICK_PIXELS - 1) / 2)
    assert ra == pytest.approx(brick.ra, abs=1e-9)
    assert dec == pytest.approx(brick.dec, abs=1e-9)
    assert proj_plane_pixel_scales(wcs) * 3600 == pytest.approx([0.262, 0.262])
    assert wcs.wcs.cd[0, 0] < 0


def test_brick_image_covers_its_box() -> None:
    # The image reaches past the box on every side, so a cutout of up to 160 px fits.
    for ra, dec in ((150.1, 2.1), (10.0, -45.3), (200.0, 70.2)):
        brick = brick_for(ra, dec)
        wcs = brick_wcs(brick)
        corners_ra = [brick.ra1, brick.ra2, brick.ra1, brick.ra2]
        corners_dec = [brick.dec1, brick.dec1, brick.dec2, brick.dec2]
        x, y = wcs.world_to_pixel_values(corners_ra, corners_dec)
        assert np.all(np.minimum(x, y) > 70), (brick, x, y)
        assert np.all(np.maximum(x, y) < BRICK_PIXELS - 70), (brick, x, y)


def test_coadd_path_layout() -> None:
    brick = brick_for(112.6, 22.2)
    assert coadd_path("https://host/dr9/south/", brick, "r") == (
        f"https://host/dr9/south/coadd/112/{brick.name}/legacysurvey-{brick.name}-image-r.fits.fz"
    )
    assert (
        coadd_path("/m", "1126p222", "z", "invvar")
        == "/m/coadd/112/1126p222/legacysurvey-1126p222-invvar-z.fits.fz"
    )
    assert (
        coadd_path("/m", "1126p222", kind="maskbits")
        == "/m/coadd/112/1126p222/legacysurvey-1126p222-maskbits.fits.fz"
    )


def test_coadd_path_needs_band() -> None:
    with pytest.raises(ValueError, match="needs a band"):
        coadd_path("/m", "1126p222")


def test_table_round_trip(tmp_path) -> None:
    table = default_grid().to_table()
    rows = table[(table["DEC"] == 0.0) | (table["DEC"] == 0.25)]
    path = tmp_path / "survey-bricks.fits.gz"
    buffer = fits.BinTableHDU(rows)
    with gzip.open(path, "wb") as handle:
        buffer.writeto(handle)
    grid = BrickGrid.read(str(path))
    ra, dec = np.array([0.1, 100.0]), np.array([0.0, 0.0])
    assert [brick.name for brick in grid.bricks_for(ra, dec)] == [
        brick.name for brick in bricks_for(ra, dec)
    ]
    assert len(grid) == len(rows)


def test_table_missing_column(tmp_path) -> None:
    table = default_grid().to_table()[:5]
    table.remove_column("RA1")
    with pytest.raises(ConfigError, match="RA1"):
        BrickGrid.from_table(table)
