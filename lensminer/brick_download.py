"""Brick mode of the download stage: cut every target from the survey's brick coadds.

One request per object is too slow for a whole survey, so brick mode reads each brick's coadd
files once and cuts all of its targets at native pixels (0.262 arcsec) with
:class:`astropy.nddata.Cutout2D` on the brick's WCS. The coadds come from any fsspec URL: the
public HTTP data release, a local mirror or ``s3://``.

The output is the cutout store of :mod:`lensminer.stores` with the same layout as cutout-service
mode: float32 nanomaggies ``(N, C, S, S)``, FITS orientation (row 0 south, east left). With
``survey.invvar`` or ``survey.maskbits`` the ``invvar`` planes are cut from the
``-invvar-<band>`` coadds and the ``maskbits`` plane from the ``-maskbits`` file, on the same
pixels. Rows are ordered by brick (a stable sort of the target table by the brick that owns each
target), so a shard touches few bricks. ``target_id`` identifies each row.

Each target is cut from the brick that owns its position (the nearest brick centre). Pixels of
a cutout that fall outside that brick's image are filled from the neighbouring bricks by
bilinear interpolation onto the owning brick's pixel grid (nearest pixel for maskbits). With
3600-pixel images and 0.25-degree bricks this happens only for cutouts larger than about 160
pixels or targets at brick corners. Pixels outside every brick are 0, and a cutout that is 0
everywhere is ``NO_COVERAGE``.

The shard is the unit of work: one call of :func:`cut_brick_shard` cuts and writes one shard and
sets its ``shard_done`` flag last, so a Prefect flow can map a task over :func:`shard_bricks`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from astropy.io import fits
from astropy.nddata import Cutout2D, NoOverlapError
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage

from lensminer import storage
from lensminer.bricks import BRICK_PIXSCALE, Brick, BrickGrid, brick_wcs, coadd_path, default_grid
from lensminer.config import BrickConfig, DownloadConfig, SurveyConfig
from lensminer.download import (
    DownloadSummary,
    check_targets,
    create_target_store,
    summarize_download,
)
from lensminer.exceptions import ConfigError, StoreError
from lensminer.stores import (
    RowStatus,
    check_planes,
    mark_shard_done,
    open_store,
    shard_count,
    shard_slice,
)

__all__ = [
    "check_brick_survey",
    "cut_brick_shard",
    "download_from_bricks",
    "load_grid",
    "prepare_brick_store",
    "shard_bricks",
    "sort_by_brick",
]

logger = logging.getLogger(__name__)


#: Decoded bricks kept in memory per worker; a 3-band brick is about 155 MB, and about 365 MB
#: with invvar and maskbits planes.
CACHED_BRICKS = 3

# Points per side of the grid sampled over a cutout to find the bricks that it overlaps.
_FOOTPRINT_SAMPLES = 5


def check_brick_survey(survey: SurveyConfig) -> None:
    """Check that a survey configuration can be cut from bricks.

    Raises
    ------
    ConfigError
        If the pixel scale is not the coadds' 0.262 arcsec or the image format is not FITS.
    """
    if not math.isclose(survey.pixscale, BRICK_PIXSCALE, rel_tol=1e-6):
        raise ConfigError(
            f"brick mode cuts native coadd pixels of {BRICK_PIXSCALE} arcsec, but "
            f"survey.pixscale is {survey.pixscale}; set survey.pixscale to {BRICK_PIXSCALE} "
            "or use cutout-service mode"
        )
    if survey.image_format != "fits":
        raise ConfigError(
            "brick mode writes float32 FITS cutouts, but survey.image_format is "
            f"{survey.image_format!r}; set it to 'fits' or use cutout-service mode"
        )


def _survey_planes(survey: SurveyConfig) -> list[str]:
    """Return the optional planes that ``survey`` requests, in the store's writing order."""
    return [name for name in ("invvar", "maskbits") if getattr(survey, name)]


