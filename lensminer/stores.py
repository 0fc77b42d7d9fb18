"""Layouts of the Zarr stores that the stages pass to each other.

Both stores are Zarr v3 groups cut into shards of ``shard_rows`` rows. A shard is the unit of work
and of writing: exactly one task writes a shard's rows in every array, and it sets the shard's
flag in ``shard_done`` last. A crash before the flag leaves the shard pending, so a rerun rewrites
it whole and never trusts a half-written shard.

Cutout store (``kind = "cutouts"``)::

    images      (N, C, S, S)  float32 nanomaggies (FITS) or uint8 RGB (JPEG); shards of shard_rows
    invvar      (N, C, S, S)  float32 inverse variance in nanomaggies^-2, 0 without data. FITS
                              only, present when the layout requests it. Chunked as images
    maskbits    (N, S, S)     int32 coadd maskbits. FITS only, present when the layout requests
                              it. Chunked as images
    ra, dec     (N,)          float64 degrees (ICRS)
    target_id   (N,)          str
    status      (N,)          uint8 RowStatus code
    reason      (N,)          str, why a row failed or has no coverage ("" when ok)
    shard_done  (n_shards,)   bool, one chunk per flag
    label       (N,)          int8, 1 lens / 0 not / -1 unknown (when the targets have labels)
    ebv         (N,)          float32 E(B-V) (optional)
    psf_fwhm    (N, C)        float32 arcsec (optional)

The attribute ``planes`` lists the optional image planes that the store contains (``invvar``,
``maskbits``), so a rerun that requests other planes is rejected instead of mixing layouts.

Embedding store (``kind = "embeddings"``)::

    representation (N, D)     float32 or float16 backbone features
    projection     (N, P)     float32 or float16, L2-normalised
    target_id      (N,)       str, equal to the cutout store's
    valid          (N,)       bool, False where the cutout was not ok (those rows hold zeros)
    shard_done     (n_shards,) bool
"""

from __future__ import annotations

import collections
import datetime as dt
import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from lensminer import storage
from lensminer.exceptions import StoreError, StoreIncompleteError, StoreNotFoundError

