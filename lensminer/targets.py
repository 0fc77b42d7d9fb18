"""Target tables: read catalogs, standardise their columns, validate coordinates, cut samples.

Every reader returns an astropy :class:`~astropy.table.Table` with the columns that the download
stage expects:

``target_id`` (str)
    Stable identifier: ``release-brickid-objid`` for Legacy Survey catalogs, else an id or name
    column, else ``J<ra>±<dec>`` from the coordinates rounded to 1e-5 degree (0.036 arcsec).
``ra``, ``dec`` (float64)
    ICRS degrees, RA in [0, 360) and Dec in [-90, 90].
``label`` (int8)
    1 lens, 0 not a lens, -1 unknown; present only when the source table has the label column.
``ebv``, ``psfsize_g``, ``psfsize_r``, ``psfsize_z`` (float32)
    E(B-V) in magnitudes and PSF FWHM in arcsec, kept when the source table has them.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table, vstack

from lensminer.exceptions import TargetError

__all__ = [
    "MASKBITS_BRIGHT_STAR",
    "MASKBITS_GLOBULAR_CLUSTER",
    "MASKBITS_LARGE_GALAXY",
    "MASKBITS_MEDIUM_STAR",
    "merge_close_targets",
    "parse_iau_names",
    "read_catalogs",
    "read_lens_table",
    "read_lenscat",
    "read_table",
    "read_targets",
    "select_box",
    "select_cone",
    "select_parent_sample",
    "standardize_targets",
]

logger = logging.getLogger(__name__)

# NOTE: bit positions of the DR8/DR9 MASKBITS column; check them before using another release.
MASKBITS_BRIGHT_STAR = 1 << 1
MASKBITS_MEDIUM_STAR = 1 << 11
MASKBITS_LARGE_GALAXY = 1 << 12
MASKBITS_GLOBULAR_CLUSTER = 1 << 13

RA_NAMES = ("ra", "ra_deg", "radeg", "raj2000", "ra_j2000", "ra_icrs", "ra_gaia")
DEC_NAMES = (
    "dec",
    "dec_deg",
    "decdeg",
    "dej2000",
    "decj2000",
    "dec_j2000",
    "de_icrs",
    "dec_icrs",
    "dec_gaia",
)
ID_NAMES = ("target_id", "id", "objname", "name", "iauname")
LEGACY_ID_COLUMNS = ("release", "brickid", "objid")
PSF_COLUMNS = ("psfsize_g", "psfsize_r", "psfsize_z")

_IAU_NAME = re.compile(
    r"^J?(?P<h>\d{2})(?P<m>\d{2})(?P<s>\d{2}(?:\.\d*)?)(?P<sign>[+-])(?P<d>\d{2})(?P<am>\d{2})(?P<as>\d{2}(?:\.\d*)?)$"
)
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".txt": "tsv",
    ".fits": "fits",
    ".fit": "fits",
    ".fts": "fits",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_MAX_LISTED = 5


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _format_of(url: str, head: bytes) -> str:
    name = url.lower().removesuffix(".gz")
    for suffix, kind in _FORMATS.items():
        if name.endswith(suffix):
            return kind

    # Unknown extension: sniff the first bytes.
    if head.startswith(b"SIMPLE  ="):
        return "fits"
    if head.startswith(b"PAR1"):
        return "parquet"
    first_line = head.split(b"\n", 1)[0]
    return "tsv" if b"\t" in first_line else "csv"


def read_table(url: str, *, storage_options: dict[str, Any] | None = None) -> Table:
    """Read a catalog file into an astropy Table with its original column names.

    Parameters
    ----------
    url
        Local path or fsspec URL of a CSV, TSV, FITS or Parquet file, optionally gzip-compressed
        (``.gz``). The format comes from the extension, or from the first bytes when the extension
        is unknown. For FITS the first HDU that contains a table is read.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``url``.
    TargetError
        If the file cannot be parsed in the detected format or a FITS file contains no table.
    """
    compression = "gzip" if url.lower().endswith(".gz") else None
    try:
        with fsspec.open(url, "rb", compression=compression, **(storage_options or {})) as handle:
            data = handle.read()
    except FileNotFoundError as error:
        raise FileNotFoundError(f"target table {url!r} not found; check the path or URL") from error

    kind = _format_of(url, data[:4096])
    logger.debug("reading %s as %s (%d bytes)", url, kind, len(data))
    try:
        if kind == "fits":
            return _read_fits_table(data, url)
        if kind == "parquet":
            return _read_parquet(data)
        text_format = "ascii.tab" if kind == "tsv" else "ascii.csv"
        return Table.read(data.decode("utf-8"), format=text_format, fast_reader=True)
    except TargetError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, IndexError) as error:
        raise TargetError(
            f"cannot read {url!r} as {kind}: {error}; check the file format"
        ) from error


def _read_fits_table(data: bytes, url: str) -> Table:
    with fits.open(io.BytesIO(data), memmap=False) as hdus:
        for hdu in hdus:
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                return Table.read(hdu)
    raise TargetError(
        f"{url!r} contains no table HDU; a target file needs a FITS binary or ASCII table"
    )


def _read_parquet(data: bytes) -> Table:
    import pyarrow.parquet as pq

    arrow = pq.read_table(io.BytesIO(data))
    columns = {}
    for name in arrow.column_names:
        values = arrow.column(name).to_numpy(zero_copy_only=False)
        if values.dtype == object:
            # Arrow strings arrive as Python objects, and None marks a missing value.
            missing = np.array([value is None for value in values])
            values = np.ma.MaskedArray(
                np.array(["" if v is None else str(v) for v in values]), mask=missing
            )
        columns[name] = values
    return Table(columns)


def read_catalogs(urls: Sequence[str], *, storage_options: dict[str, Any] | None = None) -> Table:
    """Read several catalog files (e.g. sweep or Tractor files) and stack their rows.

    Raises
    ------
    TargetError
        If ``urls`` is empty or the files have different columns.
    """
    if not urls:
        raise TargetError("no catalog files given; pass at least one sweep or Tractor file")
    tables = [read_table(url, storage_options=storage_options) for url in urls]
    try:
        return vstack(tables, join_type="exact", metadata_conflicts="silent")
    except Exception as error:  # astropy raises TableMergeError, a bare Exception subclass
        raise TargetError(
            f"catalog files have different columns: {error}; read them separately"
        ) from error


def read_targets(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    label_column: str | None = "label",
    id_columns: Sequence[str] | None = None,
    keep_columns: Sequence[str] = (),
) -> Table:
    """Read a target table and return it with standard, validated columns.

    Parameters
    ----------
    url
        Local path or fsspec URL of a CSV, TSV, FITS or Parquet file.
    label_column
        Column with 1/0 lens labels; blank, masked or -1 values become -1. With the default
        ``"label"`` a table without that column simply gets no ``label``; any other name must
        exist. ``None`` reads no labels.
    id_columns
        Columns joined with ``-`` to form ``target_id``. By default ``release``, ``brickid`` and
        ``objid`` when all exist, else the first of ``target_id``, ``id``, ``objname``, ``name``,
        ``iauname``, else an id built from the coordinates.
    keep_columns
        Further columns to copy, under their lower-case names.

    Returns
    -------
    astropy.table.Table
        Columns as described in the module docstring, in the file's row order.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``url``.
    TargetError
        If a column is missing, a coordinate or label is invalid, or target ids repeat.
    """
    table = read_table(url, storage_options=storage_options)
    targets = standardize_targets(
        table,
        label_column=label_column,
        id_columns=id_columns,
        keep_columns=keep_columns,
        source=url,
    )
    logger.debug("read %d targets from %s", len(targets), url)
    return targets


# --------------------------------------------------------------------------------------------
# Standardising
# --------------------------------------------------------------------------------------------


def _lower_names(table: Table) -> dict[str, str]:
    return {name.lower(): name for name in table.colnames}


def _find_column(names: dict[str, str], candidates: Sequence[str]) -> str | None:
    for candidate in candidates:
        if candidate in names:
            return names[candidate]
    return None


def _as_strings(column: Any) -> np.ndarray:
    """Return a column as stripped str values, with masked entries as ""."""
    values = np.asarray(np.ma.getdata(column))
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii")
    strings = np.char.strip(values.astype(str))
    mask = np.ma.getmaskarray(column) if np.ma.isMaskedArray(column) else None
    if mask is not None and mask.any():
        strings = np.where(mask, "", strings)
    return strings


def _as_float(column: Any) -> np.ndarray:
    if np.ma.isMaskedArray(column):
        return np.ma.filled(column.astype(np.float64), np.nan)
    return np.asarray(column, dtype=np.float64)


def parse_iau_names(names: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Parse IAU-style names ``JHHMMSS.ss+DDMMSS.s`` into coordinates.

    Returns
    -------
    ra, dec : numpy.ndarray
        float64 degrees, shape (N,). The names truncate the coordinates, so they are good to about
        0.15 arcsec in RA and 0.1 arcsec in Dec for two and one decimals.

    Raises
    ------
    TargetError
        Listing the rows whose names do not match the pattern.
    """
    values = _as_strings(np.asarray(names))
    ra = np.full(values.shape, np.nan)
    dec = np.full(values.shape, np.nan)
    bad = []
    for row, name in enumerate(values):
        match = _IAU_NAME.match(name)
        if match is None:
            bad.append(row)
            continue
        parts = match.groupdict()
        ra[row] = 15.0 * (int(parts["h"]) + int(parts["m"]) / 60 + float(parts["s"]) / 3600)
        sign = -1.0 if parts["sign"] == "-" else 1.0
        dec[row] = sign * (int(parts["d"]) + int(parts["am"]) / 60 + float(parts["as"]) / 3600)
    if bad:
        raise TargetError(
            f"{len(bad)} names are not IAU names like J000411.19+020924.0 "
            f"(rows {bad[:_MAX_LISTED]}, "
            f"first {values[bad[0]]!r}); add ra and dec columns to the table"
        )
    return ra, dec