def load_grid(bricks: BrickConfig) -> BrickGrid:
    """Return the brick grid of ``bricks.bricks_table``, or the computed grid when it is None."""
    if bricks.bricks_table is None:
        return default_grid()
    return BrickGrid.read(bricks.bricks_table, bricks.storage_options)


def sort_by_brick(targets: Table, grid: BrickGrid) -> Table:
    """Return ``targets`` stably sorted by the brick that owns each row.

    The result has an added ``brickname`` column.
    """
    index = grid.indices_for(
        np.asarray(targets["ra"], dtype=np.float64), np.asarray(targets["dec"], dtype=np.float64)
    )
    order = np.argsort(index, kind="stable")
    ordered = targets[order]
    ordered["brickname"] = grid.names[index[order]]
    return ordered


def prepare_brick_store(
    targets: Table,
    store_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    bricks: BrickConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    grid: BrickGrid | None = None,
) -> zarr.Group:
    """Create (or reopen) the cutout store of a brick-mode run, with rows sorted by brick.

    Raises
    ------
    ConfigError
        If ``survey`` cannot be cut from bricks (see :func:`check_brick_survey`).
    TargetError
        If ``targets`` lacks ``target_id``, ``ra`` or ``dec``, or has no rows.
    StoreError
        If a store for other targets, of another kind, with other optional planes, or written by
        cutout-service mode exists.
    """
    check_brick_survey(survey)
    check_targets(targets)
    grid = grid or load_grid(bricks)
    ordered = sort_by_brick(targets, grid)

    provenance = {"source": "bricks", "root": bricks.root, "bricks_table": bricks.bricks_table}
    group = create_target_store(
        ordered,
        store_url,
        survey,
        download,
        service_url=bricks.root,
        provenance=provenance,
        storage_options=storage_options,
    )
    source = dict(group.attrs.get("download", {})).get("source")
    if source != "bricks":
        raise StoreError(
            f"{store_url!r} was written by cutout-service mode, not from bricks; "
            "choose another store URL for brick mode"
        )
    return group


def shard_bricks(
    store_url: str,
    grid: BrickGrid,
    *,
    storage_options: dict[str, Any] | None = None,
    retry_failed: bool = True,
) -> dict[int, list[str]]:
    """Map each shard still to be cut to the names of the bricks that own its rows.

    A shard is listed when its ``shard_done`` flag is not set, or, with ``retry_failed``, when
    it is done but has FAILED rows (the whole shard is cut again).

    Returns
    -------
    dict
        Shard index to brick names in row order, for shards in increasing order.
    """
    group = open_store(store_url, "cutouts", storage_options=storage_options)
    n_rows = int(group.attrs["n_rows"])
    shard_rows = int(group.attrs["shard_rows"])
    done = group["shard_done"][:]
    status = group["status"][:] if retry_failed and done.any() else None
    owners = grid.names[grid.indices_for(group["ra"][:], group["dec"][:])]

    work: dict[int, list[str]] = {}
    for index in range(shard_count(n_rows, shard_rows)):
        rows = shard_slice(index, n_rows, shard_rows)
        failed = status is not None and bool(np.any(status[rows] == RowStatus.FAILED))
        if not done[index] or failed:
            work[index] = list(dict.fromkeys(owners[rows].tolist()))
    return work


@dataclass
class _Coadd:
    """The decoded files of one brick on the pixel grid of its WCS.

    ``data`` is ``(C, H, W)`` float32 nanomaggies. ``invvar`` (``(C, H, W)`` float32
    nanomaggies^-2, 0 for bands without an image) and ``maskbits`` (``(H, W)`` int32) are read
    when requested. ``problem`` names the requested file that is missing, "" when none is.
    """

    name: str
    data: np.ndarray
    wcs: WCS
    missing_bands: str
    invvar: np.ndarray | None = None
    maskbits: np.ndarray | None = None
    problem: str = ""


