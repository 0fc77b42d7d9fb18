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
import zarr
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from lensminer import storage, stores
from lensminer.config import SimilarityConfig
from lensminer.exceptions import InvalidQueryError, QueryNotFoundError, StoreError

__all__ = [
    "MAX_MATCH_ARCSEC",
    "QueryNotFoundError",
    "SimilarityIndex",
    "build_index",
    "find_similar",
    "l2_normalise",
]

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


def _read_index(
    index_url: str, storage_options: dict[str, Any] | None
) -> tuple[faiss.Index, dict[str, Any]]:
    try:
        with _open(index_url, "rb", storage_options) as handle:
            data = np.frombuffer(handle.read(), dtype=np.uint8)
        with _open(_metadata_url(index_url), "r", storage_options) as handle:
            metadata = json.load(handle)
    except FileNotFoundError as error:
        raise StoreError(
            f"no similarity index at {index_url!r}; build it with `lensminer index --run-dir DIR` "
            "or check that the run directory exists"
        ) from error
    return faiss.deserialize_index(data), metadata


def _format_separation(arcsec: float) -> str:
    return f"{arcsec:.1f} arcsec" if arcsec < 3600.0 else f"{arcsec / 3600.0:.2f} deg"


class SimilarityIndex:
    """A faiss index opened with the stores it was built from, ready for many queries.

    Use :meth:`open`. The index, its metadata and the per-row columns ``valid``, ``target_id``,
    ``ra`` and ``dec`` are read once. Each query reads one embedding row from the store.
    ``search`` and ``row_near`` only read shared state, so threads may call them concurrently.

    The per-row columns take about 63 bytes a row (tracemalloc, 10^6 rows with 22-character
    ids), beside the flat faiss index's 4 D + 8 bytes a vector.

    Attributes
    ----------
    index : faiss.Index
        ``IndexIDMap`` over ``IndexFlatIP`` whose ids are store row numbers.
    embedding : str
        Name of the indexed embedding array, ``"representation"`` or ``"projection"``.
    vectors : zarr.Array
        The indexed embeddings, shape (N, D), float32, not normalised.
    valid : numpy.ndarray
        Shape (N,), bool: True for rows that have an embedding and are in the index.
    target_id : numpy.ndarray
        Shape (N,), str: the target identifier of each row.
    ra, dec : numpy.ndarray
        Shape (N,), float64: ICRS position of each row in degrees.
    cutouts : zarr.Group
        The cutout store, for columns read on demand (``status``, ``images``, ``label``).

    Raises
    ------
    StoreError
        If the index does not match the stores: another row count, vector count or width, or a
        cutout store with other target ids than the embedding store.
    """

    def __init__(
        self,
        index: faiss.Index,
        metadata: dict[str, Any],
        embeddings: zarr.Group,
        cutouts: zarr.Group,
        *,
        index_url: str,
        embeddings_url: str,
        cutouts_url: str,
    ) -> None:
        self.index = index
        self.embedding = str(metadata["embedding"])
        self.vectors = embeddings[self.embedding]
        self.valid = embeddings["valid"][:]
        self.cutouts = cutouts

        # The index, the embedding store and the cutout store must describe the same rows.
        n_rows = self.valid.shape[0]
        rebuild = "build the index again (`lensminer index` or build_index)"
        if metadata["n_rows"] != n_rows:
            raise StoreError(
                f"the index {index_url!r} was built from {metadata['n_rows']} rows but "
                f"{embeddings_url!r} has {n_rows}; {rebuild}"
            )
        n_valid = int(np.count_nonzero(self.valid))
        if index.ntotal != n_valid or index.d != self.vectors.shape[1]:
            raise StoreError(
                f"the index {index_url!r} contains {index.ntotal} vectors of width {index.d} but "
                f"{embeddings_url!r} has {n_valid} valid {self.embedding} rows of width "
                f"{self.vectors.shape[1]}; {rebuild}"
            )
        self.target_id = cutouts["target_id"][:]
        if not np.array_equal(self.target_id, embeddings["target_id"][:]):
            raise StoreError(
                f"the cutout store {cutouts_url!r} ({self.target_id.shape[0]} rows) has other "
                f"target ids than the embedding store {embeddings_url!r} ({n_rows} rows); pass "
                "the cutout store that the embeddings were computed from"
            )
        self.ra = np.asarray(cutouts["ra"][:], dtype=np.float64)
        self.dec = np.asarray(cutouts["dec"][:], dtype=np.float64)

        # Sky catalog of the valid rows for position queries, built on the first one.
        self._valid_rows = np.flatnonzero(self.valid)
        self._catalog: SkyCoord | None = None

        logger.debug(
            "opened similarity index %s: %d %s vectors over %d rows",
            index_url,
            index.ntotal,
            self.embedding,
            n_rows,
        )

    @classmethod
    def open(
        cls,
        index_url: str,
        embeddings_url: str,
        cutouts_url: str,
        *,
        storage_options: dict[str, Any] | None = None,
    ) -> SimilarityIndex:
        """Open an index written by :func:`build_index` with its embedding and cutout stores.

        Raises
        ------
        StoreError
            If there is no index at ``index_url``, or it does not match the stores.
        StoreNotFoundError
            If a store is missing.
        """
        index, metadata = _read_index(index_url, storage_options)
        embeddings = stores.open_store(
            embeddings_url, "embeddings", storage_options=storage_options
        )
        cutouts = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
        return cls(
            index,
            metadata,
            embeddings,
            cutouts,
            index_url=index_url,
            embeddings_url=embeddings_url,
            cutouts_url=cutouts_url,
        )

    @property
    def n_rows(self) -> int:
        """Rows of the stores, valid or not."""
        return int(self.valid.shape[0])

    def prepare_positions(self) -> None:
        """Build the sky catalog of the valid rows and its KD-tree now, not on the first query."""
        self._position_catalog()

    def _position_catalog(self) -> SkyCoord:
        if self._catalog is None:
            # NOTE: the catalog and its KD-tree stay in memory, roughly 100 bytes per valid row
            # (an estimate: tracemalloc counts 63 for 10^6 rows but misses the KD-tree's C++
            # nodes).
            catalog = SkyCoord(
                self.ra[self._valid_rows] * u.deg, self.dec[self._valid_rows] * u.deg
            )
            # Matching once builds the KD-tree and caches it on the catalog.
            catalog[:1].match_to_catalog_sky(catalog)
            self._catalog = catalog
        return self._catalog

    def check_row(self, row: int) -> None:
        """Raise unless ``row`` is a row of the stores with an embedding.

        Raises
        ------
        InvalidQueryError
            If ``row`` is outside the stores.
        QueryNotFoundError
            If the row's cutout is not OK, so it has no embedding.
        """
        if not 0 <= row < self.n_rows:
            raise InvalidQueryError(
                f"row {row} is out of range: the stores have rows 0 to {self.n_rows - 1}"
            )
        if not self.valid[row]:
            status = stores.RowStatus(int(self.cutouts["status"][row])).name
            raise QueryNotFoundError(
                f"row {row} has no embedding because its cutout status is {status}; "
                "query another row"
            )

    def row_near(
        self, ra: float, dec: float, max_separation_arcsec: float = MAX_MATCH_ARCSEC
    ) -> int:
        """Return the row with an embedding nearest to (``ra``, ``dec``), ICRS in degrees.

        Raises
        ------
        InvalidQueryError
            If ``ra`` is not in [0, 360) or ``dec`` not in [-90, 90] degrees.
        QueryNotFoundError
            If the nearest row with an embedding is more than ``max_separation_arcsec`` away.
        """
        if not (0.0 <= ra < 360.0 and -90.0 <= dec <= 90.0):
            raise InvalidQueryError(
                f"a position needs RA in [0, 360) and Dec in [-90, 90] degrees, "
                f"got ra={ra}, dec={dec}"
            )

        target = SkyCoord(ra * u.deg, dec * u.deg)
        nearest, separation, _ = target.match_to_catalog_sky(self._position_catalog())
        separation_arcsec = float(np.ravel(separation.to_value(u.arcsec))[0])
        row = int(self._valid_rows[np.ravel(nearest)[0]])
        if separation_arcsec > max_separation_arcsec:
            raise QueryNotFoundError(
                f"no embedded object within {max_separation_arcsec:g} arcsec of RA {ra:g}, "
                f"Dec {dec:g}; the nearest (row {row}) is "
                f"{_format_separation(separation_arcsec)} away. "
                "Query by its row or check the coordinates"
            )
        return row

    def search(self, row: int, k: int) -> Table:
        """Find the ``k`` rows most similar to ``row``, excluding ``row`` itself.

        Returns
        -------
        astropy.table.Table
            Columns ``rank`` (1 = most similar), ``row``, ``target_id``, ``ra``, ``dec``
            (degrees) and ``similarity`` (cosine, in [-1, 1]), most similar first;
            ``meta["query_row"]`` is ``row``. Fewer than ``k`` rows when the index contains fewer
            other vectors.

        Raises
        ------
        ValueError
            If ``k`` is below 1 or ``row`` is outside the stores.
        QueryNotFoundError
            If ``row`` has no embedding.
        """
        if k < 1:
            raise InvalidQueryError(f"k must be at least 1, got {k}")
        self.check_row(row)

        # Search one extra neighbour, because the query itself is usually the first hit.
        query = l2_normalise(self.vectors[row : row + 1])
        similarity, ids = self.index.search(query, min(k + 1, self.index.ntotal))
        hits = [
            (int(i), float(s))
            for i, s in zip(ids[0], similarity[0], strict=True)
            if i >= 0 and i != row
        ][:k]

        rows = np.array([i for i, _ in hits], dtype=np.int64)
        return Table(
            {
                "rank": np.arange(1, rows.size + 1),
                "row": rows,
                "target_id": self.target_id[rows],
                "ra": self.ra[rows],
                "dec": self.dec[rows],
                "similarity": np.array([s for _, s in hits], dtype=np.float64),
            },
            meta={"query_row": int(row)},
        )


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

    This opens a :class:`SimilarityIndex` for one query; open one yourself for many queries.

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
        As :meth:`SimilarityIndex.search` returns it.

    Raises
    ------
    ValueError
        If neither or both of ``row`` and (``ra``, ``dec``) are given, or the row is out of range.
    QueryNotFoundError
        A ``ValueError``, if the row has no embedding or no object lies within
        ``max_separation_arcsec`` of the position.
    StoreError
        If the index is missing or does not match the stores.
    """
    if k < 1:
        raise InvalidQueryError(f"k must be at least 1, got {k}")
    by_position = ra is not None or dec is not None
    if (row is None) == (not by_position):
        raise InvalidQueryError("give either row or both ra and dec")
    if by_position and (ra is None or dec is None):
        raise InvalidQueryError(f"a position query needs both ra and dec, got ra={ra}, dec={dec}")

    index = SimilarityIndex.open(
        index_url, embeddings_url, cutouts_url, storage_options=storage_options
    )
    if ra is not None and dec is not None:
        row = index.row_near(float(ra), float(dec), max_separation_arcsec)
    assert row is not None
    return index.search(row, k)
