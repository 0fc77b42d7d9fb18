"""Similarity search over embeddings with an exact faiss inner-product index.

Embeddings are L2-normalised before indexing, so the inner product is the cosine similarity.
The index holds only valid rows, under their row numbers in the stores. A JSON file next to the
index records which embedding array it was built from, so a query uses the same one.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import faiss
import fsspec
import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from lensminer import storage, stores
from lensminer.config import SimilarityConfig
from lensminer.exceptions import StoreError

__all__ = ["MAX_MATCH_ARCSEC", "build_index", "find_similar", "l2_normalise"]

logger = logging.getLogger(__name__)

# Largest separation in arcsec between a query position and the stored object it resolves to.
MAX_MATCH_ARCSEC = 5.0

# Rows added to the index per step, so building reads the store in bounded pieces.
ADD_BLOCK_ROWS = 65_536


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Return float32 rows of ``vectors`` (N, D) scaled to unit L2 norm; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def _metadata_url(index_url: str) -> str:
    return f"{index_url}.json"


def _open(url: str, mode: str, storage_options: dict[str, Any] | None) -> Any:
    options = storage_options if storage.is_remote(url) else None
    return fsspec.open(url, mode, **(options or {}))


def build_index(
    embeddings_url: str,
    index_url: str,
    similarity: SimilarityConfig,
    *,
    storage_options: dict[str, Any] | None = None,
) -> int:
    """Build an exact cosine-similarity index of the valid rows of an embedding store.

    The index is a ``faiss.IndexFlatIP`` inside a ``faiss.IndexIDMap`` whose ids are the store's
    row numbers. It is written with ``faiss.serialize_index`` to ``index_url``, and its metadata
    (embedding name, width, row count) to ``index_url + ".json"``.

    Returns
    -------
    int
        Vectors in the index.

    Raises
    ------
    StoreIncompleteError
        If the embedding store has unwritten shards.
    StoreError
        If the store has no valid rows.
    """
    group = stores.open_store(embeddings_url, "embeddings", storage_options=storage_options)
    stores.require_complete(group, embeddings_url)
    vectors = group[similarity.embedding]
    valid = group["valid"][:]
    if not valid.any():
        raise StoreError(
            f"{embeddings_url!r} has no valid rows to index; check the cutout store's status"
        )

    # Add normalised vectors block by block under their row numbers.
    index = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    for start in range(0, valid.shape[0], ADD_BLOCK_ROWS):
        rows = slice(start, min(start + ADD_BLOCK_ROWS, valid.shape[0]))
        keep = np.flatnonzero(valid[rows])
        if keep.size:
            block = l2_normalise(vectors[rows][keep])
            index.add_with_ids(block, (start + keep).astype(np.int64))

    with _open(index_url, "wb", storage_options) as handle:
        handle.write(faiss.serialize_index(index).tobytes())
    metadata = {
        "embedding": similarity.embedding,
        "dim": int(vectors.shape[1]),
        "n_vectors": int(index.ntotal),
        "n_rows": int(valid.shape[0]),
        "embeddings_url": embeddings_url,
    }
    with _open(_metadata_url(index_url), "w", storage_options) as handle:
        json.dump(metadata, handle, indent=2)

    logger.debug(
        "indexed %d %s vectors of %s into %s",
        index.ntotal,
        similarity.embedding,
        embeddings_url,
        index_url,
    )
    return int(index.ntotal)


def _load_index(
    index_url: str, storage_options: dict[str, Any] | None
) -> tuple[faiss.Index, dict[str, Any]]:
    try:
        with _open(index_url, "rb", storage_options) as handle:
            data = np.frombuffer(handle.read(), dtype=np.uint8)
        with _open(_metadata_url(index_url), "r", storage_options) as handle:
            metadata = json.load(handle)
    except FileNotFoundError as error:
        raise StoreError(f"no similarity index at {index_url!r}; run build_index first") from error
    return faiss.deserialize_index(data), metadata


def _resolve_position(
    cutouts: Any, valid: np.ndarray, ra: float, dec: float, max_separation_arcsec: float
) -> int:
    """Return the valid row nearest to (ra, dec) in degrees."""
    rows = np.flatnonzero(valid)
    catalog = SkyCoord(cutouts["ra"][:][rows] * u.deg, cutouts["dec"][:][rows] * u.deg)
    target = SkyCoord(ra * u.deg, dec * u.deg)
    separation = target.separation(catalog).to_value(u.arcsec)
    nearest = int(np.argmin(separation))
    if separation[nearest] > max_separation_arcsec:
        raise ValueError(
            f"no embedded object within {max_separation_arcsec} arcsec of ra={ra}, dec={dec}; "
            f"the nearest (row {rows[nearest]}) is {separation[nearest]:.1f} arcsec away. "
            "Pass its row, or check the coordinates"
        )
    return int(rows[nearest])


def find_similar(
    index_url: str,
    embeddings_url: str,
    cutouts_url: str,
    *,
    row: int | None = None,
    ra: float | None = None,
    dec: float | None = None,
    k: int = 10,
    max_separation_arcsec: float = MAX_MATCH_ARCSEC,
    storage_options: dict[str, Any] | None = None,
) -> Table:
    """Find the ``k`` objects most similar to a query object, excluding the query itself.

    Parameters
    ----------
    index_url
        Index written by :func:`build_index`.
    embeddings_url, cutouts_url
        The embedding store that was indexed and its cutout store.
    row
        Query by store row number.
    ra, dec
        Query by position in degrees (ICRS): the nearest valid object within
        ``max_separation_arcsec`` is the query.
    k
        Neighbours to return.

    Returns
    -------
    astropy.table.Table
        Columns ``rank`` (1 = most similar), ``row``, ``target_id``, ``ra``, ``dec`` (degrees) and
        ``similarity`` (cosine, in [-1, 1]); ``meta["query_row"]`` is the query's row.

    Raises
    ------
    ValueError
        If neither or both of ``row`` and (``ra``, ``dec``) are given, the row is out of range or
        has no embedding, or no object lies within ``max_separation_arcsec`` of the position.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    by_position = ra is not None or dec is not None
    if (row is None) == (not by_position):
        raise ValueError("give either row or both ra and dec")
    if by_position and (ra is None or dec is None):
        raise ValueError(f"a position query needs both ra and dec, got ra={ra}, dec={dec}")

    index, metadata = _load_index(index_url, storage_options)
    embeddings = stores.open_store(embeddings_url, "embeddings", storage_options=storage_options)
    cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    valid = embeddings["valid"][:]
    if metadata["n_rows"] != valid.shape[0]:
        raise StoreError(
            f"the index {index_url!r} was built from {metadata['n_rows']} rows but "
            f"{embeddings_url!r} has "
            f"{valid.shape[0]}; build the index again"
        )

    # Resolve the query to a row with an embedding.
    if by_position:
        row = _resolve_position(cutouts, valid, float(ra), float(dec), max_separation_arcsec)  # type: ignore[arg-type]
    assert row is not None
    if not 0 <= row < valid.shape[0]:
        raise ValueError(f"row {row} is out of range for a store of {valid.shape[0]} rows")
    if not valid[row]:
        raise ValueError(
            f"row {row} has no embedding because its cutout is not OK; query another row"
        )

    # Search one extra neighbour, because the query itself is usually the first hit.
    query = l2_normalise(embeddings[metadata["embedding"]][row : row + 1])
    similarity, ids = index.search(query, min(k + 1, index.ntotal))
    hits = [
        (int(i), float(s))
        for i, s in zip(ids[0], similarity[0], strict=True)
        if i >= 0 and i != row
    ][:k]

    rows = np.array([i for i, _ in hits], dtype=np.int64)
    table = Table(
        {
            "rank": np.arange(1, rows.size + 1),
            "row": rows,
            "target_id": cutouts["target_id"].get_orthogonal_selection((rows,)),
            "ra": cutouts["ra"].get_orthogonal_selection((rows,)),
            "dec": cutouts["dec"].get_orthogonal_selection((rows,)),
            "similarity": np.array([s for _, s in hits], dtype=np.float64),
        },
        meta={"query_row": int(row)},
    )
    return table