class _BrickReader:
    """Reader of brick coadds with a small LRU of decoded bricks, used by one thread at a time."""

    def __init__(
        self,
        bricks: BrickConfig,
        bands: str,
        grid: BrickGrid,
        *,
        invvar: bool = False,
        maskbits: bool = False,
    ) -> None:
        self.root = bricks.root
        self.fs, self.root_path = storage.filesystem(bricks.root, bricks.storage_options)
        self.bands = bands
        self.grid = grid
        self.invvar = invvar
        self.maskbits = maskbits
        self.files_read = 0
        self._cache: collections.OrderedDict[str, _Coadd | None] = collections.OrderedDict()

    def get(self, name: str) -> _Coadd | None:
        """Return brick ``name`` with the requested planes, or None when it has no band image.

        Raises
        ------
        OSError
            If a file exists but cannot be read or decoded.
        """
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        coadd = self._read(name)
        if coadd is not None and (self.invvar or self.maskbits):
            self._read_planes(coadd)
            if coadd.problem:
                logger.warning("%s; its rows fail", coadd.problem)
        self._cache[name] = coadd
        while len(self._cache) > CACHED_BRICKS:
            self._cache.popitem(last=False)
        return coadd

    def _read_file(self, path: str) -> bytes | None:
        """Return the bytes of a coadd file, or None when it does not exist."""
        try:
            with self.fs.open(path, "rb") as handle:
                content = handle.read()
        except FileNotFoundError:
            return None
        self.files_read += 1
        return content

    def _read(self, name: str) -> _Coadd | None:
        planes: list[np.ndarray | None] = []
        wcs = None
        missing = ""
        for band in self.bands:
            path = coadd_path(self.root_path, name, band, "image")
            content = self._read_file(path)
            if content is None:
                logger.debug("no %s-band image of brick %s at %s", band, name, path)
                planes.append(None)
                missing += band
                continue
            data, header = _decode_image(content, path)
            planes.append(data)
            wcs = wcs or WCS(header, naxis=2)

        if wcs is None:
            logger.debug("brick %s not found under %s", name, self.root)
            return None
        shape = next(plane.shape for plane in planes if plane is not None)
        cube = np.stack(
            [plane if plane is not None else np.zeros(shape, np.float32) for plane in planes]
        )
        logger.debug("read brick %s (%s) from %s", name, self.bands, self.root)
        return _Coadd(name, cube, wcs, missing)

    def _read_planes(self, coadd: _Coadd) -> None:
        """Read the requested invvar and maskbits files of ``coadd``'s brick into it.

        A missing file sets ``coadd.problem``, so every row cut from the brick fails with that
        reason without reading the brick again.

        Raises
        ------
        OSError
            If a file exists but cannot be decoded or its shape differs from the images'.
        """
        shape = coadd.data.shape[1:]
        if self.invvar:
            coadd.invvar = np.zeros(coadd.data.shape, dtype=np.float32)
            for index, band in enumerate(self.bands):
                if band in coadd.missing_bands:
                    continue  # no image, so no information: invvar stays 0
                path = coadd_path(self.root_path, coadd.name, band, "invvar")
                content = self._read_file(path)
                if content is None:
                    coadd.problem = (
                        f"brick {coadd.name} has a {band}-band image but no {path}; "
                        "add the file or set survey.invvar to false"
                    )
                    return
                coadd.invvar[index] = _check_shape(_decode_image(content, path)[0], shape, path)

        if self.maskbits:
            path = coadd_path(self.root_path, coadd.name, kind="maskbits")
            content = self._read_file(path)
            if content is None:
                coadd.problem = (
                    f"brick {coadd.name} has images but no {path}; "
                    "add the file or set survey.maskbits to false"
                )
                return
            coadd.maskbits = _check_shape(_decode_maskbits(content, path), shape, path)


