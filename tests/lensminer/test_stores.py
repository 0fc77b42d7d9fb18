"""Tests of the shared store layouts."""

from __future__ import annotations

import numpy as np
import pytest

from lensminer import stores
from lensminer.exceptions import StoreError, StoreIncompleteError, StoreNotFoundError

LAYOUT = stores.CutoutLayout("grz", 8, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")


def _create(url, ids=("a", "b", "c"), **kwargs):
    n = len(ids)
    return stores.create_cutout_store(
        url,
        target_id=list(ids),
        ra=np.arange(n, dtype=float),
        dec=np.zeros(n),
        layout=LAYOUT,
        shard_rows=2,
        chunk_rows=1,
        **kwargs,
    )


def test_shard_slices_cover_rows():
    slices = [stores.shard_slice(i, 5, 2) for i in range(stores.shard_count(5, 2))]
    assert slices == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_shard_slice_out_of_range():
    with pytest.raises(IndexError, match="shard 3"):
        stores.shard_slice(3, 5, 2)


def test_cutout_store_layout(tmp_path):
    group = _create(str(tmp_path / "c.zarr"), columns={"label": np.array([1, 0, -1], "int8")})
    assert group["images"].shape == (3, 3, 8, 8)
    assert group["images"].dtype == np.float32
    assert group["target_id"][:].tolist() == ["a", "b", "c"]
    assert group["status"][:].tolist() == [0, 0, 0]
    assert group["label"][:].tolist() == [1, 0, -1]
    assert group.attrs["kind"] == "cutouts"


def test_reopen_keeps_finished_shards(tmp_path):
    url = str(tmp_path / "c.zarr")
    stores.mark_shard_done(_create(url), 0)
    assert stores.pending_shards(_create(url)) == [1]


def test_reopen_with_other_targets_raises(tmp_path):
    url = str(tmp_path / "c.zarr")
    _create(url)
    with pytest.raises(StoreError, match="other targets"):
        _create(url, ids=("a", "b", "x"))


def test_require_complete_names_pending(tmp_path):
    url = str(tmp_path / "c.zarr")
    group = _create(url)
    stores.mark_shard_done(group, 1)
    with pytest.raises(StoreIncompleteError, match=r"1 of 2 shards"):
        stores.require_complete(group, url)


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no Zarr store"):
        stores.open_store(str(tmp_path / "missing.zarr"), "cutouts")


def test_cutout_store_on_s3(s3_endpoint):
    url = "s3://lensminer-test/stores/c.zarr"
    group = _create(url, storage_options=s3_endpoint)
    group["images"][0:2] = np.ones((2, 3, 8, 8), np.float32)
    stores.mark_shard_done(group, 0)
    reopened = stores.open_store(url, "cutouts", storage_options=s3_endpoint)
    np.testing.assert_array_equal(reopened["images"][0], np.ones((3, 8, 8), np.float32))
    assert stores.pending_shards(reopened) == [1]


PLANES_LAYOUT = stores.CutoutLayout(
    "grz", 8, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/", invvar=True, maskbits=True
)


def test_cutout_store_planes_layout(tmp_path):
    group = stores.create_cutout_store(
        str(tmp_path / "planes.zarr"),
        target_id=["a", "b", "c", "d", "e"],
        ra=np.arange(5, dtype=float),
        dec=np.zeros(5),
        layout=PLANES_LAYOUT,
        shard_rows=4,
        chunk_rows=2,
    )

    assert group["invvar"].shape == (5, 3, 8, 8)
    assert group["invvar"].dtype == np.float32
    assert group["maskbits"].shape == (5, 8, 8)
    assert group["maskbits"].dtype == np.int32
    assert group["invvar"].shards == group["images"].shards
    assert group["invvar"].chunks == group["images"].chunks
    assert group["maskbits"].shards == (4, 8, 8)
    assert group["maskbits"].chunks == (2, 8, 8)
    assert group.attrs["planes"] == ["invvar", "maskbits"]


def test_cutout_store_without_planes(tmp_path):
    group = _create(str(tmp_path / "c.zarr"))
    assert "invvar" not in group
    assert "maskbits" not in group
    assert group.attrs["planes"] == []


def test_reopen_with_other_planes_raises(tmp_path):
    url = str(tmp_path / "c.zarr")
    _create(url)
    with pytest.raises(StoreError, match=r"contains the optional planes \[\], but this run"):
        stores.create_cutout_store(
            url,
            target_id=["a", "b", "c"],
            ra=np.arange(3, dtype=float),
            dec=np.zeros(3),
            layout=PLANES_LAYOUT,
            shard_rows=2,
            chunk_rows=1,
        )


def test_planes_with_jpeg_raise(tmp_path):
    layout = stores.CutoutLayout(
        "grz", 8, 0.262, "jpeg", "ls-dr9", "http://127.0.0.1/viewer/", maskbits=True
    )
    with pytest.raises(StoreError, match="need FITS images"):
        stores.create_cutout_store(
            str(tmp_path / "j.zarr"),
            target_id=["a"],
            ra=np.zeros(1),
            dec=np.zeros(1),
            layout=layout,
            shard_rows=2,
            chunk_rows=1,
        )
