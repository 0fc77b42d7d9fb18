"""Brick geometry of the Legacy Surveys: which brick owns a position, and its coadd WCS and files.

The survey cuts the sky into bricks of about 0.25 x 0.25 degrees. A brick name encodes its
centre: ``1126p222`` is near RA 112.6, Dec +22.2 (``m`` for negative Dec), and its coadds live
under ``coadd/<AAA>/<brick>/`` where ``AAA`` is the first three characters of the name. Each
coadd is a TAN projection of 3600 x 3600 pixels at 0.262 arcsec per pixel centred on the brick
centre. 3600 pixels are about 0.262 degrees, so the images of neighbouring bricks overlap by
about 80 pixels on each side.

:class:`BrickGrid` finds bricks either from an official ``survey-bricks.fits(.gz)`` table or
from a computed grid (:meth:`BrickGrid.default`). The computed grid has Dec rows 0.25 degrees
high, centred on multiples of 0.25 degrees. Each row is split into
``n = max(1, round(360 cos(dec) / 0.25))`` bricks of equal RA width, the first starting at RA 0.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from lensminer import storage
from lensminer.exceptions import ConfigError

__all__ = [
    "BRICK_PIXELS",
    "BRICK_PIXSCALE",
    "Brick",
    "BrickGrid",
    "brick_for",
    "brick_name",
    "brick_wcs",
    "bricks_for",
    "coadd_path",
    "default_grid",
]

logger = logging.getLogger(__name__)

#: Side of a brick coadd in pixels.
BRICK_PIXELS = 3600

#: Pixel scale of brick coadds in arcsec per pixel.
BRICK_PIXSCALE = 0.262

#: Height of a Dec row, and the target width of a brick, in degrees.
BRICK_SIZE = 0.25

#: Columns of a survey-bricks table that this module reads.
TABLE_COLUMNS = ("BRICKNAME", "BRICKID", "RA", "DEC", "RA1", "RA2", "DEC1", "DEC2")

CoaddKind = Literal["image", "invvar", "model", "maskbits"]


@dataclass(frozen=True)
class Brick:
    """One brick: its name, id, centre and the RA/Dec box it owns, all in degrees.

    ``ra1 <= ra < ra2`` and ``dec1 <= dec < dec2`` is the region for which this brick is the
    primary one; its coadd image covers a little more.
    """

    name: str
    brickid: int
    ra: float
    dec: float
    ra1: float
    ra2: float
    dec1: float
    dec2: float

    @property
    def directory(self) -> str:
        """The ``AAA`` sub-directory of ``coadd/`` that contains this brick's folder."""
        return self.name[:3]


def brick_name(ra: float, dec: float) -> str:
    """Return the survey's name of the brick centred at (ra, dec), e.g. ``1126p222``.

    RA and |Dec| are written in tenths of a degree, truncated, as the survey does.
    """
    sign = "p" if dec >= 0 else "m"
    return f"{int(ra * 10 + 1e-9):04d}{sign}{int(abs(dec) * 10 + 1e-9):03d}"


