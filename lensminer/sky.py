"""A deterministic simulated sky: one galaxy at every position, some of them strong lenses.

Every (ra, dec) has a galaxy whose properties are a pure function of the sky's seed and the
position, so a catalog drawn from the sky and the cutouts rendered for its rows agree without
any stored state. Images are in nanomaggies per pixel in g, r and z, in FITS orientation
(row 0 south, east left), with the galaxy at the cutout centre.

Galaxies are Sersic profiles: red ellipticals and bluer discs, convolved with a Moffat PSF per
band, plus Gaussian pixel noise. A share ``lens_fraction`` of positions is a strong lens:
an SIE plus external shear (lenstronomy) that lenses a blue Sersic source behind a red
elliptical. The deflector light uses the same Sersic renderer as every other galaxy, so a
classifier cannot tell lenses from non-lenses by rendering artefacts of the deflector.

Magnitudes are AB: ``flux [nmgy] = 10 ** ((22.5 - mag) / 2.5)``. Magnitudes and colours in
:class:`SkyObject` are observed values, which include Galactic reddening by ``ebv``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from lenstronomy.Data.imaging_data import ImageData
from lenstronomy.Data.psf import PSF
from lenstronomy.ImSim.image_model import ImageModel
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import param_util
from scipy import integrate, signal, special

__all__ = [
    "NATIVE_PIXSCALE",
    "SKY_BANDS",
    "SimulatedSky",
    "SkyObject",
    "moffat_kernel",
    "render_sersic",
]

logger = logging.getLogger(__name__)

#: Bands of the simulated sky, in the order of every per-band tuple.
SKY_BANDS = "grz"

#: Pixel scale in arcsec per pixel at which the per-pixel noise sigma of :class:`SkyObject` applies.
NATIVE_PIXSCALE = 0.262

#: Extinction A_band / E(B-V) for g, r, z, the values that the augmentation also uses.
REDDENING_COEFFICIENTS = (3.214, 2.165, 1.211)

#: Moffat index of the PSF, an assumed typical value for ground-based seeing.
MOFFAT_BETA = 3.5

#: Sersic profiles fall to 0 between these radii, in units of the effective radius, so that
#: a stamp of 16 effective radii contains the whole catalog flux.
SERSIC_TAPER_START = 7.0
SERSIC_TAPER_END = 8.0

# Positions are rounded to this step in degrees (3.6 mas) before hashing into the RNG seed.
_POSITION_STEP = 1e-6

# Second entries of the seed sequence, one per independent random stream of a position.
_STREAM_TRUTH = 0
_STREAM_NOISE = 1
_STREAM_CATALOG = 2


@dataclass(frozen=True)
class SkyObject:
    """Properties of the simulated galaxy (and lens, if any) at one position.

    Per-band tuples are in :data:`SKY_BANDS` order (g, r, z). Lens and source fields are 0 when
    ``is_lens`` is false. Ellipticities ``e1, e2`` use lenstronomy's convention:
    ``e = (1 - q) / (1 + q)`` with ``q`` the axis ratio, rotated by twice the angle of the major
    axis from the +RA (east) axis towards north. Radii are circularised, ``sqrt(a * b)``.
    """

    ra: float
    dec: float
    is_lens: bool
    galaxy_type: str
    mag_z: float
    g_r: float
    r_z: float
    sersic_n: float
    r_eff: float
    e1: float
    e2: float
    theta_e: float
    lens_e1: float
    lens_e2: float
    gamma1: float
    gamma2: float
    source_x: float
    source_y: float
    source_mag_g: float
    source_g_r: float
    source_r_z: float
    source_sersic_n: float
    source_r_eff: float
    source_e1: float
    source_e2: float
    psf_fwhm: tuple[float, float, float]
    ebv: float
    noise_sigma: tuple[float, float, float]

    @property
    def mags(self) -> tuple[float, float, float]:
        """Observed AB magnitudes of the galaxy in g, r, z."""
        mag_r = self.mag_z + self.r_z
        return (mag_r + self.g_r, mag_r, self.mag_z)

    @property
    def fluxes(self) -> tuple[float, float, float]:
        """Total galaxy flux in g, r, z in nanomaggies."""
        return tuple(_mag_to_nanomaggies(mag) for mag in self.mags)  # type: ignore[return-value]

    @property
    def source_fluxes(self) -> tuple[float, float, float]:
        """Unlensed source flux in g, r, z in nanomaggies; zeros for a non-lens."""
        if not self.is_lens:
            return (0.0, 0.0, 0.0)
        mag_g = self.source_mag_g
        mag_r = mag_g - self.source_g_r
        return (
            _mag_to_nanomaggies(mag_g),
            _mag_to_nanomaggies(mag_r),
            _mag_to_nanomaggies(mag_r - self.source_r_z),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-ready builtins, with ``bands`` naming the tuple order."""
        data = dataclasses.asdict(self)
        data["psf_fwhm"] = list(self.psf_fwhm)
        data["noise_sigma"] = list(self.noise_sigma)
        data["bands"] = SKY_BANDS
        return data


