"""Tests of the faiss similarity index and queries."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from lensminer import stores
from lensminer.config import SimilarityConfig
from lensminer.exceptions import InvalidQueryError, StoreError, StoreIncompleteError
from lensminer.similarity import (
    QueryNotFoundError,
    SimilarityIndex,
    build_index,
    find_similar,
    l2_normalise,
)

LAYOUT = stores.CutoutLayout("grz", 8, 0.262, "jpeg", "ls-dr9", "http://127.0.0.1/viewer/")
N_ROWS, DIM = 100, 16


def _make_stores(
    base, representation, projection, *, status, shard_rows=32, storage_options=None, done=True
):
    n = representation.shape[0]
    ok = status == int(stores.RowStatus.OK)
    ra = 30.0 + 0.01 * np.arange(n)
    cutouts = stores.create_cutout_store(
        f"{base}/cutouts.zarr",
        target_id=[f"t{i:03d}" for i in range(n)],
        ra=ra,
        dec=np.full(n, -5.0),
        layout=LAYOUT,
        shard_rows=shard_rows,
        chunk_rows=shard_rows,
        storage_options=storage_options,
    )
    cutouts["status"][:] = status
    embeddings = stores.create_embedding_store(
        f"{base}/embeddings.zarr",
        target_id=np.asarray(cutouts["target_id"][:].tolist()),
        representation_dim=representation.shape[1],
        projection_dim=projection.shape[1],
        dtype="float32",
        shard_rows=shard_rows,
        storage_options=storage_options,
    )
    embeddings["representation"][:] = representation * ok[:, None]
    embeddings["projection"][:] = projection * ok[:, None]
    embeddings["valid"][:] = ok
    if done:
        for index in range(stores.shard_count(n, shard_rows)):
            stores.mark_shard_done(cutouts, index)
            stores.mark_shard_done(embeddings, index)
    return f"{base}/cutouts.zarr", f"{base}/embeddings.zarr"


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(7)
    representation = rng.normal(size=(N_ROWS, DIM)).astype(np.float32) * rng.uniform(
        0.5, 3, (N_ROWS, 1)
    )
    projection = rng.normal(size=(N_ROWS, 4)).astype(np.float32)
    status = np.full(N_ROWS, int(stores.RowStatus.OK), "uint8")
    status[[5, 50, 99]] = int(stores.RowStatus.NO_COVERAGE)
    cutouts_url, embeddings_url = _make_stores(tmp_path, representation, projection, status=status)
    index_url = str(tmp_path / "similarity.faiss")
    build_index(embeddings_url, index_url, SimilarityConfig())
    return {
        "cutouts": cutouts_url,
        "embeddings": embeddings_url,
        "index": index_url,
        "representation": representation,
        "projection": projection,
        "valid": status == 1,
    }


def _brute_force(vectors, valid, row, k):
    """Return the k most cosine-similar valid rows to ``row``, by a plain numpy loop."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit[row]
    candidates = [i for i in np.argsort(-cosine, kind="stable") if valid[i] and i != row]
    return candidates[:k], cosine


def test_index_counts_valid_rows(run):
    assert build_index(run["embeddings"], run["index"], SimilarityConfig()) == N_ROWS - 3


def test_similar_matches_brute_force(run):
    table = find_similar(run["index"], run["embeddings"], run["cutouts"], row=12, k=10)
    expected, cosine = _brute_force(run["representation"], run["valid"], 12, 10)
    assert list(table["row"]) == expected
    np.testing.assert_allclose(table["similarity"], cosine[expected], rtol=1e-5)


def test_similar_excludes_query(run):
    table = find_similar(run["index"], run["embeddings"], run["cutouts"], row=12, k=N_ROWS)
    assert 12 not in set(table["row"])
    assert len(table) == N_ROWS - 4


def test_similar_skips_invalid_rows(run):
    table = find_similar(run["index"], run["embeddings"], run["cutouts"], row=0, k=N_ROWS)
    assert set(table["row"]).isdisjoint({5, 50, 99})


def test_similar_columns(run):
    table = find_similar(run["index"], run["embeddings"], run["cutouts"], row=3, k=4)
    assert table.colnames == ["rank", "row", "target_id", "ra", "dec", "similarity"]
    assert list(table["rank"]) == [1, 2, 3, 4]
    assert list(table["target_id"]) == [f"t{row:03d}" for row in table["row"]]
    np.testing.assert_allclose(table["ra"], 30.0 + 0.01 * np.asarray(table["row"]))


def test_similar_by_position(run):
    # Row 20 sits at ra = 30.2; 2 arcsec away still resolves to it.
    table = find_similar(
        run["index"], run["embeddings"], run["cutouts"], ra=30.2 + 2 / 3600, dec=-5.0, k=5
    )
    assert table.meta["query_row"] == 20
    assert list(table["row"]) == _brute_force(run["representation"], run["valid"], 20, 5)[0]


def test_similar_by_position_too_far(run):
    # 0.01 deg of RA at dec -5 deg spans 36 cos(5 deg) = 35.9 arcsec.
    with pytest.raises(ValueError, match=r"nearest \(row 0\) is 35.9 arcsec away"):
        find_similar(run["index"], run["embeddings"], run["cutouts"], ra=30.0 - 0.01, dec=-5.0)


def test_similar_position_skips_invalid_row(run):
    # Row 50 has no embedding, so a query on its position resolves to a neighbour 35.9 arcsec away.
    with pytest.raises(ValueError, match=r"\(row 49\) is 35.9 arcsec away"):
        find_similar(run["index"], run["embeddings"], run["cutouts"], ra=30.5, dec=-5.0)


