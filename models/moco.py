"""MoCo v2 (He et al. 2020; Chen et al. 2020, arXiv 2003.04297) as a Lightning module.

A query encoder learns by gradient descent; a key encoder follows it as an exponential moving
average. Each step makes two augmented views of the raw cutouts on the training device, embeds
one with each encoder, and minimises InfoNCE between the query, its own key (the positive) and a
queue of keys from earlier batches (the negatives).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from lensminer.augment import Augmentation, evaluation_view
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.datasets import LabelledSubset
from lensminer.exceptions import ConfigError
from lensminer.models.encoder import Encoder, build_encoder

__all__ = [
    "MoCoV2",
    "embed_evaluation_views",
    "info_nce_loss",
    "knn_accuracy",
    "knn_roc_auc",
    "labelled_knn_accuracy",
    "momentum_update",
    "split_halves",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)


def info_nce_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Compute the InfoNCE loss with one positive per query and a shared set of negatives.

    Parameters
    ----------
    query, key
        (B, P) L2-normalised projections of two views of the same B images.
    queue
        (P, K) L2-normalised negatives.
    temperature
        Softmax temperature.

    Returns
    -------
    Tensor
        Scalar, the mean over the batch of ``-log softmax(logits)[positive]``.
    """
    positive = (query * key).sum(dim=1, keepdim=True)  # (B, 1)
    negative = query @ queue  # (B, K)
    logits = torch.cat([positive, negative], dim=1) / temperature
    labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, momentum: float) -> None:
    """Move each key-encoder parameter toward the query's: ``k = m * k + (1 - m) * q``.

    Buffers (BatchNorm running statistics) are not averaged: the key encoder keeps its own,
    updated by its forward passes in training mode, as in the reference MoCo implementation.
    """
    for key_param, query_param in zip(
        key_encoder.parameters(), query_encoder.parameters(), strict=True
    ):
        key_param.mul_(momentum).add_(query_param.detach(), alpha=1.0 - momentum)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Return the learning-rate factor at ``step``: linear warm-up, then cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def _knn_votes(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int,
    n_classes: int,
    leave_one_out: bool,
) -> Tensor:
    """Return the (M, n_classes) cosine-similarity-weighted votes of the k nearest train rows."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    similarity = test @ train.T  # (M, N)

    # Each row is its own nearest neighbour, so leave-one-out masks the diagonal.
    if leave_one_out:
        if train.shape[0] != test.shape[0]:
            raise ValueError(
                "leave_one_out=True requires the test rows to be the train rows, but got "
                f"{test.shape[0]} test and {train.shape[0]} train rows. Pass the same features "
                "and labels as train and test."
            )
        similarity.fill_diagonal_(float("-inf"))
    k = min(k, train.shape[0] - int(leave_one_out))

    nearest, index = similarity.topk(k, dim=1)  # (M, k)
    votes = torch.zeros(test.shape[0], n_classes, device=test.device)
    votes.scatter_add_(1, train_labels[index], nearest.clamp(min=0) + 1e-6)
    return votes


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int,
    *,
    leave_one_out: bool = False,
) -> float:
    """Classify by a cosine-similarity-weighted vote of the k nearest training rows.

    Parameters
    ----------
    train_features, test_features
        (N, D) and (M, D) features; they are L2-normalised here.
    train_labels, test_labels
        (N,) and (M,) integer class labels.
    leave_one_out
        The test rows are the train rows, and each row is classified without its own vote.

    Returns
    -------
    float
        Share of test rows whose predicted class equals their label.
    """
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = _knn_votes(train_features, train_labels, test_features, k, n_classes, leave_one_out)
    return float((votes.argmax(dim=1) == test_labels).float().mean())


@torch.no_grad()
def knn_roc_auc(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int,
    *,
    leave_one_out: bool = False,
) -> float:
    """Measure the ROC AUC of the k-NN vote share of class 1 as a score for binary labels.

    The votes are those of :func:`knn_accuracy`. The score is continuous, so the AUC uses
    every test row's margin, unlike the accuracy, which counts only which class wins.

    Parameters
    ----------
    train_features, test_features
        (N, D) and (M, D) features; they are L2-normalised here.
    train_labels, test_labels
        (N,) and (M,) integer labels, each 0 or 1.
    leave_one_out
        The test rows are the train rows, and each row is scored without its own vote.

    Returns
    -------
    float
        The AUC in [0, 1] (0.5 for a score unrelated to the label), or NaN when the test rows
        contain one class only.

    Raises
    ------
    ValueError
        If a label is not 0 or 1.
    """
    for name, labels in (("train_labels", train_labels), ("test_labels", test_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 1):
            found = sorted(set(labels.unique().tolist()) - {0, 1})
            raise ValueError(
                f"{name} contains {found}, but the ROC AUC needs binary labels 0 and 1. "
                "Relabel as one class against the rest."
            )
    if test_labels.unique().numel() < 2:
        return float("nan")

    votes = _knn_votes(train_features, train_labels, test_features, k, 2, leave_one_out)
    share = votes[:, 1] / votes.sum(dim=1)
    return float(roc_auc_score(test_labels.cpu().numpy(), share.cpu().numpy()))


@torch.no_grad()
def embed_evaluation_views(
    encoder: Encoder,
    images: Tensor,
    *,
    image_format: str,
    bands: str,
    augment: AugmentConfig,
    batch_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """Embed the evaluation views (centre crop and RGB stretch) of raw cutouts in eval mode.

    Parameters
    ----------
    images
        (N, C, S, S) raw cutouts as stored: float32 nanomaggies (FITS) or uint8 RGB (JPEG).

    Returns
    -------
    representation, projection
        (N, D) and (N, P) float32 on the encoder's device; the projection is L2-normalised.
    """
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    representations, projections = [], []
    for start in range(0, images.shape[0], batch_size):
        views = evaluation_view(
            images[start : start + batch_size].to(device),
            image_format=image_format,
            bands=bands,
            crop_size=augment.crop_size,
            config=augment,
        )
        representation, projection = encoder(views.contiguous(memory_format=torch.channels_last))
        representations.append(representation.float())
        projections.append(projection.float())
    encoder.train(was_training)
    return torch.cat(representations), torch.cat(projections)


def split_halves(count: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split ``range(count)`` at random (seeded) into a reference half and a test half.

    Returns
    -------
    reference, test
        int64 indices; the test half has ``count // 2`` rows.
    """
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    reference, test = order.tensor_split(2)
    return reference, test


