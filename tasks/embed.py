"""Prefect tasks of the embedding stage: one task per shard of the cutout store."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer.config import AugmentConfig, EmbedConfig
from lensminer.embed import embed_shard, prepare_embedding_store, verify_embedding_store
from lensminer.tasks._common import as_record, retry_unless_permanent

__all__ = ["embed_shard_task", "prepare_embeddings_task", "verify_embeddings_task"]


@task(name="prepare-embeddings", cache_policy=NO_CACHE)
def prepare_embeddings_task(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None = None,
) -> list[int]:
    """Create or reopen the embedding store and return the shards still to embed."""
    pending = prepare_embedding_store(
        cutouts_url,
        encoder_url,
        embeddings_url,
        embed,
        augment=augment,
        storage_options=storage_options,
    )
    get_run_logger().info("%d shards of %s still to embed", len(pending), embeddings_url)
    return pending


# Each shard's completion flag in the embedding store replaces Prefect's result cache.
@task(
    name="embed-shard",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def embed_shard_task(
    shard_index: int,
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Embed one shard of the cutout store and return the rows embedded."""
    return embed_shard(
        cutouts_url,
        encoder_url,
        embeddings_url,
        shard_index,
        embed,
        augment,
        storage_options=storage_options,
    )


@task(name="verify-embeddings", cache_policy=NO_CACHE)
def verify_embeddings_task(
    cutouts_url: str,
    embeddings_url: str,
    shards_written: int = 0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Check that the embedding store is complete and aligned with the cutout store.

    ``shards_written`` is the number of shards this run embedded; the rest count as skipped.
    """
    summary = as_record(
        verify_embedding_store(cutouts_url, embeddings_url, storage_options=storage_options)
    )
    summary["shards_written"] = shards_written
    summary["shards_skipped"] -= shards_written
    get_run_logger().info(
        "embedding store %s verified: %s rows, %s valid, %d shards written",
        embeddings_url,
        summary["n_rows"],
        summary["n_valid"],
        shards_written,
    )
    return summary
