"""Prefect task of the download stage."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer.config import DownloadConfig, SurveyConfig
from lensminer.download import download_cutouts
from lensminer.targets import read_targets
from lensminer.tasks._common import as_record

__all__ = ["download_task"]


# The cutout store is its own cache: finished shards are skipped on a rerun, so Prefect's result
# cache is off and a retry resumes where the failed attempt stopped.
@task(name="download-cutouts", retries=2, retry_delay_seconds=30, cache_policy=NO_CACHE)
def download_task(
    targets_url: str,
    cutouts_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    label_column: str | None = "label",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Download cutouts of every target into the cutout store and return the summary."""
    logger = get_run_logger()
    targets = read_targets(targets_url, storage_options=storage_options, label_column=label_column)
    logger.info("read %d targets from %s", len(targets), targets_url)

    summary = as_record(
        download_cutouts(targets, cutouts_url, survey, download, storage_options=storage_options)
    )
    logger.info("cutout store %s: rows by status %s", cutouts_url, summary["counts"])
    return summary
