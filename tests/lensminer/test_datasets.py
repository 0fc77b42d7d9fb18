"""Tests of the shard-wise training batches and the labelled subset."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lensminer import stores
from lensminer.datasets import CutoutBatches, load_labelled_subset, magnitude_weights
from lensminer.exceptions import ConfigError, StoreError

SIZE = 12


def _make_store(
    url: str,
    n_rows: int = 40,
    *,
    shard_rows: int = 8,
    failed: tuple[int, ...] = (3, 17),
    columns: dict | None = None,
    storage_options: dict | None = None,
    done: bool = True,
) -> None:
    """Write a FITS-layout store whose image of row i is filled with the value i."""
    layout = stores.CutoutLayout("grz", SIZE, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")
    if columns is None:
        rng = np.random.default_rng(0)
        columns = {
            "ebv": np.linspace(0.0, 0.2, n_rows).astype(np.float32),
            "psf_fwhm": rng.uniform(0.9, 1.6, size=(n_rows, 3)).astype(np.float32),
            "label": np.where(np.arange(n_rows) % 3 == 0, -1, np.arange(n_rows) % 2).astype(
                np.int8
            ),
        }
    group = stores.create_cutout_store(
        url,
        target_id=[f"t{i}" for i in range(n_rows)],
        ra=np.linspace(150.0, 151.0, n_rows),
        dec=np.zeros(n_rows),
        layout=layout,
        shard_rows=shard_rows,
        chunk_rows=4,
        columns=columns,
        storage_options=storage_options,
    )
    images = np.broadcast_to(
        np.arange(n_rows, dtype=np.float32)[:, None, None, None], (n_rows, 3, SIZE, SIZE)
    )
    group["images"][:] = np.ascontiguousarray(images)
    status = np.full(n_rows, int(stores.RowStatus.OK), dtype=np.uint8)
    status[list(failed)] = int(stores.RowStatus.FAILED)
    group["status"][:] = status
    if done:
        for shard in range(stores.shard_count(n_rows, shard_rows)):
            stores.mark_shard_done(group, shard)


def _rows(batches) -> list[int]:
    return [row for batch in batches for row in batch.row_index.tolist()]


def test_batches_contain_ok_rows_once(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    dataset = CutoutBatches(url, batch_size=5, magnitude_column=None)
    batches = list(dataset)
    rows = _rows(batches)

    assert len(batches) == len(dataset) == 38 // 5
    assert len(rows) == len(set(rows))
    assert not {3, 17} & set(rows)
    assert all(batch.images.shape == (5, 3, SIZE, SIZE) for batch in batches)


def test_batch_values_match_rows(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    group = stores.open_store(url, "cutouts")
    for batch in CutoutBatches(url, batch_size=4, magnitude_column=None):
        rows = batch.row_index.numpy()
        np.testing.assert_array_equal(batch.images[:, 0, 0, 0].numpy(), rows.astype(np.float32))
        np.testing.assert_array_equal(batch.ebv.numpy(), group["ebv"][:][rows])
        np.testing.assert_array_equal(batch.psf_fwhm.numpy(), group["psf_fwhm"][:][rows])


def test_batch_unpacks_to_tuple(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    images, ebv, psf_fwhm, row_index = next(iter(CutoutBatches(url, batch_size=4)))
    assert images.dtype == torch.float32
    assert ebv.shape == (4,)
    assert psf_fwhm.shape == (4, 3)
    assert row_index.dtype == torch.int64


def test_missing_catalog_columns_are_nan(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, columns={})
    batch = next(iter(CutoutBatches(url, batch_size=4)))
    assert bool(torch.isnan(batch.ebv).all())
    assert bool(torch.isnan(batch.psf_fwhm).all())


def test_epochs_are_seeded(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    first = CutoutBatches(url, batch_size=4, seed=1)
    second = CutoutBatches(url, batch_size=4, seed=1)
    assert _rows(first) == _rows(second)
    epoch0 = _rows(first)
    first.set_epoch(1)
    assert _rows(first) != epoch0


def test_rows_shuffled_within_shard_groups(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, failed=())
    rows = _rows(CutoutBatches(url, batch_size=8, shuffle_shards=1))
    # With one shard per group, each batch of 8 is exactly one shard's rows.
    for start in range(0, len(rows), 8):
        assert len({row // 8 for row in rows[start : start + 8]}) == 1


def test_worker_processes_split_shards(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    dataset = CutoutBatches(url, batch_size=3, num_workers=2)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
    rows = _rows(batches)
    assert len(batches) == len(dataset)
    assert len(rows) == len(set(rows))
    assert not {3, 17} & set(rows)


def test_worker_count_mismatch(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    # Built for two workers but iterated in the main process.
    dataset = CutoutBatches(url, batch_size=3, num_workers=2)
    with pytest.raises(ConfigError, match="num_workers=2 but runs in 1"):
        next(iter(dataset))


def test_ranks_get_equal_batches(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, n_rows=44)
    ranks = [CutoutBatches(url, batch_size=3, rank=r, world_size=2) for r in range(2)]
    rows = [_rows(dataset) for dataset in ranks]
    assert len(ranks[0]) == len(ranks[1])
    assert len(rows[0]) == len(rows[1])
    assert not set(rows[0]) & set(rows[1])


def test_uneven_shards_leave_rows_out(tmp_path) -> None:
    # 24 OK rows in shards of 16 and 8: rank 0 takes 16 rows and rank 1 takes 8, so each rank
    # runs 2 batches of 4 and 16 of the 24 rows are trained on.
    url = str(tmp_path / "c.zarr")
    _make_store(url, n_rows=24, shard_rows=16, failed=())
    ranks = [CutoutBatches(url, batch_size=4, rank=r, world_size=2) for r in range(2)]

    assert ranks[0].rows_in_epoch(0) == 24
    assert [dataset.batches_in_epoch(0) for dataset in ranks] == [2, 2]


def test_magnitude_weights_flatten_histogram() -> None:
    magnitude = np.array([18.0, 18.1, 18.2, 19.0, np.nan])
    weights = magnitude_weights(magnitude, bin_width=0.5)
    np.testing.assert_allclose(weights, [1 / 6, 1 / 6, 1 / 6, 1 / 2, 0.0])


def test_sampling_uniform_in_magnitude(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    n_rows = 400
    # Three times as many bright rows (mag 17-18) as faint ones (18-19).
    magnitude = np.where(np.arange(n_rows) < 300, 17.0, 18.0) + np.random.default_rng(0).uniform(
        0, 0.99, n_rows
    )
    _make_store(
        url,
        n_rows=n_rows,
        shard_rows=40,
        failed=(),
        columns={"mag_z": magnitude.astype(np.float32)},
    )
    rows = np.array(_rows(CutoutBatches(url, batch_size=40)))
    faint_share = float(np.mean(magnitude[rows] >= 18.0))
    # Uniform in magnitude gives 0.5; the sample has 400 draws, so a 4-sigma band is +-0.1.
    assert abs(faint_share - 0.5) < 0.1


def test_store_on_s3(s3_endpoint) -> None:
    url = "s3://lensminer-test/datasets/c.zarr"
    _make_store(url, storage_options=s3_endpoint)
    batch = next(iter(CutoutBatches(url, batch_size=4, storage_options=s3_endpoint)))
    np.testing.assert_array_equal(
        batch.images[:, 0, 0, 0].numpy(), batch.row_index.numpy().astype(np.float32)
    )


def test_no_ok_rows(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, n_rows=4, failed=(0, 1, 2, 3))
    with pytest.raises(StoreError, match="no rows with status OK"):
        CutoutBatches(url, batch_size=2)


def test_unfinished_shards_warn(tmp_path, caplog) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, done=False)
    with caplog.at_level(logging.WARNING, logger="lensminer.datasets"):
        CutoutBatches(url, batch_size=2)
    assert "5 unfinished shards" in caplog.text


def test_labelled_subset(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    subset = load_labelled_subset(url)
    rows = np.arange(40)
    expected = rows[(rows % 3 != 0) & ~np.isin(rows, [3, 17])]
    np.testing.assert_array_equal(subset.row_index.numpy(), expected)
    np.testing.assert_array_equal(subset.labels.numpy(), expected % 2)
    np.testing.assert_array_equal(subset.images[:, 0, 0, 0].numpy(), expected.astype(np.float32))


def test_labelled_subset_max_rows(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    subset = load_labelled_subset(url, max_rows=5)
    assert subset.labels.shape == (5,)
    np.testing.assert_array_equal(
        subset.images[:, 0, 0, 0].numpy(), subset.row_index.numpy().astype(np.float32)
    )


def test_labelled_subset_absent(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url, columns={})
    assert load_labelled_subset(url) is None


def test_skip_batches_resumes_epoch(tmp_path) -> None:
    url = str(tmp_path / "c.zarr")
    _make_store(url)
    dataset = CutoutBatches(url, batch_size=4, seed=2)
    dataset.set_epoch(1)
    full = [batch.row_index.tolist() for batch in dataset]
    dataset.skip_batches = 3
    resumed = [batch.row_index.tolist() for batch in dataset]
    assert resumed == full[3:]
    assert len(dataset) == len(full)
