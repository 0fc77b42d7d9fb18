"""The download stage: fetch a cutout for every target into a sharded Zarr cutout store.

The store layout and the shard contract are those of :mod:`lensminer.stores`. This stage fetches
all rows of a shard concurrently through one shared :class:`~lensminer.client.CutoutClient`
and parses each response. A single writer then writes the shard's images, the optional ``invvar``
and ``maskbits`` planes (``survey.invvar``, ``survey.maskbits``), status and reason, and sets the
shard's ``shard_done`` flag last. A crash before the flag leaves the shard pending and a
rerun rewrites it whole.

Failed rows of finished shards are retried by a rerun when ``retry_failed=True`` (the default).
For each done shard with FAILED rows, the rerun fetches only those rows, reads the other rows back
from the store, clears the shard's flag and rewrites the whole shard before it sets the flag again.
The shard still has one writer. A crash during the rewrite leaves the shard pending, so the next run
refetches it whole.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import zarr
from astropy.table import Table

from lensminer.client import CutoutClient, FetchError, client_version
from lensminer.config import DownloadConfig, SurveyConfig
from lensminer.cutout_io import ParsedCutout, parse_fits_cutout, parse_jpeg_cutout
from lensminer.exceptions import ConfigError, TargetError
from lensminer.stores import (
    CutoutLayout,
    RowStatus,
    create_cutout_store,
    shard_count,
    shard_slice,
    status_summary,
)

__all__ = [
    "TOP_FAILURES",
    "DownloadSummary",
    "catalog_columns",
    "check_targets",
    "create_target_store",
    "cutout_request",
    "download_cutouts",
    "summarize_download",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
TOP_FAILURES = 5
PSF_COLUMNS = ("psfsize_g", "psfsize_r", "psfsize_z")

# Store array name to the ParsedCutout field that fills it.
_PLANE_FIELDS = {"images": "image", "invvar": "invvar", "maskbits": "maskbits"}


@dataclass
class DownloadSummary:
    """Outcome of one call of :func:`download_cutouts`.

    Attributes
    ----------
    store_url
        URL of the cutout store.
    n_rows
        Rows in the store.
    counts
        Rows by status name (``OK``, ``NO_COVERAGE``, ``FAILED``, ``PENDING``) over the whole store.
    top_failures
        The most common failure reasons with their row counts, most common first.
    shards_written, shards_skipped
        Shards written by this call, and shards that were already done and left alone.
    seconds
        Wall-clock duration of the call.
    requests, retries
        HTTP requests sent and retries among them.
    """

    store_url: str
    n_rows: int
    counts: dict[str, int]
    top_failures: list[tuple[str, int]]
    shards_written: int
    shards_skipped: int
    seconds: float
    requests: int = 0
    retries: int = 0


@dataclass
class _RowResult:
    status: RowStatus
    parsed: ParsedCutout | None = None
    reason: str = ""


def _check_planes(survey: SurveyConfig) -> None:
    requested = [f"survey.{name}" for name in ("invvar", "maskbits") if getattr(survey, name)]
    if survey.image_format != "fits" and requested:
        raise ConfigError(
            f"the optional planes of {' and '.join(requested)} need FITS cutouts, but "
            f"survey.image_format is "
            f"{survey.image_format!r}; set survey.image_format to 'fits' or set "
            f"{' and '.join(requested)} to false"
        )


def cutout_request(survey: SurveyConfig, ra: float, dec: float) -> tuple[str, dict[str, Any]]:
    """Return the endpoint and query parameters of one cutout request.

    ``ra`` and ``dec`` are sent with ``repr`` precision, so the service centres the cutout on the
    stored float64 coordinates. ``survey.invvar`` and ``survey.maskbits`` add ``invvar=1`` and
    ``maskbits=1``.

    Raises
    ------
    ConfigError
        If ``survey.invvar`` or ``survey.maskbits`` is set for JPEG cutouts.
    """
    _check_planes(survey)
    params: dict[str, Any] = {
        "ra": repr(float(ra)),
        "dec": repr(float(dec)),
        "layer": survey.layer,
        "pixscale": survey.pixscale,
        "size": survey.size,
    }
    if survey.image_format == "fits":
        params["bands"] = survey.bands
        if survey.invvar:
            params["invvar"] = 1
        if survey.maskbits:
            params["maskbits"] = 1
        return "fits-cutout", params
    return "jpeg-cutout", params


def _parser(survey: SurveyConfig) -> Callable[[bytes], ParsedCutout]:
    if survey.image_format == "fits":
        return lambda body: parse_fits_cutout(
            body,
            bands=survey.bands,
            size=survey.size,
            pixscale=survey.pixscale,
            invvar=survey.invvar,
            maskbits=survey.maskbits,
        )
    return lambda body: parse_jpeg_cutout(body, size=survey.size)


def catalog_columns(targets: Table, n_bands: int) -> dict[str, np.ndarray]:
    """Return the catalog columns that a cutout store keeps: label, ebv and psf_fwhm (N, 3)."""
    columns: dict[str, np.ndarray] = {}
    if "label" in targets.colnames:
        columns["label"] = np.asarray(targets["label"], dtype=np.int8)
    if "ebv" in targets.colnames:
        columns["ebv"] = np.asarray(targets["ebv"], dtype=np.float32)
    if all(name in targets.colnames for name in PSF_COLUMNS):
        psf = np.stack(
            [np.asarray(targets[name], dtype=np.float32) for name in PSF_COLUMNS], axis=1
        )
        # NOTE: psf_fwhm keeps the catalog's g, r, z order; with other bands its width is still 3.
        if n_bands != 3:
            logger.warning(
                "psf_fwhm contains g, r, z PSF sizes, but the survey requests %d bands", n_bands
            )
        columns["psf_fwhm"] = psf
    return columns


def check_targets(targets: Table) -> None:
    """Raise :class:`TargetError` unless ``targets`` has rows and target_id, ra and dec columns."""
    missing = [name for name in ("target_id", "ra", "dec") if name not in targets.colnames]
    if missing:
        raise TargetError(
            f"target table lacks columns {missing}; read it with lensminer.targets.read_targets"
        )
    if len(targets) == 0:
        raise TargetError("target table has no rows; nothing to download")


def create_target_store(
    targets: Table,
    store_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    *,
    service_url: str,
    provenance: dict[str, Any],
    storage_options: dict[str, Any] | None = None,
) -> zarr.Group:
    """Create or reopen the cutout store of ``targets`` in their row order.

    Both download modes use it: the layout comes from ``survey``, the shard sizes from
    ``download``, and the catalog columns (label, ebv, psf_fwhm) from ``targets``.
    ``service_url`` and ``provenance`` record where the images come from.
    """
    layout = CutoutLayout(
        bands=survey.bands,
        size=survey.size,
        pixscale=survey.pixscale,
        image_format=survey.image_format,
        layer=survey.layer,
        service_url=service_url,
        invvar=survey.invvar,
        maskbits=survey.maskbits,
    )
    return create_cutout_store(
        store_url,
        target_id=np.asarray(targets["target_id"]).astype(str),
        ra=np.asarray(targets["ra"], dtype=np.float64),
        dec=np.asarray(targets["dec"], dtype=np.float64),
        layout=layout,
        shard_rows=download.shard_rows,
        chunk_rows=download.chunk_rows,
        columns=catalog_columns(targets, layout.channels),
        attrs={"download": provenance},
        storage_options=storage_options,
    )


def _plan(
    group: zarr.Group, n_rows: int, shard_rows: int, retry_failed: bool
) -> tuple[dict[int, np.ndarray], int]:
    """Return the shard-relative rows to fetch per shard to work on, and the skipped shard count."""
    done = group["shard_done"][:]
    status = group["status"][:] if retry_failed and done.any() else None
    work: dict[int, np.ndarray] = {}
    skipped = 0
    for index in range(shard_count(n_rows, shard_rows)):
        rows = shard_slice(index, n_rows, shard_rows)
        if not done[index]:
            work[index] = np.arange(rows.stop - rows.start)
            continue
        failed = (
            np.flatnonzero(status[rows] == RowStatus.FAILED)
            if status is not None
            else np.array([], int)
        )
        if failed.size:
            work[index] = failed
        else:
            skipped += 1
    return work, skipped


class _ShardWriter:
    """Fetcher and writer of whole shards, one instance per download call."""

    def __init__(
        self,
        group: zarr.Group,
        client: CutoutClient,
        survey: SurveyConfig,
        ra: np.ndarray,
        dec: np.ndarray,
        shard_rows: int,
        progress: Callable[[int], None],
    ) -> None:
        self.group = group
        self.client = client
        self.survey = survey
        self.ra = ra
        self.dec = dec
        self.shard_rows = shard_rows
        self.progress = progress
        self.parse = _parser(survey)
        self.n_rows = ra.shape[0]
        # Shape of one row and dtype of each array written per shard, in writing order: images
        # first, then the optional planes.
        self.arrays = {
            name: (group[name].shape[1:], group[name].dtype)
            for name in _PLANE_FIELDS
            if name in group
        }

    async def _fetch_row(self, row: int) -> _RowResult:
        endpoint, params = cutout_request(self.survey, self.ra[row], self.dec[row])
        try:
            parsed = await self.client.fetch_parsed(endpoint, params, self.parse)
        except FetchError as error:
            return _RowResult(RowStatus.FAILED, reason=error.reason)
        finally:
            self.progress(1)
        reason = "" if parsed.status == RowStatus.OK else "no coverage: every pixel is 0"
        return _RowResult(parsed.status, parsed, reason)

    async def run_shard(self, index: int, fetch_rows: np.ndarray) -> None:
        rows = shard_slice(index, self.n_rows, self.shard_rows)
        n = rows.stop - rows.start

        # Fetch the requested rows concurrently. The client bounds the requests in flight.
        results = await asyncio.gather(
            *(self._fetch_row(rows.start + int(offset)) for offset in fetch_rows)
        )

        # Start from the stored shard when only some rows were refetched.
        refetch_all = fetch_rows.size == n
        if refetch_all:
            planes = {
                name: np.zeros((n, *shape), dtype=dtype)
                for name, (shape, dtype) in self.arrays.items()
            }
            status = np.full(n, int(RowStatus.PENDING), dtype=np.uint8)
            reason = np.full(n, "", dtype=object)
        else:
            planes, status, reason = await asyncio.to_thread(self._read_shard, rows)
        for offset, result in zip(fetch_rows, results, strict=True):
            status[offset] = int(result.status)
            reason[offset] = result.reason
            for name, plane in planes.items():
                value = getattr(result.parsed, _PLANE_FIELDS[name], None)
                plane[offset] = value if value is not None else 0

        await asyncio.to_thread(self._write_shard, index, rows, planes, status, reason)

    def _read_shard(self, rows: slice) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        return (
            {name: self.group[name][rows] for name in self.arrays},
            self.group["status"][rows],
            np.asarray(self.group["reason"][rows], dtype=object),
        )

    def _write_shard(
        self,
        index: int,
        rows: slice,
        planes: dict[str, np.ndarray],
        status: np.ndarray,
        reason: np.ndarray,
    ) -> None:
        # The flag goes down before and up after the arrays, so a crash in between leaves the
        # shard pending (it is already down for a shard that was never finished).
        flags = self.group["shard_done"]
        if flags[index]:
            flags[index] = False
        for name in self.arrays:
            self.group[name][rows] = planes[name]
        self.group["status"][rows] = status
        self.group["reason"][rows] = reason.astype(str)
        flags[index] = True
        logger.debug("wrote shard %d (rows %d-%d)", index, rows.start, rows.stop - 1)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion, in a helper thread when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as error:  # re-raised in the calling thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, name="lensminer-download")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


async def _download(
    writer_args: dict[str, Any],
    client: CutoutClient,
    work: dict[int, np.ndarray],
    shards_in_flight: int,
) -> None:
    writer = _ShardWriter(client=client, **writer_args)
    queue = collections.deque(sorted(work.items()))

    # A few shards in flight keep the connection pool busy while a finished shard is written.
    # At most that many shards have buffers in memory.
    async def worker() -> None:
        while queue:
            index, rows = queue.popleft()
            await writer.run_shard(index, rows)

    await asyncio.gather(*(worker() for _ in range(min(shards_in_flight, len(work)))))


def summarize_download(
    group: zarr.Group,
    store_url: str,
    *,
    shards_written: int,
    seconds: float = 0.0,
    requests: int = 0,
    retries: int = 0,
    run_attrs: dict[str, Any] | None = None,
) -> DownloadSummary:
    """Count a cutout store's rows by status, record the run in its attributes and log it.

    Both download modes end with this. ``shards_written`` is the number of shards that this run
    wrote; every other shard counts as skipped.
    """
    counts, top_failures = status_summary(group, TOP_FAILURES)
    n_rows = int(group.attrs["n_rows"])
    summary = DownloadSummary(
        store_url=store_url,
        n_rows=n_rows,
        counts=counts,
        top_failures=top_failures,
        shards_written=shards_written,
        shards_skipped=int(group["shard_done"].shape[0]) - shards_written,
        seconds=seconds,
        requests=requests,
        retries=retries,
    )
    group.attrs["download"] = {
        **dict(group.attrs.get("download", {})),
        **(run_attrs or {}),
        "counts": counts,
    }

    if counts["FAILED"]:
        logger.warning(
            "%d of %d cutouts failed in %s (top reasons %s); rerun to retry them",
            counts["FAILED"],
            n_rows,
            store_url,
            top_failures,
        )
    logger.info("cutout store %s: %s in %.1f s", store_url, counts, seconds)
    return summary


def download_cutouts(
    targets: Table,
    store_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    retry_failed: bool = True,
    seed: int | None = None,
) -> DownloadSummary:
    """Download a cutout for every target into a Zarr cutout store, resuming a previous run.

    Parameters
    ----------
    targets
        Table with ``target_id`` (str), ``ra`` and ``dec`` (float64 degrees), as returned by
        :func:`lensminer.targets.read_targets`. ``label``, ``ebv`` and ``psfsize_g/r/z`` (arcsec),
        when present, are copied into the store as ``label``, ``ebv`` and ``psf_fwhm`` (N, 3).
    store_url
        Local path or fsspec URL (e.g. ``s3://bucket/run/cutouts.zarr``) of the store.
    survey
        Service URL, layer, bands, cutout size in pixels, pixel scale, image format, and whether
        to store the ``invvar`` (N, C, S, S) and ``maskbits`` (N, S, S) planes (FITS only).
    download
        Client settings and the shard and chunk sizes of a new store.
    storage_options
        fsspec options for remote stores.
    progress
        Called as ``progress(done_rows, total_rows)`` once at the start (rows already done) and
        after every fetched row, from the thread that runs the download.
    retry_failed
        Refetch FAILED rows of finished shards (see the module docstring); False leaves them.
    seed
        Seed of the retry jitter, for reproducible tests.

    Returns
    -------
    DownloadSummary
        Row counts over the whole store and what this call did.

    Raises
    ------
    ConfigError
        If ``survey`` requests invvar or maskbits planes with JPEG cutouts.
    TargetError
        If ``targets`` lacks the standard columns or has no rows.
    StoreError
        If a store for other targets, of another kind or with other optional planes exists at
        ``store_url``.
    """
    started = time.perf_counter()
    _check_planes(survey)
    check_targets(targets)

    # Create or reopen the store and work out what is left to do.
    provenance = {
        "client": f"lensminer {client_version()}",
        "endpoint": cutout_request(survey, 0.0, 0.0)[0],
    }
    group = create_target_store(
        targets,
        store_url,
        survey,
        download,
        service_url=survey.base_url,
        provenance=provenance,
        storage_options=storage_options,
    )
    n_rows = len(targets)
    shard_rows = int(group.attrs["shard_rows"])
    work, skipped = _plan(group, n_rows, shard_rows, retry_failed)
    to_fetch = int(sum(rows.size for rows in work.values()))
    logger.info(
        "downloading %d rows in %d shards into %s (%d shards already done)",
        to_fetch,
        len(work),
        store_url,
        skipped,
    )

    done_rows = n_rows - to_fetch
    if progress is not None:
        progress(done_rows, n_rows)

    def advance(count: int) -> None:
        nonlocal done_rows
        done_rows += count
        if progress is not None:
            progress(done_rows, n_rows)

    # Fetch and write the pending shards through one shared client.
    client = CutoutClient(
        survey.base_url,
        concurrency=download.concurrency,
        rate_limit=download.rate_limit,
        timeout=download.timeout,
        max_retries=download.max_retries,
        backoff=download.backoff,
        max_backoff=download.max_backoff,
        seed=seed,
    )
    writer_args = {
        "group": group,
        "survey": survey,
        "ra": np.asarray(group["ra"][:]),
        "dec": np.asarray(group["dec"][:]),
        "shard_rows": shard_rows,
        "progress": advance,
    }
    shards_in_flight = 2 + -(-download.concurrency // shard_rows)

    async def main() -> None:
        async with client:
            await _download(writer_args, client, work, shards_in_flight)

    if work:
        _run(main())

    return summarize_download(
        group,
        store_url,
        shards_written=len(work),
        seconds=time.perf_counter() - started,
        requests=client.stats.requests,
        retries=client.stats.retries,
        run_attrs={
            "client": f"lensminer {client_version()}",
            "user_agent": client.user_agent,
            "last_run": dt.datetime.now(dt.UTC).isoformat(),
        },
    )