class BrickGrid:
    """A table of bricks with vectorised lookup of the brick that owns a position.

    Build it with :meth:`from_table` (an official survey-bricks table), :meth:`read` (the same
    from a file) or :meth:`default` (the computed grid). Bricks must form Dec rows that share
    DEC1/DEC2, and each row must start at RA1 = 0 and tile RA without gaps, as in the survey's
    table. All angles are degrees, one array element per brick.
    """

    def __init__(
        self,
        names: np.ndarray,
        brickids: np.ndarray,
        ra: np.ndarray,
        dec: np.ndarray,
        ra1: np.ndarray,
        ra2: np.ndarray,
        dec1: np.ndarray,
        dec2: np.ndarray,
    ) -> None:
        # Sort by row, then by RA inside the row, so a lookup is two binary searches.
        dec1 = np.asarray(dec1, dtype=np.float64)
        ra1 = np.asarray(ra1, dtype=np.float64)
        order = np.lexsort((ra1, dec1))
        self.names = np.strings.strip(np.asarray(names).astype(str)[order])
        self.brickids = np.asarray(brickids, dtype=np.int64)[order]
        self.ra = np.asarray(ra, dtype=np.float64)[order]
        self.dec = np.asarray(dec, dtype=np.float64)[order]
        self.ra1 = ra1[order]
        self.ra2 = np.asarray(ra2, dtype=np.float64)[order]
        self.dec1 = dec1[order]
        self.dec2 = np.asarray(dec2, dtype=np.float64)[order]

        self.row_dec1, row_of_brick = np.unique(self.dec1, return_inverse=True)
        self._keys = row_of_brick * 360.0 + self.ra1
        logger.debug(
            "brick grid with %d bricks in %d Dec rows", len(self.names), len(self.row_dec1)
        )

    @classmethod
    def from_table(cls, table: Table) -> BrickGrid:
        """Build a grid from a table with the survey-bricks columns (case-insensitive).

        Raises
        ------
        ConfigError
            If a column is missing.
        """
        names = {name.upper(): name for name in table.colnames}
        missing = [column for column in TABLE_COLUMNS if column not in names]
        if missing:
            raise ConfigError(
                f"brick table lacks columns {missing}; expected {list(TABLE_COLUMNS)} as in "
                "survey-bricks.fits"
            )
        return cls(*(np.asarray(table[names[column]]) for column in TABLE_COLUMNS))

    @functools.cached_property
    def _index_of_name(self) -> dict[str, int]:
        return {str(name): index for index, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Brick]:
        return (self.brick(index) for index in range(len(self)))

    def __repr__(self) -> str:
        return f"BrickGrid({len(self)} bricks)"

    @classmethod
    def default(cls) -> BrickGrid:
        """Return the computed grid described in the module docstring (cached)."""
        return default_grid()

    @classmethod
    def read(cls, url: str, storage_options: dict[str, Any] | None = None) -> BrickGrid:
        """Read a ``survey-bricks.fits`` or ``.fits.gz`` table from a path or fsspec URL.

        Raises
        ------
        FileNotFoundError
            If nothing exists at ``url``.
        ConfigError
            If the file is not a FITS table with the brick columns.
        """
        fs, path = storage.filesystem(url, storage_options)
        with fs.open(path, "rb", compression="infer") as handle:
            try:
                with fits.open(handle) as hdus:
                    hdu = next((hdu for hdu in hdus if isinstance(hdu, fits.BinTableHDU)), None)
                    if hdu is None:
                        raise ConfigError(
                            f"{url!r} has no FITS binary table; expected survey-bricks.fits"
                        )
                    table = Table(hdu.data)
            except OSError as error:
                raise ConfigError(
                    f"{url!r} is not a readable FITS file ({error}); expected survey-bricks.fits"
                ) from error
        logger.debug("read brick table %s with %d rows", url, len(table))
        return cls.from_table(table)

    def brick(self, index: int) -> Brick:
        """Return the brick at position ``index`` of the sorted table."""
        return Brick(
            name=str(self.names[index]),
            brickid=int(self.brickids[index]),
            ra=float(self.ra[index]),
            dec=float(self.dec[index]),
            ra1=float(self.ra1[index]),
            ra2=float(self.ra2[index]),
            dec1=float(self.dec1[index]),
            dec2=float(self.dec2[index]),
        )

    def by_name(self, name: str) -> Brick:
        """Return the brick called ``name``.

        Raises
        ------
        KeyError
            If the grid has no brick of that name.
        """
        try:
            return self.brick(self._index_of_name[name])
        except KeyError:
            raise KeyError(f"no brick named {name!r} in {self!r}") from None

    def indices_for(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Return the table index of the brick that owns each position.

        Parameters
        ----------
        ra, dec
            Positions in degrees, any matching shapes. RA is wrapped into [0, 360); Dec must be
            in [-90, 90].

        Returns
        -------
        numpy.ndarray
            int64 indices with the broadcast shape of ``ra`` and ``dec``.

        Raises
        ------
        ValueError
            If a coordinate is not finite or a Dec is outside [-90, 90].
        """
        ra, dec = np.broadcast_arrays(
            np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
        )
        if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
            raise ValueError(
                "ra and dec must be finite degrees; drop or fix the non-finite positions"
            )
        if np.any(np.abs(dec) > 90.0):
            bad = dec[np.abs(dec) > 90.0].ravel()[:5]
            raise ValueError(f"dec must be in [-90, 90] degrees, got {bad.tolist()}")

        # Row by DEC1, then brick by RA1 inside the row; dec = +90 falls into the last row.
        row = np.clip(
            np.searchsorted(self.row_dec1, dec, side="right") - 1, 0, len(self.row_dec1) - 1
        )
        wrapped = np.mod(ra, 360.0)
        index = np.searchsorted(self._keys, row * 360.0 + wrapped, side="right") - 1
        return index.astype(np.int64)

    def bricks_for(self, ra: np.ndarray, dec: np.ndarray) -> list[Brick]:
        """Return the brick that owns each position, for 1-D arrays of degrees."""
        return [self.brick(int(index)) for index in np.ravel(self.indices_for(ra, dec))]

    def brick_for(self, ra: float, dec: float) -> Brick:
        """Return the brick that owns the position (ra, dec) in degrees."""
        return self.brick(int(self.indices_for(np.asarray(ra), np.asarray(dec))))

    def to_table(self) -> Table:
        """Return the grid as a table with the survey-bricks columns."""
        return Table(
            {
                "BRICKNAME": self.names.astype("U8"),
                "BRICKID": self.brickids.astype(np.int32),
                "RA": self.ra,
                "DEC": self.dec,
                "RA1": self.ra1,
                "RA2": self.ra2,
                "DEC1": self.dec1,
                "DEC2": self.dec2,
            }
        )


@functools.cache
def default_grid() -> BrickGrid:
    """Return the computed brick grid (660,046 bricks), built once per process.

    NOTE: this reproduces the layout of the survey's brick table (0.25-degree Dec rows, about
    0.25-degree wide bricks, names from the centre) but not necessarily its exact RA split of
    every row or its BRICKID numbers. Pass the official survey-bricks.fits table through
    BrickConfig.bricks_table when ids or names must match the released data.
    """
    row_centres = np.arange(-360, 361) * BRICK_SIZE
    counts = np.maximum(1, np.round(360.0 * np.cos(np.radians(row_centres)) / BRICK_SIZE)).astype(
        np.int64
    )

    # One entry per brick: its row and its position inside the row.
    row_of_brick = np.repeat(np.arange(row_centres.size), counts)
    starts = np.cumsum(counts) - counts
    column = np.arange(row_of_brick.size) - starts[row_of_brick]
    step = 360.0 / counts[row_of_brick]
    ra1 = column * step
    ra = ra1 + step / 2
    dec = row_centres[row_of_brick]
    dec1 = np.maximum(dec - BRICK_SIZE / 2, -90.0)
    dec2 = np.minimum(dec + BRICK_SIZE / 2, 90.0)

    brickids = np.arange(1, ra.size + 1)
    return BrickGrid(_brick_names(ra, dec), brickids, ra, dec, ra1, ra1 + step, dec1, dec2)


def _brick_names(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Vectorised :func:`brick_name` for arrays of brick centres in degrees."""
    ra_tenths = np.floor(ra * 10 + 1e-9).astype(np.int64).astype("U4")
    dec_tenths = np.floor(np.abs(dec) * 10 + 1e-9).astype(np.int64).astype("U3")
    sign = np.where(dec >= 0, "p", "m")
    return np.strings.add(
        np.strings.add(np.strings.zfill(ra_tenths, 4), sign), np.strings.zfill(dec_tenths, 3)
    )


