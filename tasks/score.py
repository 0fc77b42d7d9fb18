"""Prefect task of the scoring stage."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer.config import ScoreConfig
from lensminer.score import score_embeddings
from lensminer.tasks._common import as_record, retry_unless_permanent

__all__ = ["score_task"]


@task(
    name="score-candidates",
    retries=1,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def score_task(
    cutouts_url: str,
    embeddings_url: str,
    out_dir: str,
    score: ScoreConfig,
    embedding: str = "representation",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the linear probe, rank every row and write the candidates table, grid and metrics."""
    result = as_record(
        score_embeddings(
            cutouts_url,
            embeddings_url,
            out_dir,
            score,
            embedding=embedding,
            storage_options=storage_options,
        )
    )
    get_run_logger().info(
        "ranked %s rows into %s; metrics %s",
        result["n_scored"],
        result["candidates_url"],
        result["metrics"],
    )
    return result