__all__ = [
    "SCHEMA_VERSION",
    "RowStatus",
    "check_planes",
    "create_cutout_store",
    "create_embedding_store",
    "mark_shard_done",
    "open_store",
    "pending_shards",
    "require_complete",
    "shard_slice",
    "shard_count",
    "status_summary",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class RowStatus(enum.IntEnum):
    """Per-row state of a cutout store."""

    PENDING = 0
    OK = 1
    NO_COVERAGE = 2
    FAILED = 3


@dataclass(frozen=True)
class CutoutLayout:
    """Shape and provenance of the images in a cutout store."""

    bands: str
    size: int
    pixscale: float
    image_format: str  # "fits" or "jpeg"
    layer: str
    service_url: str
    invvar: bool = False
    maskbits: bool = False

    @property
    def channels(self) -> int:
        return 3 if self.image_format == "jpeg" else len(self.bands)

    @property
    def planes(self) -> list[str]:
        """Names of the optional planes stored beside ``images``, in writing order."""
        return [name for name in ("invvar", "maskbits") if getattr(self, name)]

    @property
    def dtype(self) -> str:
        return "uint8" if self.image_format == "jpeg" else "float32"


def shard_count(n_rows: int, shard_rows: int) -> int:
    """Return the number of shards that cover ``n_rows`` rows."""
    return -(-n_rows // shard_rows)


def shard_slice(index: int, n_rows: int, shard_rows: int) -> slice:
    """Return the row slice of shard ``index`` (the last shard may be short)."""
    start = index * shard_rows
    if not 0 <= start < max(n_rows, 1):
        raise IndexError(
            f"shard {index} is out of range for {n_rows} rows in shards of {shard_rows}"
        )
    return slice(start, min(start + shard_rows, n_rows))


def _as_ids(target_id: Sequence[str] | np.ndarray) -> np.ndarray:
    # Zarr returns numpy StringDType arrays, which refuse a plain astype(str), so the ids go
    # through Python str.
    return np.asarray([str(value) for value in np.asarray(target_id).tolist()], dtype=str)


def _row_array(
    group: zarr.Group, name: str, n_rows: int, shard_rows: int, dtype: Any, fill: Any
) -> zarr.Array:
    # Per-row arrays use one chunk per shard, so the writer of a shard owns the whole chunk.
    return group.create_array(
        name, shape=(n_rows,), chunks=(shard_rows,), dtype=dtype, fill_value=fill
    )


def _flags_array(group: zarr.Group, n_shards: int) -> zarr.Array:
    return group.create_array(
        "shard_done", shape=(n_shards,), chunks=(1,), dtype="bool", fill_value=False
    )


def _check_existing(group: zarr.Group, kind: str, target_ids: np.ndarray, url: str) -> None:
    attrs = group.attrs.asdict()
    if attrs.get("kind") != kind:
        raise StoreError(
            f"{url!r} contains a {attrs.get('kind', 'non-LensMiner')!r} store, expected {kind!r}; "
            "choose another run directory"
        )
    stored = group["target_id"][:]
    if stored.tolist() != target_ids.tolist():
        raise StoreError(
            f"{url!r} was created for other targets ({stored.shape[0]} rows, expected "
            f"{target_ids.shape[0]}); delete it or choose another run directory to start again"
        )


def check_planes(group: zarr.Group, planes: Sequence[str], url: str) -> None:
    """Raise :class:`StoreError` unless the cutout store ``group`` contains exactly ``planes``.

    ``planes`` names the optional planes of a request (see :attr:`CutoutLayout.planes`).
    """
    # Stores written before the optional planes existed have no "planes" attribute.
    planes = list(planes)
    stored = list(group.attrs.get("planes", []))
    if stored != planes:
        raise StoreError(
            f"{url!r} contains the optional planes {stored}, but this run requests {planes}; "
            "set survey.invvar and survey.maskbits to match the store, or choose another store URL"
        )


def _image_array(
    group: zarr.Group,
    name: str,
    n_rows: int,
    plane_shape: tuple[int, ...],
    shard_rows: int,
    chunk_rows: int,
    dtype: str,
) -> zarr.Array:
    # Image-like arrays share the images' shards, so the writer of a shard owns whole shards.
    return group.create_array(
        name,
        shape=(n_rows, *plane_shape),
        chunks=(chunk_rows, *plane_shape),
        shards=(shard_rows, *plane_shape),
        dtype=dtype,
        fill_value=0,
    )


def create_cutout_store(
    url: str,
    *,
    target_id: Sequence[str] | np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    layout: CutoutLayout,
    shard_rows: int,
    chunk_rows: int,
    columns: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create a cutout store for a target list, or reopen the one already there.

    Parameters
    ----------
    url
        fsspec URL of the store.
    target_id, ra, dec
        Per-target identifiers (str) and ICRS coordinates in degrees, shape (N,).
    layout
        Image layout and request provenance, stored in the group's attributes. With
        ``layout.invvar`` or ``layout.maskbits`` the store also gets the ``invvar``
        (N, C, S, S) float32 or ``maskbits`` (N, S, S) int32 array.
    shard_rows, chunk_rows
        Rows per shard (the unit of writing) and per chunk inside a shard.
    columns
        Optional catalog columns to keep: ``label`` (N,) int, ``ebv`` (N,) float,
        ``psf_fwhm`` (N, C) float arcsec.

    Returns
    -------
    zarr.Group
        The group, opened for writing. An existing store for the same targets is returned as it
        is, so finished shards are kept and a rerun fills in the rest.

    Raises
    ------
    StoreError
        If a store for other targets, of another kind or with other optional planes already
        exists at ``url``, or the layout requests optional planes for JPEG images.
    """
    ids = _as_ids(target_id)
    n_rows = ids.shape[0]
    if n_rows == 0:
        raise StoreError("cannot create a cutout store for 0 targets; check the target table")
    if layout.planes and layout.image_format != "fits":
        raise StoreError(
            f"optional planes {layout.planes} need FITS images, but the layout's image_format is "
            f"{layout.image_format!r}; use image_format 'fits' or drop the planes"
        )
    chunk_rows = min(chunk_rows, shard_rows)
    if shard_rows % chunk_rows:
        raise StoreError(
            f"shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})"
        )

    try:
        group = storage.open_group(url, mode="r+", storage_options=storage_options)
    except (StoreNotFoundError, FileNotFoundError):
        group = None
    if group is not None and "kind" in group.attrs:
        _check_existing(group, "cutouts", ids, url)
        check_planes(group, layout.planes, url)
        logger.debug("reusing cutout store %s", url)
        return group

    group = storage.open_group(url, mode="w", storage_options=storage_options)
    channels, size = layout.channels, layout.size
    _image_array(
        group, "images", n_rows, (channels, size, size), shard_rows, chunk_rows, layout.dtype
    )
    if layout.invvar:
        _image_array(
            group, "invvar", n_rows, (channels, size, size), shard_rows, chunk_rows, "float32"
        )
    if layout.maskbits:
        _image_array(group, "maskbits", n_rows, (size, size), shard_rows, chunk_rows, "int32")
    _row_array(group, "ra", n_rows, shard_rows, "float64", np.nan)[:] = np.asarray(
        ra, dtype=np.float64
    )
    _row_array(group, "dec", n_rows, shard_rows, "float64", np.nan)[:] = np.asarray(
        dec, dtype=np.float64
    )
    _row_array(group, "target_id", n_rows, shard_rows, str, "")[:] = ids
    _row_array(group, "status", n_rows, shard_rows, "uint8", int(RowStatus.PENDING))
    _row_array(group, "reason", n_rows, shard_rows, str, "")
    _flags_array(group, shard_count(n_rows, shard_rows))

    for name, values in (columns or {}).items():
        values = np.asarray(values)
        if values.shape[0] != n_rows:
            raise StoreError(f"column {name!r} has {values.shape[0]} rows, expected {n_rows}")
        group.create_array(
            name,
            shape=values.shape,
            chunks=(shard_rows, *values.shape[1:]),
            dtype=values.dtype,
            fill_value=np.zeros((), values.dtype).item(),
        )[:] = values

    # The attributes go last: a store without "kind" is treated as not created yet.
    group.attrs.update(
        {
            **dict(attrs or {}),
            "bands": layout.bands,
            "size": layout.size,
            "pixscale": layout.pixscale,
            "image_format": layout.image_format,
            "layer": layout.layer,
            "service_url": layout.service_url,
            "planes": layout.planes,
            "n_rows": n_rows,
            "shard_rows": shard_rows,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "schema_version": SCHEMA_VERSION,
            "kind": "cutouts",
        }
    )
    logger.debug("created cutout store %s with %d rows", url, n_rows)
    return group


def create_embedding_store(
    url: str,
    *,
    target_id: np.ndarray,
    representation_dim: int,
    projection_dim: int,
    dtype: str,
    shard_rows: int,
    attrs: Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create an embedding store aligned row for row with a cutout store, or reopen it.

    Parameters
    ----------
    target_id
        Identifiers of the cutout store, shape (N,).
    representation_dim, projection_dim
        Widths D and P of the two embedding arrays.
    dtype
        ``"float32"`` or ``"float16"``.
    shard_rows
        Rows per shard; use the cutout store's so that one task reads and writes one shard.

    Raises
    ------
    StoreError
        If a store for other targets or of another kind already exists at ``url``.
    """
    ids = _as_ids(target_id)
    n_rows = ids.shape[0]
    try:
        group = storage.open_group(url, mode="r+", storage_options=storage_options)
    except (StoreNotFoundError, FileNotFoundError):
        group = None
    if group is not None and "kind" in group.attrs:
        _check_existing(group, "embeddings", ids, url)
        return group

    group = storage.open_group(url, mode="w", storage_options=storage_options)
    for name, width in (("representation", representation_dim), ("projection", projection_dim)):
        group.create_array(
            name, shape=(n_rows, width), chunks=(shard_rows, width), dtype=dtype, fill_value=0
        )
    _row_array(group, "target_id", n_rows, shard_rows, str, "")[:] = ids
    _row_array(group, "valid", n_rows, shard_rows, "bool", False)
    _flags_array(group, shard_count(n_rows, shard_rows))
    group.attrs.update(
        {
            **dict(attrs or {}),
            "n_rows": n_rows,
            "shard_rows": shard_rows,
            "created": dt.datetime.now(dt.UTC).isoformat(),
            "schema_version": SCHEMA_VERSION,
            "kind": "embeddings",
        }
    )
    return group


def open_store(
    url: str, kind: str, mode: str = "r", storage_options: dict[str, Any] | None = None
) -> zarr.Group:
    """Open a store written by LensMiner and check that it is of the expected ``kind``.

    Raises
    ------
    StoreNotFoundError
        If nothing exists at ``url``.
    StoreError
        If the group is not a LensMiner store of that kind.
    """
    group = storage.open_group(url, mode=mode, storage_options=storage_options)  # type: ignore[arg-type]
    found = group.attrs.get("kind")
    if found != kind:
        raise StoreError(
            f"{url!r} is not a LensMiner {kind} store (kind={found!r}); "
            "it may be unfinished: rerun the stage that writes it"
        )
    return group


def status_summary(group: zarr.Group, top: int = 5) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Count a cutout store's rows by status and list its commonest failure reasons.

    Returns
    -------
    tuple
        Rows by :class:`RowStatus` name, and up to ``top`` (reason, rows) pairs of FAILED rows,
        most common first.
    """
    status = group["status"][:]
    counts = {member.name: int(np.count_nonzero(status == member)) for member in RowStatus}
    failed = status == RowStatus.FAILED
    if not failed.any():
        return counts, []
    reasons = collections.Counter(group["reason"][:][failed].tolist())
    return counts, reasons.most_common(top)


def pending_shards(group: zarr.Group) -> list[int]:
    """Return the indices of shards not yet marked done."""
    return [int(i) for i in np.flatnonzero(~group["shard_done"][:])]


def mark_shard_done(group: zarr.Group, index: int) -> None:
    """Mark shard ``index`` written; call only after every array of the shard is written."""
    group["shard_done"][index] = True


def require_complete(group: zarr.Group, url: str) -> None:
    """Raise :class:`StoreIncompleteError` unless every shard of the store is done."""
    pending = pending_shards(group)
    if pending:
        raise StoreIncompleteError(
            f"{url!r} has {len(pending)} of {group['shard_done'].shape[0]} shards unwritten "
            f"(first: {pending[:5]}); rerun the stage that writes it to finish them"
        )
