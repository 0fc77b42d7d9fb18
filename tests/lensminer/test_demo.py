"""The demo runs at reduced size: real Galaxy Zoo DECaLS images and the held-out recall count."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table

from lensminer.demo import run_image_folder_demo, top_fraction_recall

REDUCED = {
    "survey.size": 96,
    "pretrain.max_steps": 4,
    "pretrain.epochs": 1,
    "pretrain.batch_size": 32,
    "pretrain.queue_size": 128,
    "embed.scheduler": "synchronous",
    "score.epochs": 100,
    "score.grid_size": 9,
}


def test_top_fraction_recall_counts_test_rows():
    candidates = Table(
        {
            "score": np.linspace(1.0, 0.0, 40),
            "label": [1, 0, 1] + [0] * 36 + [1],
            "split": ["test", "train", "test"] + ["test"] * 37,
        }
    )
    # Of 39 test rows, the top 5% are the 2 best: rows 0 and 2, both lenses. Row 1 is a
    # training row and does not count. The third test lens ranks last.
    assert top_fraction_recall(candidates, 0.05) == (2, 3)


@pytest.mark.slow
@pytest.mark.shared_data
def test_gz_decals_ring_run(shared_data, tmp_path, prefect_harness):
    folder = shared_data / "gz-decals"
    result = run_image_folder_demo(
        str(folder / "images"),
        str(folder / "catalog.csv"),
        "ring",
        str(tmp_path / "run"),
        overrides=REDUCED,
    )
    metrics = result.summary["score"]["metrics"]
    assert result.summary["download"]["counts"]["OK"] == 370
    assert 0.0 <= metrics["roc_auc"] <= 1.0
    assert not math.isnan(metrics["roc_auc"])
    assert metrics["n_test"] == 111
    assert len(result.summary["neighbours"]) == 10
    assert result.n_test_lenses == metrics["n_test_lenses"]