class SimulatedSky:
    """A deterministic sky with a galaxy at every position and a share of strong lenses.

    Parameters
    ----------
    seed
        Seed of the whole sky; the same seed gives the same objects and pixels everywhere.
    lens_fraction
        Probability that a position has a strong lens, in [0, 1].
    supersampling
        Sub-pixels per pixel side used by lenstronomy to ray-trace the lensed source.
    """

    def __init__(self, seed: int = 0, lens_fraction: float = 0.05, supersampling: int = 3) -> None:
        if not 0.0 <= lens_fraction <= 1.0:
            raise ValueError(f"lens_fraction must be in [0, 1], got {lens_fraction!r}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if supersampling < 1:
            raise ValueError(f"supersampling must be at least 1, got {supersampling!r}")
        self.seed = int(seed)
        self.lens_fraction = float(lens_fraction)
        self.supersampling = int(supersampling)
        self._lens_model = LensModel(["SIE", "SHEAR"])
        self._source_model = LightModel(["SERSIC_ELLIPSE"])

    def __repr__(self) -> str:
        return f"SimulatedSky(seed={self.seed}, lens_fraction={self.lens_fraction})"

    # Truth ---------------------------------------------------------------------------------

    def truth(self, ra: float, dec: float) -> SkyObject:
        """Return the object at (ra, dec) in degrees.

        The result depends only on the sky's seed, ``lens_fraction`` and the position rounded
        to 1e-6 degrees.
        """
        ra_key, dec_key = _position_keys(ra, dec)
        rng = np.random.default_rng([self.seed, _STREAM_TRUTH, ra_key, dec_key])

        # Observing conditions: seeing is worse in bluer bands, noise per 0.262" pixel.
        is_lens = bool(rng.random() < self.lens_fraction)
        fwhm_z = rng.uniform(1.0, 1.35)
        psf_fwhm = (fwhm_z * rng.uniform(1.08, 1.2), fwhm_z * rng.uniform(1.03, 1.12), fwhm_z)
        noise_sigma = (
            rng.uniform(0.002, 0.005),
            rng.uniform(0.003, 0.007),
            rng.uniform(0.005, 0.010),
        )
        ebv = float(min(0.005 + rng.gamma(2.0, 0.015), 0.3))

        # The galaxy: lens deflectors are bright red ellipticals.
        if is_lens:
            galaxy_type = "elliptical"
            mag_z = rng.uniform(17.5, 19.5)
            g_r, r_z = rng.uniform(1.5, 2.0), rng.uniform(0.9, 1.3)
        elif rng.random() < 0.45:
            galaxy_type = "elliptical"
            mag_z = rng.uniform(17.5, 20.5)
            g_r, r_z = rng.uniform(1.3, 1.8), rng.uniform(0.7, 1.1)
        else:
            galaxy_type = "disc"
            mag_z = rng.uniform(17.5, 20.5)
            g_r, r_z = rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.6)
        if galaxy_type == "elliptical":
            sersic_n = rng.uniform(3.0, 5.0)
            size_dex = rng.uniform(-0.1, 0.3)
            axis_ratio = rng.uniform(0.6, 1.0)
        else:
            sersic_n = rng.uniform(0.7, 1.5)
            size_dex = rng.uniform(0.0, 0.4)
            axis_ratio = rng.uniform(0.3, 1.0)
        # Brighter galaxies are larger: about 0.15 dex per magnitude.
        r_eff = 10.0 ** (size_dex - 0.15 * (mag_z - 19.0))
        angle = rng.uniform(0.0, np.pi)
        e1, e2 = param_util.phi_q2_ellipticity(angle, axis_ratio)
        g_r_observed = g_r + (REDDENING_COEFFICIENTS[0] - REDDENING_COEFFICIENTS[1]) * ebv
        r_z_observed = r_z + (REDDENING_COEFFICIENTS[1] - REDDENING_COEFFICIENTS[2]) * ebv

        lens = _draw_lens(rng, axis_ratio, angle, ebv) if is_lens else _NO_LENS
        return SkyObject(
            ra=float(ra_key * _POSITION_STEP),
            dec=float(dec_key * _POSITION_STEP - 90.0),
            is_lens=is_lens,
            galaxy_type=galaxy_type,
            mag_z=float(mag_z),
            g_r=float(g_r_observed),
            r_z=float(r_z_observed),
            sersic_n=float(sersic_n),
            r_eff=float(r_eff),
            e1=float(e1),
            e2=float(e2),
            psf_fwhm=tuple(float(value) for value in psf_fwhm),  # type: ignore[arg-type]
            ebv=ebv,
            noise_sigma=tuple(float(value) for value in noise_sigma),  # type: ignore[arg-type]
            **lens,
        )

    # Rendering ----------------------------------------------------------------------------

    def render(
        self,
        ra: float,
        dec: float,
        size: int,
        pixscale: float,
        bands: str = "grz",
        *,
        height: int | None = None,
        noise: bool = True,
        source: bool = True,
    ) -> np.ndarray:
        """Render the cutout centred on (ra, dec).

        Parameters
        ----------
        ra, dec
            Centre in degrees; the object at this position sits at the cutout centre, pixel
            ``((W - 1) / 2, (H - 1) / 2)`` counted from 0.
        size
            Width ``W`` in pixels (and height unless ``height`` is given).
        pixscale
            Pixel scale in arcsec per pixel. Noise sigma per pixel scales as
            ``pixscale / 0.262``, as for sky-limited noise averaged over a larger pixel.
        bands
            Bands to render, a subset of ``"grz"`` in any order.
        height
            Height ``H`` in pixels; defaults to ``size``.
        noise
            Add Gaussian pixel noise. The noise of a band depends on the position, size,
            pixscale and band, not on which other bands are requested.
        source
            Include the lensed source light (only changes lenses).

        Returns
        -------
        numpy.ndarray
            float32 array of shape ``(len(bands), H, W)`` in nanomaggies per pixel, FITS
            orientation (row 0 south, east left).
        """
        height = size if height is None else height
        _check_render_request(size, height, pixscale, bands)
        obj = self.truth(ra, dec)
        band_indices = [SKY_BANDS.index(band) for band in bands]
        x, y = _pixel_grid(size, height, pixscale)

        # The galaxy has the same shape in every band: render it once with unit flux.
        galaxy = render_sersic(x, y, pixscale, obj.sersic_n, obj.r_eff, obj.e1, obj.e2)
        lensed = None
        if obj.is_lens and source:
            lensed = self._render_lensed_source(obj, size, height, pixscale)

        cube = np.empty((len(bands), height, size), dtype=np.float32)
        for out_index, band_index in enumerate(band_indices):
            image = galaxy * obj.fluxes[band_index]
            if lensed is not None:
                image = image + lensed * obj.source_fluxes[band_index]
            kernel = moffat_kernel(obj.psf_fwhm[band_index], pixscale)
            image = signal.fftconvolve(image, kernel, mode="same")

            if noise:
                sigma = obj.noise_sigma[band_index] * pixscale / NATIVE_PIXSCALE
                noise_rng = self._noise_rng(ra, dec, size, height, pixscale, band_index)
                image = image + noise_rng.normal(0.0, sigma, size=image.shape)
            cube[out_index] = image
        return cube

    def _noise_rng(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, band_index: int
    ) -> np.random.Generator:
        ra_key, dec_key = _position_keys(ra, dec)
        pixscale_key = int(round(pixscale * 1e6))
        return np.random.default_rng(
            [self.seed, _STREAM_NOISE, ra_key, dec_key, width, height, pixscale_key, band_index]
        )

    def _render_lensed_source(
        self, obj: SkyObject, width: int, height: int, pixscale: float
    ) -> np.ndarray:
        """Ray-trace the source through the SIE and shear; unit unlensed flux, before the PSF."""
        data = ImageData(
            image_data=np.zeros((height, width)),
            transform_pix2angle=np.array([[-pixscale, 0.0], [0.0, pixscale]]),
            ra_at_xy_0=(width - 1) / 2 * pixscale,
            dec_at_xy_0=-(height - 1) / 2 * pixscale,
        )
        image_model = ImageModel(
            data,
            PSF(psf_type="NONE"),
            lens_model_class=self._lens_model,
            source_model_class=self._source_model,
            kwargs_numerics={"supersampling_factor": self.supersampling},
        )
        kwargs_source = [
            {
                "amp": 1.0,
                "R_sersic": obj.source_r_eff,
                "n_sersic": obj.source_sersic_n,
                "e1": obj.source_e1,
                "e2": obj.source_e2,
                "center_x": obj.source_x,
                "center_y": obj.source_y,
            }
        ]
        kwargs_source[0]["amp"] = 1.0 / self._source_model.total_flux(kwargs_source)[0]
        kwargs_lens = [
            {
                "theta_E": obj.theta_e,
                "e1": obj.lens_e1,
                "e2": obj.lens_e2,
                "center_x": 0.0,
                "center_y": 0.0,
            },
            {"gamma1": obj.gamma1, "gamma2": obj.gamma2, "ra_0": 0.0, "dec_0": 0.0},
        ]
        # lenstronomy integrates over pixels, so the image is in flux per pixel and sums to the
        # magnification times the unit source flux.
        flux = image_model.source_surface_brightness(kwargs_source, kwargs_lens, unconvolved=True)
        return np.asarray(flux, dtype=np.float64)

    # Catalog ------------------------------------------------------------------------------

    def catalog(
        self,
        n: int,
        ra_center: float = 150.0,
        dec_center: float = 2.0,
        radius: float = 1.0,
        seed: int | None = None,
    ) -> Table:
        """Draw ``n`` positions uniformly on the sky within ``radius`` degrees of a centre.

        Parameters
        ----------
        n
            Number of rows.
        ra_center, dec_center
            Centre of the field in degrees.
        radius
            Radius of the field in degrees.
        seed
            Seed of the positions; defaults to the sky's seed. The objects at the positions
            always come from the sky's seed.

        Returns
        -------
        astropy.table.Table
            Columns ``target_id`` (``"sim-000000"`` onwards, in row order), ``ra``, ``dec``
            (deg, rounded to 1e-6 deg so that a client printing 6 decimals gets the same
            object), ``ebv``, ``psfsize_g/r/z`` (PSF FWHM, arcsec), ``mag_g/r/z`` (AB),
            ``is_lens`` (bool) and ``label`` (int8, equal to ``is_lens``).
        """
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n!r}")
        if not 0.0 < radius <= 90.0:
            raise ValueError(f"radius must be in (0, 90] degrees, got {radius!r}")
        _position_keys(ra_center, dec_center)
        rng = np.random.default_rng([self.seed if seed is None else seed, _STREAM_CATALOG])

        # Uniform in solid angle: cos(separation) is uniform between cos(radius) and 1.
        cos_separation = rng.uniform(np.cos(np.radians(radius)), 1.0, size=n)
        separation = np.degrees(np.arccos(np.clip(cos_separation, -1.0, 1.0)))
        position_angle = rng.uniform(0.0, 360.0, size=n)
        center = SkyCoord(ra_center * u.deg, dec_center * u.deg)
        positions = center.directional_offset_by(position_angle * u.deg, separation * u.deg)
        ra = np.round(positions.ra.deg % 360.0, 6) % 360.0
        dec = np.round(positions.dec.deg, 6)

        objects = [self.truth(float(r), float(d)) for r, d in zip(ra, dec, strict=True)]
        is_lens = np.array([obj.is_lens for obj in objects], dtype=bool)
        table = Table()
        table["target_id"] = [f"sim-{index:06d}" for index in range(n)]
        table["ra"] = ra
        table["dec"] = dec
        table["ebv"] = np.array([obj.ebv for obj in objects], dtype=np.float64)
        for band_index, band in enumerate(SKY_BANDS):
            table[f"psfsize_{band}"] = np.array([obj.psf_fwhm[band_index] for obj in objects])
        for band_index, band in enumerate(SKY_BANDS):
            table[f"mag_{band}"] = np.array([obj.mags[band_index] for obj in objects])
        table["is_lens"] = is_lens
        table["label"] = is_lens.astype(np.int8)
        for column, unit in [
            ("ra", u.deg),
            ("dec", u.deg),
            ("psfsize_g", u.arcsec),
            ("psfsize_r", u.arcsec),
            ("psfsize_z", u.arcsec),
        ]:
            table[column].unit = unit
        logger.debug(
            "drew %d catalog rows around (%.4f, %.4f), %d lenses",
            n,
            ra_center,
            dec_center,
            int(is_lens.sum()),
        )
        return table