def _decode_image(content: bytes, path: str) -> tuple[np.ndarray, fits.Header]:
    """Decode the first image HDU of a (tile-compressed) FITS file into native float32."""
    data, header = _decode_hdu(content, path)
    return np.asarray(data, dtype=np.float32), header


def _decode_maskbits(content: bytes, path: str) -> np.ndarray:
    """Decode a maskbits file into native int32, rejecting a non-integer image."""
    data, _ = _decode_hdu(content, path)
    if not np.issubdtype(data.dtype, np.integer):
        raise OSError(f"{path} has dtype {data.dtype.name}, expected an integer maskbits image")
    return data.astype(np.int32)


def _decode_hdu(content: bytes, path: str) -> tuple[np.ndarray, fits.Header]:
    """Return the data and header of the first image HDU of a (tile-compressed) FITS file."""
    try:
        with fits.open(io.BytesIO(content)) as hdus:
            hdu = next((hdu for hdu in hdus if hdu.is_image and hdu.data is not None), None)
            if hdu is None:
                raise OSError(f"{path} has no image HDU")
            return np.asarray(hdu.data), hdu.header.copy()
    except (ValueError, TypeError) as error:
        raise OSError(f"cannot decode {path} as a FITS image: {error}") from error


def _check_shape(data: np.ndarray, shape: tuple[int, ...], path: str) -> np.ndarray:
    if data.shape != shape:
        raise OSError(f"{path} has shape {data.shape}, but the brick's images are {shape}")
    return data


@dataclass
class _Cutout:
    """The planes of one cutout while it is assembled from bricks.

    ``image`` and ``invvar`` are ``(C, S, S)`` float32, ``maskbits`` is ``(S, S)`` int32, and
    ``missing`` is ``(S, S)`` bool, True where no brick has given a pixel yet. The optional planes
    are None when not requested.
    """

    image: np.ndarray
    invvar: np.ndarray | None
    maskbits: np.ndarray | None
    missing: np.ndarray

    @classmethod
    def empty(cls, channels: int, size: int, invvar: bool, maskbits: bool) -> _Cutout:
        return cls(
            image=np.zeros((channels, size, size), dtype=np.float32),
            invvar=np.zeros((channels, size, size), dtype=np.float32) if invvar else None,
            maskbits=np.zeros((size, size), dtype=np.int32) if maskbits else None,
            missing=np.ones((size, size), dtype=bool),
        )


def _cut_from(
    coadd: _Coadd, ra: float, dec: float, size: int, invvar: bool, maskbits: bool
) -> tuple[_Cutout, WCS]:
    """Cut a ``size``-pixel cutout at native pixels; pixels outside the brick stay missing."""
    x, y = coadd.wcs.world_to_pixel_values(ra, dec)
    cut = _Cutout.empty(coadd.data.shape[0], size, invvar, maskbits)
    try:
        window = Cutout2D(
            coadd.data[0],
            (float(x), float(y)),
            size,
            wcs=coadd.wcs,
            mode="partial",
            fill_value=np.nan,
            copy=False,
        )
    except NoOverlapError:
        return cut, _window_wcs(coadd.wcs, float(x), float(y), size)

    # Copy the overlap of every plane with the slices that Cutout2D found on the first band.
    inside, source = window.slices_cutout, window.slices_original
    cut.image[(slice(None), *inside)] = coadd.data[(slice(None), *source)]
    if cut.invvar is not None and coadd.invvar is not None:
        cut.invvar[(slice(None), *inside)] = coadd.invvar[(slice(None), *source)]
    if cut.maskbits is not None and coadd.maskbits is not None:
        cut.maskbits[inside] = coadd.maskbits[source]
    cut.missing[inside] = False
    return cut, window.wcs


