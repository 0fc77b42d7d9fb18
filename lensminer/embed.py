"""Embedding of a cutout store into an embedding store with Dask.

One Dask task embeds one shard: it reads the shard's cutouts, runs the frozen encoder and writes
the shard's rows of every embedding array before it sets the shard's ``shard_done`` flag. A run
that stops partway leaves the unfinished shards pending, and a rerun embeds only those.

Example::

    summary = embed_cutouts(config.cutouts_url, config.encoder_url, config.embeddings_url,
                            config.embed, config.augment)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lensminer import storage, stores
from lensminer.cluster import check_scheduler, dask_client
from lensminer.config import AugmentConfig, EmbedConfig
from lensminer.exceptions import ConfigError, StoreError

if TYPE_CHECKING:
    import distributed

    from lensminer.models.encoder import Encoder

__all__ = [
    "EmbedSummary",
    "embed_cutouts",
    "embed_shard",
    "load_cached_encoder",
    "prepare_embedding_store",
    "resolve_device",
    "verify_embedding_store",
]

logger = logging.getLogger(__name__)

# Encoders loaded in this process, keyed by (URL, device, file checksum). The cache lives in an
# importable module, so a Dask worker process loads the encoder once and keeps it between tasks.
_ENCODERS: dict[tuple[str, str, str], Encoder] = {}

# Rows compared per block when a store is verified, so memory stays flat for large stores.
VERIFY_BLOCK_ROWS = 262_144


@dataclass(frozen=True)
class EmbedSummary:
    """Outcome of an embedding run.

    Attributes
    ----------
    embeddings_url
        URL of the embedding store.
    n_rows, n_valid
        Rows in the store and rows with an embedding (cutout status OK).
    shards_written, shards_skipped
        Shards embedded by this run and shards that an earlier run had already finished.
    seconds
        Wall-clock time of the run.
    """

    embeddings_url: str
    n_rows: int
    n_valid: int
    shards_written: int
    shards_skipped: int
    seconds: float


def resolve_device(device: str) -> torch.device:
    """Return the torch device for ``EmbedConfig.device`` (``auto`` picks CUDA when present)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"embed.device is {device!r} but torch finds no CUDA device; set it to 'cpu' or 'auto'"
        )
    return torch.device(device)


def load_cached_encoder(
    encoder_url: str, *, device: str = "cpu", storage_options: dict[str, Any] | None = None
) -> Encoder:
    """Load an exported encoder once per process, in eval mode and channels_last layout.

    The cache key includes the file's checksum (modification time locally, ETag on S3), so an
    encoder re-exported to the same URL is loaded again.
    """
    from lensminer.models.encoder import load_encoder

    fs, path = storage.filesystem(
        encoder_url, storage_options if storage.is_remote(encoder_url) else None
    )
    try:
        checksum = str(fs.checksum(path))
    except FileNotFoundError as error:
        raise StoreError(
            f"no encoder at {encoder_url!r}; run pretraining (or export an encoder) first"
        ) from error

    key = (encoder_url, device, checksum)
    encoder = _ENCODERS.get(key)
    if encoder is None:
        logger.debug("loading encoder %s onto %s", encoder_url, device)
        options = storage_options if storage.is_remote(encoder_url) else None
        encoder = load_encoder(encoder_url, storage_options=options, map_location=device)
        encoder = encoder.to(device=device, memory_format=torch.channels_last).eval()
        # Keep one encoder per process, so a re-exported encoder replaces the old one in memory.
        _ENCODERS.clear()
        _ENCODERS[key] = encoder
    return encoder


