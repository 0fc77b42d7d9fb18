"""Linear probe: logistic regression on frozen embeddings.

Stein et al. (2022) rank lens candidates with a single linear layer trained by binary
cross-entropy on frozen self-supervised representations. Lenses are rare among the labelled
galaxies, so the loss weights the positive class by ``n_negative / n_positive``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

__all__ = ["LinearProbe", "train_probe"]

logger = logging.getLogger(__name__)


class LinearProbe(nn.Module):
    """One linear layer D -> 1 on standardised features.

    The per-feature mean and standard deviation of the training set are buffers, so they are
    saved in the state dict and applied to every input.

    Parameters
    ----------
    dim
        Feature width D.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"probe input width must be at least 1, got {dim}")
        self.dim = dim
        self.linear = nn.Linear(dim, 1)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Store the per-column mean and std of ``features`` (N, D); constant columns get std 1."""
        self.mean.copy_(features.mean(dim=0))
        std = features.std(dim=0)
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (B,) for features of shape (B, D)."""
        standardised = (features - self.mean) / self.std
        return self.linear(standardised).squeeze(-1)

    @torch.inference_mode()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Return lens probabilities, float64 of shape (N,), for features of shape (N, D)."""
        tensor = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return torch.sigmoid(self(tensor)).double().numpy()


def _check_training_set(features: np.ndarray, labels: np.ndarray) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got shape {features.shape}")
    if labels.shape != (features.shape[0],):
        raise ValueError(
            f"labels must have shape ({features.shape[0]},) to match features, got {labels.shape}"
        )
    unknown = np.setdiff1d(np.unique(labels), [0, 1])
    if unknown.size:
        raise ValueError(
            f"labels must be 0 or 1, found {unknown.tolist()}; drop unlabelled rows first"
        )
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values; check the embedding store")
    counts = np.bincount(labels.astype(np.int64), minlength=2)
    if counts.min() == 0:
        raise ValueError(
            f"the probe needs both classes, got {counts[1]} positives and {counts[0]} negatives; "
            "add labelled lenses and non-lenses"
        )


def train_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> LinearProbe:
    """Train a linear probe by full-batch Adam on class-weighted binary cross-entropy.

    Parameters
    ----------
    features
        Float array of shape (N, D), e.g. encoder representations.
    labels
        Array of shape (N,) with 1 for a lens and 0 for a non-lens.
    epochs
        Full-batch optimisation steps.
    learning_rate, weight_decay
        Adam step size and L2 penalty on the weights.
    seed
        Seed of the weight initialisation. Training is full-batch on the CPU, so the same seed and
        data give the same probe.

    Returns
    -------
    LinearProbe
        The trained probe in eval mode.

    Raises
    ------
    ValueError
        If shapes disagree, labels are not 0/1, features are not finite, or a class is missing.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    _check_training_set(features, labels)

    x = torch.from_numpy(features)
    y = torch.from_numpy(labels.astype(np.float32))

    # Weight positives by n_negative / n_positive so that rare lenses count as much as the rest.
    n_positive = float(y.sum())
    pos_weight = torch.tensor((y.numel() - n_positive) / n_positive)

    probe = LinearProbe(features.shape[1])
    probe.set_standardisation(x)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(probe.linear.weight, std=0.01, generator=generator)
        probe.linear.bias.zero_()

    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.Adam(
        probe.linear.parameters(), lr=learning_rate, weight_decay=weight_decay
    )
    probe.train()
    for _ in range(epochs):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(probe(x), y)
        loss.backward()
        optimiser.step()

    logger.debug(
        "trained probe on %d rows (%d positive), final loss %.4f",
        y.numel(),
        int(n_positive),
        loss.item(),
    )
    return probe.eval()
