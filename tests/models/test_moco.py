"""Tests of the MoCo v2 pieces: loss, queue, momentum encoder, schedule and k-NN monitor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from lensminer.augment import evaluation_view
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.datasets import LabelledSubset
from lensminer.exceptions import ConfigError
from lensminer.models.encoder import build_encoder
from lensminer.models.moco import (
    MoCoV2,
    embed_evaluation_views,
    info_nce_loss,
    knn_accuracy,
    knn_roc_auc,
    labelled_knn_accuracy,
    momentum_update,
    split_halves,
    warmup_cosine,
)

CONFIG = PretrainConfig(backbone="resnet18", projection_dim=8, queue_size=12, batch_size=4, seed=3)
AUGMENT = AugmentConfig(crop_size=32, jitter=2)


def _module(config: PretrainConfig = CONFIG) -> MoCoV2:
    model = MoCoV2(
        config,
        AUGMENT,
        image_format="fits",
        bands="grz",
        pixscale=0.262,
        steps_per_epoch=5,
        total_steps=10,
    )
    model.trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False
    )
    return model


def test_info_nce_matches_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    key = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    queue = F.normalize(torch.randn(8, 7, generator=generator), dim=0)
    temperature = 0.2

    expected = 0.0
    for i in range(5):
        positive = math.exp(float(query[i] @ key[i]) / temperature)
        negatives = sum(math.exp(float(query[i] @ queue[:, j]) / temperature) for j in range(7))
        expected += -math.log(positive / (positive + negatives)) / 5
    assert abs(float(info_nce_loss(query, key, queue, temperature)) - expected) < 1e-5


def test_info_nce_perfect_positive() -> None:
    # A positive far more similar than every negative gives a loss near zero.
    query = torch.eye(4)
    queue = -torch.eye(4).repeat(1, 3)
    assert float(info_nce_loss(query, query, queue, 0.05)) < 1e-6


def test_momentum_update_formula() -> None:
    torch.manual_seed(0)
    query, key = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [
        0.9 * k.detach() + 0.1 * q.detach()
        for k, q in zip(key.parameters(), query.parameters(), strict=True)
    ]
    momentum_update(key, query, 0.9)
    for found, reference in zip(key.parameters(), expected, strict=True):
        torch.testing.assert_close(found.detach(), reference)


def test_momentum_one_freezes_keys() -> None:
    torch.manual_seed(0)
    query, key = nn.Linear(3, 2), nn.Linear(3, 2)
    before = key.weight.detach().clone()
    momentum_update(key, query, 1.0)
    torch.testing.assert_close(key.weight.detach(), before)


def test_queue_enqueue_and_wrap() -> None:
    model = _module()
    keys = [torch.full((4, 8), float(i)) for i in range(1, 5)]
    model._enqueue(keys[0])
    assert int(model.queue_ptr) == 4
    model._enqueue(keys[1])
    model._enqueue(keys[2])
    assert int(model.queue_ptr) == 0
    model._enqueue(keys[3])
    assert int(model.queue_ptr) == 4
    # Columns 0-3 were overwritten by the fourth batch, 4-7 and 8-11 keep the second and third.
    assert bool((model.queue[:, 0:4] == 4.0).all())
    assert bool((model.queue[:, 4:8] == 2.0).all())
    assert bool((model.queue[:, 8:12] == 3.0).all())


def test_queue_is_checkpointed_buffer() -> None:
    state = _module().state_dict()
    assert state["queue"].shape == (8, 12)
    assert "queue_ptr" in state


def test_initial_queue_is_normalised_and_seeded() -> None:
    first, second = _module(), _module()
    torch.testing.assert_close(first.queue.norm(dim=0), torch.ones(12))
    torch.testing.assert_close(first.queue, second.queue)


def test_key_encoder_has_no_gradients() -> None:
    model = _module()
    assert not any(p.requires_grad for p in model.encoder_k.parameters())


def test_shuffled_keys_keep_batch_order() -> None:
    # In eval mode BatchNorm ignores the grouping, so shuffled sub-batches give the direct keys.
    model = _module(CONFIG.model_copy(update={"shuffle_bn_splits": 3}))
    model.encoder_k.eval()
    views = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    local_keys, all_keys = model._keys(views)
    with torch.no_grad():
        expected = model.encoder_k(views)[1]
    torch.testing.assert_close(local_keys, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(all_keys, expected, atol=1e-5, rtol=1e-5)


def test_training_step_views_are_seeded() -> None:
    model = _module()
    images = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(2)) * 0.01
    batch = (images, torch.zeros(4), torch.full((4, 3), 1.2), torch.arange(4))
    first_q, first_k = model._views(batch)
    second_q, _ = model._views(batch)
    assert first_q.shape == (4, 3, 32, 32)
    torch.testing.assert_close(first_q, second_q)
    assert not torch.equal(first_q, first_k)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.25), (3, 1.0), (4, 1.0), (7, 0.5 * (1 + math.cos(math.pi * 0.5))), (10, 0.0), (12, 0.0)],
)
def test_warmup_cosine_values(step: int, expected: float) -> None:
    assert abs(warmup_cosine(step, warmup_steps=4, total_steps=10) - expected) < 1e-12


def test_knn_separable_clusters() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.arange(40) % 2
    features = centres[labels] + 0.05 * torch.randn(40, 3, generator=generator)
    assert knn_accuracy(features[:20], labels[:20], features[20:], labels[20:], k=5) == 1.0


def test_knn_matches_reference() -> None:
    rng = np.random.default_rng(4)
    train, test = rng.normal(size=(30, 6)), rng.normal(size=(15, 6))
    train_labels, test_labels = rng.integers(0, 2, 30), rng.integers(0, 2, 15)

    correct = 0
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    for row, label in zip(test, test_labels, strict=True):
        similarity = unit_train @ (row / np.linalg.norm(row))
        nearest = np.argsort(-similarity)[:7]
        votes = np.zeros(2)
        for index in nearest:
            votes[train_labels[index]] += max(similarity[index], 0.0) + 1e-6
        correct += int(np.argmax(votes) == label)

    found = knn_accuracy(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        torch.from_numpy(test),
        torch.from_numpy(test_labels),
        7,
    )
    assert abs(found - correct / 15) < 1e-6


def _clusters(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rows, 3) features in two tight clusters and their (rows,) labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.arange(rows) % 2
    return centres[labels] + 0.05 * torch.randn(rows, 3, generator=generator), labels


def _reference_share(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int, leave_one_out: bool
) -> np.ndarray:
    """Return the k-NN vote share of class 1 per test row, row by row."""
    unit_train = train / np.linalg.norm(train, axis=1, keepdims=True)
    shares = []
    for row_index, row in enumerate(test):
        similarity = unit_train @ (row / np.linalg.norm(row))
        if leave_one_out:
            similarity[row_index] = -np.inf
        votes = np.zeros(2)
        for index in np.argsort(-similarity)[:k]:
            votes[train_labels[index]] += max(similarity[index], 0.0) + 1e-6
        shares.append(votes[1] / votes.sum())
    return np.asarray(shares)


def test_knn_leave_one_out_clusters() -> None:
    features, labels = _clusters(40, seed=0)
    assert knn_accuracy(features, labels, features, labels, k=5, leave_one_out=True) == 1.0


def test_knn_leave_one_out_drops_self() -> None:
    # Each row's nearest other row has the opposite label, so only its own vote can be right.
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 0, 1])
    assert knn_accuracy(features, labels, features, labels, k=1) == 1.0
    assert knn_accuracy(features, labels, features, labels, k=1, leave_one_out=True) == 0.0


def test_knn_leave_one_out_matches_reference() -> None:
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(31, 6)), rng.integers(0, 2, 31)
    shares = _reference_share(features, labels, features, 7, leave_one_out=True)
    expected = float(np.mean((shares > 0.5) == labels))

    tensor, label_tensor = torch.from_numpy(features), torch.from_numpy(labels)
    found = knn_accuracy(tensor, label_tensor, tensor, label_tensor, 7, leave_one_out=True)
    assert abs(found - expected) < 1e-6


def test_knn_leave_one_out_rejects_other_rows() -> None:
    features, labels = _clusters(10, seed=0)
    with pytest.raises(ValueError, match="leave_one_out"):
        knn_accuracy(features, labels, features[:4], labels[:4], k=3, leave_one_out=True)


def test_knn_auc_separable_clusters() -> None:
    features, labels = _clusters(40, seed=1)
    assert knn_roc_auc(features[:20], labels[:20], features[20:], labels[20:], k=5) == 1.0


def test_knn_auc_independent_labels() -> None:
    # Labels drawn apart from the features: the AUC of 2,000 test rows is 0.5 +- 0.013 (1 sigma).
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4000, 8, generator=generator)
    labels = torch.randint(0, 2, (4000,), generator=generator)
    auc = knn_roc_auc(features[:2000], labels[:2000], features[2000:], labels[2000:], k=20)
    assert abs(auc - 0.5) < 0.05


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_knn_auc_matches_reference(leave_one_out: bool) -> None:
    rng = np.random.default_rng(6)
    train, train_labels = rng.normal(size=(30, 6)), rng.integers(0, 2, 30)
    test, test_labels = rng.normal(size=(17, 6)), rng.integers(0, 2, 17)
    if leave_one_out:
        test, test_labels = train, train_labels
    shares = _reference_share(train, train_labels, test, 7, leave_one_out)
    expected = roc_auc_score(test_labels, shares)

    found = knn_roc_auc(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        torch.from_numpy(test),
        torch.from_numpy(test_labels),
        7,
        leave_one_out=leave_one_out,
    )
    assert abs(found - expected) < 1e-9


def test_knn_auc_one_class_is_nan() -> None:
    features, labels = _clusters(10, seed=0)
    ones = torch.ones(4, dtype=torch.long)
    assert math.isnan(knn_roc_auc(features, labels, features[:4], ones, k=3))


def test_knn_auc_rejects_multiclass() -> None:
    features, labels = _clusters(10, seed=0)
    with pytest.raises(ValueError, match=r"contains \[2\]"):
        knn_roc_auc(features, labels + labels, features, labels, k=3)


def test_split_halves_partition() -> None:
    reference, test = split_halves(11, seed=2)
    assert test.numel() == 5
    assert sorted(torch.cat([reference, test]).tolist()) == list(range(11))
    torch.testing.assert_close(split_halves(11, seed=2)[1], test)
    assert not torch.equal(split_halves(11, seed=3)[1], test)


def test_embed_views_matches_batch() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(CONFIG, input_size=AUGMENT.crop_size)
    images = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8)
    representation, projection = embed_evaluation_views(
        encoder, images, image_format="jpeg", bands="grz", augment=AUGMENT, batch_size=2
    )

    encoder.eval()
    with torch.no_grad():
        views = evaluation_view(images, image_format="jpeg", bands="grz", crop_size=32)
        expected = encoder(views)
    torch.testing.assert_close(representation, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(projection, expected[1], atol=1e-5, rtol=1e-5)
    assert encoder.training is False


def test_labelled_knn_uses_split_halves() -> None:
    torch.manual_seed(1)
    encoder = build_encoder(CONFIG, input_size=AUGMENT.crop_size)
    images = torch.randint(0, 256, (12, 3, 40, 40), dtype=torch.uint8)
    labels = torch.arange(12) % 2
    subset = LabelledSubset(images=images, labels=labels, row_index=torch.arange(12))
    found = labelled_knn_accuracy(
        encoder, subset, image_format="jpeg", bands="grz", augment=AUGMENT, k=3, seed=4
    )

    representation, _ = embed_evaluation_views(
        encoder, images, image_format="jpeg", bands="grz", augment=AUGMENT
    )
    reference, test = split_halves(12, seed=4)
    expected = knn_accuracy(
        representation[reference], labels[reference], representation[test], labels[test], 3
    )
    assert found == expected


# ------------------------------------------------------------------ MoCoV2 under DDP and bf16


def test_queue_check_names_global_batch() -> None:
    # CONFIG has queue_size 12 and batch_size 4.
    expected = r"\(4 x 2 processes = 8\); choose e.g. queue_size=8"
    with pytest.raises(ConfigError, match=expected):
        MoCoV2.check_queue_size(CONFIG, world_size=2)


def test_queue_check_accepts_multiple() -> None:
    MoCoV2.check_queue_size(CONFIG, world_size=3)


def test_keys_unit_float32_under_bf16() -> None:
    model = _module()
    views = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local_keys, _ = model._keys(views)
    assert local_keys.dtype == torch.float32
    torch.testing.assert_close(local_keys.norm(dim=1), torch.ones(4))


def test_epoch_losses_survive_checkpoint() -> None:
    model = _module()
    model._epoch_loss = [torch.tensor(1.0), torch.tensor(3.0)]
    checkpoint: dict[str, object] = {}
    model.on_save_checkpoint(checkpoint)

    restored = _module()
    restored.on_load_checkpoint(checkpoint)
    assert restored._step_losses().tolist() == [1.0, 3.0]
