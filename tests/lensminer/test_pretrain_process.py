"""Tests of pretraining in a child process, the way the Prefect flow runs DDP."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lensminer.config import AugmentConfig, PretrainConfig
from lensminer.exceptions import PretrainError, StoreNotFoundError
from lensminer.models.encoder import load_encoder
from lensminer.pretrain_process import pretrain_in_subprocess

# 16 rows in 2 shards: each of 2 ranks reads one shard, 2 batches of 4 per epoch.
N_ROWS, BATCH, WORLD, EPOCHS = 16, 4, 2, 2
AUGMENT = AugmentConfig(crop_size=32, jitter=2)
CONFIG = PretrainConfig(
    projection_dim=8,
    batch_size=BATCH,
    queue_size=16,
    epochs=EPOCHS,
    seed=5,
    accelerator="cpu",
    devices=WORLD,
    strategy="ddp",
)


@pytest.fixture
def ddp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the gloo rendezvous at a free loopback port and keep each rank to one thread."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def test_subprocess_ddp_run(
    tmp_path: Path, ddp_environment: None, blob_store: Callable[..., str]
) -> None:
    store_url = str(tmp_path / "cutouts.zarr")
    blob_store(store_url)

    result = pretrain_in_subprocess(store_url, str(tmp_path / "run"), CONFIG, AUGMENT)

    # Each step reads one batch per rank, so an epoch of 16 rows is 2 steps, not 4.
    assert result.steps == EPOCHS * N_ROWS // (BATCH * WORLD)
    assert result.epochs == EPOCHS
    assert len(result.losses) == EPOCHS
    assert all(np.isfinite(result.losses))
    assert result.encoder_url == str(tmp_path / "run" / "encoder.pt")
    assert load_encoder(result.encoder_url) is not None


def test_subprocess_error_keeps_class(tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"devices": 1, "strategy": "auto"})
    with pytest.raises(StoreNotFoundError, match="no Zarr store"):
        pretrain_in_subprocess(str(tmp_path / "missing.zarr"), str(tmp_path), config, AUGMENT)


def test_subprocess_crash_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blob_store: Callable[..., str]
) -> None:
    # An invalid rendezvous port fails inside torch.distributed with a ValueError, which is not
    # a LensMiner error, so the child exits with a traceback and no result.
    store_url = str(tmp_path / "cutouts.zarr")
    blob_store(store_url)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "not-a-port")

    with pytest.raises(PretrainError, match="exited with status"):
        pretrain_in_subprocess(store_url, str(tmp_path / "run"), CONFIG, AUGMENT)
