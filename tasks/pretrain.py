"""Prefect task of the pretraining stage."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.pretrain import pretrain
from lensminer.pretrain_process import pretrain_in_subprocess
from lensminer.tasks._common import as_record, retry_unless_permanent

__all__ = ["pretrain_task"]


# Lightning's last checkpoint in the run directory is the cache: a retry or rerun resumes from it.
@task(
    name="pretrain-moco",
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_unless_permanent,
    cache_policy=NO_CACHE,
)
def pretrain_task(
    cutouts_url: str,
    run_dir: str,
    pretrain_config: PretrainConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pretrain the MoCo v2 encoder on the cutout store and return where it was exported.

    Under DDP the training runs in a child process, because Lightning starts each further rank
    by rerunning the current command, which here is the whole flow.
    """
    logger = get_run_logger()
    train = pretrain_in_subprocess if pretrain_config.strategy == "ddp" else pretrain
    result = as_record(
        train(cutouts_url, run_dir, pretrain_config, augment, storage_options=storage_options)
    )
    logger.info("encoder exported to %s after %s steps", result["encoder_url"], result["steps"])
    return result
