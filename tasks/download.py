"""Prefect tasks of the download stage: cutout-service mode and brick mode."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer import stores
from lensminer.brick_download import cut_brick_shard, load_grid, prepare_brick_store, shard_bricks
from lensminer.config import BrickConfig, DownloadConfig, SurveyConfig
from lensminer.download import download_cutouts, summarize_download
from lensminer.targets import read_targets
from lensminer.tasks._common import as_record, retry_unless_permanent

__all__ = [
    "cut_brick_shard_task",
    "download_task",
    "plan_brick_download_task",
    "summarize_cutouts_task",
]


# The cutout store is its own cache: finished shards are skipped on a rerun, so Prefect's result
# cache is off and a retry resumes where the failed attempt stopped.
@task(
    name="download-cutouts",
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def download_task(
    targets_url: str,
    cutouts_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    label_column: str | None = "label",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Download cutouts of every target from the cutout service and return the summary."""
    logger = get_run_logger()
    targets = read_targets(targets_url, storage_options=storage_options, label_column=label_column)
    logger.info("read %d targets from %s", len(targets), targets_url)

    summary = as_record(
        download_cutouts(targets, cutouts_url, survey, download, storage_options=storage_options)
    )
    logger.info("cutout store %s: rows by status %s", cutouts_url, summary["counts"])
    return summary


@task(
    name="plan-brick-download",
    retries=2,
    retry_delay_seconds=30,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def plan_brick_download_task(
    targets_url: str,
    cutouts_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    bricks: BrickConfig,
    label_column: str | None = "label",
    storage_options: dict[str, Any] | None = None,
) -> list[int]:
    """Create or reopen the brick-mode cutout store and return the shards still to cut."""
    logger = get_run_logger()
    targets = read_targets(targets_url, storage_options=storage_options, label_column=label_column)
    grid = load_grid(bricks)
    prepare_brick_store(
        targets, cutouts_url, survey, download, bricks, storage_options=storage_options, grid=grid
    )
    work = shard_bricks(cutouts_url, grid, storage_options=storage_options)
    n_bricks = len({name for names in work.values() for name in names})
    logger.info(
        "%d targets: %d shards over %d bricks still to cut from %s",
        len(targets),
        len(work),
        n_bricks,
        bricks.root,
    )
    return sorted(work)


# Coadd reads over HTTP or object storage fail transiently; a retry recuts the whole shard.
@task(
    name="cut-brick-shard",
    retries=3,
    retry_delay_seconds=[10, 60, 300],
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def cut_brick_shard_task(
    shard_index: int,
    cutouts_url: str,
    survey: SurveyConfig,
    bricks: BrickConfig,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Cut one shard of the cutout store from its bricks and return its rows by status."""
    return cut_brick_shard(
        cutouts_url, shard_index, survey, bricks, storage_options=storage_options
    )


@task(name="summarize-cutouts", cache_policy=NO_CACHE)
def summarize_cutouts_task(
    cutouts_url: str, shards_written: int, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check that the cutout store is complete and count its rows by status."""
    group = stores.open_store(cutouts_url, "cutouts", mode="r+", storage_options=storage_options)
    stores.require_complete(group, cutouts_url)
    summary = as_record(summarize_download(group, cutouts_url, shards_written=shards_written))
    get_run_logger().info("cutout store %s: rows by status %s", cutouts_url, summary["counts"])
    return summary
