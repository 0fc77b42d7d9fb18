"""The Prefect embedding flow: Dask worker processes reporting to one Prefect server, and resume."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from lensminer import stores
from lensminer.config import AugmentConfig, EmbedConfig, PretrainConfig
from lensminer.embed import embed_cutouts, prepare_embedding_store
from lensminer.flows.pipeline import embed_flow, embed_task_runner
from lensminer.models.encoder import build_encoder, export_encoder

PREFECT = Path(sys.executable).parent / "prefect"
SIZE, CROP = 40, 32
N_ROWS, SHARD_ROWS = 48, 8
N_SHARDS = N_ROWS // SHARD_ROWS
LAYOUT = stores.CutoutLayout("grz", SIZE, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
PRETRAIN = PretrainConfig(backbone="resnet18", small_stem=False, projection_dim=16)
AUGMENT = AugmentConfig(crop_size=CROP)
SYNC = EmbedConfig(batch_size=16, scheduler="synchronous")
PROCESSES = EmbedConfig(
    batch_size=16, scheduler="local", processes=True, n_workers=2, threads_per_worker=1
)
FAILED_ROWS = [5, 30]
ARRAYS = ("representation", "projection", "valid")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Write a complete cutout store of synthetic fluxes and a randomly initialised encoder."""
    base = tmp_path_factory.mktemp("embed-flow-inputs")
    rng = np.random.default_rng(0)
    cutouts_url = str(base / "cutouts.zarr")
    group = stores.create_cutout_store(
        cutouts_url,
        target_id=[f"t{i:03d}" for i in range(N_ROWS)],
        ra=np.linspace(150.0, 150.5, N_ROWS),
        dec=np.full(N_ROWS, 2.0),
        layout=LAYOUT,
        shard_rows=SHARD_ROWS,
        chunk_rows=SHARD_ROWS,
    )
    group["images"][:] = rng.gamma(2.0, 0.05, size=(N_ROWS, 3, SIZE, SIZE)).astype(np.float32)
    status = np.full(N_ROWS, int(stores.RowStatus.OK), np.uint8)
    status[FAILED_ROWS] = int(stores.RowStatus.FAILED)
    group["status"][:] = status
    for index in range(N_SHARDS):
        stores.mark_shard_done(group, index)

    torch.manual_seed(0)
    encoder_url = export_encoder(
        build_encoder(PRETRAIN, input_size=CROP),
        str(base / "encoder.pt"),
        config=PRETRAIN,
        augment=AUGMENT,
    )
    return {"cutouts": cutouts_url, "encoder": encoder_url}


@pytest.fixture(scope="module")
def synchronous_arrays(
    inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, np.ndarray]:
    """Embed the store with the library's synchronous driver on one torch thread.

    Dask worker processes run torch on one thread, and a matrix product sums in an order that
    depends on the thread count, so only a one-thread run can equal theirs bit for bit.
    """
    url = str(tmp_path_factory.mktemp("embed-flow-sync") / "sync.zarr")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embed_cutouts(inputs["cutouts"], inputs["encoder"], url, SYNC, AUGMENT)
    finally:
        torch.set_num_threads(threads)
    return _read_arrays(url)


def _read_arrays(url: str) -> dict[str, np.ndarray]:
    group = stores.open_store(url, "embeddings")
    return {name: group[name][:] for name in ARRAYS}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _prefect_server(home: Path, timeout: float = 60) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; yield its API URL."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with code {server.returncode}; see {home}/server.log"
                )
            try:
                if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"prefect server at {api_url} not healthy after {timeout} s")
            time.sleep(0.25)
        yield api_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        finally:
            log.close()


def _embed_shard_runs(flow_run_id: uuid.UUID) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="embed-shard")),
        )


