"""MoCo v2 pretraining on a cutout store, with resumable Lightning checkpoints.

``pretrain(cutouts_url, run_dir, pretrain_config, augment_config)`` trains
:class:`lensminer.models.moco.MoCoV2`, writes ``{run_dir}/checkpoints/last.ckpt`` and exports the
query encoder to ``{run_dir}/encoder.pt``. A rerun with ``resume=True`` continues from
``last.ckpt``.
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher
from torch.utils.data import DataLoader

from lensminer import storage, stores
from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.datasets import CutoutBatches, load_labelled_subset
from lensminer.exceptions import CheckpointError, ConfigError
from lensminer.models.encoder import export_encoder
from lensminer.models.moco import MoCoV2

__all__ = ["PretrainResult", "pretrain"]

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """Outcome of :func:`pretrain`.

    Attributes
    ----------
    encoder_url
        URL of the exported query encoder.
    checkpoint_url
        URL of the Lightning checkpoint to resume from.
    epochs
        Epochs completed, including those of earlier runs that this one resumed.
    steps
        Optimizer steps completed in total.
    losses
        Mean InfoNCE loss of each completed epoch.
    knn_accuracy
        k-NN accuracy on the labelled rows after each epoch; NaN when the store has none.
    """

    encoder_url: str
    checkpoint_url: str
    epochs: int
    steps: int
    losses: list[float] = field(default_factory=list)
    knn_accuracy: list[float] = field(default_factory=list)


def _batches_before(dataset: CutoutBatches, epoch: int) -> int:
    return sum(dataset.batches_in_epoch(e) for e in range(epoch))


def _train_dataset(trainer: pl.Trainer) -> CutoutBatches:
    """Return the dataset of the DataLoader that ``trainer.fit`` iterates."""
    return trainer.train_dataloader.dataset  # type: ignore[union-attr]


class _EpochData(pl.Callback):
    """Point the dataset at the current epoch and skip the batches a resumed epoch already ran.

    Lightning does not call ``on_train_epoch_start`` when it resumes in the middle of an epoch,
    so ``on_train_start`` (called on every fit) sets the dataset up too. Both run before the
    DataLoader iterator of the epoch starts.
    """

    def _point_dataset(self, trainer: pl.Trainer) -> None:
        dataset, epoch = _train_dataset(trainer), trainer.current_epoch
        dataset.set_epoch(epoch)
        dataset.skip_batches = max(0, trainer.global_step - _batches_before(dataset, epoch))
        if dataset.skip_batches:
            logger.debug("resuming epoch %d after %d batches", epoch, dataset.skip_batches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._point_dataset(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._point_dataset(trainer)


class _LastCheckpoint(Checkpoint):
    """Write ``last.ckpt`` after full epochs, every ``every_n_steps`` steps and at ``max_steps``.

    A run stopped by ``max_steps`` is saved in the middle of its epoch, so a resumed run finishes
    that epoch (see :class:`_EpochData`) instead of starting the next one. Lightning's
    ``ModelCheckpoint`` would also save when the cut-short epoch ends, which marks it finished.
    As a :class:`Checkpoint` subclass it runs after the module's ``on_train_epoch_end``, so the
    saved history includes the epoch just ended. Every DDP process calls
    ``trainer.save_checkpoint``, which writes the file on rank 0 only.
    """

    def __init__(self, url: str, *, max_steps: int, every_n_steps: int) -> None:
        self.url = url
        self.max_steps = max_steps
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.url)
        self.saved_step = trainer.global_step
        if trainer.is_global_zero:
            logger.debug("saved %s at step %d", self.url, trainer.global_step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning turns Ctrl-C into exit status 1 and reports it at INFO level only.
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            saved = (
                f"the last checkpoint of this run is at step {self.saved_step}"
                if self.saved_step is not None
                else "this run has written no checkpoint"
            )
            logger.warning(
                "pretraining interrupted at step %d, and %s (%s). Rerun the same command to resume "
                "from the last checkpoint",
                trainer.global_step,
                saved,
                self.url,
            )

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        at_max = self.max_steps > 0 and step >= self.max_steps
        periodic = self.every_n_steps > 0 and step % self.every_n_steps == 0
        if at_max or periodic:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dataset, epoch = _train_dataset(trainer), trainer.current_epoch
        done_in_epoch = trainer.global_step - _batches_before(dataset, epoch)
        if done_in_epoch >= dataset.batches_in_epoch(epoch):
            self._save(trainer)


def _trainer_device(config: PretrainConfig) -> tuple[str, str]:
    """Resolve the Lightning accelerator and precision.

    ``precision="auto"`` becomes bf16 autocast (``"bf16-mixed"``) on a GPU and float32
    (``"32-true"``) on a CPU.

    Raises
    ------
    ConfigError
        If a GPU is requested but none is available, or float16 autocast is requested on a CPU.
    """
    accelerator = config.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    on_gpu = accelerator in ("gpu", "cuda")
    if on_gpu and not torch.cuda.is_available():
        raise ConfigError(
            f"pretrain.accelerator is {config.accelerator!r} but no CUDA GPU is available; "
            "use 'cpu'"
        )

    precision = config.precision
    if precision == "auto":
        precision = "bf16-mixed" if on_gpu else "32-true"
    if precision == "16-mixed" and not on_gpu:
        raise ConfigError(
            f"pretrain.precision is '16-mixed' but the accelerator is {accelerator!r}; float16 "
            "autocast needs a GPU, so use 'bf16-mixed' or '32-true' on a CPU"
        )
    return accelerator, precision


def _build_trainer(
    config: PretrainConfig,
    run_dir: str,
    checkpoint_url: str,
    callbacks: Sequence[pl.Callback],
) -> pl.Trainer:
    """Build the Lightning trainer, whose rank and world size are set before ``fit`` starts.

    Raises
    ------
    ConfigError
        If the configuration does not suit the machine (see :func:`_trainer_device`), or
        Lightning would fork or spawn the DDP processes.
    """
    accelerator, precision = _trainer_device(config)
    checkpoints = _LastCheckpoint(
        checkpoint_url,
        max_steps=config.max_steps,
        every_n_steps=config.checkpoint_every_n_steps,
    )
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=config.devices,
        strategy=config.strategy,
        precision=precision,
        max_epochs=config.epochs,
        max_steps=config.max_steps,
        callbacks=[_EpochData(), checkpoints, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        default_root_dir=run_dir if not storage.is_remote(run_dir) else None,
    )

    # strategy="auto" picks ddp_fork for several devices in an interactive session (Lightning
    # 2.6). Forked or spawned ranks copy a dataset built before the rank is known.
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        raise ConfigError(
            f"pretrain.strategy={config.strategy!r} with devices={config.devices!r} makes "
            "Lightning fork or spawn its processes, which pretraining does not support; run "
            "`lensminer pretrain` or a script with strategy 'ddp', or set pretrain.devices=1"
        )
    return trainer


# Settings that shape the model, the queue or the batches: a checkpoint resumes only under the
# values it was written with.
RESUME_FIELDS = {
    "pretrain": ("backbone", "small_stem", "projection_dim", "queue_size", "batch_size", "seed"),
    "augment": ("crop_size",),
}


def _check_resumable(
    checkpoint_url: str,
    pretrain: PretrainConfig,
    augment: AugmentConfig,
    storage_options: dict[str, Any] | None,
) -> int:
    """Check that a checkpoint can continue under this configuration; return its epochs done.

    Raises
    ------
    CheckpointError
        If the checkpoint cannot be read, or was written with other values of
        :data:`RESUME_FIELDS`.
    """
    try:
        with storage.open_file(checkpoint_url, "rb", storage_options) as file:
            checkpoint = torch.load(file, map_location="cpu", weights_only=False)
        stored = checkpoint["hyper_parameters"]
        # Every finished epoch appends its mean loss to the stored history.
        epochs_done = len(checkpoint.get("lensminer_history", {}).get("loss", []))
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"cannot read the pretraining checkpoint {checkpoint_url}: {error}. Delete it, or "
            "start a new run with `lensminer pretrain --fresh`"
        ) from error

    current = {
        "pretrain": pretrain.model_dump(mode="json"),
        "augment": augment.model_dump(mode="json"),
    }
    differences = [
        f"{section}.{name}={stored.get(section, {}).get(name)!r} "
        f"(this run: {current[section][name]!r})"
        for section, names in RESUME_FIELDS.items()
        for name in names
        if stored.get(section, {}).get(name) != current[section][name]
    ]
    if differences:
        raise CheckpointError(
            f"the checkpoint {checkpoint_url} was written with {', '.join(differences)}, so "
            "training cannot resume from it. Rerun with the checkpoint's values, or start a new "
            "run with `lensminer pretrain --fresh` (resume=False), which overwrites it"
        )
    return epochs_done


def pretrain(
    cutouts_url: str,
    run_dir: str,
    pretrain: PretrainConfig,
    augment: AugmentConfig,
    *,
    storage_options: dict[str, Any] | None = None,
    resume: bool = True,
    allow_incomplete: bool = False,
    callbacks: Sequence[pl.Callback] = (),
) -> PretrainResult:
    """Train an encoder with MoCo v2 on the OK rows of a cutout store.

    With ``pretrain.strategy="ddp"``, Lightning starts one process per further device by running
    the command line of this program again (``sys.argv``), so call this function from a script
    or command whose rerun reaches it with the same arguments. Every process returns a result.
    Rank 0 alone writes the checkpoint and the encoder export.

    Parameters
    ----------
    cutouts_url
        fsspec URL of a cutout store.
    run_dir
        fsspec URL of the run directory; receives ``checkpoints/last.ckpt`` and ``encoder.pt``.
    pretrain, augment
        Training and augmentation configuration.
    storage_options
        fsspec options for remote URLs (store, checkpoints and encoder).
    resume
        Continue from ``{run_dir}/checkpoints/last.ckpt`` when it exists; otherwise start anew
        and overwrite it.
    allow_incomplete
        Train on a store with unfinished shards (their rows are skipped) instead of raising.
    callbacks
        Further Lightning callbacks, e.g. for timing or logging.

    Returns
    -------
    PretrainResult

    Raises
    ------
    StoreIncompleteError
        If the store has unfinished shards and ``allow_incomplete`` is False.
    ConfigError
        If the queue size is not a multiple of the global batch size (``batch_size`` times the
        number of processes), the store has fewer OK rows than one batch for each DataLoader
        worker of each process, the precision does not suit the accelerator, or Lightning would
        fork or spawn the DDP processes.
    """
    group = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    if not allow_incomplete:
        stores.require_complete(group, cutouts_url)

    # Trainer first, because the dataset deals shards by DDP rank. Under strategy="ddp",
    # Lightning runs this program again for every other rank when fit() starts.
    # NOTE: Lightning writes and reads checkpoints through fsspec without storage_options, so a
    # remote run_dir relies on the environment's default credentials and endpoint.
    checkpoint_url = storage.join_url(run_dir, "checkpoints", "last.ckpt")
    trainer = _build_trainer(pretrain, run_dir, checkpoint_url, callbacks)
    MoCoV2.check_queue_size(pretrain, trainer.world_size)

    # Data: full batches read shard by shard, and the labelled rows for the k-NN monitor.
    dataset = CutoutBatches(
        cutouts_url,
        batch_size=pretrain.batch_size,
        storage_options=storage_options,
        seed=pretrain.seed,
        magnitude_column=pretrain.magnitude_column,
        shuffle_shards=pretrain.shuffle_shards,
        num_workers=pretrain.num_workers,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
    epoch_steps = [dataset.batches_in_epoch(epoch) for epoch in range(pretrain.epochs)]
    if min(epoch_steps) == 0:
        readers = max(1, pretrain.num_workers) * trainer.world_size
        raise ConfigError(
            f"{cutouts_url!r} has {dataset.ok_rows.size} OK rows, fewer than one batch of "
            f"{pretrain.batch_size} for each of its {readers} readers ({trainer.world_size} "
            f"processes x {max(1, pretrain.num_workers)} DataLoader workers). Each reader takes "
            f"whole shards of {dataset.shard_rows} rows, so lower pretrain.batch_size, "
            "pretrain.num_workers or pretrain.devices"
        )
    # Readers take whole shards and every rank runs the smallest rank's number of batches, so
    # uneven shares leave rows out of each epoch.
    used_rows = epoch_steps[0] * pretrain.batch_size * trainer.world_size
    drawn_rows = dataset.rows_in_epoch(0)
    if trainer.is_global_zero and used_rows < 0.8 * drawn_rows:
        logger.warning(
            "each epoch trains on %d of %d rows: %d processes x %d DataLoader workers take whole "
            "shards of %d rows, and every process runs as many batches as the one with the "
            "fewest. Smaller shards (download.shard_rows) or fewer devices or workers use more",
            used_rows,
            drawn_rows,
            trainer.world_size,
            max(1, pretrain.num_workers),
            dataset.shard_rows,
        )

    # The cosine schedule spans all epochs. max_steps only stops early, so a run stopped at
    # max_steps and resumed with a larger one follows the same learning rates as one run.
    total_steps = sum(epoch_steps)
    monitor = load_labelled_subset(
        cutouts_url,
        storage_options=storage_options,
        max_rows=pretrain.knn_max_rows,
        seed=pretrain.seed,
    )

    # Model: seeded so that the initial weights and queue depend on the configuration only.
    pl.seed_everything(pretrain.seed, workers=True, verbose=False)
    model = MoCoV2(
        pretrain,
        augment,
        image_format=dataset.image_format,
        bands=dataset.bands,
        pixscale=dataset.pixscale,
        steps_per_epoch=epoch_steps[0],
        total_steps=total_steps,
    )
    model.monitor_data = monitor

    ckpt_path = (
        checkpoint_url if resume and storage.exists(checkpoint_url, storage_options) else None
    )
    # The checkpoint is read once here and again by fit(), so that a mismatch fails before
    # Lightning starts the other DDP processes.
    if ckpt_path:
        epochs_done = _check_resumable(ckpt_path, pretrain, augment, storage_options)
        if trainer.is_global_zero:
            logger.info("resuming pretraining from %s", ckpt_path)
            if epochs_done >= pretrain.epochs:
                logger.warning(
                    "the checkpoint %s has finished %d epochs and pretrain.epochs is %d, so no "
                    "step will run. Raise pretrain.epochs to train on, or start a new run with "
                    "`lensminer pretrain --fresh`",
                    ckpt_path,
                    epochs_done,
                    pretrain.epochs,
                )
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=pretrain.num_workers,
        pin_memory=not isinstance(trainer.accelerator, CPUAccelerator),
    )

    # Train. Lightning's warnings about few workers, an IterableDataset with a length and a
    # mid-epoch resume do not apply, because CutoutBatches plans every worker's batches and
    # skips the batches that a resumed epoch already ran.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
        warnings.filterwarnings(
            "ignore", message=".*resuming from a checkpoint that ended before the epoch.*"
        )
        trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)

    # Export the query encoder with the whole configuration. Only rank 0 writes it.
    encoder_url = storage.join_url(run_dir, "encoder.pt")
    if trainer.is_global_zero:
        export_encoder(
            model.encoder_q,
            encoder_url,
            config=pretrain,
            augment=augment,
            extra={
                "cutouts_url": cutouts_url,
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "losses": list(model.history["loss"]),
                "knn_accuracy": list(model.history["knn_accuracy"]),
            },
            storage_options=storage_options,
        )
        logger.info(
            "pretraining finished after %d steps; encoder at %s", trainer.global_step, encoder_url
        )

    return PretrainResult(
        encoder_url=encoder_url,
        checkpoint_url=checkpoint_url,
        epochs=len(model.history["loss"]),
        steps=trainer.global_step,
        losses=list(model.history["loss"]),
        knn_accuracy=list(model.history["knn_accuracy"]),
    )