def _coordinates(table: Table, names: dict[str, str], source: str) -> tuple[np.ndarray, np.ndarray]:
    ra_name = _find_column(names, RA_NAMES)
    dec_name = _find_column(names, DEC_NAMES)
    if ra_name is not None and dec_name is not None:
        return _as_float(table[ra_name]), _as_float(table[dec_name])
    if "iauname" in names:
        return parse_iau_names(table[names["iauname"]])
    raise TargetError(
        f"{source} has no coordinate columns (looked for {RA_NAMES[:3]}... and "
        f"{DEC_NAMES[:3]}... in any case, "
        f"or iauname); columns are {table.colnames[:12]}; rename the RA/Dec columns to ra and dec"
    )


def _check_coordinates(ra: np.ndarray, dec: np.ndarray, source: str) -> None:
    bad = ~np.isfinite(ra) | ~np.isfinite(dec) | (ra < 0) | (ra >= 360) | (dec < -90) | (dec > 90)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    first = int(rows[0])
    noun = "row" if rows.size == 1 else "rows"
    raise TargetError(
        f"{source} has {rows.size} {noun} with invalid coordinates "
        f"(0-based {noun} {rows[:_MAX_LISTED].tolist()}, "
        f"first ra={float(ra[first])}, dec={float(dec[first])}); expected finite degrees with "
        "RA in [0, 360) and Dec in [-90, 90]. Fix or drop those rows (wrap RA with ra % 360)"
    )