def test_similar_invalid_row_raises(run):
    with pytest.raises(ValueError, match="row 50 has no embedding"):
        find_similar(run["index"], run["embeddings"], run["cutouts"], row=50)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({}, "either row or both ra and dec"),
        ({"row": 1, "ra": 30.0, "dec": -5.0}, "either row or both ra and dec"),
        ({"ra": 30.0}, "needs both ra and dec"),
        ({"row": N_ROWS}, "out of range"),
    ],
)
def test_similar_bad_query(run, query, message):
    with pytest.raises(ValueError, match=message):
        find_similar(run["index"], run["embeddings"], run["cutouts"], **query)


def test_projection_index_uses_projection(run, tmp_path):
    index_url = str(tmp_path / "projection.faiss")
    build_index(run["embeddings"], index_url, SimilarityConfig(embedding="projection"))
    table = find_similar(index_url, run["embeddings"], run["cutouts"], row=7, k=6)
    assert list(table["row"]) == _brute_force(run["projection"], run["valid"], 7, 6)[0]


def test_missing_index_raises(run, tmp_path):
    with pytest.raises(StoreError, match="lensminer index"):
        find_similar(str(tmp_path / "none.faiss"), run["embeddings"], run["cutouts"], row=1)


def test_incomplete_store_not_indexed(tmp_path):
    vectors = np.ones((10, 3), np.float32)
    status = np.ones(10, "uint8")
    _, embeddings_url = _make_stores(tmp_path, vectors, vectors, status=status, done=False)
    with pytest.raises(StoreIncompleteError):
        build_index(embeddings_url, str(tmp_path / "i.faiss"), SimilarityConfig())


def test_l2_normalise_zero_row():
    unit = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0]])


def test_similar_on_s3(s3_endpoint):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    base = "s3://lensminer-test/similarity"
    cutouts_url, embeddings_url = _make_stores(
        base, vectors, vectors, status=np.ones(40, "uint8"), storage_options=s3_endpoint
    )
    index_url = f"{base}/similarity.faiss"
    assert (
        build_index(embeddings_url, index_url, SimilarityConfig(), storage_options=s3_endpoint)
        == 40
    )
    table = find_similar(
        index_url, embeddings_url, cutouts_url, row=9, k=5, storage_options=s3_endpoint
    )
    assert list(table["row"]) == _brute_force(vectors, np.ones(40, bool), 9, 5)[0]


def _open_index(run) -> SimilarityIndex:
    return SimilarityIndex.open(run["index"], run["embeddings"], run["cutouts"])


def test_index_search_matches_find_similar(run):
    index = _open_index(run)
    for row in (0, 12, 49, 98):
        table = index.search(row, 7)
        expected = find_similar(run["index"], run["embeddings"], run["cutouts"], row=row, k=7)
        assert list(table["row"]) == list(expected["row"]), row
        assert list(table["target_id"]) == list(expected["target_id"]), row
        np.testing.assert_array_equal(table["similarity"], expected["similarity"])


def test_index_row_near_nearest(run):
    # Rows are 0.01 deg apart in RA, so 0.004 deg east of row 30 is nearest to row 30.
    index = _open_index(run)
    assert index.row_near(30.3 + 0.004, -5.0, max_separation_arcsec=20.0) == 30


def test_index_row_near_too_far(run):
    with pytest.raises(QueryNotFoundError, match=r"\(row 0\) is 35.9 arcsec away"):
        _open_index(run).row_near(30.0 - 0.01, -5.0)


def test_index_row_near_far_in_degrees(run):
    with pytest.raises(QueryNotFoundError, match=r"is \d+\.\d\d deg away"):
        _open_index(run).row_near(200.0, 40.0)


@pytest.mark.parametrize(
    ("ra", "dec"),
    [(float("nan"), 0.0), (30.0, float("inf")), (30.0, 91.0), (400.0, 0.0), (-1.0, 0.0)],
)
def test_index_row_near_bad_position(run, ra, dec):
    with pytest.raises(InvalidQueryError, match=r"RA in \[0, 360\) and Dec in \[-90, 90\]"):
        _open_index(run).row_near(ra, dec)


def test_index_invalid_row_status(run):
    with pytest.raises(QueryNotFoundError, match="row 5 has no embedding .* NO_COVERAGE"):
        _open_index(run).search(5, 3)


def test_index_search_bad_k(run):
    with pytest.raises(ValueError, match="k must be at least 1, got 0"):
        _open_index(run).search(1, 0)


def test_index_columns_loaded(run):
    index = _open_index(run)
    assert index.n_rows == N_ROWS
    assert index.embedding == "representation"
    assert list(index.target_id[:3]) == ["t000", "t001", "t002"]
    np.testing.assert_allclose(index.ra, 30.0 + 0.01 * np.arange(N_ROWS))
    np.testing.assert_array_equal(index.valid, run["valid"])


def test_index_stale_after_rows_change(run):
    # A row that turned valid after indexing would be missing from every search.
    zarr.open_group(run["embeddings"], mode="r+")["valid"][5] = True
    with pytest.raises(StoreError, match="contains 97 vectors .* has 98 valid"):
        _open_index(run)


def test_index_other_cutout_store(run, tmp_path):
    stores.create_cutout_store(
        str(tmp_path / "other.zarr"),
        target_id=[f"u{i:03d}" for i in range(N_ROWS)],
        ra=np.zeros(N_ROWS),
        dec=np.zeros(N_ROWS),
        layout=LAYOUT,
        shard_rows=32,
        chunk_rows=32,
    )
    with pytest.raises(StoreError, match="other target ids"):
        SimilarityIndex.open(run["index"], run["embeddings"], str(tmp_path / "other.zarr"))
