"""The parent flow end to end under Prefect's test API on a small simulated sky."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from lensminer import stores
from lensminer.config import load_config
from lensminer.flows.pipeline import embed_task_runner, lens_search
from lensminer.infra.sources import SimulatedSkySource
from lensminer.infra.survey_server import create_app, serve_in_thread
from lensminer.sky import SimulatedSky

pytestmark = pytest.mark.slow

SMALL_RUN = {
    "survey.size": 64,
    "download.shard_rows": 32,
    "download.concurrency": 8,
    "download.rate_limit": 1000.0,
    "pretrain.backbone": "resnet18",
    "pretrain.small_stem": False,
    "pretrain.batch_size": 16,
    "pretrain.queue_size": 64,
    "pretrain.epochs": 1,
    "pretrain.max_steps": 3,
    "embed.batch_size": 32,
    "embed.scheduler": "local",
    "embed.n_workers": 2,
    "score.test_fraction": 0.5,
    "score.epochs": 50,
    "score.top_k": 10,
    "score.grid_size": 4,
    "similarity.k": 5,
}


@pytest.fixture(scope="module")
def small_sky_run(tmp_path_factory, prefect_harness):
    run_dir = tmp_path_factory.mktemp("run")
    sky = SimulatedSky(seed=3, lens_fraction=0.25)
    targets = run_dir / "targets.csv"
    sky.catalog(96, seed=3).write(targets, format="ascii.csv")

    with serve_in_thread(create_app(SimulatedSkySource(sky))) as base_url:
        config = load_config(
            None,
            {
                **SMALL_RUN,
                "run_dir": str(run_dir),
                "targets": str(targets),
                "survey.base_url": base_url,
            },
        )
        summary = lens_search(config)
    return config, summary


def test_flow_fills_every_store(small_sky_run):
    config, summary = small_sky_run
    assert summary["embed"]["shards_written"] == 3
    cutouts = stores.open_store(config.cutouts_url, "cutouts")
    embeddings = stores.open_store(config.embeddings_url, "embeddings")
    assert summary["download"]["counts"]["OK"] == 96
    assert stores.pending_shards(cutouts) == []
    assert stores.pending_shards(embeddings) == []
    assert embeddings["target_id"][:].tolist() == cutouts["target_id"][:].tolist()


def test_flow_ranks_every_row(small_sky_run):
    config, summary = small_sky_run
    candidates = Table.read(summary["score"]["candidates_url"], format="ascii.csv")
    assert len(candidates) == 96
    assert sorted(candidates["rank"]) == list(range(1, 97))
    assert np.all(np.diff(np.asarray(candidates["score"])) <= 0)


def test_flow_writes_summary_and_neighbours(small_sky_run):
    config, summary = small_sky_run
    with open(config.url("summary.json")) as handle:
        written = json.load(handle)
    assert written["n_indexed"] == 96
    assert len(summary["neighbours"]) == 5
    assert summary["query_row"] not in [n["row"] for n in summary["neighbours"]]


def test_flow_rerun_skips_finished_shards(small_sky_run):
    config, _ = small_sky_run
    with serve_in_thread(
        create_app(SimulatedSkySource(SimulatedSky(seed=3, lens_fraction=0.25)))
    ) as base_url:
        rerun = lens_search(
            config.model_copy(
                update={"survey": config.survey.model_copy(update={"base_url": base_url})}
            )
        )
    assert rerun["download"]["shards_written"] == 0
    assert rerun["embed"]["shards_written"] == 0


def test_local_runner_without_api_uses_threads(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    runner = embed_task_runner(load_config(None, {"embed.scheduler": "local"}).embed)
    assert runner.cluster_kwargs["processes"] is False
    assert runner.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")


def test_unknown_scheduler_rejected():
    from lensminer.exceptions import ConfigError

    with pytest.raises(ConfigError, match="embed.scheduler"):
        embed_task_runner(load_config(None, {"embed.scheduler": "slurm"}).embed)