def _fill_from(cut: _Cutout, cut_wcs: WCS, coadd: _Coadd) -> None:
    """Fill the missing pixels of ``cut`` that fall on another brick's image."""
    rows, columns = np.nonzero(cut.missing)
    ra, dec = cut_wcs.pixel_to_world_values(columns, rows)
    x, y = coadd.wcs.world_to_pixel_values(ra, dec)
    height, width = coadd.data.shape[1:]
    inside = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    if not inside.any():
        return
    rows, columns, x, y = rows[inside], columns[inside], x[inside], y[inside]

    # Bilinear interpolation for fluxes and inverse variance, nearest pixel for the bit mask.
    for band, plane in enumerate(coadd.data):
        cut.image[band, rows, columns] = ndimage.map_coordinates(
            plane, [y, x], order=1, mode="nearest"
        )
    if cut.invvar is not None and coadd.invvar is not None:
        # NOTE: bilinear interpolation averages the noise of up to four pixels, so the interpolated
        # inverse variance underestimates the true inverse variance of these fluxes.
        for band, plane in enumerate(coadd.invvar):
            cut.invvar[band, rows, columns] = ndimage.map_coordinates(
                plane, [y, x], order=1, mode="nearest"
            )
    if cut.maskbits is not None and coadd.maskbits is not None:
        cut.maskbits[rows, columns] = ndimage.map_coordinates(
            coadd.maskbits, [y, x], order=0, mode="nearest"
        )
    cut.missing[rows, columns] = False


def _footprint_bricks(cube_wcs: WCS, size: int, grid: BrickGrid) -> list[str]:
    """Return the names of the bricks that own points spread over a cutout's footprint."""
    samples = np.linspace(-0.5, size - 0.5, _FOOTPRINT_SAMPLES)
    columns, rows = np.meshgrid(samples, samples)
    ra, dec = cube_wcs.pixel_to_world_values(columns.ravel(), rows.ravel())
    return list(dict.fromkeys(grid.names[grid.indices_for(ra, dec)].tolist()))


@dataclass
class _RowOutcome:
    status: RowStatus
    reason: str = ""
    cutout: _Cutout | None = None


def _get_brick(reader: _BrickReader, name: str) -> _Coadd | _RowOutcome | None:
    """Return brick ``name``, None when it does not exist, or a FAILED outcome."""
    try:
        coadd = reader.get(name)
    except OSError as error:
        return _RowOutcome(RowStatus.FAILED, f"reading brick {name} failed: {error}")
    if coadd is not None and coadd.problem:
        return _RowOutcome(RowStatus.FAILED, coadd.problem)
    return coadd