# Lens parameters of a non-lens.
_NO_LENS: dict[str, float] = {
    "theta_e": 0.0,
    "lens_e1": 0.0,
    "lens_e2": 0.0,
    "gamma1": 0.0,
    "gamma2": 0.0,
    "source_x": 0.0,
    "source_y": 0.0,
    "source_mag_g": 0.0,
    "source_g_r": 0.0,
    "source_r_z": 0.0,
    "source_sersic_n": 0.0,
    "source_r_eff": 0.0,
    "source_e1": 0.0,
    "source_e2": 0.0,
}


def _draw_lens(
    rng: np.random.Generator, light_axis_ratio: float, light_angle: float, ebv: float
) -> dict[str, float]:
    """Draw SIE, shear and source parameters; the mass is roughly aligned with the light."""
    theta_e = rng.uniform(1.0, 3.0)
    mass_axis_ratio = float(np.clip(light_axis_ratio + rng.normal(0.0, 0.05), 0.5, 1.0))
    mass_angle = light_angle + np.radians(rng.normal(0.0, 10.0))
    lens_e1, lens_e2 = param_util.phi_q2_ellipticity(mass_angle, mass_axis_ratio)
    gamma1, gamma2 = rng.normal(0.0, 0.04, size=2)

    # Sources inside half the Einstein radius form bright arcs or rings.
    offset = theta_e * 0.5 * np.sqrt(rng.uniform(0.01, 1.0))
    offset_angle = rng.uniform(0.0, 2.0 * np.pi)
    source_e1, source_e2 = param_util.phi_q2_ellipticity(
        rng.uniform(0.0, np.pi), rng.uniform(0.5, 1.0)
    )
    source_g_r = (
        rng.uniform(0.0, 0.5) + (REDDENING_COEFFICIENTS[0] - REDDENING_COEFFICIENTS[1]) * ebv
    )
    source_r_z = (
        rng.uniform(0.0, 0.5) + (REDDENING_COEFFICIENTS[1] - REDDENING_COEFFICIENTS[2]) * ebv
    )
    source_mag_g = rng.uniform(20.5, 22.5) + REDDENING_COEFFICIENTS[0] * ebv
    return {
        "theta_e": float(theta_e),
        "lens_e1": float(lens_e1),
        "lens_e2": float(lens_e2),
        "gamma1": float(gamma1),
        "gamma2": float(gamma2),
        "source_x": float(offset * np.cos(offset_angle)),
        "source_y": float(offset * np.sin(offset_angle)),
        "source_mag_g": float(source_mag_g),
        "source_g_r": float(source_g_r),
        "source_r_z": float(source_r_z),
        "source_sersic_n": float(rng.uniform(0.8, 1.5)),
        "source_r_eff": float(rng.uniform(0.15, 0.5)),
        "source_e1": float(source_e1),
        "source_e2": float(source_e2),
    }


