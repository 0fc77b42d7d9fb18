"""Tests of candidate ranking, its metrics and the scoring stage."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from astropy.table import Table
from PIL import Image

from lensminer import stores
from lensminer.config import ScoreConfig
from lensminer.exceptions import StoreError
from lensminer.score import (
    precision_at_k,
    ranking_metrics,
    recall_in_top_fraction,
    score_embeddings,
    viewer_url,
)

LAYOUT = stores.CutoutLayout("grz", 8, 0.262, "jpeg", "ls-dr9", "http://127.0.0.1/viewer/")
FAST = ScoreConfig(epochs=100, learning_rate=0.05, top_k=20, grid_size=9, test_fraction=0.5, seed=0)


def _make_stores(base, features, *, labels=None, status=None, shard_rows=16, storage_options=None):
    """Write a complete cutout store and an embedding store with ``features`` in both arrays."""
    n = features.shape[0]
    status = np.full(n, int(stores.RowStatus.OK), "uint8") if status is None else status
    ok = status == int(stores.RowStatus.OK)
    columns = None if labels is None else {"label": labels.astype("int8")}
    cutouts = stores.create_cutout_store(
        f"{base}/cutouts.zarr",
        target_id=[f"t{i:04d}" for i in range(n)],
        ra=150.0 + 0.01 * np.arange(n),
        dec=np.full(n, 2.0),
        layout=LAYOUT,
        shard_rows=shard_rows,
        chunk_rows=shard_rows,
        columns=columns,
        storage_options=storage_options,
    )
    cutouts["images"][:] = (np.arange(n) % 256).astype("uint8")[:, None, None, None] * np.ones(
        (1, 3, 8, 8), "uint8"
    )
    cutouts["status"][:] = status
    embeddings = stores.create_embedding_store(
        f"{base}/embeddings.zarr",
        target_id=np.asarray(cutouts["target_id"][:].tolist()),
        representation_dim=features.shape[1],
        projection_dim=features.shape[1],
        dtype="float32",
        shard_rows=shard_rows,
        storage_options=storage_options,
    )
    embeddings["representation"][:] = features * ok[:, None]
    embeddings["projection"][:] = features * ok[:, None]
    embeddings["valid"][:] = ok
    for index in range(stores.shard_count(n, shard_rows)):
        stores.mark_shard_done(cutouts, index)
        stores.mark_shard_done(embeddings, index)
    return f"{base}/cutouts.zarr", f"{base}/embeddings.zarr"


def _separable(n=80, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.where(np.arange(n) % 4 == 0, 1, 0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += 6.0 * labels
    return features, labels


# Metrics against hand-computed values.


def test_precision_at_k_hand_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 0])
    assert precision_at_k(scores, labels, 1) == 1.0
    assert precision_at_k(scores, labels, 2) == 0.5
    assert precision_at_k(scores, labels, 3) == pytest.approx(2 / 3)


def test_precision_at_k_beyond_rows_uses_all():
    assert precision_at_k(np.array([0.2, 0.1, 0.3]), np.array([0, 1, 0]), 10) == pytest.approx(
        1 / 3
    )


def test_precision_at_k_unsorted_input():
    scores = np.array([0.1, 0.95, 0.3, 0.9])
    labels = np.array([1, 1, 0, 0])
    assert precision_at_k(scores, labels, 2) == 0.5


def test_precision_at_k_ties_keep_row_order():
    assert precision_at_k(np.array([0.5, 0.5]), np.array([1, 0]), 1) == 1.0


def test_recall_in_top_fraction_hand_value():
    # 40 rows: the top 5 % is 2 rows. Lenses sit at ranks 1 and 5, so half of them are found.
    scores = np.linspace(1.0, 0.0, 40)
    labels = np.zeros(40, dtype=int)
    labels[[0, 4]] = 1
    assert recall_in_top_fraction(scores, labels, 0.05) == 0.5


def test_recall_without_lenses_raises():
    with pytest.raises(ValueError, match="without lenses"):
        recall_in_top_fraction(np.ones(3), np.zeros(3, dtype=int))


def test_metrics_perfect_ranking():
    labels = np.array([1, 1, 0, 0, 0, 0])
    metrics = ranking_metrics(np.linspace(1, 0, 6), labels, top_k=2)
    assert metrics["roc_auc"] == 1.0
    assert metrics["precision_at_2"] == 1.0
    assert metrics["recall_in_top_5_percent"] == 0.5


def test_metrics_reversed_ranking():
    labels = np.array([1, 1, 0, 0, 0, 0])
    metrics = ranking_metrics(np.linspace(0, 1, 6), labels, top_k=2)
    assert metrics["roc_auc"] == 0.0
    assert metrics["precision_at_2"] == 0.0
    assert metrics["recall_in_top_5_percent"] == 0.0


def test_metrics_keys():
    metrics = ranking_metrics(np.linspace(1, 0, 6), np.array([1, 0, 1, 0, 0, 0]), top_k=25)
    expected = {
        "roc_auc",
        "precision_at_10",
        "precision_at_25",
        "precision_at_50",
        "precision_at_100",
        "recall_in_top_5_percent",
    }
    assert set(metrics) == expected


def test_viewer_url_format():
    assert viewer_url(150.5, -2.25) == (
        "https://www.legacysurvey.org/viewer?ra=150.500000&dec=-2.250000&layer=ls-dr9&zoom=16"
    )


# The scoring stage on real Zarr stores.


def test_score_outputs(tmp_path):
    features, labels = _separable()
    status = np.full(80, int(stores.RowStatus.OK), "uint8")
    status[[3, 40]] = int(stores.RowStatus.FAILED)
    labels = labels.copy()
    labels[60:] = -1
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels, status=status)

    result = score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), FAST)
    table = Table.read(result.candidates_url, format="ascii.csv")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    assert result.n_scored == 78
    assert len(table) == 78
    assert set(table["row"]).isdisjoint({3, 40})
    assert list(table["rank"]) == list(range(1, 79))
    assert np.all(np.diff(table["score"]) <= 0)
    assert table.colnames == [
        "rank",
        "row",
        "target_id",
        "ra",
        "dec",
        "score",
        "label",
        "split",
        "viewer",
    ]
    assert set(table["split"][table["label"] == -1]) == {"unlabelled"}
    assert metrics["roc_auc"] == 1.0
    assert metrics == result.metrics


def test_score_split_is_stratified(tmp_path):
    features, labels = _separable()
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    result = score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), FAST)
    assert result.metrics["n_test"] == 40
    assert result.metrics["n_test_lenses"] == 10
    assert result.metrics["n_train_lenses"] == 10


def test_score_row_matches_probe_order(tmp_path):
    features, labels = _separable()
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    table = Table.read(
        score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "o"), FAST).candidates_url,
        format="ascii.csv",
    )
    top = table[: int(labels.sum())]
    assert set(top["label"]) == {1}
    assert list(top["target_id"]) == [f"t{row:04d}" for row in top["row"]]


def test_score_deterministic(tmp_path):
    features, labels = _separable()
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    first = score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "a"), FAST)
    second = score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "b"), FAST)
    assert (tmp_path / "a" / "candidates.csv").read_bytes() == (
        tmp_path / "b" / "candidates.csv"
    ).read_bytes()
    assert first.metrics == second.metrics


def test_score_grid_size(tmp_path):
    features, labels = _separable()
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    result = score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), FAST)
    with Image.open(result.grid_url) as png:
        # 9 tiles of 8 px enlarged to 128 px in a 3 x 3 grid, each with a 16 px caption strip.
        assert png.size == (3 * 128, 3 * (128 + 16))


def test_score_without_labels_names_column(tmp_path):
    features, _ = _separable()
    cutouts_url, embeddings_url = _make_stores(tmp_path, features)
    with pytest.raises(StoreError, match="no 'label' array.*'label' column"):
        score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), FAST)


def test_score_too_few_lenses_raises(tmp_path):
    features, _ = _separable()
    labels = np.zeros(80, dtype=int)
    labels[0] = 1
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    with pytest.raises(StoreError, match="at least 2 lenses"):
        score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), FAST)


def test_score_on_s3(s3_endpoint):
    features, labels = _separable()
    base = "s3://lensminer-test/score"
    cutouts_url, embeddings_url = _make_stores(
        base, features, labels=labels, storage_options=s3_endpoint
    )
    result = score_embeddings(
        cutouts_url, embeddings_url, f"{base}/out", FAST, storage_options=s3_endpoint
    )
    with fsspec.open(result.candidates_url, "r", **s3_endpoint) as handle:
        table = Table.read(handle.read(), format="ascii.csv")
    assert len(table) == 80
    assert result.metrics["roc_auc"] == 1.0


def test_score_split_too_small_raises(tmp_path):
    features, _ = _separable(n=8)
    labels = np.array([1, 1, 0, 0, -1, -1, -1, -1])
    cutouts_url, embeddings_url = _make_stores(tmp_path, features, labels=labels)
    config = FAST.model_copy(update={"test_fraction": 0.1})
    with pytest.raises(StoreError, match="cannot split 4 labelled rows"):
        score_embeddings(cutouts_url, embeddings_url, str(tmp_path / "out"), config)