def _coordinate_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    return np.array([f"J{r:09.5f}{d:+09.5f}" for r, d in zip(ra, dec, strict=True)])


def _target_ids(
    table: Table,
    names: dict[str, str],
    id_columns: Sequence[str] | None,
    ra: np.ndarray,
    dec: np.ndarray,
) -> np.ndarray:
    if id_columns is not None:
        missing = [name for name in id_columns if name.lower() not in names]
        if missing:
            raise TargetError(f"id columns {missing} not found; columns are {table.colnames[:12]}")
        chosen = [names[name.lower()] for name in id_columns]
    elif all(name in names for name in LEGACY_ID_COLUMNS):
        chosen = [names[name] for name in LEGACY_ID_COLUMNS]
    else:
        found = _find_column(names, ID_NAMES)
        if found is None:
            return _coordinate_ids(ra, dec)
        chosen = [found]

    parts = [_as_strings(table[name]) for name in chosen]
    ids = parts[0]
    for part in parts[1:]:
        ids = np.char.add(np.char.add(ids, "-"), part)
    return ids


def _check_unique(ids: np.ndarray, source: str) -> None:
    unique, counts = np.unique(ids, return_counts=True)
    repeated = unique[counts > 1]
    if repeated.size:
        raise TargetError(
            f"{source} has {repeated.size} repeated target ids "
            f"(first {repeated[:_MAX_LISTED].tolist()}); "
            "remove the duplicate rows, or pass id_columns that identify each row"
        )
    empty = np.flatnonzero(ids == "")
    if empty.size:
        raise TargetError(
            f"{source} has {empty.size} empty target ids (rows {empty[:_MAX_LISTED].tolist()})"
        )


