"""Training batches and the labelled subset read from a cutout store.

:class:`CutoutBatches` reads whole shards (contiguous blocks of rows) rather than one cutout at a
time, because a shard is the unit in which Zarr stores and fetches the images. Each epoch it draws
the rows to train on and deals whole shards to the DataLoader worker processes (and DDP ranks).
Each worker shuffles rows within a few shards at a time and yields ready-made batches, so use it
with ``DataLoader(dataset, batch_size=None)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import IterableDataset, get_worker_info

from lensminer import stores
from lensminer.exceptions import ConfigError, StoreError

__all__ = [
    "CutoutBatch",
    "CutoutBatches",
    "LabelledSubset",
    "load_labelled_subset",
    "magnitude_weights",
]

logger = logging.getLogger(__name__)


@dataclass
class CutoutBatch:
    """One batch of raw cutouts with the catalog values the augmentations need.

    Attributes
    ----------
    images
        (B, C, S, S): float32 nanomaggies (FITS stores) or uint8 RGB (JPEG stores).
    ebv
        (B,) float32 E(B-V) in magnitudes; NaN where the store has no ``ebv`` array.
    psf_fwhm
        (B, C) float32 PSF FWHM in arcsec; NaN where the store has no ``psf_fwhm`` array.
    row_index
        (B,) int64 row of each cutout in the store.
    """

    images: torch.Tensor
    ebv: torch.Tensor
    psf_fwhm: torch.Tensor
    row_index: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Unpacks as ``images, ebv, psf_fwhm, row_index = batch``.
        return iter((self.images, self.ebv, self.psf_fwhm, self.row_index))


def magnitude_weights(magnitude: np.ndarray, bin_width: float = 0.25) -> np.ndarray:
    """Weight rows so that a weighted draw is uniform in magnitude.

    Each row gets ``1 / (rows in its magnitude bin)``; rows with a non-finite magnitude get 0.

    Parameters
    ----------
    magnitude
        (N,) magnitudes.
    bin_width
        Bin width in magnitudes.

    Returns
    -------
    numpy.ndarray
        (N,) float64 weights summing to 1 (all zero when no magnitude is finite).
    """
    magnitude = np.asarray(magnitude, dtype=np.float64)
    finite = np.isfinite(magnitude)
    weights = np.zeros(magnitude.shape, dtype=np.float64)
    if not finite.any():
        return weights

    bins = np.floor((magnitude[finite] - magnitude[finite].min()) / bin_width).astype(np.int64)
    counts = np.bincount(bins)
    weights[finite] = 1.0 / counts[bins]
    return weights / weights.sum()


def _round_robin_counts(available: list[int], total: int) -> list[int]:
    """Return how many of the first ``total`` items each source gives when items are taken from
    the sources in turn, skipping sources that have run out (as a DataLoader takes batches from
    its workers)."""
    counts = [0] * len(available)
    total = min(total, sum(available))
    while sum(counts) < total:
        for source, limit in enumerate(available):
            if counts[source] < limit and sum(counts) < total:
                counts[source] += 1
    return counts


class CutoutBatches(IterableDataset):
    """Batches of OK rows of a cutout store, read shard by shard.

    Parameters
    ----------
    url
        fsspec URL of a cutout store (local path or ``s3://``).
    batch_size
        Rows per batch. Every batch is full: the rows left over at the end of each worker's
        share of an epoch are dropped, because MoCo's queue needs a fixed batch size.
    storage_options
        fsspec options for remote URLs.
    seed
        Seed of the row sampling and shuffling; the draws of epoch ``e`` depend on (seed, e) only.
    magnitude_column
        Name of a per-row magnitude array (e.g. z-band magnitude). When the store has it, rows
        are drawn with replacement uniformly in magnitude; otherwise each OK row is used once per
        epoch.
    shuffle_shards
        Number of shards whose rows are shuffled together; memory per worker is about this many
        shards of images.
    num_workers
        DataLoader worker processes that will iterate the dataset; needed for ``len()``.

    Attributes such as ``skip_batches`` (batches of the current epoch to leave out, for a resumed
    run) are read when iteration starts, so set them before creating the DataLoader iterator.
    rank, world_size
        DDP process rank and count; by default read from ``torch.distributed`` when initialised.

    Attributes
    ----------
    image_format, bands, pixscale
        The store's attributes, for :class:`lensminer.augment.Augmentation`.
    ok_rows
        (N_ok,) int64 rows whose status is OK.
    """

    def __init__(
        self,
        url: str,
        *,
        batch_size: int,
        storage_options: dict[str, Any] | None = None,
        seed: int = 0,
        magnitude_column: str | None = "mag_z",
        shuffle_shards: int = 2,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.url = url
        self.batch_size = batch_size
        self.storage_options = storage_options
        self.seed = seed
        self.shuffle_shards = max(1, shuffle_shards)
        self.num_workers = num_workers
        self.epoch = 0
        self.skip_batches = 0
        self._group: zarr.Group | None = None
        self._plan_cache: tuple[tuple[int, int], list[np.ndarray]] | None = None

        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            world_size = torch.distributed.get_world_size() if distributed else 1
        self.rank, self.world_size = rank, world_size

        # Small per-row metadata is read once here; images are opened lazily in each worker.
        group = stores.open_store(url, "cutouts", storage_options=storage_options)
        attrs = group.attrs.asdict()
        self.image_format: str = attrs["image_format"]
        self.bands: str = attrs["bands"]
        self.pixscale: float = float(attrs["pixscale"])
        self.shard_rows: int = int(attrs["shard_rows"])
        self.n_rows: int = int(attrs["n_rows"])
        self.channels: int = int(group["images"].shape[1])
        self.has_ebv = "ebv" in group
        self.has_psf_fwhm = "psf_fwhm" in group

        status = group["status"][:]
        self.ok_rows = np.flatnonzero(status == int(stores.RowStatus.OK)).astype(np.int64)
        if self.ok_rows.size == 0:
            raise StoreError(
                f"cutout store {url!r} has no rows with status OK; run or rerun the download"
            )
        pending = stores.pending_shards(group)
        if pending:
            logger.warning(
                "cutout store %s has %d unfinished shards; their rows are skipped",
                url,
                len(pending),
            )

        self.weights: np.ndarray | None = None
        if magnitude_column and magnitude_column in group:
            weights = magnitude_weights(group[magnitude_column][:][self.ok_rows])
            if weights.sum() > 0:
                self.weights = weights
                logger.debug("sampling %s uniformly in %s", url, magnitude_column)
        if self.weights is None:
            logger.debug("sampling %s uniformly over %d OK rows", url, self.ok_rows.size)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own Zarr group.
        state = self.__dict__.copy()
        state["_group"] = None
        state["_plan_cache"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose rows the next iteration yields."""
        self.epoch = epoch
        self.skip_batches = 0

    # ------------------------------------------------------------------ planning

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        """Draw the rows of one epoch, grouped by shard in a random shard order, as (N,) int64."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.weights is None:
            rows = self.ok_rows
        else:
            rows = rng.choice(self.ok_rows, size=self.ok_rows.size, replace=True, p=self.weights)

        shard = rows // self.shard_rows
        shard_order = rng.permutation(stores.shard_count(self.n_rows, self.shard_rows))
        position = np.empty_like(shard_order)
        position[shard_order] = np.arange(shard_order.size)
        return rows[np.argsort(position[shard], kind="stable")]

    def _slot_sequences(self, epoch: int, slots: int) -> list[np.ndarray]:
        """Return the row sequence of each (rank, worker) slot: whole shards dealt in turn,
        with rows shuffled within groups of ``shuffle_shards`` shards."""
        key = (epoch, slots)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1]

        rows = self._epoch_rows(epoch)
        boundaries = np.flatnonzero(np.diff(rows // self.shard_rows)) + 1
        segments = np.split(rows, boundaries)  # one array per shard, in the epoch's shard order

        sequences = []
        for slot in range(slots):
            mine = segments[slot::slots]
            rng = np.random.default_rng([self.seed, epoch, slot])
            pieces = [
                rng.permutation(np.concatenate(mine[i : i + self.shuffle_shards]))
                for i in range(0, len(mine), self.shuffle_shards)
            ]
            sequences.append(np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64))

        self._plan_cache = (key, sequences)
        return sequences

    def _batches_per_worker(self, epoch: int) -> list[int]:
        """Return how many batches each worker of this rank yields in ``epoch``.

        Every rank yields the same total (the smallest over ranks), so DDP ranks stay in step.
        The DataLoader takes batches from its workers in turn, and the cut follows that order.
        """
        workers = max(1, self.num_workers)
        slots = self.world_size * workers
        full = [len(rows) // self.batch_size for rows in self._slot_sequences(epoch, slots)]
        per_rank = [sum(full[r * workers : (r + 1) * workers]) for r in range(self.world_size)]
        total = min(per_rank)

        available = full[self.rank * workers : (self.rank + 1) * workers]
        return _round_robin_counts(available, total)

    def batches_in_epoch(self, epoch: int) -> int:
        """Return the number of batches this rank yields in a whole ``epoch``."""
        return sum(self._batches_per_worker(epoch))

    def rows_in_epoch(self, epoch: int) -> int:
        """Return the number of rows drawn for ``epoch`` over all ranks, before batching.

        Every epoch draws as many rows as the store has OK rows, with magnitude sampling too.
        """
        return int(self.ok_rows.size)

    def __len__(self) -> int:
        # The whole epoch, including skipped batches, because Lightning counts those as done.
        return self.batches_in_epoch(self.epoch)

    # ------------------------------------------------------------------ reading

    def _open(self) -> zarr.Group:
        if self._group is None:
            self._group = stores.open_store(
                self.url, "cutouts", storage_options=self.storage_options
            )
        return self._group

    def _read_shard(self, shard: int) -> dict[str, np.ndarray]:
        group = self._open()
        rows = stores.shard_slice(shard, self.n_rows, self.shard_rows)
        count = rows.stop - rows.start
        logger.debug("reading shard %d (rows %d-%d) of %s", shard, rows.start, rows.stop, self.url)

        images = np.asarray(group["images"][rows])
        native = images.dtype.newbyteorder("=")
        block = {"images": images.astype(native, copy=False)}
        if self.has_ebv:
            block["ebv"] = np.asarray(group["ebv"][rows], dtype=np.float32)
        else:
            block["ebv"] = np.full(count, np.nan, dtype=np.float32)
        if self.has_psf_fwhm:
            block["psf_fwhm"] = np.asarray(group["psf_fwhm"][rows], dtype=np.float32)
        else:
            block["psf_fwhm"] = np.full((count, self.channels), np.nan, dtype=np.float32)
        return block

    def __iter__(self) -> Iterator[CutoutBatch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if workers != max(1, self.num_workers):
            raise ConfigError(
                f"CutoutBatches was built for num_workers={self.num_workers} but runs in "
                f"{workers} workers; pass the DataLoader's num_workers to it"
            )
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        sequence = self._slot_sequences(self.epoch, slots)[slot]
        per_worker = self._batches_per_worker(self.epoch)
        n_batches = per_worker[worker]
        # A resumed epoch skips the batches this rank already yielded, in the DataLoader's order.
        skipped = _round_robin_counts(per_worker, self.skip_batches)[worker]
        sequence = sequence[skipped * self.batch_size : n_batches * self.batch_size]

        # Keep a shard in memory from its first to its last use in the sequence.
        shard = sequence // self.shard_rows
        last_use = {int(s): int(i) for i, s in enumerate(shard)}
        cache: dict[int, dict[str, np.ndarray]] = {}

        for start in range(0, sequence.size, self.batch_size):
            rows = sequence[start : start + self.batch_size]
            parts: dict[str, list[np.ndarray]] = {"images": [], "ebv": [], "psf_fwhm": []}
            for row in rows.tolist():
                index = row // self.shard_rows
                if index not in cache:
                    cache[index] = self._read_shard(index)
                offset = row - index * self.shard_rows
                for name in parts:
                    parts[name].append(cache[index][name][offset])

            for index in [s for s in cache if last_use[s] < start + self.batch_size]:
                del cache[index]

            yield CutoutBatch(
                images=torch.from_numpy(np.stack(parts["images"])),
                ebv=torch.from_numpy(np.stack(parts["ebv"])),
                psf_fwhm=torch.from_numpy(np.stack(parts["psf_fwhm"])),
                row_index=torch.from_numpy(rows.copy()),
            )


@dataclass
class LabelledSubset:
    """The labelled OK rows of a cutout store.

    Attributes
    ----------
    images
        (N, C, S, S) raw cutouts, dtype as stored.
    labels
        (N,) int64, 1 lens (or positive class) and 0 not.
    row_index
        (N,) int64 rows in the store.
    """

    images: torch.Tensor
    labels: torch.Tensor
    row_index: torch.Tensor


def load_labelled_subset(
    url: str,
    *,
    storage_options: dict[str, Any] | None = None,
    max_rows: int | None = 2000,
    seed: int = 0,
) -> LabelledSubset | None:
    """Read the OK rows whose ``label`` is 0 or 1, shard by shard.

    Parameters
    ----------
    max_rows
        Keep a random subset of at most this many rows (None keeps all), to bound memory.

    Returns
    -------
    LabelledSubset or None
        None when the store has no ``label`` array or no labelled OK rows.
    """
    group = stores.open_store(url, "cutouts", storage_options=storage_options)
    if "label" not in group:
        return None

    labels = np.asarray(group["label"][:]).astype(np.int64)
    status = group["status"][:]
    rows = np.flatnonzero((labels >= 0) & (status == int(stores.RowStatus.OK)))
    if rows.size == 0:
        return None
    if max_rows is not None and rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_rows, replace=False))

    # Read each shard that contains labelled rows once, as one block.
    shard_rows = int(group.attrs["shard_rows"])
    n_rows = int(group.attrs["n_rows"])
    images = []
    for shard in np.unique(rows // shard_rows).tolist():
        block = stores.shard_slice(shard, n_rows, shard_rows)
        selected = rows[(rows >= block.start) & (rows < block.stop)] - block.start
        data = np.asarray(group["images"][block])
        images.append(data[selected].astype(data.dtype.newbyteorder("="), copy=False))

    return LabelledSubset(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(labels[rows]),
        row_index=torch.from_numpy(rows.astype(np.int64)),
    )