@torch.no_grad()
def labelled_knn_accuracy(
    encoder: Encoder,
    subset: LabelledSubset,
    *,
    image_format: str,
    bands: str,
    augment: AugmentConfig,
    k: int,
    seed: int,
    batch_size: int = 256,
) -> float:
    """Measure how well an encoder's representations separate the labelled rows.

    The rows are split by :func:`split_halves`; each row of the test half is classified by
    :func:`knn_accuracy` against the reference half. Views are the evaluation views (centre
    crop and RGB stretch), embedded in eval mode on the encoder's device.

    Returns
    -------
    float
        The accuracy, or NaN when there are fewer than 4 labelled rows.
    """
    if subset.labels.numel() < 4:
        return float("nan")

    representation, _ = embed_evaluation_views(
        encoder,
        subset.images,
        image_format=image_format,
        bands=bands,
        augment=augment,
        batch_size=batch_size,
    )
    labels = subset.labels.to(representation.device)
    reference, test = (part.to(labels.device) for part in split_halves(labels.numel(), seed))
    return knn_accuracy(
        representation[reference], labels[reference], representation[test], labels[test], k
    )


def _unit_float32(projection: Tensor) -> Tensor:
    """Cast (B, P) projections to float32 and L2-normalise them again.

    Under bf16 autocast the encoder normalises in bfloat16, which leaves norms a few tenths of a
    percent off 1, but the loss and the queue need unit vectors.
    """
    return F.normalize(projection.float(), dim=1)