def _labels(column: Any, name: str, source: str) -> np.ndarray:
    strings = np.char.lower(_as_strings(column))
    labels = np.full(strings.shape, -1, dtype=np.int8)
    positive = np.isin(strings, ("1", "1.0", "true", "t", "yes"))
    negative = np.isin(strings, ("0", "0.0", "false", "f", "no"))
    unknown = np.isin(strings, ("", "-1", "-1.0", "nan", "none", "--"))
    labels[positive] = 1
    labels[negative] = 0

    bad = np.flatnonzero(~(positive | negative | unknown))
    if bad.size:
        raise TargetError(
            f"label column {name!r} of {source} has {bad.size} values that are not 1, 0 or blank "
            f"(rows {bad[:_MAX_LISTED].tolist()}, first {strings[bad[0]]!r}); use 1 for lenses, "
            "0 for non-lenses and leave unknown labels blank or -1"
        )
    return labels


def standardize_targets(
    table: Table,
    *,
    label_column: str | None = "label",
    id_columns: Sequence[str] | None = None,
    keep_columns: Sequence[str] = (),
    source: str = "target table",
) -> Table:
    """Return a target table with the standard columns from any catalog table.

    Parameters are those of :func:`read_targets`; ``source`` names the table in error messages.

    Raises
    ------
    TargetError
        If a column is missing, a coordinate or label is invalid, or target ids repeat.
    """
    names = _lower_names(table)

    ra, dec = _coordinates(table, names, source)
    _check_coordinates(ra, dec, source)
    ids = _target_ids(table, names, id_columns, ra, dec)
    _check_unique(ids, source)

    result = Table({"target_id": ids, "ra": ra, "dec": dec}, meta={"source": source})
    if label_column is not None:
        if label_column.lower() in names:
            result["label"] = _labels(table[names[label_column.lower()]], label_column, source)
        elif label_column != "label":
            raise TargetError(
                f"label column {label_column!r} not found in {source}; "
                f"columns are {table.colnames[:12]}"
            )
    for name in ("ebv", *PSF_COLUMNS):
        if name in names:
            result[name] = _as_float(table[names[name]]).astype(np.float32)
    for name in keep_columns:
        if name.lower() not in names:
            raise TargetError(
                f"column {name!r} to keep not found in {source}; columns are {table.colnames[:12]}"
            )
        result[name.lower()] = table[names[name.lower()]]
    return result


def merge_close_targets(table: Table, radius_arcsec: float = 0.262) -> Table:
    """Drop targets closer than ``radius_arcsec`` to an earlier target.

    Of every group of close targets the first row is kept, so the result keeps the input order.
    The default radius is one Legacy Survey pixel. Works on any table with RA/Dec columns
    under the names :func:`read_targets` accepts.
    """
    if len(table) < 2:
        return table
    ra, dec = _ra_dec(table)
    coords = SkyCoord(ra=ra * u.deg, dec=dec * u.deg)
    first, second, _, _ = coords.search_around_sky(coords, radius_arcsec * u.arcsec)

    # Each pair appears twice and every row matches itself. Walking the pairs in row order means
    # that only kept rows drop later rows.
    pairs = sorted((int(i), int(j)) for i, j in zip(first, second, strict=True) if i < j)
    dropped = np.zeros(len(table), dtype=bool)
    for i, j in pairs:
        if not dropped[i]:
            dropped[j] = True

    if dropped.any():
        logger.info(
            "merged %d of %d targets closer than %.3f arcsec",
            dropped.sum(),
            len(table),
            radius_arcsec,
        )
    return table[~dropped]


# --------------------------------------------------------------------------------------------
# Known lenses
# --------------------------------------------------------------------------------------------