def _mag_to_nanomaggies(mag: float) -> float:
    return float(10.0 ** ((22.5 - mag) / 2.5))


def _position_keys(ra: float, dec: float) -> tuple[int, int]:
    """Quantise a position to integer keys: RA wrapped into [0, 360), Dec shifted to [0, 180]."""
    if not (math.isfinite(ra) and math.isfinite(dec)):
        raise ValueError(
            f"ra and dec must be finite numbers of degrees, got ra={ra!r}, dec={dec!r}"
        )
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"dec must be in [-90, 90] degrees, got {dec!r}")
    steps_per_turn = round(360.0 / _POSITION_STEP)
    ra_key = round((ra % 360.0) / _POSITION_STEP) % steps_per_turn
    dec_key = round((dec + 90.0) / _POSITION_STEP)
    return int(ra_key), int(dec_key)


def _check_render_request(width: int, height: int, pixscale: float, bands: str) -> None:
    if width < 1 or height < 1:
        raise ValueError(
            f"cutout size must be at least 1 pixel, got width={width!r}, height={height!r}"
        )
    if not (math.isfinite(pixscale) and pixscale > 0):
        raise ValueError(
            f"pixscale must be a positive number of arcsec per pixel, got {pixscale!r}"
        )
    unknown = [band for band in bands if band not in SKY_BANDS]
    if not bands or unknown:
        raise ValueError(f"bands must be a non-empty subset of {SKY_BANDS!r}, got {bands!r}")


