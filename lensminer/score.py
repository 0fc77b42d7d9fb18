"""Lens scoring: a linear probe on frozen embeddings, a ranked candidate table and its metrics.

The labelled rows are split into a training part and a stratified held-out test part. The probe
is trained on the training part and scores every valid row. Metrics use the test part only, so
they measure how well the ranking finds lenses that the probe never saw.

Outputs in ``out_dir``:

- ``candidates.csv``: every valid row, best first, with a link to the Legacy Surveys viewer.
- ``metrics.json``: ROC AUC, precision at k and recall in the top 5 % on the test split, and counts.
- ``top_candidates.png``: the top ``grid_size`` cutouts with rank and score.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from astropy.table import Table
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from lensminer import plots, storage, stores
from lensminer.config import ScoreConfig
from lensminer.embed import verify_embedding_store
from lensminer.exceptions import StoreError
from lensminer.models.probe import train_probe

__all__ = [
    "PRECISION_AT_K",
    "ScoreResult",
    "precision_at_k",
    "ranking_metrics",
    "recall_in_top_fraction",
    "score_embeddings",
    "viewer_url",
]

logger = logging.getLogger(__name__)

PRECISION_AT_K = (10, 50, 100)
TOP_FRACTION = 0.05
VIEWER_URL = "https://www.legacysurvey.org/viewer"


@dataclass(frozen=True)
class ScoreResult:
    """Locations and headline numbers of a scoring run.

    Attributes
    ----------
    candidates_url, grid_url, metrics_url
        URLs of the candidate CSV, the PNG grid and the metrics JSON.
    metrics
        The contents of the metrics JSON.
    n_scored
        Rows scored (the valid rows of the embedding store).
    top_row
        Store row of the best-ranked candidate.
    """

    candidates_url: str
    grid_url: str
    metrics_url: str
    metrics: dict[str, Any]
    n_scored: int
    top_row: int


def viewer_url(ra: float, dec: float, layer: str = "ls-dr9") -> str:
    """Return the Legacy Surveys viewer link centred on (ra, dec) in degrees."""
    return f"{VIEWER_URL}?ra={ra:.6f}&dec={dec:.6f}&layer={layer}&zoom=16"


def _ranking(scores: np.ndarray) -> np.ndarray:
    # Highest score first; ties keep the lower row first, so the ranking is reproducible.
    return np.lexsort((np.arange(scores.shape[0]), -scores))


def precision_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Return the share of lenses among the ``k`` highest-scored rows.

    Parameters
    ----------
    scores
        Scores of shape (N,); higher means more lens-like.
    labels
        Labels of shape (N,): 1 lens, 0 not.
    k
        Rows to inspect. When ``k`` exceeds N, all N rows are used, so the value is the share of
        lenses in the whole set.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    top = _ranking(np.asarray(scores))[: min(k, len(scores))]
    return float(np.asarray(labels)[top].mean())


def recall_in_top_fraction(
    scores: np.ndarray, labels: np.ndarray, fraction: float = TOP_FRACTION
) -> float:
    """Return the share of lenses ranked within the top ``fraction`` of rows.

    The top contains ``ceil(fraction * N)`` rows, at least one.
    """
    labels = np.asarray(labels)
    n_positive = int(labels.sum())
    if n_positive == 0:
        raise ValueError("recall is undefined without lenses among the labels")
    n_top = max(1, math.ceil(fraction * labels.shape[0]))
    top = _ranking(np.asarray(scores))[:n_top]
    return float(labels[top].sum() / n_positive)


def ranking_metrics(scores: np.ndarray, labels: np.ndarray, *, top_k: int) -> dict[str, float]:
    """Return ROC AUC, precision at 10, 50, 100 and ``top_k``, and recall in the top 5 %.

    Parameters
    ----------
    scores, labels
        Scores and 0/1 labels of shape (N,) of held-out rows; both classes must be present.
    top_k
        An extra k for precision at k.
    """
    metrics = {"roc_auc": float(roc_auc_score(labels, scores))}
    for k in sorted({*PRECISION_AT_K, top_k}):
        metrics[f"precision_at_{k}"] = precision_at_k(scores, labels, k)
    metrics["recall_in_top_5_percent"] = recall_in_top_fraction(scores, labels, TOP_FRACTION)
    return metrics


def _read_labels(cutouts: Any, cutouts_url: str, label_column: str) -> np.ndarray:
    if "label" not in cutouts.array_keys():
        raise StoreError(
            f"the cutout store {cutouts_url!r} has no 'label' array because its target table "
            f"had no {label_column!r} column; add that column (1 lens, 0 non-lens, -1 or blank "
            "unknown) to the target table, or set score.label_column to the column that has the "
            "labels, and build the "
            "cutout store again"
        )
    labels = cutouts["label"][:].astype(np.int64)
    unknown = np.setdiff1d(np.unique(labels), [-1, 0, 1])
    if unknown.size:
        raise StoreError(
            f"'label' in {cutouts_url!r} contains {unknown.tolist()}; expected 1, 0 or -1"
        )
    return labels


def _split(
    labelled_rows: np.ndarray, labels: np.ndarray, score: ScoreConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Split labelled row numbers into stratified (train, test) parts."""
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        raise StoreError(
            f"a stratified split needs at least 2 lenses and 2 non-lenses among valid rows, got "
            f"{counts[1]} and {counts[0]}; label more targets"
        )
    try:
        train, test = train_test_split(
            labelled_rows, test_size=score.test_fraction, stratify=labels, random_state=score.seed
        )
    except ValueError as error:
        # scikit-learn rejects splits that leave a class out of either part.
        raise StoreError(
            f"cannot split {labels.size} labelled rows ({counts[1]} lenses) with "
            f"score.test_fraction={score.test_fraction} so that both parts contain both classes: "
            f"{error}; label more targets "
            "or change score.test_fraction"
        ) from error
    return np.sort(train), np.sort(test)


