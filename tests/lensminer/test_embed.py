"""Tests of the Dask embedding stage on real Zarr stores, Dask clusters and S3."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lensminer import stores
from lensminer.augment import evaluation_view
from lensminer.config import AugmentConfig, EmbedConfig, PretrainConfig
from lensminer.embed import embed_cutouts, prepare_embedding_store, verify_embedding_store
from lensminer.exceptions import ConfigError, StoreError, StoreIncompleteError
from lensminer.models.encoder import build_encoder, export_encoder, load_encoder

VENV_BIN = Path(sys.executable).parent
SIZE, CROP = 40, 32
N_ROWS, SHARD_ROWS = 64, 8
LAYOUT = stores.CutoutLayout("grz", SIZE, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
PRETRAIN = PretrainConfig(backbone="resnet18", small_stem=False, projection_dim=16)
AUGMENT = AugmentConfig(crop_size=CROP)
SYNC = EmbedConfig(batch_size=16, scheduler="synchronous")
FAILED_ROWS = [3, 17, 18, 63]


def _export_encoder(url: str, storage_options=None) -> str:
    torch.manual_seed(0)
    encoder = build_encoder(PRETRAIN, input_size=CROP)
    return export_encoder(
        encoder, url, config=PRETRAIN, augment=AUGMENT, storage_options=storage_options
    )


def _make_cutouts(url: str, *, n_rows=N_ROWS, done=True, storage_options=None) -> str:
    # A store of n_rows < N_ROWS contains the first n_rows rows of the full one, because the
    # generator fills the image array in row order.
    rng = np.random.default_rng(0)
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i:03d}" for i in range(n_rows)],
        ra=np.linspace(10, 11, n_rows),
        dec=np.zeros(n_rows),
        layout=LAYOUT,
        shard_rows=SHARD_ROWS,
        chunk_rows=SHARD_ROWS,
        storage_options=storage_options,
    )
    group["images"][:] = rng.gamma(2.0, 0.05, size=(n_rows, 3, SIZE, SIZE)).astype(np.float32)
    status = np.full(n_rows, int(stores.RowStatus.OK), "uint8")
    status[[row for row in FAILED_ROWS if row < n_rows]] = int(stores.RowStatus.FAILED)
    group["status"][:] = status
    if done:
        for index in range(stores.shard_count(n_rows, SHARD_ROWS)):
            stores.mark_shard_done(group, index)
    return url


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("embed-inputs")
    return {
        "cutouts": _make_cutouts(str(base / "cutouts.zarr")),
        "encoder": _export_encoder(str(base / "encoder.pt")),
    }


@pytest.fixture(scope="module")
def reference(inputs):
    """Embed row by row in a bare loop; return (representation, projection)."""
    encoder = load_encoder(inputs["encoder"])
    group = stores.open_store(inputs["cutouts"], "cutouts")
    images, status = group["images"][:], group["status"][:]
    representation = np.zeros((N_ROWS, encoder.representation_dim), np.float32)
    projection = np.zeros((N_ROWS, encoder.projection_dim), np.float32)
    with torch.inference_mode():
        for row in np.flatnonzero(status == int(stores.RowStatus.OK)):
            view = evaluation_view(
                torch.from_numpy(images[row : row + 1]),
                image_format="fits",
                bands="grz",
                crop_size=CROP,
                config=AUGMENT,
            )
            rep, proj = encoder(view)
            representation[row], projection[row] = rep.numpy()[0], proj.numpy()[0]
    return representation, projection


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread, as in Dask worker processes (OMP_NUM_THREADS=1).

    A matrix product sums in an order that depends on the thread count, so runs compared bit for
    bit must use the same count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _arrays(url: str, storage_options=None) -> dict[str, np.ndarray]:
    group = stores.open_store(url, "embeddings", storage_options=storage_options)
    return {name: group[name][:] for name in ("representation", "projection", "valid")}


def _assert_matches_reference(arrays, reference):
    # Batched and row-by-row convolutions sum in different orders, so allow float32 rounding.
    n_rows = arrays["representation"].shape[0]
    np.testing.assert_allclose(
        arrays["representation"], reference[0][:n_rows], rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(arrays["projection"], reference[1][:n_rows], rtol=1e-4, atol=1e-5)


def test_embed_synchronous_matches_loop(inputs, reference, tmp_path):
    summary = embed_cutouts(
        inputs["cutouts"], inputs["encoder"], str(tmp_path / "e.zarr"), SYNC, AUGMENT
    )
    _assert_matches_reference(_arrays(summary.embeddings_url), reference)


def test_embed_local_cluster_equals_synchronous(inputs, tmp_path):
    local = EmbedConfig(batch_size=16, scheduler="local", n_workers=2, threads_per_worker=1)
    dask_summary = embed_cutouts(
        inputs["cutouts"], inputs["encoder"], str(tmp_path / "dask.zarr"), local, AUGMENT
    )

    with _one_thread():
        embed_cutouts(
            inputs["cutouts"], inputs["encoder"], str(tmp_path / "sync.zarr"), SYNC, AUGMENT
        )
    dask_arrays, sync_arrays = (
        _arrays(str(tmp_path / "dask.zarr")),
        _arrays(str(tmp_path / "sync.zarr")),
    )
    assert dask_summary.shards_written == N_ROWS // SHARD_ROWS
    for name in ("representation", "projection", "valid"):
        np.testing.assert_array_equal(dask_arrays[name], sync_arrays[name], err_msg=name)


def test_embed_failed_rows_invalid(inputs, tmp_path):
    summary = embed_cutouts(
        inputs["cutouts"], inputs["encoder"], str(tmp_path / "e.zarr"), SYNC, AUGMENT
    )
    arrays = _arrays(summary.embeddings_url)
    assert summary.n_valid == N_ROWS - len(FAILED_ROWS)
    assert np.flatnonzero(~arrays["valid"]).tolist() == FAILED_ROWS
    assert not arrays["representation"][FAILED_ROWS].any()
    assert not arrays["projection"][FAILED_ROWS].any()
    assert np.abs(arrays["representation"][arrays["valid"]]).sum(axis=1).min() > 0


def test_embed_rerun_skips_done_shards(inputs, tmp_path):
    url = str(tmp_path / "e.zarr")
    embed_cutouts(inputs["cutouts"], inputs["encoder"], url, SYNC, AUGMENT)
    summary = embed_cutouts(inputs["cutouts"], inputs["encoder"], url, SYNC, AUGMENT)
    assert summary.shards_written == 0
    assert summary.shards_skipped == N_ROWS // SHARD_ROWS


KILLED_RUN = """
import sys, time
import torch
import lensminer.embed as embed
from lensminer.config import AugmentConfig, EmbedConfig

