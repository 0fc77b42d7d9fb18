"""Prefect tasks of the similarity search."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer.config import SimilarityConfig
from lensminer.similarity import build_index, find_similar
from lensminer.tasks._common import retry_unless_permanent

__all__ = ["build_index_task", "find_similar_task"]


@task(
    name="build-similarity-index",
    retries=1,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def build_index_task(
    embeddings_url: str,
    index_url: str,
    similarity: SimilarityConfig,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Build the faiss index over the embeddings and return the number of rows indexed."""
    count = build_index(embeddings_url, index_url, similarity, storage_options=storage_options)
    get_run_logger().info("indexed %d rows into %s", count, index_url)
    return count


@task(name="find-similar", cache_policy=NO_CACHE)
def find_similar_task(
    index_url: str,
    embeddings_url: str,
    cutouts_url: str,
    row: int,
    k: int,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Return the ``k`` objects most similar to row ``row`` as a list of records."""
    table = find_similar(
        index_url, embeddings_url, cutouts_url, row=row, k=k, storage_options=storage_options
    )
    return [{name: _plain(table[name][i]) for name in table.colnames} for i in range(len(table))]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
