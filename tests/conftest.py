"""Fixtures shared by the whole test suite: real survey data, Prefect and an S3 endpoint."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LENSMINER_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the shared_data fixture, so ``-m shared_data`` selects them all."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real survey data (gz-decals, decals-fits, lenses, sweep); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"real survey data not found at {SHARED_DATA}; set LENSMINER_SHARED_DATA to its folder"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run flows against Prefect's temporary test API with a private PREFECT_HOME."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict[str, object]]:
    """Start a moto S3 server on 127.0.0.1 and return fsspec storage options for it.

    The bucket ``lensminer-test`` exists in it.
    """
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    credentials = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(
        Bucket="lensminer-test"
    )
    yield {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        "skip_instance_cache": True,
    }
    server.stop()


def write_blob_store(url: str, n_rows: int = 16, *, done: bool = True) -> str:
    """Write a FITS cutout store of noisy Gaussian blobs for pretraining tests and return ``url``.

    The cutouts are 3 x 40 x 40 float32 in shards of 8 rows. Label 1 marks the wider blobs,
    and every row has ``ebv`` and ``psf_fwhm`` columns. With ``done=False`` no shard is marked
    finished.
    """
    from lensminer import stores

    layout = stores.CutoutLayout("grz", 40, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
    label = (np.arange(n_rows) % 2).astype(np.int8)
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i}" for i in range(n_rows)],
        ra=np.linspace(10.0, 11.0, n_rows),
        dec=np.zeros(n_rows),
        layout=layout,
        shard_rows=8,
        chunk_rows=4,
        columns={
            "label": label,
            "ebv": np.full(n_rows, 0.03, np.float32),
            "psf_fwhm": np.full((n_rows, 3), 1.2, np.float32),
        },
    )
    rng = np.random.default_rng(0)
    y, x = np.mgrid[-20:20, -20:20] + 0.5
    width = np.where(label == 1, 6.0, 2.0)[:, None, None]
    blobs = 0.5 * np.exp(-(x**2 + y**2)[None] / (2 * width**2))
    images = blobs[:, None] * np.array([0.5, 1.0, 1.5])[None, :, None, None]
    group["images"][:] = (images + rng.normal(0, 0.005, images.shape)).astype(np.float32)
    group["status"][:] = np.ones(n_rows, np.uint8)
    if done:
        for shard in range(stores.shard_count(n_rows, 8)):
            stores.mark_shard_done(group, shard)
    return url


@pytest.fixture
def blob_store() -> Callable[..., str]:
    """Return :func:`write_blob_store`, which writes a small FITS store for pretraining tests."""
    return write_blob_store