def brick_for(ra: float, dec: float, grid: BrickGrid | None = None) -> Brick:
    """Return the brick that owns (ra, dec) in degrees, in ``grid`` or the default grid."""
    return (grid or default_grid()).brick_for(ra, dec)


def bricks_for(ra: np.ndarray, dec: np.ndarray, grid: BrickGrid | None = None) -> list[Brick]:
    """Return the brick that owns each position of 1-D arrays ``ra``, ``dec`` in degrees."""
    return (grid or default_grid()).bricks_for(ra, dec)


def brick_wcs(brick: Brick, size: int = BRICK_PIXELS, pixscale: float = BRICK_PIXSCALE) -> WCS:
    """Return the TAN WCS of a brick's coadds.

    The tangent point is the brick centre at FITS pixel ``((size + 1) / 2, (size + 1) / 2)``,
    with east left (``CD1_1 = -pixscale / 3600``) and north up, pixscale in arcsec per pixel.
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [brick.ra, brick.dec]
    wcs.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    wcs.wcs.cd = [[-pixscale / 3600.0, 0.0], [0.0, pixscale / 3600.0]]
    wcs.pixel_shape = (size, size)
    return wcs


def coadd_path(
    root: str, brick: Brick | str, band: str | None = None, kind: CoaddKind = "image"
) -> str:
    """Return the URL of a brick coadd file under a data-release root.

    ``{root}/coadd/{AAA}/{brick}/legacysurvey-{brick}-{kind}-{band}.fits.fz``, and
    ``legacysurvey-{brick}-maskbits.fits.fz`` for ``kind="maskbits"`` (which has no band).

    Raises
    ------
    ValueError
        If ``band`` is missing for a per-band kind, or ``kind`` is unknown.
    """
    name = brick if isinstance(brick, str) else brick.name
    folder = storage.join_url(root, "coadd", name[:3], name)
    if kind == "maskbits":
        return f"{folder}/legacysurvey-{name}-maskbits.fits.fz"
    if kind not in ("image", "invvar", "model"):
        raise ValueError(f"unknown coadd kind {kind!r}; expected image, invvar, model or maskbits")
    if not band:
        raise ValueError(f"coadd kind {kind!r} needs a band, e.g. band='r'")
    return f"{folder}/legacysurvey-{name}-{kind}-{band}.fits.fz"
