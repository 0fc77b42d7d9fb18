"""Prefect flows of the lens search: download, pretrain, embed, score and index.

Run the whole chain with ``lensminer run --config run.yaml`` or from Python::

    from lensminer.config import load_config
    from lensminer.flows.pipeline import lens_search
    lens_search(load_config("run.yaml"))
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from lensminer.cluster import check_scheduler, import_cluster_class, local_cluster_kwargs
from lensminer.config import (
    AugmentConfig,
    BrickConfig,
    DownloadConfig,
    EmbedConfig,
    LensMinerConfig,
    SurveyConfig,
)
from lensminer.exceptions import ConfigError
from lensminer.tasks.download import (
    cut_brick_shard_task,
    download_task,
    plan_brick_download_task,
    summarize_cutouts_task,
)
from lensminer.tasks.embed import embed_shard_task, prepare_embeddings_task, verify_embeddings_task
from lensminer.tasks.pretrain import pretrain_task
from lensminer.tasks.report import publish_report_task
from lensminer.tasks.score import score_task
from lensminer.tasks.similarity import build_index_task, find_similar_task

__all__ = ["brick_download_flow", "embed_flow", "embed_task_runner", "lens_search"]

logger = logging.getLogger(__name__)


def embed_task_runner(embed: EmbedConfig) -> ThreadPoolTaskRunner | DaskTaskRunner:
    """Choose the task runner of the embedding flow from ``embed.scheduler``.

    - ``"synchronous"`` runs shards one after another in this process.
    - ``"local"`` starts a Dask ``LocalCluster`` whose listeners bind to 127.0.0.1.
    - ``"cluster"`` starts ``embed.cluster_class`` (see ``infra/clusters/``).
    - ``"tcp://host:port"`` joins an existing scheduler.

    Worker processes report task runs to ``PREFECT_API_URL``. Without it every process would start
    a temporary API server of its own, so the local cluster then uses threads and warns.
    """
    check_scheduler(embed)
    if embed.scheduler == "synchronous":
        return ThreadPoolTaskRunner(max_workers=1)
    if "://" in embed.scheduler:
        return DaskTaskRunner(address=embed.scheduler)
    if embed.scheduler == "cluster":
        return DaskTaskRunner(
            cluster_class=import_cluster_class(str(embed.cluster_class)),
            cluster_kwargs=embed.cluster_kwargs,
            adapt_kwargs=embed.adapt,
        )

    processes = embed.processes
    if processes and not os.environ.get("PREFECT_API_URL"):
        logger.warning(
            "PREFECT_API_URL is not set, so Dask workers run as threads of this process; "
            "start `prefect server start` and set PREFECT_API_URL to use worker processes"
        )
        processes = False
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs=local_cluster_kwargs(embed, processes),
    )


@flow(name="cut-from-bricks", log_prints=False)
def brick_download_flow(
    targets_url: str,
    cutouts_url: str,
    survey: SurveyConfig,
    download: DownloadConfig,
    bricks: BrickConfig,
    label_column: str | None = "label",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cut every target from the survey's brick coadds, one task per shard of the cutout store."""
    shards = plan_brick_download_task(
        targets_url, cutouts_url, survey, download, bricks, label_column, storage_options
    )
    futures = cut_brick_shard_task.map(
        shards, unmapped(cutouts_url), unmapped(survey), unmapped(bricks), unmapped(storage_options)
    )
    futures.result()
    return summarize_cutouts_task(cutouts_url, len(shards), storage_options)


@flow(name="embed-cutouts", log_prints=False)
def embed_flow(
    cutouts_url: str,
    encoder_url: str,
    embeddings_url: str,
    embed: EmbedConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed every pending shard of the cutout store, one task per shard, then verify the store."""
    pending = prepare_embeddings_task(
        cutouts_url, encoder_url, embeddings_url, embed, augment, storage_options
    )
    futures = embed_shard_task.map(
        pending,
        unmapped(cutouts_url),
        unmapped(encoder_url),
        unmapped(embeddings_url),
        unmapped(embed),
        unmapped(augment),
        unmapped(storage_options),
    )
    futures.result()
    return verify_embeddings_task(cutouts_url, embeddings_url, len(pending), storage_options)


@flow(name="lens-search", log_prints=False)
def lens_search(config: LensMinerConfig, query_row: int | None = None) -> dict[str, Any]:
    """Run the whole lens search on ``config.targets`` and return a summary of every stage.

    Parameters
    ----------
    config
        The run's configuration; ``config.targets`` must name the target table.
    query_row
        Row of the similarity query; the top-ranked candidate when ``None``.
    """
    if not config.targets:
        raise ConfigError(
            "config.targets is not set; give the URL of a target table (CSV, TSV, FITS or Parquet)"
        )
    log = get_run_logger()
    options = config.storage.options or None

    if config.download.source == "bricks":
        download = brick_download_flow.with_options(
            task_runner=ThreadPoolTaskRunner(max_workers=config.bricks.workers)
        )(
            config.targets,
            config.cutouts_url,
            config.survey,
            config.download,
            config.bricks,
            config.score.label_column,
            options,
        )
    else:
        download = download_task(
            config.targets,
            config.cutouts_url,
            config.survey,
            config.download,
            config.score.label_column,
            options,
        )
    pretrained = pretrain_task(
        config.cutouts_url, config.run_dir, config.pretrain, config.augment, options
    )
    runner = embed_task_runner(config.embed)
    embedded = embed_flow.with_options(task_runner=runner)(
        config.cutouts_url,
        pretrained["encoder_url"],
        config.embeddings_url,
        config.embed,
        config.augment,
        options,
    )
    scored = score_task(
        config.cutouts_url,
        config.embeddings_url,
        config.run_dir,
        config.score,
        config.similarity.embedding,
        options,
    )

    index_url = config.url("similarity.faiss")
    n_indexed = build_index_task(config.embeddings_url, index_url, config.similarity, options)
    if query_row is None:
        query_row = int(scored["top_row"])
    neighbours = find_similar_task(
        index_url,
        config.embeddings_url,
        config.cutouts_url,
        query_row,
        config.similarity.k,
        options,
    )

    summary = {
        "run_dir": config.run_dir,
        "download": download,
        "pretrain": pretrained,
        "embed": embedded,
        "score": scored,
        "index_url": index_url,
        "n_indexed": n_indexed,
        "query_row": query_row,
        "neighbours": neighbours,
    }
    publish_report_task(summary, config.url("summary.json"), storage_options=options)
    log.info("lens search finished in %s", config.run_dir)
    return summary