class MoCoV2(pl.LightningModule):
    """MoCo v2 pretraining of an :class:`~lensminer.models.encoder.Encoder`.

    Parameters
    ----------
    pretrain, augment
        Configurations (or their dicts, as stored in a Lightning checkpoint).
    image_format, bands, pixscale
        The cutout store's attributes, for the augmentations.
    steps_per_epoch
        Optimizer steps per epoch, for the warm-up length.
    total_steps
        Optimizer steps of the whole run, for the cosine schedule.

    Attributes
    ----------
    encoder_q, encoder_k
        Query and key encoders; ``encoder_q`` is the one to export.
    queue
        (P, K) buffer of L2-normalised keys; ``queue_ptr`` (1,) int64 is the next column to fill.
    history
        Per-epoch ``loss`` and ``knn_accuracy`` (NaN without labelled rows), kept in checkpoints.
    """

    def __init__(
        self,
        pretrain: PretrainConfig | dict[str, Any],
        augment: AugmentConfig | dict[str, Any],
        *,
        image_format: str,
        bands: str,
        pixscale: float,
        steps_per_epoch: int,
        total_steps: int,
    ) -> None:
        super().__init__()
        self.config = PretrainConfig.model_validate(pretrain)
        self.augment_config = AugmentConfig.model_validate(augment)
        self.save_hyperparameters(
            {
                "pretrain": self.config.model_dump(mode="json"),
                "augment": self.augment_config.model_dump(mode="json"),
                "image_format": image_format,
                "bands": bands,
                "pixscale": pixscale,
                "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps,
            }
        )
        self.image_format, self.bands = image_format, bands
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

        self.encoder_q: Encoder = build_encoder(
            self.config, input_size=self.augment_config.crop_size
        )
        self.encoder_k: Encoder = copy.deepcopy(self.encoder_q)
        for parameter in self.encoder_k.parameters():
            parameter.requires_grad_(False)
        self.encoder_q.to(memory_format=torch.channels_last)
        self.encoder_k.to(memory_format=torch.channels_last)
        self.augmentation = Augmentation(
            self.augment_config, image_format=image_format, bands=bands, pixscale=pixscale
        )

        generator = torch.Generator().manual_seed(self.config.seed)
        queue = torch.randn(self.config.projection_dim, self.config.queue_size, generator=generator)
        self.register_buffer("queue", F.normalize(queue, dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        self.history: dict[str, list[float]] = {"loss": [], "knn_accuracy": []}
        self.monitor_data: LabelledSubset | None = None
        self._epoch_loss: list[Tensor] = []
        # Epoch of the losses in _epoch_loss, which a checkpoint can carry into the next run.
        self._loss_epoch: int | None = None

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def check_queue_size(config: PretrainConfig, world_size: int) -> None:
        """Raise :class:`ConfigError` unless the queue size is a multiple of the global batch.

        Each step writes the keys of every process's batch, ``batch_size * world_size``
        columns, as one block that must end at or before the last column of the queue.
        """
        global_batch = config.batch_size * world_size
        if config.queue_size % global_batch:
            suggestion = global_batch * max(1, config.queue_size // global_batch)
            raise ConfigError(
                f"pretrain.queue_size ({config.queue_size}) must be a multiple of the global "
                f"batch size ({config.batch_size} x {world_size} processes = {global_batch}); "
                f"choose e.g. queue_size={suggestion}"
            )

    def setup(self, stage: str) -> None:
        self.check_queue_size(self.config, self.trainer.world_size)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(
            self.encoder_q.parameters(),
            lr=self.config.learning_rate,
            momentum=0.9,
            weight_decay=self.config.weight_decay,
        )
        warmup_steps = int(round(self.config.warmup_epochs * self.steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, self.total_steps)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ------------------------------------------------------------------ one step

    def _step_generator(self, *, per_rank: bool) -> torch.Generator:
        """Return a generator seeded by (seed, global step[, rank]), so a resumed run draws
        the same augmentations as an uninterrupted one."""
        key = [self.config.seed, self.global_step] + ([self.global_rank] if per_rank else [])
        seed = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _views(self, batch: Any) -> tuple[Tensor, Tensor]:
        images, ebv, psf_fwhm, _ = batch
        generator = self._step_generator(per_rank=True)
        # The augmentations run in float32 even under bf16 autocast.
        with torch.autocast(device_type=self.device.type, enabled=False):
            view_q = self.augmentation(images, ebv=ebv, psf_fwhm=psf_fwhm, generator=generator)
            view_k = self.augmentation(images, ebv=ebv, psf_fwhm=psf_fwhm, generator=generator)
        channels_last = torch.channels_last
        return view_q.contiguous(memory_format=channels_last), view_k.contiguous(
            memory_format=channels_last
        )

    @torch.no_grad()
    def _keys(self, view_k: Tensor) -> tuple[Tensor, Tensor]:
        """Embed the key views with BatchNorm statistics over a shuffled grouping of the batch.

        Without it, the key and query of one image would share BatchNorm batch statistics, which
        lets the model find the positive from batch statistics alone (MoCo's shuffle-BN). Under
        DDP the views of all processes are gathered, shuffled and split, as in the reference
        implementation. On one device the shuffled batch is embedded in ``shuffle_bn_splits``
        sub-batches instead.

        Returns
        -------
        local_keys
            (B, P) keys of this process's images, in batch order.
        all_keys
            (world_size * B, P) keys of every process, to enqueue.
        """
        world_size, batch = self.trainer.world_size, view_k.shape[0]
        generator = self._step_generator(per_rank=False)

        # Every process draws the same permutation (the generator ignores the rank), embeds
        # its slice of the shuffled views, and scatters the gathered keys back to image order.
        if world_size > 1:
            views = self._all_gather(view_k)  # (W * B, 3, H, W), rank r's images at r * B
            order = torch.randperm(views.shape[0], generator=generator, device=self.device)
            mine = order.view(world_size, batch)[self.global_rank]
            keys = self.encoder_k(views[mine].contiguous(memory_format=torch.channels_last))[1]
            shuffled = self._all_gather(_unit_float32(keys))  # row i: key of views[order[i]]
            all_keys = torch.empty_like(shuffled)
            all_keys[order] = shuffled
            start = self.global_rank * batch
            return all_keys[start : start + batch], all_keys

        order = torch.randperm(batch, generator=generator, device=self.device)
        splits = min(self.config.shuffle_bn_splits, batch)
        chunks = [self.encoder_k(view_k[part])[1] for part in order.tensor_split(splits)]
        keys = torch.empty(batch, self.config.projection_dim, device=self.device)
        keys[order] = _unit_float32(torch.cat(chunks))
        return keys, keys

    def _all_gather(self, tensor: Tensor) -> Tensor:
        """Concatenate the (B, ...) ``tensor`` of every process, in rank order, to (W * B, ...).

        Every process must pass the same shape and dtype.
        """
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(parts, tensor)
        return torch.cat(parts)

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        count, pointer = keys.shape[0], int(self.queue_ptr)
        self.queue[:, pointer : pointer + count] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (pointer + count) % self.config.queue_size

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        view_q, view_k = self._views(batch)

        _, query = self.encoder_q(view_q)
        momentum_update(self.encoder_k, self.encoder_q, self.config.momentum)
        local_keys, all_keys = self._keys(view_k)

        loss = info_nce_loss(
            _unit_float32(query), local_keys, self.queue.clone(), self.config.temperature
        )
        self._enqueue(all_keys)

        self._epoch_loss.append(loss.detach())
        self._loss_epoch = self.current_epoch
        self.log("train_loss", loss, prog_bar=False, batch_size=view_q.shape[0])
        return loss

    # ------------------------------------------------------------------ epochs

    def _step_losses(self) -> Tensor:
        """Return the (S,) float32 losses of this epoch's steps, averaged over processes.

        Every process has run the same number of steps, because the dataset gives every rank
        the same number of batches.
        """
        if not self._epoch_loss:
            return torch.empty(0, device=self.device)
        losses = torch.stack([loss.to(self.device) for loss in self._epoch_loss]).float()
        if self.trainer.world_size > 1:
            losses = self._all_gather(losses[None]).mean(dim=0)
        return losses

    def on_train_start(self) -> None:
        # A checkpoint written after the last step of an epoch, but before the epoch's end,
        # resumes in the next epoch without ending the earlier one (Lightning 2.6 calls neither
        # on_train_epoch_end nor on_train_epoch_start then), so end it here.
        if self._epoch_loss and self._loss_epoch is not None:
            if self._loss_epoch < self.current_epoch:
                self._end_epoch(self._loss_epoch)

    def on_train_epoch_end(self) -> None:
        self._end_epoch(self.current_epoch)

    def _end_epoch(self, epoch: int) -> None:
        """Append the epoch's mean loss and k-NN accuracy to the history."""
        # The losses of a run resumed mid-epoch include those restored from the checkpoint.
        losses = self._step_losses()
        self._epoch_loss = []
        loss = float(losses.mean()) if losses.numel() else float("nan")
        self.history["loss"].append(loss)

        # Rank 0 measures the k-NN accuracy and sends it to the others, so that every rank
        # keeps the same history.
        accuracy = self._knn_monitor() if self.trainer.is_global_zero else float("nan")
        if self.trainer.world_size > 1:
            accuracy = float(self.trainer.strategy.broadcast(accuracy, src=0))
        self.history["knn_accuracy"].append(accuracy)
        if not math.isnan(accuracy):
            # Every rank has the same value, so the mean over ranks changes nothing.
            self.log("knn_accuracy", accuracy, sync_dist=True)
        logger.debug("epoch %d: loss %.4f, k-NN accuracy %.3f", epoch, loss, accuracy)

    def _knn_monitor(self) -> float:
        """Return the k-NN accuracy on the labelled rows (half as reference, half as test)."""
        if self.monitor_data is None:
            return float("nan")
        return labelled_knn_accuracy(
            self.encoder_q,
            self.monitor_data,
            image_format=self.image_format,
            bands=self.bands,
            augment=self.augment_config,
            k=self.config.knn_k,
            seed=self.config.seed,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Under DDP every process runs this hook, so the collective in _step_losses is safe.
        checkpoint["lensminer_history"] = {
            name: list(values) for name, values in self.history.items()
        }
        checkpoint["lensminer_epoch_losses"] = self._step_losses().tolist()
        checkpoint["lensminer_epoch_losses_epoch"] = self._loss_epoch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("lensminer_history", {})
        self.history = {name: list(stored.get(name, [])) for name in ("loss", "knn_accuracy")}
        self._epoch_loss = [
            torch.tensor(loss) for loss in checkpoint.get("lensminer_epoch_losses", [])
        ]
        self._loss_epoch = checkpoint.get("lensminer_epoch_losses_epoch")
