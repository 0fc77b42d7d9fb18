"""Tests of the linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensminer.models.probe import LinearProbe, train_probe

SETTINGS = {"epochs": 200, "learning_rate": 0.05, "weight_decay": 0.0}


def _blobs(n_positive: int, n_negative: int, dim: int = 6, gap: float = 4.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    positives = rng.normal(size=(n_positive, dim)) + gap / 2
    negatives = rng.normal(size=(n_negative, dim)) - gap / 2
    features = np.concatenate([positives, negatives]).astype(np.float32)
    labels = np.concatenate([np.ones(n_positive), np.zeros(n_negative)]).astype(np.int64)
    return features, labels


def test_probe_separates_linear_toy_set():
    features, labels = _blobs(100, 100)
    probe = train_probe(features, labels, seed=0, **SETTINGS)
    predicted = probe.predict_proba(features) > 0.5
    assert np.array_equal(predicted, labels == 1)


def test_probe_deterministic_with_seed():
    features, labels = _blobs(30, 60, gap=1.0)
    first = train_probe(features, labels, seed=3, **SETTINGS)
    second = train_probe(features, labels, seed=3, **SETTINGS)
    assert torch.equal(first.linear.weight, second.linear.weight)
    assert torch.equal(first.linear.bias, second.linear.bias)


def test_probe_class_weighting_finds_rare_positives():
    # 10 lenses among 1,000 overlapping galaxies: without weighting the probe predicts "no lens".
    features, labels = _blobs(10, 990, gap=2.0, seed=1)
    probe = train_probe(features, labels, seed=0, **SETTINGS)
    recall = (probe.predict_proba(features[labels == 1]) > 0.5).mean()
    assert recall >= 0.9


def test_probe_invariant_to_feature_scale():
    features, labels = _blobs(40, 40, gap=1.0)
    probe = train_probe(features, labels, seed=0, **SETTINGS)
    scaled = train_probe(features * 1000.0 + 5.0, labels, seed=0, **SETTINGS)
    np.testing.assert_allclose(
        scaled.predict_proba(features * 1000.0 + 5.0),
        probe.predict_proba(features),
        rtol=1e-3,
        atol=1e-4,
    )


def test_probe_constant_feature_has_unit_std():
    features, labels = _blobs(20, 20)
    features[:, 2] = 7.0
    probe = train_probe(features, labels, seed=0, **SETTINGS)
    assert probe.std[2].item() == 1.0
    assert np.isfinite(probe.predict_proba(features)).all()


def test_probe_logits_shape():
    probe = LinearProbe(5)
    assert probe(torch.zeros(3, 5)).shape == (3,)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 2, 1]), r"must be 0 or 1, found \[2\]"),
        (np.zeros(4, dtype=int), "needs both classes"),
        (np.array([0, 1, 1]), r"shape \(4,\)"),
    ],
)
def test_probe_rejects_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        train_probe(np.zeros((4, 2), np.float32), labels, seed=0, **SETTINGS)


def test_probe_rejects_nan_features():
    features = np.ones((4, 2), np.float32)
    features[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_probe(features, np.array([0, 1, 0, 1]), seed=0, **SETTINGS)