def _pixel_grid(width: int, height: int, pixscale: float) -> tuple[np.ndarray, np.ndarray]:
    """Angular offsets in arcsec of each pixel centre from the cutout centre, shape (H, W).

    ``x`` grows to the east, which is left in FITS orientation, and ``y`` grows to the north.
    """
    columns = (np.arange(width) - (width - 1) / 2) * -pixscale
    rows = (np.arange(height) - (height - 1) / 2) * pixscale
    return np.meshgrid(columns, rows)


def _sersic_b(n: float) -> float:
    """Return b_n such that half the untruncated Sersic flux lies inside the effective radius."""
    return float(special.gammaincinv(2.0 * n, 0.5))


def _sersic_profile(radius_ratio: np.ndarray, n: float, b: float) -> np.ndarray:
    """Return the tapered Sersic brightness at ``radius_ratio = R / r_eff``, 1 at ``r_eff``."""
    profile = np.exp(-b * (np.power(radius_ratio, 1.0 / n) - 1.0))
    ramp = np.clip(
        (radius_ratio - SERSIC_TAPER_START) / (SERSIC_TAPER_END - SERSIC_TAPER_START), 0.0, 1.0
    )
    return profile * 0.5 * (1.0 + np.cos(np.pi * ramp))


def _sersic_total_flux(n: float, r_eff: float) -> float:
    """Total flux of the tapered profile with brightness 1 at ``r_eff``, in arcsec^2 units."""
    b = _sersic_b(n)
    integrand = lambda s: _sersic_profile(np.asarray(s), n, b) * 2.0 * np.pi * s  # noqa: E731
    inner, _ = integrate.quad(integrand, 0.0, 1.0, limit=200)
    outer, _ = integrate.quad(integrand, 1.0, SERSIC_TAPER_END, limit=200)
    return float((inner + outer) * r_eff**2)