def read_lens_table(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    keep_columns: Sequence[str] | None = None,
    merge_radius_arcsec: float | None = 0.262,
) -> Table:
    """Read a table of known lenses or candidates as positive targets (``label`` = 1).

    The tables of Stein et al. (2022) have ra, dec, ebv and photometry but no id column, so the
    ids come from the coordinates. ``grade``, ``region``, ``source_type`` and ``z_spec`` are kept
    when present unless ``keep_columns`` names others. The candidate table lists a few objects
    twice (once per imaging region), so rows within ``merge_radius_arcsec`` of an earlier row are
    dropped first. With ``None`` every row is kept, and repeated coordinates raise TargetError.
    """
    table = read_table(url, storage_options=storage_options)
    if merge_radius_arcsec is not None:
        table = merge_close_targets(table, merge_radius_arcsec)
    names = _lower_names(table)
    if keep_columns is None:
        keep_columns = [
            name for name in ("grade", "region", "source_type", "z_spec") if name in names
        ]
    targets = standardize_targets(table, label_column=None, keep_columns=keep_columns, source=url)
    targets["label"] = np.ones(len(targets), dtype=np.int8)
    return targets


def lenscat_catalog_path() -> str:
    """Return the path of the catalog CSV inside the installed ``lenscat`` package.

    The package is located without importing it: its ``__init__`` loads pandas and ligo.skymap,
    which reading the table does not need.

    Raises
    ------
    ImportError
        If ``lenscat`` is not installed.
    FileNotFoundError
        If the installed package has no ``data/catalog.csv``.
    """
    spec = importlib.util.find_spec("lenscat")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the lenscat package is not installed; install it with "
            "pip install 'lensminer[lenscat]' or pass the path of its catalog CSV"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "catalog.csv"
    if not path.is_file():
        raise FileNotFoundError(f"lenscat is installed but {path} is missing; reinstall lenscat")
    return str(path)


def read_lenscat(
    path: str | None = None,
    *,
    grading: Sequence[str] | None = None,
    merge_radius_arcsec: float = 1.0,
    storage_options: dict[str, Any] | None = None,
) -> Table:
    """Read the community catalog of known and candidate lenses (lenscat) as positive targets.

    Parameters
    ----------
    path
        fsspec URL of a catalog CSV in lenscat's format (columns ``name``, ``RA [deg]``,
        ``DEC [deg]``, ``zlens``, ``type``, ``grading``, ``ref``); the installed package's copy
        when ``None``.
    grading
        Keep only these values of the ``grading`` column, e.g. ``["confident"]``.
    merge_radius_arcsec
        The catalog lists some lenses once per discovery paper, under the same or another name and
        at slightly different positions. Rows within this radius of an earlier row are dropped.

    Returns
    -------
    Table
        Standard target columns with ids from the coordinates (names repeat, and some are "-"),
        ``label`` = 1, and the catalog's ``lens_name``, ``grading`` and ``type``.
    """
    table = read_table(path or lenscat_catalog_path(), storage_options=storage_options)

    # lenscat puts units in its coordinate column names.
    for name in table.colnames:
        bare = name.split("[")[0].strip()
        if bare != name and bare.lower() in ("ra", "dec"):
            table.rename_column(name, bare.lower())
    if grading is not None:
        table = table[np.isin(_as_strings(table["grading"]), list(grading))]
    table = merge_close_targets(table, merge_radius_arcsec)
    # Renamed so that the repeated names are kept as data but not taken as ids.
    table.rename_column("name", "lens_name")

    targets = standardize_targets(
        table,
        label_column=None,
        keep_columns=["lens_name", "grading", "type"],
        source="lenscat",
    )
    targets["label"] = np.ones(len(targets), dtype=np.int8)
    return targets


# --------------------------------------------------------------------------------------------
# Sample cuts
# --------------------------------------------------------------------------------------------


def _require(
    table: Table, names: dict[str, str], required: Sequence[str], purpose: str
) -> list[str]:
    missing = [name.upper() for name in required if name not in names]
    if missing:
        raise TargetError(
            f"{purpose} needs columns {missing} (any case); the table has {table.colnames[:12]}"
        )
    return [names[name] for name in required]


