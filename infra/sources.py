"""Image sources behind the local cutout server: the simulated sky, a folder of real images, and
simulated brick coadds.

A source returns cutouts in FITS orientation (row 0 south, east left) on a TAN grid centred on
the requested position. It returns ``None`` where it has no coverage, and the server then sends
an all-zero cube as the public service does.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.coordinates import angular_separation
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from PIL import Image
from scipy import ndimage

from lensminer.bricks import (
    BRICK_PIXELS,
    BRICK_PIXSCALE,
    Brick,
    BrickGrid,
    brick_wcs,
    coadd_path,
    default_grid,
)
from lensminer.exceptions import SurveyServerError
from lensminer.rgb import fits_to_picture
from lensminer.sky import NATIVE_PIXSCALE, SKY_BANDS, SimulatedSky

__all__ = [
    "CutoutSource",
    "ImageDirectorySource",
    "SimulatedBrickSource",
    "SimulatedSkySource",
    "cutout_wcs",
    "parse_iauname",
]

logger = logging.getLogger(__name__)

FITS_SUFFIXES = (".fits", ".fit", ".fits.fz", ".fits.gz")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: Smallest and largest side in pixels of the stamp drawn for each target in a simulated brick.
STAMP_MIN = 64
STAMP_MAX = 152

#: File written into a simulated brick's folder after all its files.
COMPLETE_MARKER = ".complete"

# Entry of the random seed sequence for brick noise, apart from the sky's own streams.
_STREAM_BRICK_NOISE = 7

_IAUNAME = re.compile(r"J(\d{2})(\d{2})(\d{2}(?:\.\d+)?)([+-])(\d{2})(\d{2})(\d{2}(?:\.\d+)?)")


def cutout_wcs(ra: float, dec: float, width: int, height: int, pixscale: float) -> WCS:
    """Return the TAN WCS of a cutout as the Legacy Survey service writes it.

    The reference pixel is the centre, ``((W + 1) / 2, (H + 1) / 2)`` in FITS 1-based pixels,
    at (ra, dec) in degrees. ``CD1_1 = -pixscale / 3600`` puts east on the left and
    ``CD2_2 = +pixscale / 3600`` puts north up, with pixscale in arcsec per pixel.
    """
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [(width + 1) / 2, (height + 1) / 2]
    wcs.wcs.cd = [[-pixscale / 3600.0, 0.0], [0.0, pixscale / 3600.0]]
    wcs.pixel_shape = (width, height)
    return wcs


def parse_iauname(name: str) -> tuple[float, float]:
    """Return (ra, dec) in degrees encoded in an IAU name such as ``J000411.19+020924.0``.

    Raises
    ------
    ValueError
        If ``name`` does not contain ``JHHMMSS.ss+DDMMSS.s``.
    """
    match = _IAUNAME.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not an IAU name of the form JHHMMSS.ss+DDMMSS.s")
    hours, minutes, seconds, sign, degrees, arcmin, arcsec = match.groups()
    ra = 15.0 * (int(hours) + int(minutes) / 60.0 + float(seconds) / 3600.0)
    dec = int(degrees) + int(arcmin) / 60.0 + float(arcsec) / 3600.0
    return ra, -dec if sign == "-" else dec


class CutoutSource:
    """Base class of the images that the cutout server serves.

    Subclasses implement :meth:`image`; the other methods have defaults that derive from it or
    reject the request. ``bands`` lists the bands the source can serve, and ``survey`` is
    written into the FITS header's ``SURVEY`` card.
    """

    bands: str = SKY_BANDS
    survey: str = "LegacySurvey"

    def image(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray | None:
        """Return a float32 cube ``(len(bands), height, width)`` in nanomaggies, or None."""
        raise NotImplementedError

    def invvar(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray | None:
        """Return the inverse variance cube ``(len(bands), height, width)`` in nanomaggies^-2."""
        raise SurveyServerError(
            f"{type(self).__name__} has no inverse variance; request without invvar"
        )

    def maskbits(
        self, ra: float, dec: float, width: int, height: int, pixscale: float
    ) -> np.ndarray | None:
        """Return the int32 maskbits plane ``(height, width)``."""
        raise SurveyServerError(f"{type(self).__name__} has no maskbits; request without maskbits")

    def picture(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray:
        """Return the ``(height, width, 3)`` uint8 picture of a JPEG cutout, row 0 north."""
        cube = self.image(ra, dec, width, height, pixscale, bands)
        if cube is None:
            cube = np.zeros((len(bands), height, width), dtype=np.float32)
        return fits_to_picture(cube, bands)


class SimulatedSkySource(CutoutSource):
    """Cutouts rendered by a :class:`~lensminer.sky.SimulatedSky`; every position is covered."""

    survey = "LensMinerSimulatedSky"

    def __init__(self, sky: SimulatedSky) -> None:
        self.sky = sky

    def __repr__(self) -> str:
        return f"SimulatedSkySource({self.sky!r})"

    def image(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray:
        return self.sky.render(ra, dec, width, pixscale, bands, height=height)

    def invvar(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray:
        obj = self.sky.truth(ra, dec)
        sigma = (
            np.array([obj.noise_sigma[SKY_BANDS.index(band)] for band in bands])
            * pixscale
            / NATIVE_PIXSCALE
        )
        return np.broadcast_to((1.0 / sigma**2)[:, None, None], (len(bands), height, width)).astype(
            np.float32
        )

    def maskbits(
        self, ra: float, dec: float, width: int, height: int, pixscale: float
    ) -> np.ndarray:
        # The simulated sky has no bright stars, bad pixels or large galaxies to mask.
        return np.zeros((height, width), dtype=np.int32)


@dataclass(frozen=True)
class _FitsImage:
    path: Path
    data: np.ndarray  # (n_bands, H, W) float32, native byte order
    wcs: WCS
    bands: str
    ra: float
    dec: float
    pixscale: float  # arcsec per pixel


@dataclass(frozen=True)
class _Picture:
    path: Path
    ra: float
    dec: float


class ImageDirectorySource(CutoutSource):
    """Real images in a folder: FITS cutouts found by their WCS, PNG/JPEG pictures by position.

    Parameters
    ----------
    path
        Folder searched recursively for ``*.fits`` (also ``.fit``, ``.fits.fz``, ``.fits.gz``)
        and ``*.png``/``*.jpg`` files. Every FITS image is read into memory at start, so the
        folder is meant to hold cutouts, not survey-scale coadds.
    catalog
        CSV table naming the pictures: a file column (``png``, ``file``, ``path`` or
        ``filename``, relative to the table's folder) and either ``ra``/``dec`` columns in
        degrees or an ``iauname`` column. Without it, pictures are placed by an IAU name in
        their file name.
    png_pixscale
        Pixel scale of the pictures in arcsec per pixel. When set, a picture covers
        ``png_pixscale * side`` arcsec and is cut and resampled like a FITS image. When None,
        a request within ``match_radius`` of a picture gets the whole picture resized to the
        requested size, whatever its pixscale.
    match_radius
        Distance in arcsec within which a request matches a picture when ``png_pixscale`` is
        None.
    """

    def __init__(
        self,
        path: str | Path,
        catalog: str | Path | None = None,
        png_pixscale: float | None = None,
        match_radius: float = 1.0,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SurveyServerError(
                f"image folder {str(self.path)!r} not found; pass an existing folder"
            )
        if png_pixscale is not None and not png_pixscale > 0:
            raise SurveyServerError(
                f"png_pixscale must be positive arcsec per pixel, got {png_pixscale!r}"
            )
        self.png_pixscale = png_pixscale
        self.match_radius = match_radius

        files = sorted(file for file in self.path.rglob("*") if file.is_file())
        self._fits = [
            image
            for file in files
            if _has_suffix(file, FITS_SUFFIXES)
            if (image := _read_fits(file))
        ]
        if catalog is not None:
            self._pictures = _pictures_from_catalog(Path(catalog))
        else:
            self._pictures = _pictures_from_names(
                [file for file in files if _has_suffix(file, PICTURE_SUFFIXES)]
            )
        self.bands = (
            "".join(dict.fromkeys("".join(image.bands for image in self._fits))) or SKY_BANDS
        )
        logger.info(
            "indexed %d FITS images and %d pictures in %s",
            len(self._fits),
            len(self._pictures),
            self.path,
        )

    def __repr__(self) -> str:
        counts = f"fits={len(self._fits)}, pictures={len(self._pictures)}"
        return f"ImageDirectorySource({str(self.path)!r}, {counts})"

    @property
    def fits_paths(self) -> list[Path]:
        """Paths of the FITS images that were read successfully."""
        return [image.path for image in self._fits]

    def image(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray | None:
        image = self._find_fits(ra, dec, pixscale)
        if image is None:
            if self._find_picture(ra, dec) is not None:
                raise SurveyServerError(
                    f"only a PNG/JPEG picture covers ra={ra}, dec={dec}, so there is no FITS data; "
                    "request jpeg-cutout instead"
                )
            return None

        planes = []
        for band in bands:
            if band in image.bands:
                planes.append(image.data[image.bands.index(band)])
            else:
                logger.debug("%s has no %s band; serving zeros", image.path.name, band)
                planes.append(np.zeros(image.data.shape[1:], dtype=np.float32))
        cube = _resample(np.stack(planes), image.wcs, cutout_wcs(ra, dec, width, height, pixscale))

        # Pixel values are flux per pixel, so they scale with the pixel area.
        area_ratio = (pixscale / image.pixscale) ** 2
        if not math.isclose(area_ratio, 1.0, rel_tol=1e-9):
            cube *= area_ratio
        return cube

    def picture(
        self, ra: float, dec: float, width: int, height: int, pixscale: float, bands: str
    ) -> np.ndarray:
        if self._find_fits(ra, dec, pixscale) is not None:
            return super().picture(ra, dec, width, height, pixscale, bands)
        found = self._find_picture(ra, dec)
        if found is None:
            return super().picture(ra, dec, width, height, pixscale, bands)

        with Image.open(found.path) as opened:
            rgb = opened.convert("RGB")
        if self.png_pixscale is None:
            # NOTE: the pictures' own pixel scale is unknown, so the whole picture is resized to
            # the requested size and the requested pixscale is ignored.
            return np.asarray(rgb.resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)

        # Resample in FITS orientation on the TAN grid that the picture is assumed to have.
        pixels = np.flipud(np.asarray(rgb, dtype=np.float32)).transpose(2, 0, 1)
        picture_wcs = cutout_wcs(
            found.ra, found.dec, pixels.shape[2], pixels.shape[1], self.png_pixscale
        )
        cube = _resample(pixels, picture_wcs, cutout_wcs(ra, dec, width, height, pixscale))
        return np.ascontiguousarray(
            np.flipud(np.clip(np.round(cube), 0, 255).astype(np.uint8).transpose(1, 2, 0))
        )

    def _find_fits(self, ra: float, dec: float, pixscale: float) -> _FitsImage | None:
        """Return the image whose footprint contains (ra, dec) and whose centre is nearest.

        Images with the same centre are ranked by how close their pixel scale is to ``pixscale``.
        """
        best: tuple[float, float, _FitsImage] | None = None
        for image in self._fits:
            x, y = image.wcs.world_to_pixel_values(ra, dec)
            height, width = image.data.shape[1:]
            if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
                continue
            separation = _separation_arcsec(ra, dec, image.ra, image.dec)
            rank = (round(separation, 3), abs(math.log(image.pixscale / pixscale)), image)
            if best is None or rank[:2] < best[:2]:
                best = rank
        return None if best is None else best[2]

    def _find_picture(self, ra: float, dec: float) -> _Picture | None:
        """Return the nearest picture that covers (ra, dec), or None."""
        if not self._pictures:
            return None
        separations = [
            _separation_arcsec(ra, dec, picture.ra, picture.dec) for picture in self._pictures
        ]
        nearest = int(np.argmin(separations))
        picture = self._pictures[nearest]
        if self.png_pixscale is None:
            return picture if separations[nearest] <= self.match_radius else None
        with Image.open(picture.path) as opened:
            side_width, side_height = opened.size
        x, y = cutout_wcs(
            picture.ra, picture.dec, side_width, side_height, self.png_pixscale
        ).world_to_pixel_values(ra, dec)
        inside = -0.5 <= x <= side_width - 0.5 and -0.5 <= y <= side_height - 0.5
        return picture if inside else None


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    radians = angular_separation(
        math.radians(ra1), math.radians(dec1), math.radians(ra2), math.radians(dec2)
    )
    return math.degrees(float(radians)) * 3600.0


def _read_fits(path: Path) -> _FitsImage | None:
    """Read a FITS cutout and its celestial WCS; log a warning and return None if that fails."""
    # astropy warns about truncated files before failing, so the log line carries its warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False) as hdul:
                hdu = next(
                    (hdu for hdu in hdul if hdu.data is not None and hdu.data.ndim in (2, 3)), None
                )
                if hdu is None:
                    raise ValueError("no 2-D or 3-D image HDU")
                header = hdu.header
                data = np.asarray(hdu.data, dtype=np.float32)
                wcs = WCS(header, naxis=2)
        except (OSError, TypeError, ValueError) as error:
            details = "; ".join([str(warning.message) for warning in caught] + [str(error)])
            logger.warning("skipping %s: cannot read it as a FITS image (%s)", path, details)
            return None

    if data.ndim == 2:
        data = data[None]
    bands = str(header.get("BANDS", "")) or "".join(
        str(header.get(f"BAND{index}", "?")) for index in range(data.shape[0])
    )
    if len(bands) != data.shape[0]:
        logger.warning(
            "skipping %s: BANDS %r does not match %d image planes", path, bands, data.shape[0]
        )
        return None
    if not wcs.has_celestial:
        logger.warning("skipping %s: no celestial WCS in its header", path)
        return None
    centre_ra, centre_dec = wcs.pixel_to_world_values(
        (data.shape[2] - 1) / 2, (data.shape[1] - 1) / 2
    )
    pixscale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    logger.debug("indexed %s: bands %s, %.3f arcsec/px", path.name, bands, pixscale)
    return _FitsImage(path, data, wcs, bands, float(centre_ra), float(centre_dec), pixscale)


def _pictures_from_names(paths: list[Path]) -> list[_Picture]:
    pictures = []
    for path in paths:
        try:
            ra, dec = parse_iauname(path.name)
        except ValueError:
            logger.warning("skipping %s: no IAU name in the file name and no catalog given", path)
            continue
        pictures.append(_Picture(path, ra, dec))
    return pictures


def _pictures_from_catalog(catalog: Path) -> list[_Picture]:
    if not catalog.is_file():
        raise SurveyServerError(
            f"picture catalog {str(catalog)!r} not found; pass an existing CSV file"
        )
    table = Table.read(catalog, format="ascii.csv")
    file_column = next(
        (name for name in ("png", "file", "path", "filename") if name in table.colnames), None
    )
    if file_column is None:
        raise SurveyServerError(
            f"picture catalog {str(catalog)!r} has columns {table.colnames}, expected a file "
            "column named png, file, path or filename"
        )
    has_coordinates = "ra" in table.colnames and "dec" in table.colnames
    if not has_coordinates and "iauname" not in table.colnames:
        raise SurveyServerError(
            f"picture catalog {str(catalog)!r} needs ra and dec columns or an iauname column"
        )

    pictures = []
    for row in table:
        path = catalog.parent / str(row[file_column])
        if not path.is_file():
            logger.warning("skipping catalog row %s: file %s not found", row[file_column], path)
            continue
        if has_coordinates:
            ra, dec = float(row["ra"]), float(row["dec"])
        else:
            ra, dec = parse_iauname(str(row["iauname"]))
        pictures.append(_Picture(path, ra, dec))
    return pictures


def _resample(planes: np.ndarray, source_wcs: WCS, target_wcs: WCS) -> np.ndarray:
    """Interpolate ``planes`` (n, H_in, W_in) onto the pixel grid of ``target_wcs``.

    Bilinear interpolation at the position of each target pixel centre; target pixels outside
    the source footprint are 0. Values are not rescaled for pixel area.
    """
    width, height = target_wcs.pixel_shape
    columns, rows = np.meshgrid(
        np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    )
    ra, dec = target_wcs.pixel_to_world_values(columns, rows)
    x, y = source_wcs.celestial.world_to_pixel_values(ra, dec)

    # Snap coordinates that are integers up to rounding, so an aligned grid copies pixels exactly.
    for coordinate in (x, y):
        nearest = np.round(coordinate)
        aligned = np.abs(coordinate - nearest) < 1e-6
        coordinate[aligned] = nearest[aligned]

    source_height, source_width = planes.shape[1:]
    inside = (x >= -0.5) & (x <= source_width - 0.5) & (y >= -0.5) & (y <= source_height - 0.5)
    # NOTE: bilinear sampling does not average over the larger output pixels when the requested
    # pixscale is coarser than the image's, so downsampled noise and fine structure alias.
    out = np.zeros((planes.shape[0], height, width), dtype=np.float32)
    for index, plane in enumerate(planes):
        sampled = ndimage.map_coordinates(plane, [y, x], order=1, mode="nearest")
        out[index] = np.where(inside, sampled, 0.0)
    return out


class SimulatedBrickSource:
    """Brick coadds of a simulated sky with a galaxy at each position of a target catalog.

    Each brick image is Gaussian sky noise plus a stamp for every target whose stamp overlaps
    the brick. A stamp is the noise-free :meth:`SimulatedSky.render` image of the object, shifted
    by a cubic spline to the target's sub-pixel position on the brick's TAN grid. A
    brick is rendered when one of its files is first requested and is kept as tile-compressed
    FITS files under ``cache_dir``, in the layout of a data release
    (``coadd/<AAA>/<brick>/legacysurvey-<brick>-<kind>[-<band>].fits.fz``).

    Parameters
    ----------
    sky
        The simulated sky that draws each object.
    targets
        Table with ``ra`` and ``dec`` columns in degrees.
    grid
        Brick grid; the computed default grid when None.
    cache_dir
        Folder of the rendered files. None uses a new temporary folder, deleted by
        :meth:`close`, and keeps at most ``max_cached`` bricks in it (least recently used go
        first). A given folder keeps every brick, so it can serve as a local mirror.
    max_cached
        Bricks kept in a temporary ``cache_dir``.
    margin
        Pixels beyond a brick's image edge within which a target makes the brick part of the
        served footprint, so that cutouts of up to ``2 * margin`` pixels around a target near
        an edge can be filled from the neighbouring brick.
    quantize_level
        None writes lossless GZIP_2 floats. A number writes lossy RICE_1 with that quantize
        level (noise sigma divided by the quantisation step), which gives files about 4 times
        smaller, as lossy quantisation does for the survey's own coadds.

        NOTE: with astropy 8.0.2, lossy files decode about 2.5 % of pixels (those within half
        a quantisation step of 0) as exactly 0, which is the survey's value for no coverage;
        why dithering does not prevent it is not yet understood.
    """

    survey = "LensMinerSimulatedSky"

    def __init__(
        self,
        sky: SimulatedSky,
        targets: Table,
        *,
        grid: BrickGrid | None = None,
        cache_dir: str | Path | None = None,
        max_cached: int = 4,
        margin: int = 256,
        quantize_level: float | None = None,
    ) -> None:
        missing = [name for name in ("ra", "dec") if name not in targets.colnames]
        if missing:
            raise SurveyServerError(
                f"brick catalog lacks columns {missing}; pass a table with ra and dec in degrees"
            )
        if max_cached < 1:
            raise SurveyServerError(f"max_cached must be at least 1 brick, got {max_cached!r}")
        if quantize_level is not None and not quantize_level > 0:
            raise SurveyServerError(
                "quantize_level must be positive or None for lossless files, "
                f"got {quantize_level!r}"
            )
        self.sky = sky
        self.grid = grid or default_grid()
        self.ra = np.asarray(targets["ra"], dtype=np.float64)
        self.dec = np.asarray(targets["dec"], dtype=np.float64)
        self.margin = int(margin)
        self.quantize_level = quantize_level
        self.max_cached = int(max_cached)

        self._temporary = cache_dir is None
        self.cache_dir = (
            Path(tempfile.mkdtemp(prefix="lensminer-bricks-"))
            if cache_dir is None
            else Path(cache_dir)
        )
        self._cached: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._brick_locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.bricks = self._covering_bricks()
        self._by_name = {brick.name: brick for brick in self.bricks}
        logger.info(
            "simulated bricks: %d targets in %d bricks, files under %s",
            self.ra.size,
            len(self.bricks),
            self.cache_dir,
        )

    def __repr__(self) -> str:
        return (
            f"SimulatedBrickSource({self.sky!r}, targets={self.ra.size}, bricks={len(self.bricks)})"
        )

    def close(self) -> None:
        """Delete a temporary cache folder; a folder given by the caller is kept."""
        if self._temporary:
            shutil.rmtree(self.cache_dir, ignore_errors=True)

    # Footprint ----------------------------------------------------------------------------

    def _covering_bricks(self) -> list[Brick]:
        """Return the bricks whose image, grown by ``margin`` pixels, contains a target."""
        if self.ra.size == 0:
            return []

        # Candidates: the bricks that own points around each target, a margin away.
        reach = (BRICK_PIXELS / 2 + self.margin) * BRICK_PIXSCALE / 3600.0
        candidates: set[int] = set()
        for d_dec in (-reach, 0.0, reach):
            dec = np.clip(self.dec + d_dec, -90.0, 90.0)
            d_ra = reach / np.maximum(np.cos(np.radians(dec)), 1e-3)
            for sign in (-1.0, 0.0, 1.0):
                candidates.update(
                    np.unique(self.grid.indices_for(self.ra + sign * d_ra, dec)).tolist()
                )

        # Keep those whose grown image contains a target.
        covering = []
        for index in sorted(candidates):
            brick = self.grid.brick(index)
            if self.targets_near(brick, self.margin).size:
                covering.append(brick)
        return covering

    def targets_near(self, brick: Brick, margin: float) -> np.ndarray:
        """Return indices of targets within ``margin`` pixels of the brick's image."""
        x, y = _pixels_on(brick, self.ra, self.dec)
        low, high = -0.5 - margin, BRICK_PIXELS - 0.5 + margin
        return np.flatnonzero((x >= low) & (x <= high) & (y >= low) & (y <= high))

    def brick(self, name: str) -> Brick | None:
        """Return the served brick called ``name``, or None outside the footprint."""
        return self._by_name.get(name)

    def bricks_table(self) -> Table:
        """Return the survey-bricks rows of the served bricks."""
        names = np.array([brick.name for brick in self.bricks], dtype="U8")
        return Table(
            {
                "BRICKNAME": names,
                "BRICKID": np.array([brick.brickid for brick in self.bricks], dtype=np.int32),
                **{
                    column.upper(): np.array([getattr(brick, column) for brick in self.bricks])
                    for column in ("ra", "dec", "ra1", "ra2", "dec1", "dec2")
                },
            }
        )

    # Rendering ----------------------------------------------------------------------------

    def render(self, brick: Brick, bands: str = SKY_BANDS) -> tuple[np.ndarray, np.ndarray]:
        """Render a brick's image cube and the noise sigma of each band.

        Returns
        -------
        image : numpy.ndarray
            float32 ``(len(bands), 3600, 3600)`` in nanomaggies per pixel, FITS orientation.
        sigma : numpy.ndarray
            float64 ``(len(bands),)`` noise sigma per pixel in nanomaggies.
        """
        band_indices = [SKY_BANDS.index(band) for band in bands]
        conditions = self.sky.truth(brick.ra, brick.dec)
        sigma = np.array([conditions.noise_sigma[index] for index in band_indices])

        # Sky noise, seeded by the sky and the brick so that a rerender is identical.
        image = np.empty((len(bands), BRICK_PIXELS, BRICK_PIXELS), dtype=np.float32)
        for out_index, band_index in enumerate(band_indices):
            rng = np.random.default_rng(
                [self.sky.seed, _STREAM_BRICK_NOISE, brick.brickid, band_index]
            )
            image[out_index] = rng.standard_normal((BRICK_PIXELS, BRICK_PIXELS), dtype=np.float32)
            image[out_index] *= np.float32(sigma[out_index])

        # Add every target whose largest possible stamp overlaps the image.
        near = self.targets_near(brick, STAMP_MAX / 2)
        x, y = _pixels_on(brick, self.ra[near], self.dec[near])
        for index, column, row in zip(near, x, y, strict=True):
            stamp = self._stamp(self.ra[index], self.dec[index], bands, column, row)
            _add_stamp(image, stamp, column, row)
        logger.debug("rendered brick %s with %d targets", brick.name, near.size)
        return image, sigma

    def _stamp(self, ra: float, dec: float, bands: str, x: float, y: float) -> np.ndarray:
        """Render the noise-free object at (ra, dec), placed at brick pixel (x, y), on a stamp.

        The stamp is large enough for the profile, and its width and height are odd or even so
        that the sub-pixel shift that :func:`_add_stamp` applies is at most 1/4 pixel (1/2 pixel
        along y for lenses).
        """
        obj = self.sky.truth(ra, dec)

        # The Sersic taper ends at 8 effective radii; add 4 PSF FWHM for the convolution.
        reach = 8.0 * obj.r_eff + 4.0 * max(obj.psf_fwhm)
        side = int(np.clip(2 * math.ceil(reach / BRICK_PIXSCALE), STAMP_MIN, STAMP_MAX))
        width = side + _parity_offset(x, side)
        height = side + _parity_offset(y, side)
        if obj.is_lens:
            # NOTE: lenstronomy's ray tracing in SimulatedSky.render accepts square grids
            # only, so a lens stamp can be shifted by up to 1/2 pixel along y.
            height = width
        return self.sky.render(ra, dec, width, BRICK_PIXSCALE, bands, height=height, noise=False)

    def write_brick(self, brick: Brick, root: str | Path, bands: str = SKY_BANDS) -> list[Path]:
        """Write a brick's image, invvar and maskbits files under a data-release ``root``.

        Returns
        -------
        list of pathlib.Path
            The files written.
        """
        image, sigma = self.render(brick, bands)
        header = brick_wcs(brick).to_header()
        header["BRICKNAM"] = (brick.name, "Brick name")
        header["BRICKID"] = (brick.brickid, "Brick id")
        header["SURVEY"] = self.survey
        header["BUNIT"] = ("nanomaggy", "AB mag = 22.5 - 2.5 log10(flux)")

        files = []
        root = str(root)
        for out_index, band in enumerate(bands):
            band_header = header.copy()
            band_header["BAND"] = band
            invvar = np.full(image.shape[1:], 1.0 / sigma[out_index] ** 2, dtype=np.float32)
            for kind, plane in (("image", image[out_index]), ("invvar", invvar)):
                path = Path(coadd_path(root, brick, band, kind))
                _write_compressed(path, plane, band_header, self.quantize_level, brick.brickid)
                files.append(path)

        # The simulated sky has no bright stars, bad pixels or large galaxies to mask.
        maskbits = np.zeros(image.shape[1:], dtype=np.int32)
        path = Path(coadd_path(root, brick, kind="maskbits"))
        _write_compressed(path, maskbits, header, None, brick.brickid)
        files.append(path)
        return files

    def file(self, brick: Brick, filename: str) -> Path:
        """Return the cached path of one of a brick's files, rendering the brick if needed.

        Raises
        ------
        FileNotFoundError
            If the brick has no file called ``filename``.
        """
        with self._brick_locks[brick.name]:
            folder = self.cache_dir / "coadd" / brick.directory / brick.name
            if not (folder / COMPLETE_MARKER).is_file():
                self.write_brick(brick, self.cache_dir)
                (folder / COMPLETE_MARKER).touch()
            self._touch(brick.name)
        path = folder / filename
        if not path.is_file():
            raise FileNotFoundError(f"brick {brick.name} has no file {filename!r}")
        return path

    def _touch(self, name: str) -> None:
        """Mark a brick as just used and delete the least recently used ones beyond the limit."""
        with self._lock:
            self._cached[name] = None
            self._cached.move_to_end(name)
            # NOTE: a response that is still sending a file of an evicted brick can lose the file.
            # Keep max_cached above the number of bricks read at once.
            while self._temporary and len(self._cached) > self.max_cached:
                old, _ = self._cached.popitem(last=False)
                brick = self._by_name[old]
                shutil.rmtree(self.cache_dir / "coadd" / brick.directory / old, ignore_errors=True)
                logger.debug("evicted brick %s from %s", old, self.cache_dir)


def _pixels_on(brick: Brick, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return 0-based pixel coordinates (x, y) of positions on a brick's coadd grid."""
    x, y = brick_wcs(brick).world_to_pixel_values(ra, dec)
    return np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))