def prepare_embedding_store(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    *,
    augment: AugmentConfig | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[int]:
    """Create or reopen the embedding store of a complete cutout store.

    The embedding store gets the cutout store's ``shard_rows``, so one task reads and writes one
    shard. Its widths come from the encoder file. When ``augment`` is given, its ``crop_size``
    must equal the encoder's input size.

    Returns
    -------
    list[int]
        Indices of the shards still to embed.

    Raises
    ------
    StoreIncompleteError
        If the cutout store has unwritten shards.
    StoreError
        If an existing embedding store belongs to other targets or another encoder.
    ConfigError
        If ``augment.crop_size`` differs from the encoder's input size.
    """
    cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    stores.require_complete(cutouts, cutouts_url)
    encoder = load_cached_encoder(encoder_url, device="cpu", storage_options=storage_options)
    if augment is not None and augment.crop_size != encoder.input_size:
        raise ConfigError(
            f"augment.crop_size is {augment.crop_size} but the encoder {encoder_url!r} was "
            "trained on "
            f"{encoder.input_size} px inputs; set augment.crop_size to {encoder.input_size}"
        )
    shard_rows = int(cutouts.attrs["shard_rows"])

    group = stores.create_embedding_store(
        embeddings_url,
        # NOTE: zarr returns ids as numpy StringDType, which create_embedding_store cannot cast to a
        # fixed-width str array, so they pass through a list.
        target_id=np.asarray(cutouts["target_id"][:].tolist()),
        representation_dim=encoder.representation_dim,
        projection_dim=encoder.projection_dim,
        dtype=embed.dtype,
        shard_rows=shard_rows,
        attrs={"cutouts_url": cutouts_url, "encoder_url": encoder_url, "embed": embed.model_dump()},
        storage_options=storage_options,
    )

    # A reopened store must match this encoder and this cutout store's sharding.
    expected = {
        "representation width": (group["representation"].shape[1], encoder.representation_dim),
        "projection width": (group["projection"].shape[1], encoder.projection_dim),
        "shard_rows": (int(group.attrs["shard_rows"]), shard_rows),
        "dtype": (str(group["representation"].dtype), embed.dtype),
    }
    for name, (found, wanted) in expected.items():
        if found != wanted:
            raise StoreError(
                f"{embeddings_url!r} has {name} {found}, but this run needs {wanted}; "
                "delete the embedding store or choose another run directory"
            )

    pending = stores.pending_shards(group)
    logger.debug(
        "%s: %d of %d shards pending", embeddings_url, len(pending), group["shard_done"].shape[0]
    )
    return pending


def _embed_images(
    encoder: Encoder,
    images: np.ndarray,
    *,
    image_format: str,
    bands: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (representation (B, D), projection (B, P)) float32 for cutouts (B, C, S, S)."""
    from lensminer.augment import evaluation_view

    representations, projections = [], []
    for start in range(0, images.shape[0], embed.batch_size):
        batch = images[start : start + embed.batch_size]
        view = evaluation_view(
            torch.from_numpy(batch),
            image_format=image_format,
            bands=bands,
            crop_size=augment.crop_size,
            config=augment,
        )
        x = view.to(device).contiguous(memory_format=torch.channels_last)

        # bf16 autocast runs only on CUDA, so CPU embeddings stay float32 and reproducible.
        # NOTE: the CUDA branch has not been run by the tests, which are CPU only.
        with (
            torch.inference_mode(),
            torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"),
        ):
            representation, projection = encoder(x)
        representations.append(representation.float().cpu().numpy())
        projections.append(projection.float().cpu().numpy())
    return np.concatenate(representations), np.concatenate(projections)


def embed_shard(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    shard_index: int,
    embed: EmbedConfig,
    augment: AugmentConfig,
    *,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Embed the rows of one shard and mark the shard done.

    Rows whose cutout status is not OK get ``valid=False`` and zero embeddings, and they are not
    passed to the encoder.

    Returns
    -------
    int
        Rows run through the encoder (the shard's rows with status OK).

    Raises
    ------
    StoreError
        If the written rows do not read back with the same count and target ids, or the encoder
        returned NaN or infinite values.
    """
    cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    embeddings = stores.open_store(
        embeddings_url, "embeddings", mode="r+", storage_options=storage_options
    )
    rows = stores.shard_slice(
        shard_index, int(cutouts.attrs["n_rows"]), int(cutouts.attrs["shard_rows"])
    )

    # Read the shard.
    images = cutouts["images"][rows]
    status = cutouts["status"][rows]
    target_id = cutouts["target_id"][rows]
    ok = status == int(stores.RowStatus.OK)

    # Embed the rows with good cutouts; the rest keep zeros.
    n_read = images.shape[0]
    dtype = embeddings["representation"].dtype
    representation = np.zeros((n_read, embeddings["representation"].shape[1]), dtype=dtype)
    projection = np.zeros((n_read, embeddings["projection"].shape[1]), dtype=dtype)
    if ok.any():
        device = resolve_device(embed.device)
        encoder = load_cached_encoder(
            encoder_url, device=str(device), storage_options=storage_options
        )
        rep, proj = _embed_images(
            encoder,
            images[ok],
            image_format=cutouts.attrs["image_format"],
            bands=cutouts.attrs["bands"],
            embed=embed,
            augment=augment,
            device=device,
        )
        if not (np.isfinite(rep).all() and np.isfinite(proj).all()):
            raise StoreError(
                f"the encoder {encoder_url!r} returned NaN or infinite values in shard "
                f"{shard_index}; "
                "check the encoder and the cutouts of that shard"
            )
        representation[ok] = rep
        projection[ok] = proj

    # Write the shard's rows, then check them before the shard counts as done.
    embeddings["representation"][rows] = representation
    embeddings["projection"][rows] = projection
    embeddings["valid"][rows] = ok

    written_ids = embeddings["target_id"][rows]
    written_valid = embeddings["valid"][rows]
    if written_ids.shape[0] != n_read or written_valid.shape[0] != n_read:
        raise StoreError(
            f"shard {shard_index} of {embeddings_url!r}: read {n_read} rows but "
            f"{written_valid.shape[0]} were written; the embedding store does not match the "
            "cutout store, so rerun prepare_embedding_store"
        )
    if written_ids.tolist() != target_id.tolist():
        raise StoreError(
            f"shard {shard_index} of {embeddings_url!r}: target ids differ from the cutout "
            "store's; "
            "the stores belong to different target lists"
        )
    if not np.array_equal(written_valid, ok):
        raise StoreError(
            f"shard {shard_index} of {embeddings_url!r}: the valid flags did not read back as "
            "written"
        )

    stores.mark_shard_done(embeddings, shard_index)
    logger.debug(
        "embedded shard %d of %s: %d of %d rows valid",
        shard_index,
        embeddings_url,
        int(ok.sum()),
        n_read,
    )
    return int(ok.sum())


def _run_shards(
    client: distributed.Client,
    shards: list[int],
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None,
) -> int:
    futures = client.map(
        embed_shard,
        [cutouts_url] * len(shards),
        [encoder_url] * len(shards),
        [embeddings_url] * len(shards),
        shards,
        embed=embed,
        augment=augment,
        storage_options=storage_options,
        pure=False,
    )
    return int(sum(client.gather(futures)))


def embed_cutouts(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    client: distributed.Client | None = None,
) -> EmbedSummary:
    """Embed every pending shard with Dask, then verify the embedding store.

    Parameters
    ----------
    client
        A Dask client to run on. Without one, ``embed.scheduler`` chooses: ``"local"`` starts a
        LocalCluster of ``embed.n_workers`` processes whose listeners bind 127.0.0.1,
        ``"synchronous"`` runs the shards one after another in this process, ``"cluster"``
        starts ``embed.cluster_class`` (e.g. a SLURM cluster), and a ``tcp://host:port`` address
        connects to a running scheduler.

    Returns
    -------
    EmbedSummary
        Counts of the finished store and of the shards written by this run.

    Raises
    ------
    ConfigError
        If ``embed.scheduler`` is not one of those.
    StoreError
        If a shard fails its checks, or the finished store does not match the cutout store.
    """
    started = time.perf_counter()
    if client is None:
        check_scheduler(embed)

    pending = prepare_embedding_store(
        cutouts_url,
        encoder_url,
        embeddings_url,
        embed,
        augment=augment,
        storage_options=storage_options,
    )
    args = (cutouts_url, encoder_url, embeddings_url, embed, augment, storage_options)

    if not pending:
        logger.debug("%s: every shard is already embedded", embeddings_url)
    elif client is not None:
        _run_shards(client, pending, *args)
    elif embed.scheduler == "synchronous":
        for index in pending:
            embed_shard(
                cutouts_url,
                encoder_url,
                embeddings_url,
                index,
                embed,
                augment,
                storage_options=storage_options,
            )
    else:
        with dask_client(embed) as started_client:
            _run_shards(started_client, pending, *args)

    verified = verify_embedding_store(cutouts_url, embeddings_url, storage_options=storage_options)
    summary = EmbedSummary(
        embeddings_url=embeddings_url,
        n_rows=verified.n_rows,
        n_valid=verified.n_valid,
        shards_written=len(pending),
        shards_skipped=verified.shards_skipped - len(pending),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "embedded %s: %d rows, %d valid, %d shards written, %d already done, %.1f s",
        embeddings_url,
        summary.n_rows,
        summary.n_valid,
        summary.shards_written,
        summary.shards_skipped,
        summary.seconds,
    )
    return summary


def verify_embedding_store(
    cutouts_url: str, embeddings_url: str, *, storage_options: dict[str, Any] | None = None
) -> EmbedSummary:
    """Check that an embedding store is complete and aligned with its cutout store.

    Returns
    -------
    EmbedSummary
        Row counts; every shard counts as skipped because nothing is written.

    Raises
    ------
    StoreIncompleteError
        If a shard of the embedding store is not done.
    StoreError
        If the row count or target ids differ from the cutout store's, or ``valid`` differs from
        ``status == OK``.
    """
    started = time.perf_counter()
    cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    embeddings = stores.open_store(embeddings_url, "embeddings", storage_options=storage_options)
    stores.require_complete(embeddings, embeddings_url)

    n_rows = int(cutouts.attrs["n_rows"])
    if embeddings["target_id"].shape[0] != n_rows:
        raise StoreError(
            f"{embeddings_url!r} has {embeddings['target_id'].shape[0]} rows, the cutout store "
            f"{cutouts_url!r} "
            f"has {n_rows}; delete the embedding store and embed again"
        )

    # Compare in blocks of whole shards, so memory does not grow with the store.
    shard_rows = int(cutouts.attrs["shard_rows"])
    block = max(shard_rows, VERIFY_BLOCK_ROWS // shard_rows * shard_rows)
    n_valid = 0
    for start in range(0, n_rows, block):
        rows = slice(start, min(start + block, n_rows))
        if embeddings["target_id"][rows].tolist() != cutouts["target_id"][rows].tolist():
            raise StoreError(
                f"target ids of {embeddings_url!r} differ from {cutouts_url!r} in rows "
                f"{rows.start}-{rows.stop - 1}; "
                "the stores belong to different target lists"
            )
        valid = embeddings["valid"][rows]
        ok = cutouts["status"][rows] == int(stores.RowStatus.OK)
        if not np.array_equal(valid, ok):
            first = rows.start + int(np.flatnonzero(valid != ok)[0])
            raise StoreError(
                f"{embeddings_url!r}: valid flags differ from the cutout status (first at row "
                f"{first}); the cutout store changed after embedding, so delete the embedding "
                "store and embed again"
            )
        n_valid += int(valid.sum())

    return EmbedSummary(
        embeddings_url=embeddings_url,
        n_rows=n_rows,
        n_valid=n_valid,
        shards_written=0,
        shards_skipped=int(embeddings["shard_done"].shape[0]),
        seconds=time.perf_counter() - started,
    )