def render_sersic(
    x: np.ndarray,
    y: np.ndarray,
    pixscale: float,
    n: float,
    r_eff: float,
    e1: float,
    e2: float,
    *,
    oversample: int = 9,
    core_halfwidth: int = 4,
) -> np.ndarray:
    """Render a unit-flux elliptical Sersic profile centred at (0, 0), integrated over pixels.

    Pixels are sampled at their centres, except a core of ``2 * core_halfwidth + 2`` pixels per
    side around the centre, which is averaged over ``oversample**2`` sub-pixels because the
    profile is steep there. The profile is tapered to 0 between 7 and 8 effective radii.

    Parameters
    ----------
    x, y
        Offsets of pixel centres from the profile centre in arcsec, shape (H, W), ``x`` east
        and ``y`` north, as returned for a regular grid with spacing ``pixscale``.
    pixscale
        Pixel side in arcsec.
    n
        Sersic index.
    r_eff
        Circularised effective (half-light) radius in arcsec.
    e1, e2
        Ellipticity components in lenstronomy's convention.

    Returns
    -------
    numpy.ndarray
        float64 array of shape (H, W): flux per pixel, summing to 1 when the stamp contains
        the whole profile.
    """
    angle, axis_ratio = param_util.ellipticity2phi_q(e1, e2)
    b = _sersic_b(n)
    brightness_scale = pixscale**2 / _sersic_total_flux(n, r_eff)
    cos_angle, sin_angle = np.cos(angle), np.sin(angle)

    def brightness(dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        along = cos_angle * dx + sin_angle * dy
        across = -sin_angle * dx + cos_angle * dy
        radius = np.sqrt(axis_ratio * along**2 + across**2 / axis_ratio)
        return _sersic_profile(radius / r_eff, n, b)

    image = brightness(x, y) * brightness_scale

    # Average the core pixels over a finer grid of sub-pixel centres.
    height, width = x.shape
    row_centre, column_centre = (height - 1) / 2, (width - 1) / 2
    rows = slice(
        max(0, math.floor(row_centre) - core_halfwidth),
        min(height, math.ceil(row_centre) + core_halfwidth + 1),
    )
    columns = slice(
        max(0, math.floor(column_centre) - core_halfwidth),
        min(width, math.ceil(column_centre) + core_halfwidth + 1),
    )
    offsets = (np.arange(oversample) + 0.5) / oversample - 0.5
    core_x = x[rows, columns][..., None, None] - offsets[None, :] * pixscale
    core_y = y[rows, columns][..., None, None] + offsets[:, None] * pixscale
    image[rows, columns] = brightness(core_x, core_y).mean(axis=(-2, -1)) * brightness_scale
    return image


def moffat_kernel(
    fwhm: float, pixscale: float, beta: float = MOFFAT_BETA, oversample: int = 3
) -> np.ndarray:
    """Return a pixel-integrated circular Moffat PSF normalised to unit sum.

    Parameters
    ----------
    fwhm
        Full width at half maximum in arcsec.
    pixscale
        Pixel side in arcsec.
    beta
        Moffat index.
    oversample
        Sub-pixels per pixel side used to integrate over each pixel.

    Returns
    -------
    numpy.ndarray
        float64 array of shape (K, K) with odd ``K``, reaching 4 FWHM from the centre, where a
        Moffat with beta 3.5 has less than 0.5 % of its flux outside.
    """
    halfwidth = max(1, math.ceil(4.0 * fwhm / pixscale))
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    sub = (np.arange((2 * halfwidth + 1) * oversample) + 0.5) / oversample - (halfwidth + 0.5)
    xx, yy = np.meshgrid(sub * pixscale, sub * pixscale)
    fine = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-beta)
    kernel = fine.reshape(2 * halfwidth + 1, oversample, 2 * halfwidth + 1, oversample).sum(
        axis=(1, 3)
    )
    return kernel / kernel.sum()