def _wait_for_finished_runs(flow_run_id: uuid.UUID, expected: int, timeout: float = 30) -> list:
    """Read the flow run's embed-shard task runs once ``expected`` of them have a final state.

    The server records task runs from the events that the engine sends, so the last states can
    arrive shortly after the flow returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = _embed_shard_runs(flow_run_id)
        final = [run for run in runs if run.state is not None and run.state.is_final()]
        if len(final) >= expected or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _drain_prefect_workers() -> None:
    """Send this process's queued logs and events before its server stops.

    Otherwise the events worker keeps retrying the stopped server, and the next drain blocks on
    it (the teardown of the ``prefect_harness`` fixture hung this way).
    """
    with contextlib.suppress(RuntimeError):  # raised when this process never started the worker
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


@pytest.mark.slow
def test_flow_worker_processes_report_to_server(
    inputs: dict[str, str],
    synchronous_arrays: dict[str, np.ndarray],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server_home = tmp_path / "server-home"
    worker_home = tmp_path / "worker-home"
    server_home.mkdir()
    worker_home.mkdir()
    embeddings_url = str(tmp_path / "embeddings.zarr")

    with _prefect_server(server_home) as api_url:
        # Dask worker processes inherit the environment; this process reads the settings context.
        monkeypatch.setenv("PREFECT_API_URL", api_url)
        monkeypatch.setenv("PREFECT_HOME", str(worker_home))
        monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            runner = embed_task_runner(PROCESSES)
            state = embed_flow.with_options(task_runner=runner)(
                inputs["cutouts"],
                inputs["encoder"],
                embeddings_url,
                PROCESSES,
                AUGMENT,
                return_state=True,
            )
            summary = state.result()
            runs = _wait_for_finished_runs(state.state_details.flow_run_id, N_SHARDS)
            _drain_prefect_workers()

    assert runner.cluster_kwargs["processes"] is True
    assert state.is_completed()
    assert summary["n_valid"] == N_ROWS - len(FAILED_ROWS)
    # Task runs do not record their arguments, so one run per shard means a run count equal to
    # the shard count, each with its own id, and a store equal to the synchronous one.
    assert len(runs) == N_SHARDS
    assert [run.state_type for run in runs] == [StateType.COMPLETED] * N_SHARDS
    assert len({run.id for run in runs}) == N_SHARDS
    # A worker that ignored PREFECT_API_URL would start a temporary server with a database here.
    assert not (worker_home / "prefect.db").exists()

    flow_arrays = _read_arrays(embeddings_url)
    for name in ARRAYS:
        np.testing.assert_array_equal(flow_arrays[name], synchronous_arrays[name], err_msg=name)


def _chunk_files(url: str, shard: int) -> list[Path]:
    """List the chunk files of one shard: ``c/<shard>`` of 1-D arrays, ``c/<shard>/0`` of 2-D."""
    files = []
    for name in ARRAYS:
        chunk = Path(url, name, "c", str(shard))
        files += [chunk] if chunk.is_file() else chunk.glob("*")
    return sorted(files)


def test_flow_resumes_pending_shards(
    inputs: dict[str, str],
    synchronous_arrays: dict[str, np.ndarray],
    tmp_path: Path,
    prefect_harness: None,
) -> None:
    url = str(tmp_path / "embeddings.zarr")
    done = [0, 2, 3]
    pending = [index for index in range(N_SHARDS) if index not in done]

    # Write the done shards as an earlier run would: the correct rows, then the shard flag.
    prepare_embedding_store(inputs["cutouts"], inputs["encoder"], url, SYNC, augment=AUGMENT)
    group = stores.open_store(url, "embeddings", mode="r+")
    for index in done:
        rows = stores.shard_slice(index, N_ROWS, SHARD_ROWS)
        for name in ARRAYS:
            group[name][rows] = synchronous_arrays[name][rows]
        stores.mark_shard_done(group, index)
    before = {path: path.stat().st_mtime_ns for index in done for path in _chunk_files(url, index)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = embed_flow.with_options(task_runner=embed_task_runner(SYNC))(
            inputs["cutouts"], inputs["encoder"], url, SYNC, AUGMENT, return_state=True
        )
    finally:
        torch.set_num_threads(threads)
    runs = _wait_for_finished_runs(state.state_details.flow_run_id, len(pending))

    assert state.is_completed()
    assert len(runs) == len(pending)
    assert [run.state_type for run in runs] == [StateType.COMPLETED] * len(pending)
    assert len(before) == len(done) * len(ARRAYS)
    after = {path: path.stat().st_mtime_ns for path in before}
    assert after == before
    for index in pending:
        assert len(_chunk_files(url, index)) == len(ARRAYS), f"shard {index}"
    assert stores.pending_shards(stores.open_store(url, "embeddings")) == []

    resumed = _read_arrays(url)
    for name in ARRAYS:
        np.testing.assert_array_equal(resumed[name], synchronous_arrays[name], err_msg=name)
