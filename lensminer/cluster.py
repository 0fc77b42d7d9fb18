"""Dask clusters for the embedding stage: local, an existing scheduler, or a cluster manager."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lensminer.config import EmbedConfig
from lensminer.exceptions import ConfigError

__all__ = ["check_scheduler", "dask_client", "import_cluster_class", "local_cluster_kwargs"]

logger = logging.getLogger(__name__)


def check_scheduler(embed: EmbedConfig) -> None:
    """Raise :class:`ConfigError` unless ``embed.scheduler`` names a known way to run Dask."""
    scheduler = embed.scheduler
    if scheduler in ("local", "synchronous") or "://" in scheduler:
        return
    if scheduler == "cluster":
        if not embed.cluster_class:
            raise ConfigError(
                "embed.scheduler is 'cluster' but embed.cluster_class is not set; give a dotted "
                "class path such as dask_jobqueue.SLURMCluster (see infra/clusters/)"
            )
        return
    raise ConfigError(
        f"embed.scheduler must be 'local', 'synchronous', 'cluster' or a scheduler address such as "
        f"'tcp://127.0.0.1:8786', got {scheduler!r}"
    )


def local_cluster_kwargs(embed: EmbedConfig, processes: bool | None = None) -> dict[str, Any]:
    """Return ``LocalCluster`` keyword arguments that keep every listener on 127.0.0.1."""
    processes = embed.processes if processes is None else processes
    kwargs: dict[str, Any] = {
        "n_workers": embed.n_workers,
        "threads_per_worker": embed.threads_per_worker,
        "processes": processes,
        "dashboard_address": "127.0.0.1:0",
    }
    if processes:
        kwargs["host"] = "127.0.0.1"
    else:
        # Thread workers reach the scheduler in-process; only their dashboards listen on a port.
        kwargs["worker_dashboard_address"] = "127.0.0.1:0"
    return kwargs


def import_cluster_class(path: str) -> type:
    """Import a cluster class from its dotted path, with an install hint when that fails."""
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        hint = {
            "dask_jobqueue": "lensminer[slurm]",
            "dask_kubernetes": "lensminer[kubernetes]",
        }.get(module_name.split(".")[0])
        install = f"; install it with pip install '{hint}'" if hint else ""
        raise ConfigError(
            f"cannot import the Dask cluster class {path!r}: {error}{install}"
        ) from error


@contextmanager
def dask_client(embed: EmbedConfig) -> Iterator[Any]:
    """Start or join the Dask cluster that ``embed`` describes and yield a connected client.

    ``"local"`` starts a ``LocalCluster``, ``"cluster"`` instantiates ``embed.cluster_class`` with
    ``embed.cluster_kwargs`` (adapting when ``embed.adapt`` is set) and an address joins a running
    scheduler. Clusters started here are closed on exit.
    """
    from distributed import Client, LocalCluster

    check_scheduler(embed)
    if embed.scheduler == "synchronous":
        raise ConfigError(
            "embed.scheduler 'synchronous' runs without Dask; there is no client to start"
        )

    if "://" in embed.scheduler:
        logger.debug("joining Dask scheduler %s", embed.scheduler)
        with Client(embed.scheduler) as client:
            yield client
        return

    if embed.scheduler == "local":
        cluster = LocalCluster(**local_cluster_kwargs(embed))
    else:
        cluster = import_cluster_class(str(embed.cluster_class))(**embed.cluster_kwargs)
        if embed.adapt:
            cluster.adapt(**embed.adapt)
    logger.debug("started Dask cluster %s", cluster)
    with cluster, Client(cluster) as client:
        yield client