shard = embed.embed_shard
def slow_shard(*args, **kwargs):
    rows = shard(*args, **kwargs)
    time.sleep(0.5)
    return rows
embed.embed_shard = slow_shard
torch.set_num_threads(1)
config = EmbedConfig(batch_size=16, scheduler="synchronous")
embed.embed_cutouts(sys.argv[1], sys.argv[2], sys.argv[3], config,
                    AugmentConfig(crop_size=int(sys.argv[4])))
"""


def test_embed_resumes_after_kill(inputs, reference, tmp_path):
    url = str(tmp_path / "e.zarr")
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, inputs["cutouts"], inputs["encoder"], url, str(CROP)]
    )
    try:
        # Kill the run with SIGKILL once two shards are done and the rest are still pending.
        deadline = time.monotonic() + 120
        done = 0
        while done < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            try:
                done = int(stores.open_store(url, "embeddings")["shard_done"][:].sum())
            except (StoreError, FileNotFoundError, KeyError, json.JSONDecodeError):
                done = 0
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)

    assert process.returncode == -signal.SIGKILL
    with pytest.raises(StoreIncompleteError):
        verify_embedding_store(inputs["cutouts"], url)

    with _one_thread():
        summary = embed_cutouts(inputs["cutouts"], inputs["encoder"], url, SYNC, AUGMENT)
        uninterrupted = embed_cutouts(
            inputs["cutouts"], inputs["encoder"], str(tmp_path / "u.zarr"), SYNC, AUGMENT
        )
    assert 0 < summary.shards_written < N_ROWS // SHARD_ROWS
    resumed, clean = _arrays(url), _arrays(uninterrupted.embeddings_url)
    for name in ("representation", "projection", "valid"):
        np.testing.assert_array_equal(resumed[name], clean[name], err_msg=name)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{path} did not appear; the process exited with {process.returncode}"
            )
        time.sleep(0.1)


def test_embed_through_dask_cli_cluster(inputs, reference, tmp_path):
    cutouts_url = _make_cutouts(str(tmp_path / "c.zarr"), n_rows=16)
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    scheduler = subprocess.Popen(
        [
            str(VENV_BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = []
    try:
        _wait_for(scheduler_file, scheduler)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        workers.append(
            subprocess.Popen(
                [
                    str(VENV_BIN / "dask"),
                    "worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--host",
                    "127.0.0.1",
                    "--no-nanny",
                    "--nthreads",
                    "1",
                    "--no-dashboard",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
            worker_hosts = {info["host"] for info in client.scheduler_info()["workers"].values()}
        assert worker_hosts == {"127.0.0.1"}

        config = EmbedConfig(batch_size=16, scheduler=address)
        summary = embed_cutouts(
            cutouts_url, inputs["encoder"], str(tmp_path / "e.zarr"), config, AUGMENT
        )
        assert summary.shards_written == 2
        _assert_matches_reference(_arrays(summary.embeddings_url), reference)
    finally:
        for process in [*workers, scheduler]:
            process.terminate()
        for process in [*workers, scheduler]:
            process.wait(timeout=30)


def test_embed_on_s3(s3_endpoint, reference):
    base = "s3://lensminer-test/embed"
    cutouts_url = _make_cutouts(f"{base}/cutouts.zarr", n_rows=16, storage_options=s3_endpoint)
    encoder_url = _export_encoder(f"{base}/encoder.pt", storage_options=s3_endpoint)
    summary = embed_cutouts(
        cutouts_url,
        encoder_url,
        f"{base}/embeddings.zarr",
        SYNC,
        AUGMENT,
        storage_options=s3_endpoint,
    )
    assert summary.n_valid == 16 - 1
    _assert_matches_reference(_arrays(summary.embeddings_url, s3_endpoint), reference)


def test_prepare_rejects_incomplete_cutouts(inputs, tmp_path):
    cutouts_url = _make_cutouts(str(tmp_path / "c.zarr"), done=False)
    with pytest.raises(StoreIncompleteError, match="8 of 8 shards unwritten"):
        prepare_embedding_store(cutouts_url, inputs["encoder"], str(tmp_path / "e.zarr"), SYNC)


def test_prepare_uses_cutout_shard_rows(inputs, tmp_path):
    url = str(tmp_path / "e.zarr")
    pending = prepare_embedding_store(inputs["cutouts"], inputs["encoder"], url, SYNC)
    group = stores.open_store(url, "embeddings")
    assert pending == list(range(N_ROWS // SHARD_ROWS))
    assert group.attrs["shard_rows"] == SHARD_ROWS
    assert group["representation"].shape == (N_ROWS, 512)
    assert group["projection"].shape == (N_ROWS, 16)


def test_prepare_rejects_other_encoder(inputs, tmp_path):
    url = str(tmp_path / "e.zarr")
    prepare_embedding_store(inputs["cutouts"], inputs["encoder"], url, SYNC)
    other = PretrainConfig(backbone="resnet18", small_stem=False, projection_dim=8)
    other_url = export_encoder(
        build_encoder(other, input_size=CROP),
        str(tmp_path / "other.pt"),
        config=other,
        augment=AUGMENT,
    )
    with pytest.raises(StoreError, match="projection width 16, but this run needs 8"):
        prepare_embedding_store(inputs["cutouts"], other_url, url, SYNC)


def test_prepare_rejects_crop_mismatch(inputs, tmp_path):
    with pytest.raises(ConfigError, match="set augment.crop_size to 32"):
        prepare_embedding_store(
            inputs["cutouts"],
            inputs["encoder"],
            str(tmp_path / "e.zarr"),
            SYNC,
            augment=AugmentConfig(crop_size=48),
        )


def test_prepare_missing_encoder(inputs, tmp_path):
    with pytest.raises(StoreError, match="no encoder at"):
        prepare_embedding_store(
            inputs["cutouts"], str(tmp_path / "none.pt"), str(tmp_path / "e.zarr"), SYNC
        )


def test_embed_unknown_scheduler(inputs, tmp_path):
    with pytest.raises(ConfigError, match="got 'threads'"):
        embed_cutouts(
            inputs["cutouts"],
            inputs["encoder"],
            str(tmp_path / "e.zarr"),
            EmbedConfig(scheduler="threads"),
            AUGMENT,
        )


def test_verify_detects_status_change(inputs, tmp_path):
    cutouts_url = _make_cutouts(str(tmp_path / "c.zarr"), n_rows=16)
    url = str(tmp_path / "e.zarr")
    embed_cutouts(cutouts_url, inputs["encoder"], url, SYNC, AUGMENT)
    stores.open_store(cutouts_url, "cutouts", mode="r+")["status"][5] = int(stores.RowStatus.FAILED)
    with pytest.raises(StoreError, match="first at row 5"):
        verify_embedding_store(cutouts_url, url)
