"""Small but complete runs of the lens search against the local survey server.

``run_simulated_demo`` serves a simulated sky with injected lenses, so the ranking can be scored
against the truth. ``run_image_folder_demo`` serves a folder of real survey images (for example
Galaxy Zoo DECaLS cutouts with a ring label) through the same cutout API.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from astropy.table import Table

from lensminer.config import LensMinerConfig, load_config
from lensminer.infra.launch import survey_server_process
from lensminer.sky import SimulatedSky

__all__ = [
    "DemoResult",
    "demo_config",
    "run_image_folder_demo",
    "run_simulated_demo",
    "top_fraction_recall",
]

logger = logging.getLogger(__name__)

# Small settings that finish on two CPU cores in a few minutes.
_DEMO_OVERRIDES: dict[str, Any] = {
    "download.concurrency": 16,
    "download.rate_limit": 500.0,
    "download.timeout": 60.0,
    "download.shard_rows": 256,
    "pretrain.backbone": "resnet18",
    "pretrain.small_stem": False,
    "pretrain.batch_size": 64,
    "pretrain.queue_size": 1024,
    "pretrain.epochs": 3,
    "embed.batch_size": 128,
    "embed.scheduler": "local",
    "embed.n_workers": 2,
    # Thread workers share this process's Prefect API; worker processes would need a Prefect
    # server (PREFECT_API_URL), which the demo does not start.
    "embed.processes": False,
    "score.test_fraction": 0.5,
}


@dataclass
class DemoResult:
    """Output locations of a demo run and its ranking of the held-out lenses."""

    run_dir: str
    summary: dict[str, Any]
    n_test_lenses: int
    n_test_lenses_in_top: int
    top_fraction: float
    outputs: dict[str, str] = field(default_factory=dict)


def demo_config(
    run_dir: str, base_url: str, targets_url: str, overrides: dict[str, Any] | None = None
) -> LensMinerConfig:
    """Return the demo's configuration for a survey server at ``base_url``."""
    return load_config(
        None,
        {
            **_DEMO_OVERRIDES,
            "run_dir": run_dir,
            "targets": targets_url,
            "survey.base_url": base_url,
            **(overrides or {}),
        },
    )


def top_fraction_recall(candidates: Table, fraction: float = 0.05) -> tuple[int, int]:
    """Count held-out lenses that rank in the top ``fraction`` of the held-out rows.

    Parameters
    ----------
    candidates
        The candidates table with columns ``score``, ``label`` and ``split``.

    Returns
    -------
    tuple of int
        (lenses in the top fraction, lenses in the held-out split).
    """
    test = candidates[candidates["split"] == "test"]
    order = np.argsort(-np.asarray(test["score"], dtype=float), kind="stable")
    n_top = max(1, int(round(fraction * len(test))))
    labels = np.asarray(test["label"], dtype=int)
    return int(labels[order[:n_top]].sum()), int(labels.sum())


def _finish(config: LensMinerConfig, summary: dict[str, Any]) -> DemoResult:
    with fsspec.open(summary["score"]["candidates_url"], "r") as handle:
        candidates = Table.read(handle.read(), format="ascii.csv")
    in_top, total = top_fraction_recall(candidates, 0.05)
    outputs = {
        "cutouts": config.cutouts_url,
        "encoder": summary["pretrain"]["encoder_url"],
        "embeddings": config.embeddings_url,
        "candidates": summary["score"]["candidates_url"],
        "grid": summary["score"]["grid_url"],
        "metrics": summary["score"]["metrics_url"],
        "index": summary["index_url"],
        "summary": config.url("summary.json"),
    }
    return DemoResult(config.run_dir, summary, total, in_top, 0.05, outputs)


def run_simulated_demo(
    run_dir: str = "runs/demo",
    n_targets: int = 2000,
    lens_fraction: float = 0.05,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the lens search on a simulated sky served by a local survey server.

    Parameters
    ----------
    run_dir
        Local directory for every output of the run.
    n_targets
        Number of simulated galaxies in the target table.
    lens_fraction
        Share of targets that are strong lenses.
    seed
        Seed of the simulated sky (positions and objects).
    overrides
        Dotted configuration overrides applied after the demo's defaults.
    """
    from lensminer.flows.pipeline import lens_search

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    sky = SimulatedSky(seed=seed, lens_fraction=lens_fraction)
    targets_url = str(Path(run_dir) / "targets.csv")
    sky.catalog(n_targets).write(targets_url, format="ascii.csv", overwrite=True)
    logger.info("wrote %d simulated targets to %s", n_targets, targets_url)

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    server_arguments = ["--sky", "--seed", str(seed), "--lens-fraction", str(lens_fraction)]
    with survey_server_process(server_arguments) as base_url:
        config = demo_config(run_dir, base_url, targets_url, overrides)
        summary = lens_search(config)
    return _finish(config, summary)


def run_image_folder_demo(
    images: str,
    catalog: str,
    label_column: str,
    run_dir: str = "runs/real",
    overrides: dict[str, Any] | None = None,
) -> DemoResult:
    """Run the lens search on a folder of real colour images served by the local survey server.

    Parameters
    ----------
    images
        Folder of PNG/JPEG cutouts.
    catalog
        CSV naming each image with its position (``iauname`` JHHMMSS.ss+DDMMSS.s or ra/dec) and
        the label column.
    label_column
        0/1 column that the linear probe learns, e.g. ``ring``.
    """
    from lensminer.flows.pipeline import lens_search

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with survey_server_process(["--images", images, "--catalog", catalog]) as base_url:
        config = demo_config(
            run_dir,
            base_url,
            catalog,
            {
                "survey.image_format": "jpeg",
                "score.label_column": label_column,
                "score.test_fraction": 0.3,
                "download.shard_rows": 64,
                "pretrain.epochs": 5,
                "pretrain.queue_size": 256,
                **(overrides or {}),
            },
        )
        summary = lens_search(config)
    return _finish(config, summary)