def _parity_offset(position: float, side: int) -> int:
    """Return the change, 0 or 1, to an even stamp ``side``.

    Adding it puts the stamp centre nearest ``position``.
    """
    fraction = (position - (side - 1) / 2) % 1.0
    return 1 if 0.25 < fraction < 0.75 else 0


def _add_stamp(image: np.ndarray, stamp: np.ndarray, x: float, y: float) -> None:
    """Add a ``(C, h, w)`` stamp to a ``(C, H, W)`` image with its centre at pixel (x, y)."""
    stamp_height, stamp_width = stamp.shape[-2:]
    corner_x, corner_y = x - (stamp_width - 1) / 2, y - (stamp_height - 1) / 2
    start_x, start_y = math.floor(corner_x), math.floor(corner_y)
    shift_y, shift_x = corner_y - start_y, corner_x - start_x
    # A shift close to 1 pixel is a small shift the other way from the next pixel.
    if shift_y > 0.5:
        start_y, shift_y = start_y + 1, shift_y - 1.0
    if shift_x > 0.5:
        start_x, shift_x = start_x + 1, shift_x - 1.0
    if max(abs(shift_y), abs(shift_x)) > 1e-3:
        stamp = _fourier_shift(stamp, shift_y, shift_x)

    # Clip the stamp to the image.
    height, width = image.shape[1:]
    y0, x0 = max(start_y, 0), max(start_x, 0)
    y1, x1 = min(start_y + stamp_height, height), min(start_x + stamp_width, width)
    if y0 >= y1 or x0 >= x1:
        return
    image[:, y0:y1, x0:x1] += stamp[:, y0 - start_y : y1 - start_y, x0 - start_x : x1 - start_x]


