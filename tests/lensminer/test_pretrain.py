"""End-to-end tests of MoCo pretraining on tiny synthetic cutout stores."""

from __future__ import annotations

import math
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lensminer.config import AugmentConfig, PretrainConfig, load_config
from lensminer.exceptions import CheckpointError, ConfigError, StoreIncompleteError
from lensminer.models.encoder import load_encoder
from lensminer.pretrain import _trainer_device, pretrain

# Small views (32 px crops of 40 px cutouts) keep a CPU step well under a second.
AUGMENT = AugmentConfig(crop_size=32, jitter=2)
CONFIG = PretrainConfig(
    backbone="resnet18", projection_dim=8, batch_size=4, queue_size=16, epochs=2, seed=5
)


def _checkpoint_state(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    return checkpoint["state_dict"]


@pytest.mark.slow
def test_pretrain_end_to_end(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    result = pretrain(url, str(tmp_path / "run"), CONFIG, AUGMENT)

    assert result.epochs == 2
    assert result.steps == 8
    assert len(result.losses) == 2
    assert all(math.isfinite(loss) for loss in result.losses)
    assert len(result.knn_accuracy) == 2
    assert all(0.0 <= accuracy <= 1.0 for accuracy in result.knn_accuracy)
    assert Path(result.checkpoint_url).is_file()

    encoder = load_encoder(result.encoder_url)
    assert encoder.pretrain_config == CONFIG
    assert encoder.metadata["extra"]["steps"] == 8
    with torch.no_grad():
        _, projection = encoder(torch.rand(2, 3, 32, 32))
    assert projection.shape == (2, 8)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    # 16 rows in batches of 4 make 4 steps an epoch: stop at step 3, mid-epoch, and resume to 6.
    url = blob_store(str(tmp_path / "c.zarr"))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    uninterrupted = pretrain(
        url, str(straight), CONFIG.model_copy(update={"max_steps": 6}), AUGMENT
    )
    first = pretrain(url, str(resumed), CONFIG.model_copy(update={"max_steps": 3}), AUGMENT)
    second = pretrain(url, str(resumed), CONFIG.model_copy(update={"max_steps": 6}), AUGMENT)

    assert first.steps == 3
    assert second.steps == 6
    # The checkpoint keeps the losses of the steps before the cut, so epoch means agree.
    assert second.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    expected, found = _checkpoint_state(straight), _checkpoint_state(resumed)
    assert expected.keys() == found.keys()
    for name in (
        "queue",
        "queue_ptr",
        "encoder_q.backbone.conv1.weight",
        "encoder_k.projector.2.weight",
    ):
        torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


class _CrashAtEpochEnd(pl.Callback):
    """Raise when epoch 0 ends, before the module's epoch-end hook, as a killed process stops.

    Lightning runs this hook of ordinary callbacks before the LightningModule's and the
    checkpoint callback's, so the last checkpoint is the one written after the epoch's last step.
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 0:
            raise RuntimeError("crash at the end of epoch 0")


@pytest.mark.slow
def test_resume_after_last_step_of_epoch(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    # A checkpoint written at the last step of epoch 0, before the epoch's end, must keep that
    # epoch's loss and monitor entries apart from epoch 1's when the run resumes.
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(update={"epochs": 2, "checkpoint_every_n_steps": 4})
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    uninterrupted = pretrain(url, straight, config, AUGMENT)
    with pytest.raises(RuntimeError, match="crash at the end of epoch 0"):
        pretrain(url, resumed, config, AUGMENT, callbacks=[_CrashAtEpochEnd()])
    assert (
        torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)["global_step"]
        == 4
    )

    result = pretrain(url, resumed, config, AUGMENT)

    assert result.steps == 8
    assert result.epochs == 2
    assert result.losses == pytest.approx(uninterrupted.losses, rel=1e-5)
    assert len(result.knn_accuracy) == 2


def test_resume_with_other_queue_size(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    run_dir = str(tmp_path / "run")
    pretrain(url, run_dir, CONFIG.model_copy(update={"max_steps": 1}), AUGMENT)

    with pytest.raises(CheckpointError, match=r"pretrain\.queue_size=16 \(this run: 32\)"):
        pretrain(url, run_dir, CONFIG.model_copy(update={"queue_size": 32}), AUGMENT)


def test_resume_finished_run_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, blob_store: Callable[..., str]
) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    run_dir = str(tmp_path / "run")
    config = CONFIG.model_copy(update={"epochs": 1})
    pretrain(url, run_dir, config, AUGMENT)

    with caplog.at_level("WARNING", logger="lensminer.pretrain"):
        again = pretrain(url, run_dir, config, AUGMENT)

    assert again.steps == 4
    assert "no step will run" in caplog.text


def test_unreadable_checkpoint(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")

    with pytest.raises(CheckpointError, match="--fresh"):
        pretrain(url, str(tmp_path / "run"), CONFIG, AUGMENT)


class _InterruptAtStep(pl.Callback):
    """Raise KeyboardInterrupt after a step, as Ctrl-C would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupt_names_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, blob_store: Callable[..., str]
) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(update={"checkpoint_every_n_steps": 2})
    handler = signal.getsignal(signal.SIGINT)

    # Lightning ignores SIGINT while it shuts down, so the test restores the handler.
    try:
        with caplog.at_level("WARNING", logger="lensminer.pretrain"), pytest.raises(SystemExit):
            pretrain(url, str(tmp_path / "run"), config, AUGMENT, callbacks=[_InterruptAtStep(3)])
    finally:
        signal.signal(signal.SIGINT, handler)

    assert "interrupted at step 3" in caplog.text
    assert "checkpoint of this run is at step 2" in caplog.text


@pytest.mark.slow
def test_resume_false_starts_over(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    run_dir = str(tmp_path / "run")
    pretrain(url, run_dir, CONFIG.model_copy(update={"max_steps": 2}), AUGMENT)
    again = pretrain(
        url, run_dir, CONFIG.model_copy(update={"max_steps": 2}), AUGMENT, resume=False
    )
    assert again.steps == 2


def test_queue_size_not_multiple_of_batch(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(update={"queue_size": 10})
    with pytest.raises(ConfigError, match=r"queue_size \(10\) must be a multiple .* = 4\)"):
        pretrain(url, str(tmp_path / "run"), config, AUGMENT)


def test_ddp_queue_size_error(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    # The check runs before fit(), so no second process starts.
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(
        update={"queue_size": 12, "strategy": "ddp", "devices": 2, "accelerator": "cpu"}
    )
    expected = (
        r"queue_size \(12\) must be a multiple of the global batch size \(4 x 2 processes = 8\)"
    )
    with pytest.raises(ConfigError, match=expected):
        pretrain(url, str(tmp_path / "run"), config, AUGMENT)


def test_incomplete_store_rejected(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"), done=False)
    with pytest.raises(StoreIncompleteError, match="2 of 2 shards"):
        pretrain(url, str(tmp_path / "run"), CONFIG, AUGMENT)


def test_too_few_rows_for_a_batch(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"), n_rows=3)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        pretrain(url, str(tmp_path / "run"), CONFIG, AUGMENT)


class _AutocastProbe(pl.Callback):
    """Record the dtype of the query backbone's output in every training forward pass."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def _record(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if module.training:  # the k-NN monitor embeds in eval mode, outside autocast
            self.dtypes.append(output.dtype)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.encoder_q.backbone.register_forward_hook(self._record)


def test_bf16_mixed_cpu_run(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(
        update={"precision": "bf16-mixed", "accelerator": "cpu", "epochs": 1}
    )
    probe = _AutocastProbe()
    result = pretrain(url, str(tmp_path / "run"), config, AUGMENT, callbacks=[probe])

    assert probe.dtypes == [torch.bfloat16] * 4
    assert len(result.losses) == 1
    assert math.isfinite(result.losses[0])
    state = _checkpoint_state(tmp_path / "run")
    assert state["queue"].dtype == torch.float32
    assert bool(state["queue"].isfinite().all())
    torch.testing.assert_close(state["queue"].norm(dim=0), torch.ones(16))

    encoder = load_encoder(result.encoder_url)
    assert {parameter.dtype for parameter in encoder.parameters()} == {torch.float32}
    assert encoder.pretrain_config.precision == "bf16-mixed"
    with torch.no_grad():
        representation, _ = encoder(torch.rand(2, 3, 32, 32))
    assert representation.dtype == torch.float32


def test_precision_auto_on_cpu() -> None:
    assert _trainer_device(CONFIG.model_copy(update={"accelerator": "cpu"})) == ("cpu", "32-true")


def test_fp16_mixed_on_cpu_rejected() -> None:
    config = CONFIG.model_copy(update={"accelerator": "cpu", "precision": "16-mixed"})
    with pytest.raises(ConfigError, match="'16-mixed'.*needs a GPU.*'bf16-mixed'"):
        _trainer_device(config)


def test_spawn_strategy_rejected() -> None:
    with pytest.raises(ConfigError, match="pretrain.strategy = 'ddp_spawn'"):
        load_config(None, {"pretrain.strategy": "ddp_spawn"})


def test_forked_processes_rejected(tmp_path: Path, blob_store: Callable[..., str]) -> None:
    # model_copy skips validation, as "auto" does when it picks ddp_fork in a notebook.
    url = blob_store(str(tmp_path / "c.zarr"))
    config = CONFIG.model_copy(update={"strategy": "ddp_fork", "devices": 2, "accelerator": "cpu"})
    with pytest.raises(ConfigError, match="fork or spawn its processes"):
        pretrain(url, str(tmp_path / "run"), config, AUGMENT)


def test_unknown_precision_rejected() -> None:
    with pytest.raises(ConfigError, match="pretrain.precision = 'bf16'"):
        load_config(None, {"pretrain.precision": "bf16"})