def select_parent_sample(
    table: Table,
    *,
    zmag_max: float = 20.0,
    min_nobs: int = 1,
    exclude_psf: bool = True,
    maskbits: int | None = None,
) -> Table:
    """Apply the usual lens-search parent-sample cuts to sweep or Tractor rows.

    Parameters
    ----------
    zmag_max
        Keep rows with dereddened z-band AB magnitude below this, from
        ``22.5 - 2.5 log10(FLUX_Z / MW_TRANSMISSION_Z)`` (flux in nanomaggies). Rows with
        non-positive flux fail the cut.
    min_nobs
        Keep rows with at least this many exposures in each of g, r and z (``NOBS_G/R/Z``).
    exclude_psf
        Drop point sources (``TYPE == 'PSF'``).
    maskbits
        Drop rows where ``MASKBITS & maskbits`` is non-zero, e.g.
        ``MASKBITS_BRIGHT_STAR | MASKBITS_MEDIUM_STAR | MASKBITS_LARGE_GALAXY``. ``None`` skips
        the cut.

    Returns
    -------
    astropy.table.Table
        The selected rows with all their columns.
    """
    names = _lower_names(table)
    flux_z, transmission_z = _require(
        table, names, ("flux_z", "mw_transmission_z"), "the z-magnitude cut"
    )
    keep = np.ones(len(table), dtype=bool)

    # Magnitude cut on dereddened flux. Rows with non-positive flux keep an infinite magnitude.
    flux = _as_float(table[flux_z]) / _as_float(table[transmission_z])
    positive = np.isfinite(flux) & (flux > 0)
    zmag = np.full(len(table), np.inf)
    zmag[positive] = 22.5 - 2.5 * np.log10(flux[positive])
    keep &= zmag < zmag_max

    for column in _require(table, names, ("nobs_g", "nobs_r", "nobs_z"), "the exposure-count cut"):
        keep &= np.asarray(table[column]) >= min_nobs
    if exclude_psf:
        (type_column,) = _require(table, names, ("type",), "the point-source cut")
        keep &= _as_strings(table[type_column]) != "PSF"
    if maskbits is not None:
        (mask_column,) = _require(table, names, ("maskbits",), "the maskbits cut")
        keep &= (np.asarray(table[mask_column]).astype(np.int64) & int(maskbits)) == 0

    logger.debug("parent sample keeps %d of %d rows", keep.sum(), len(table))
    return table[keep]


def _ra_dec(table: Table) -> tuple[np.ndarray, np.ndarray]:
    names = _lower_names(table)
    ra_name = _find_column(names, RA_NAMES)
    dec_name = _find_column(names, DEC_NAMES)
    if ra_name is None or dec_name is None:
        raise TargetError(
            f"table has no ra/dec columns (any case); columns are {table.colnames[:12]}"
        )
    return _as_float(table[ra_name]), _as_float(table[dec_name])


def select_cone(table: Table, ra: float, dec: float, radius_deg: float) -> Table:
    """Return the rows within ``radius_deg`` degrees of (``ra``, ``dec``) in degrees."""
    if radius_deg <= 0:
        raise TargetError(f"cone radius must be positive degrees, got {radius_deg!r}")
    rows_ra, rows_dec = _ra_dec(table)
    centre = SkyCoord(ra=ra * u.deg, dec=dec * u.deg)
    separation = centre.separation(SkyCoord(ra=rows_ra * u.deg, dec=rows_dec * u.deg))
    return table[separation.deg <= radius_deg]


def select_box(table: Table, ra_min: float, ra_max: float, dec_min: float, dec_max: float) -> Table:
    """Return the rows inside an RA/Dec box in degrees.

    When ``ra_min > ra_max`` the box crosses RA = 0: ``select_box(t, 350, 10, ...)`` keeps RA in
    [350, 360) and [0, 10]. RA values are wrapped into [0, 360) first.
    """
    if dec_min > dec_max:
        raise TargetError(f"dec_min ({dec_min}) is above dec_max ({dec_max}); swap them")
    rows_ra, rows_dec = _ra_dec(table)
    rows_ra = np.mod(rows_ra, 360.0)
    low, high = ra_min % 360.0, ra_max % 360.0 if ra_max != 360 else 360.0

    if low <= high:
        in_ra = (rows_ra >= low) & (rows_ra <= high)
    else:
        in_ra = (rows_ra >= low) | (rows_ra <= high)
    return table[in_ra & (rows_dec >= dec_min) & (rows_dec <= dec_max)]