def _fourier_shift(stamp: np.ndarray, shift_y: float, shift_x: float) -> np.ndarray:
    """Shift the last two axes of ``stamp`` by sub-pixel amounts with a Fourier phase ramp.

    The stamps are PSF-convolved, so well sampled, and fall to nearly 0 at their edges, so the
    periodic wrap of the transform moves no visible flux.
    """
    height, width = stamp.shape[-2:]
    ky = np.fft.fftfreq(height)[:, None]
    kx = np.fft.rfftfreq(width)[None, :]
    phase = np.exp(-2j * np.pi * (ky * shift_y + kx * shift_x))
    shifted = np.fft.irfft2(np.fft.rfft2(stamp) * phase, s=(height, width))
    return shifted.astype(np.float32)


def _write_compressed(
    path: Path, data: np.ndarray, header: fits.Header, quantize_level: float | None, brickid: int
) -> None:
    """Write ``data`` as a tile-compressed image HDU after an empty primary HDU."""
    if quantize_level is None or data.dtype.kind != "f":
        hdu = fits.CompImageHDU(data, header=header, compression_type="GZIP_2", quantize_level=0)
    else:
        # A fixed dither seed per brick keeps the files reproducible.
        hdu = fits.CompImageHDU(
            data,
            header=header,
            compression_type="RICE_1",
            quantize_level=quantize_level,
            dither_seed=1 + brickid % 10000,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(partial, overwrite=True)
    partial.replace(path)