def _write_text(url: str, text: str, storage_options: dict[str, Any] | None) -> None:
    options = storage_options if storage.is_remote(url) else None
    with fsspec.open(url, "w", **(options or {})) as handle:
        handle.write(text)


def score_embeddings(
    cutouts_url: str,
    embeddings_url: str,
    out_dir: str,
    score: ScoreConfig,
    *,
    embedding: str = "representation",
    storage_options: dict[str, Any] | None = None,
) -> ScoreResult:
    """Train a linear probe on labelled embeddings and rank every valid row as a lens candidate.

    Parameters
    ----------
    cutouts_url
        Cutout store with a ``label`` array (1 lens, 0 non-lens, -1 unknown), which the download
        stage fills from the target table's ``score.label_column`` column.
    embeddings_url
        Complete embedding store of that cutout store.
    out_dir
        fsspec URL of the folder for ``candidates.csv``, ``metrics.json`` and
        ``top_candidates.png``.
    embedding
        ``"representation"`` or ``"projection"``.

    Returns
    -------
    ScoreResult
        Output URLs, the metrics and the number of rows scored.

    Raises
    ------
    StoreError
        If the store has no labels, too few labelled rows of a class, or the stores do not match.
    """
    if embedding not in ("representation", "projection"):
        raise ValueError(f"embedding must be 'representation' or 'projection', got {embedding!r}")

    # Open both stores and check that they line up row for row.
    verify_embedding_store(cutouts_url, embeddings_url, storage_options=storage_options)
    cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    embeddings = stores.open_store(embeddings_url, "embeddings", storage_options=storage_options)
    labels = _read_labels(cutouts, cutouts_url, score.label_column)
    valid = embeddings["valid"][:]

    # Split the valid labelled rows and train on the training part.
    labelled = np.flatnonzero(valid & (labels >= 0))
    train_rows, test_rows = _split(labelled, labels[labelled], score)
    features = embeddings[embedding]
    probe = train_probe(
        features.get_orthogonal_selection((train_rows, slice(None))).astype(np.float32),
        labels[train_rows],
        epochs=score.epochs,
        learning_rate=score.learning_rate,
        weight_decay=score.weight_decay,
        seed=score.seed,
    )

    # Score every valid row, one shard at a time so memory stays flat.
    n_rows = valid.shape[0]
    shard_rows = int(embeddings.attrs["shard_rows"])
    probability = np.full(n_rows, np.nan)
    for index in range(stores.shard_count(n_rows, shard_rows)):
        rows = stores.shard_slice(index, n_rows, shard_rows)
        shard_valid = valid[rows]
        if shard_valid.any():
            probability[rows.start + np.flatnonzero(shard_valid)] = probe.predict_proba(
                features[rows][shard_valid]
            )
    scored = np.flatnonzero(valid)
    ranked = scored[_ranking(probability[scored])]

    # Metrics on the held-out split.
    metrics: dict[str, Any] = ranking_metrics(
        probability[test_rows], labels[test_rows], top_k=score.top_k
    )
    metrics.update(
        {
            "n_rows": int(n_rows),
            "n_scored": int(scored.size),
            "n_labelled": int(labelled.size),
            "n_train": int(train_rows.size),
            "n_test": int(test_rows.size),
            "n_train_lenses": int(labels[train_rows].sum()),
            "n_test_lenses": int(labels[test_rows].sum()),
            "embedding": embedding,
            "seed": score.seed,
        }
    )

    # Candidate table, best first.
    # NOTE: the table lists every valid row, so a survey-scale store gives a CSV of tens of GB;
    # a top-k cut or a Parquet output may suit that scale better.
    split = np.full(n_rows, "unlabelled", dtype="<U10")
    split[train_rows] = "train"
    split[test_rows] = "test"
    ra = cutouts["ra"][:][ranked]
    dec = cutouts["dec"][:][ranked]
    layer = cutouts.attrs.get("layer", "ls-dr9")
    table = Table(
        {
            "rank": np.arange(1, ranked.size + 1),
            "row": ranked,
            "target_id": cutouts["target_id"][:][ranked],
            "ra": ra,
            "dec": dec,
            "score": probability[ranked],
            "label": labels[ranked],
            "split": split[ranked],
            "viewer": [viewer_url(r, d, layer) for r, d in zip(ra, dec, strict=True)],
        }
    )
    table["ra"].info.format = ".6f"
    table["dec"].info.format = ".6f"
    table["score"].info.format = ".6g"

    # Write the three outputs.
    out_dir = out_dir.rstrip("/")
    candidates_url = storage.join_url(out_dir, "candidates.csv")
    metrics_url = storage.join_url(out_dir, "metrics.json")
    grid_url = storage.join_url(out_dir, "top_candidates.png")
    if not storage.is_remote(out_dir):
        fs, path = storage.filesystem(out_dir)
        fs.makedirs(path, exist_ok=True)

    buffer = io.StringIO()
    table.write(buffer, format="ascii.csv")
    _write_text(candidates_url, buffer.getvalue(), storage_options)
    _write_text(metrics_url, json.dumps(metrics, indent=2) + "\n", storage_options)
    top = ranked[: score.grid_size]
    plots.write_candidate_grid(
        cutouts_url, top, probability[top].tolist(), grid_url, storage_options=storage_options
    )

    logger.info(
        "scored %d rows; test ROC AUC %.3f, recall in top 5%% %.3f; wrote %s",
        scored.size,
        metrics["roc_auc"],
        metrics["recall_in_top_5_percent"],
        out_dir,
    )
    return ScoreResult(
        candidates_url, grid_url, metrics_url, metrics, int(scored.size), int(ranked[0])
    )