def _cut_row(
    reader: _BrickReader, owner: str, ra: float, dec: float, size: int, channels: int
) -> _RowOutcome:
    """Cut one target from its owning brick and its neighbours."""
    coadd = _get_brick(reader, owner)
    if isinstance(coadd, _RowOutcome):
        return coadd

    if coadd is not None:
        cut, cut_wcs = _cut_from(coadd, ra, dec, size, reader.invvar, reader.maskbits)
    else:
        # Without the owning brick, use its nominal grid to collect pixels from neighbours.
        cut_wcs = _nominal_cutout_wcs(reader.grid.by_name(owner), ra, dec, size)
        cut = _Cutout.empty(channels, size, reader.invvar, reader.maskbits)

    # Fill pixels beyond the owning brick's image from the neighbouring bricks.
    if cut.missing.any():
        for name in _footprint_bricks(cut_wcs, size, reader.grid):
            if name == owner:
                continue
            neighbour = _get_brick(reader, name)
            if isinstance(neighbour, _RowOutcome):
                return neighbour
            if neighbour is not None:
                _fill_from(cut, cut_wcs, neighbour)
            if not cut.missing.any():
                break

    np.nan_to_num(cut.image, copy=False, nan=0.0)
    if cut.invvar is not None:
        np.nan_to_num(cut.invvar, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if not cut.image.any():
        where = "" if coadd is not None else f" (brick {owner} not found under {reader.root})"
        return _RowOutcome(RowStatus.NO_COVERAGE, f"no coverage: every pixel is 0{where}", cut)
    return _RowOutcome(RowStatus.OK, cutout=cut)


def _window_wcs(wcs: WCS, x: float, y: float, size: int) -> WCS:
    """Return the WCS of the ``size``-pixel window that Cutout2D would cut around pixel (x, y)."""
    window = wcs.deepcopy()
    window.wcs.crpix = window.wcs.crpix - [math.ceil(x - size / 2), math.ceil(y - size / 2)]
    window.pixel_shape = (size, size)
    return window


def _nominal_cutout_wcs(brick: Brick, ra: float, dec: float, size: int) -> WCS:
    """Return the cutout WCS on the nominal coadd grid of a brick whose files are missing."""
    wcs = brick_wcs(brick)
    x, y = wcs.world_to_pixel_values(ra, dec)
    return _window_wcs(wcs, float(x), float(y), size)


def cut_brick_shard(
    store_url: str,
    index: int,
    survey: SurveyConfig,
    bricks: BrickConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    grid: BrickGrid | None = None,
    reader: _BrickReader | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Cut every row of one shard from the brick coadds, write the shard and mark it done.

    Parameters
    ----------
    store_url
        Cutout store made by :func:`prepare_brick_store`.
    index
        Shard index.
    survey, bricks
        Cutout size, bands and optional planes, and where the coadds are.
    storage_options
        fsspec options of the store.
    grid
        Brick grid; read from ``bricks`` when None.
    progress
        Called with the number of rows just cut.

    Returns
    -------
    dict
        Rows of the shard by status name.

    Raises
    ------
    StoreError
        If the store contains other optional planes than ``survey`` requests.
    """
    check_brick_survey(survey)
    grid = grid or load_grid(bricks)
    reader = reader or _BrickReader(
        bricks, survey.bands, grid, invvar=survey.invvar, maskbits=survey.maskbits
    )
    group = open_store(store_url, "cutouts", mode="r+", storage_options=storage_options)
    check_planes(group, _survey_planes(survey), store_url)
    n_rows, shard_rows = int(group.attrs["n_rows"]), int(group.attrs["shard_rows"])
    rows = shard_slice(index, n_rows, shard_rows)
    ra, dec = group["ra"][rows], group["dec"][rows]
    owners = grid.names[grid.indices_for(ra, dec)]

    # Cut the rows brick by brick; the rows are sorted by brick, so each brick is read once.
    n = rows.stop - rows.start
    planes = {
        name: np.zeros((n, *group[name].shape[1:]), dtype=group[name].dtype)
        for name in ("images", *_survey_planes(survey))
    }
    status = np.zeros(n, dtype=np.uint8)
    reason = np.full(n, "", dtype=object)
    for offset in np.argsort(owners, kind="stable"):
        outcome = _cut_row(
            reader,
            str(owners[offset]),
            float(ra[offset]),
            float(dec[offset]),
            survey.size,
            len(survey.bands),
        )
        status[offset], reason[offset] = int(outcome.status), outcome.reason
        if outcome.cutout is not None:
            planes["images"][offset] = outcome.cutout.image
            if outcome.cutout.invvar is not None:
                planes["invvar"][offset] = outcome.cutout.invvar
            if outcome.cutout.maskbits is not None:
                planes["maskbits"][offset] = outcome.cutout.maskbits
        if progress is not None:
            progress(1)

    # The flag goes down before and up after the arrays, so a crash leaves the shard pending.
    flags = group["shard_done"]
    if flags[index]:
        flags[index] = False
    for name, values in planes.items():
        group[name][rows] = values
    group["status"][rows] = status
    group["reason"][rows] = reason.astype(str)
    mark_shard_done(group, index)
    logger.debug(
        "cut shard %d (rows %d-%d) from %d bricks",
        index,
        rows.start,
        rows.stop - 1,
        len(set(owners)),
    )
    return {member.name: int(np.count_nonzero(status == member)) for member in RowStatus}


def download_from_bricks(
    targets: Table,
    store_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    bricks: BrickConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    retry_failed: bool = True,
) -> DownloadSummary:
    """Cut a cutout for every target from brick coadds into a Zarr cutout store, resuming a run.

    Parameters
    ----------
    targets
        Table with ``target_id`` (str), ``ra`` and ``dec`` (float64 degrees); ``label``, ``ebv``
        and ``psfsize_g/r/z`` are copied as in :func:`lensminer.download.download_cutouts`.
    store_url
        Local path or fsspec URL of the store. Its rows are the targets sorted by brick.
    survey
        Bands and cutout size in pixels; ``pixscale`` must be 0.262 and ``image_format`` fits.
        ``invvar`` and ``maskbits`` also cut those planes from the ``-invvar-<band>`` and
        ``-maskbits`` coadds; a row whose brick lacks a requested file is FAILED.
    download
        Shard and chunk sizes of a new store.
    bricks
        Root URL of the coadds, optional brick table, their fsspec options and the number of
        shards cut at once.
    storage_options
        fsspec options of the store.
    progress
        Called as ``progress(done_rows, total_rows)`` at the start and after every cut row,
        from the worker threads (one call at a time).
    retry_failed
        Cut again the done shards that have FAILED rows.

    Returns
    -------
    DownloadSummary
        Row counts over the whole store; ``requests`` counts the coadd files read.

    Raises
    ------
    ConfigError
        If the survey settings cannot be cut from bricks, or the brick table is invalid.
    TargetError
        If ``targets`` lacks the standard columns or has no rows.
    StoreError
        If an incompatible store exists at ``store_url``, or it contains other optional planes
        than ``survey`` requests.
    """
    started = time.perf_counter()
    grid = load_grid(bricks)
    group = prepare_brick_store(
        targets, store_url, survey, download, bricks, storage_options=storage_options, grid=grid
    )
    n_rows = int(group.attrs["n_rows"])
    shard_rows = int(group.attrs["shard_rows"])
    n_shards = shard_count(n_rows, shard_rows)
    work = shard_bricks(store_url, grid, storage_options=storage_options, retry_failed=retry_failed)
    n_bricks = len({name for names in work.values() for name in names})
    logger.info(
        "cutting %d shards (%d bricks) from %s into %s (%d shards already done)",
        len(work),
        n_bricks,
        bricks.root,
        store_url,
        n_shards - len(work),
    )

    # Progress over rows, shared by the worker threads.
    to_cut = sum(len(range(n_rows)[shard_slice(index, n_rows, shard_rows)]) for index in work)
    done_rows = n_rows - to_cut
    lock = threading.Lock()
    if progress is not None:
        progress(done_rows, n_rows)

    def advance(count: int) -> None:
        nonlocal done_rows
        with lock:
            done_rows += count
            if progress is not None:
                progress(done_rows, n_rows)

    # Each worker thread keeps its own reader, so consecutive shards reuse a decoded brick.
    local = threading.local()
    readers: list[_BrickReader] = []

    def run(index: int) -> None:
        if not hasattr(local, "reader"):
            local.reader = _BrickReader(
                bricks, survey.bands, grid, invvar=survey.invvar, maskbits=survey.maskbits
            )
            with lock:
                readers.append(local.reader)
        cut_brick_shard(
            store_url,
            index,
            survey,
            bricks,
            storage_options=storage_options,
            grid=grid,
            reader=local.reader,
            progress=advance,
        )

    with concurrent.futures.ThreadPoolExecutor(
        bricks.workers, thread_name_prefix="lensminer-bricks"
    ) as pool:
        for future in [pool.submit(run, index) for index in work]:
            future.result()

    return summarize_download(
        group,
        store_url,
        shards_written=len(work),
        seconds=time.perf_counter() - started,
        requests=sum(reader.files_read for reader in readers),
    )
