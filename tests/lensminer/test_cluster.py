"""Tests of choosing and starting Dask clusters."""

from __future__ import annotations

import importlib.util

import pytest

from lensminer.cluster import (
    check_scheduler,
    dask_client,
    import_cluster_class,
    local_cluster_kwargs,
)
from lensminer.config import EmbedConfig
from lensminer.exceptions import ConfigError


@pytest.mark.parametrize("scheduler", ["local", "synchronous", "tcp://127.0.0.1:8786"])
def test_known_schedulers_accepted(scheduler):
    check_scheduler(EmbedConfig(scheduler=scheduler))


def test_unknown_scheduler_rejected():
    with pytest.raises(ConfigError, match="got 'slurm'"):
        check_scheduler(EmbedConfig(scheduler="slurm"))


def test_cluster_needs_class():
    with pytest.raises(ConfigError, match="cluster_class"):
        check_scheduler(EmbedConfig(scheduler="cluster"))


def test_missing_cluster_package_hint():
    if importlib.util.find_spec("dask_jobqueue") is not None:
        pytest.skip("dask_jobqueue is installed, so importing it cannot fail")
    with pytest.raises(ConfigError, match=r"lensminer\[slurm\]"):
        import_cluster_class("dask_jobqueue.SLURMCluster")


def test_unknown_cluster_class():
    with pytest.raises(ConfigError, match="no_such_module"):
        import_cluster_class("no_such_module.Cluster")


def test_local_kwargs_bind_loopback():
    kwargs = local_cluster_kwargs(EmbedConfig(n_workers=3), processes=True)
    assert kwargs["host"] == "127.0.0.1"
    assert kwargs["dashboard_address"] == "127.0.0.1:0"
    assert kwargs["n_workers"] == 3


def test_thread_kwargs_have_no_host():
    kwargs = local_cluster_kwargs(EmbedConfig(processes=False))
    assert "host" not in kwargs
    assert kwargs["worker_dashboard_address"] == "127.0.0.1:0"


def test_cluster_class_started_and_adapted():
    embed = EmbedConfig(
        scheduler="cluster",
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": 0, "processes": False, "dashboard_address": "127.0.0.1:0"},
        adapt={"minimum": 1, "maximum": 1},
    )
    with dask_client(embed) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
