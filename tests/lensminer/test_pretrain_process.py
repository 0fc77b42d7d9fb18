"""Tests of pretraining in a child process, the way the Prefect flow runs DDP."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from lensminer import stores
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


def _write_store(url: str) -> None:
    """Write a complete FITS store of noisy Gaussian blobs of two widths."""
    layout = stores.CutoutLayout("grz", 40, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i}" for i in range(N_ROWS)],
        ra=np.linspace(10.0, 11.0, N_ROWS),
        dec=np.zeros(N_ROWS),
        layout=layout,
        shard_rows=8,
        chunk_rows=4,
    )
    rng = np.random.default_rng(2)
    y, x = np.mgrid[-20:20, -20:20] + 0.5
    width = np.where(np.arange(N_ROWS) % 2 == 1, 6.0, 2.0)[:, None, None]
    blobs = 0.5 * np.exp(-(x**2 + y**2)[None] / (2 * width**2))
    images = blobs[:, None] * np.array([0.5, 1.0, 1.5])[None, :, None, None]
    group["images"][:] = (images + rng.normal(0, 0.005, images.shape)).astype(np.float32)
    group["status"][:] = np.ones(N_ROWS, np.uint8)
    for shard in range(stores.shard_count(N_ROWS, 8)):
        stores.mark_shard_done(group, shard)


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


def test_subprocess_ddp_run(tmp_path: Path, ddp_environment: None) -> None:
    store_url = str(tmp_path / "cutouts.zarr")
    _write_store(store_url)

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


def test_subprocess_crash_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An invalid rendezvous port fails inside torch.distributed with a ValueError, which is not
    # a LensMiner error, so the child exits with a traceback and no result.
    store_url = str(tmp_path / "cutouts.zarr")
    _write_store(store_url)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "not-a-port")

    with pytest.raises(PretrainError, match="exited with status"):
        pretrain_in_subprocess(store_url, str(tmp_path / "run"), CONFIG, AUGMENT)
