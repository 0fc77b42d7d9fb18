"""A server-rendered web page for similarity search over a finished run directory.

Routes of the app that :func:`create_web_app` returns:

- ``/``: the search form and the top lens candidates of ``candidates.csv`` as thumbnails.
- ``/similar?row=..&k=..`` or ``/similar?ra=..&dec=..&k=..``: the query cutout and its ``k``
  most similar objects, each with a link to the Legacy Surveys viewer.
- ``/api/similar``: the same search as JSON.
- ``/cutout/{row}.png``: one cutout as a PNG, north up, with an ETag.

The page uses no JavaScript and no external resources, so it works offline. The faiss index,
the stores and the candidate table are opened once, when the app is created. Run it with
``lensminer web --run-dir RUN_DIR``.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import io
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import fsspec
import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from lensminer import storage
from lensminer.config import LensMinerConfig
from lensminer.plots import cutouts_to_display
from lensminer.score import viewer_url
from lensminer.similarity import MAX_MATCH_ARCSEC, QueryNotFoundError, SimilarityIndex

__all__ = ["MAX_K", "N_CANDIDATES", "SimilarityRun", "create_web_app"]

logger = logging.getLogger(__name__)

#: Largest number of neighbours one request may ask for.
MAX_K = 100

#: Lens candidates shown on the start page.
N_CANDIDATES = 24

#: Rendered cutout PNGs kept in memory; a noisy 152 px cutout gives a PNG of about 64 kB.
PNG_CACHE_SIZE = 512

#: Seconds a browser may reuse a cutout PNG before it revalidates with the ETag.
CUTOUT_MAX_AGE = 3600

LABEL_NAMES = {1: "lens", 0: "not a lens"}


class RequestError(ValueError):
    """A rejected search request, with the HTTP status of its error response."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Query:
    """A parsed search request: either ``row`` or both ``ra`` and ``dec`` (degrees) are set."""

    row: int | None
    ra: float | None
    dec: float | None
    k: int


class SimilarityRun:
    """The similarity index, stores and candidate table of one run, opened once for many requests.

    Parameters
    ----------
    config
        Configuration whose ``run_dir`` contains ``cutouts.zarr``, ``embeddings.zarr``,
        ``similarity.faiss`` and, optionally, ``candidates.csv``.

    Raises
    ------
    StoreNotFoundError
        If a store is missing.
    StoreError
        If the index is missing or does not match the stores.
    """

    def __init__(self, config: LensMinerConfig) -> None:
        options = config.storage.options or None
        self.run_dir = config.run_dir
        self.default_k = min(config.similarity.k, MAX_K)

        # Open the index with both stores, and build the position catalog now so that the first
        # position query does not pay for it.
        self.index = SimilarityIndex.open(
            config.url("similarity.faiss"),
            config.embeddings_url,
            config.cutouts_url,
            storage_options=options,
        )
        self.index.prepare_positions()
        self.n_rows = self.index.n_rows
        self.cutouts = self.index.cutouts
        attrs = self.cutouts.attrs.asdict()
        self.image_format = str(attrs["image_format"])
        self.bands = str(attrs["bands"])
        self.layer = str(attrs.get("layer", "ls-dr9"))
        self.labels = self.cutouts["label"] if "label" in self.cutouts else None

        self.candidates = read_top_candidates(
            config.url("candidates.csv"), N_CANDIDATES, self.n_rows, options
        )
        for record in self.candidates:
            record["viewer"] = viewer_url(record["ra"], record["dec"], self.layer)
        self.cutout_png = functools.lru_cache(maxsize=PNG_CACHE_SIZE)(self._render_png)
        logger.info(
            "serving %d indexed %s vectors of %d rows and %d candidates from %s",
            self.index.index.ntotal,
            self.index.embedding,
            self.n_rows,
            len(self.candidates),
            self.run_dir,
        )

    def check_row(self, row: int) -> None:
        """Raise :class:`RequestError` (400) unless ``row`` is a row of the stores."""
        if not 0 <= row < self.n_rows:
            raise RequestError(
                f"row {row} is out of range: the stores have rows 0 to {self.n_rows - 1}"
            )

    def describe(self, rows: np.ndarray) -> list[dict[str, Any]]:
        """Return target_id, ra, dec (degrees), label and viewer link of each of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.labels is not None:
            labels = self.labels.get_orthogonal_selection((rows,))
        else:
            labels = np.full(rows.size, -1)

        records = []
        for row, label in zip(rows.tolist(), labels.tolist(), strict=True):
            ra = float(self.index.ra[row])
            dec = float(self.index.dec[row])
            records.append(
                {
                    "row": row,
                    "target_id": str(self.index.target_id[row]),
                    "ra": ra,
                    "dec": dec,
                    "label": label if label in LABEL_NAMES else None,
                    "viewer": viewer_url(ra, dec, self.layer),
                }
            )
        return records

    def search(self, query: Query) -> dict[str, Any]:
        """Find the ``query.k`` objects most similar to the query object, excluding itself.

        :meth:`lensminer.similarity.SimilarityIndex.search` does the search, on the index opened
        at start-up.

        Returns
        -------
        dict
            ``query`` (the query object's record from :meth:`describe`), ``k``, ``embedding``
            and ``neighbours``: records with ``rank`` (1 = most similar) and ``similarity``
            (cosine, in [-1, 1]) added, most similar first.

        Raises
        ------
        RequestError
            400 for an out-of-range row, 404 for a row without an embedding or a position with
            no embedded object near it.
        """
        # QueryNotFoundError subclasses ValueError, so it is caught first.
        try:
            if query.row is not None:
                row = query.row
            else:
                assert query.ra is not None and query.dec is not None
                row = self.index.row_near(query.ra, query.dec, MAX_MATCH_ARCSEC)
            table = self.index.search(row, query.k)
        except QueryNotFoundError as error:
            raise RequestError(str(error), status_code=404) from error
        except ValueError as error:
            raise RequestError(str(error)) from error

        records = self.describe(np.asarray(table["row"]))
        neighbours = [
            {"rank": int(rank), **record, "similarity": float(similarity)}
            for rank, similarity, record in zip(
                table["rank"], table["similarity"], records, strict=True
            )
        ]
        return {
            "query": self.describe(np.array([row]))[0],
            "k": query.k,
            "embedding": self.index.embedding,
            "neighbours": neighbours,
        }

    def _render_png(self, row: int) -> bytes:
        images = np.nan_to_num(self.cutouts["images"][row : row + 1], nan=0.0)
        tile = cutouts_to_display(images, image_format=self.image_format, bands=self.bands)[0]
        buffer = io.BytesIO()
        Image.fromarray(tile, mode="RGB").save(buffer, format="PNG")
        return buffer.getvalue()


def read_top_candidates(
    url: str, count: int, n_rows: int, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Read the first ``count`` rows of a ``candidates.csv`` written by the score stage.

    Only the first ``count`` lines are read, because the file lists every valid row.

    Returns
    -------
    list of dict
        Records with ``rank``, ``row``, ``target_id``, ``ra``, ``dec`` (degrees), ``score``
        (lens probability) and ``label`` (1, 0 or None), best first. The list is empty, and a
        warning is logged, if the file is missing or unreadable.
    """
    options = storage_options if storage.is_remote(url) else None
    records: list[dict[str, Any]] = []
    try:
        with fsspec.open(url, "r", **(options or {})) as handle:
            for line_number, entry in enumerate(csv.DictReader(handle), start=2):
                if len(records) == count:
                    break
                label = int(entry.get("label") or -1)
                record = {
                    "rank": int(entry["rank"]),
                    "row": int(entry["row"]),
                    "target_id": entry["target_id"],
                    "ra": float(entry["ra"]),
                    "dec": float(entry["dec"]),
                    "score": float(entry["score"]),
                    "label": label if label in LABEL_NAMES else None,
                }
                if not 0 <= record["row"] < n_rows:
                    raise ValueError(
                        f"line {line_number} has row {record['row']}, outside the store's "
                        f"{n_rows} rows"
                    )
                records.append(record)
    except FileNotFoundError:
        logger.warning("no candidate table at %s; run `lensminer score` to list candidates", url)
        return []
    except (KeyError, ValueError) as error:
        logger.warning("cannot read the candidate table %s (%r); listing no candidates", url, error)
        return []
    return records


def parse_query(params: dict[str, str], default_k: int) -> Query:
    """Parse the query string of a search into a :class:`Query`.

    Empty fields count as missing, because the search form always sends every field.

    Raises
    ------
    RequestError
        400 if a value is not a number or out of range, or if neither or both of ``row`` and
        (``ra``, ``dec``) are given.
    """
    fields = {name: params.get(name, "").strip() for name in ("row", "ra", "dec", "k")}

    k = _parse_int("k", fields["k"]) if fields["k"] else default_k
    if not 1 <= k <= MAX_K:
        raise RequestError(f"k must be between 1 and {MAX_K}, got {k}")

    if fields["row"] and (fields["ra"] or fields["dec"]):
        raise RequestError("give either a row number or RA and Dec, not both")
    if fields["row"]:
        return Query(row=_parse_int("row", fields["row"]), ra=None, dec=None, k=k)
    if not (fields["ra"] and fields["dec"]):
        raise RequestError("give a row number, or both RA and Dec in degrees")

    ra = _parse_float("RA", fields["ra"])
    dec = _parse_float("Dec", fields["dec"])
    if not 0.0 <= ra < 360.0:
        raise RequestError(f"RA must be in [0, 360) degrees, got {ra:g}")
    if not -90.0 <= dec <= 90.0:
        raise RequestError(f"Dec must be in [-90, 90] degrees, got {dec:g}")
    return Query(row=None, ra=ra, dec=dec, k=k)


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise RequestError(f"{name} must be a whole number, got {text!r}") from None


def _parse_float(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RequestError(f"{name} must be a number in degrees, got {text!r}") from None
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number of degrees, got {text!r}")
    return value


# HTML rendering. Every value that comes from a request or a store passes through _text or
# _attribute, which escape it.

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; background: #111; color: #ddd; }
a { color: #8cf; }
h1 a { color: inherit; text-decoration: none; }
form { display: flex; flex-wrap: wrap; gap: 0.75rem; align-items: end; margin-bottom: 1rem; }
label { display: flex; flex-direction: column; font-size: 0.85rem; }
input { width: 8rem; }
.error { color: #f88; font-weight: bold; }
.grid { display: flex; flex-wrap: wrap; gap: 0.75rem; }
figure { margin: 0; width: 160px; font-size: 0.8rem; }
figure img { width: 160px; height: 160px; image-rendering: pixelated; background: #000; }
figcaption { overflow-wrap: anywhere; }
.query figure { width: 240px; }
.query figure img { width: 240px; height: 240px; }
"""


def _text(value: object) -> str:
    return html.escape(str(value), quote=False)


def _attribute(value: object) -> str:
    return html.escape(str(value), quote=True)


def _similar_link(row: int, k: int) -> str:
    return "/similar?" + urlencode({"row": row, "k": k})


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        '<h1><a href="/">LensMiner similarity search</a></h1>\n'
        f"{body}\n</body>\n</html>\n"
    )


def _form(params: dict[str, str], default_k: int, message: str | None = None) -> str:
    values = {name: params.get(name, "") for name in ("row", "ra", "dec")}
    values["k"] = params.get("k", "") or str(default_k)
    inputs = "".join(
        f'<label>{caption}<input name="{name}" value="{_attribute(values[name])}" '
        f'inputmode="decimal"></label>'
        for name, caption in (
            ("row", "Row number"),
            ("ra", "RA (deg)"),
            ("dec", "Dec (deg)"),
            ("k", f"k (1 to {MAX_K})"),
        )
    )
    error = f'<p class="error" role="alert">{_text(message)}</p>\n' if message else ""
    return (
        f'{error}<form action="/similar" method="get">{inputs}'
        '<button type="submit">Find similar</button></form>\n'
        "<p>Search by the row number of an object, or by its position: the nearest embedded "
        f"object within {MAX_MATCH_ARCSEC:g} arcsec is the query.</p>\n"
    )


def _tile(record: dict[str, Any], k: int, css_class: str, heading: str, detail: str) -> str:
    row = record["row"]
    target_id = record["target_id"]
    label = LABEL_NAMES.get(record["label"]) if record["label"] is not None else None
    lines = [
        f"<strong>{_text(heading)}</strong> {_text(target_id)}",
        f"RA {record['ra']:.6f}, Dec {record['dec']:.6f}",
        _text(detail) + (f" &middot; {_text(label)}" if label else ""),
        f'<a href="{_attribute(record["viewer"])}">Legacy Surveys viewer</a>',
    ]
    return (
        f'<figure class="{css_class}" data-row="{row}">'
        f'<a href="{_attribute(_similar_link(row, k))}" title="Find objects similar to this one">'
        f'<img src="/cutout/{row}.png" alt="cutout of {_attribute(target_id)}"></a>'
        f"<figcaption>{'<br>'.join(lines)}</figcaption></figure>"
    )


def _index_page(run: SimilarityRun) -> str:
    k = run.default_k
    if run.candidates:
        tiles = "".join(
            _tile(record, k, "candidate", f"#{record['rank']}", f"p = {record['score']:.3f}")
            for record in run.candidates
        )
        candidates = (
            f"<h2>Top {len(run.candidates)} lens candidates</h2>\n"
            "<p>Select a cutout to find objects similar to it.</p>\n"
            f'<div class="grid">{tiles}</div>'
        )
    else:
        candidates = (
            "<p>No lens candidates to show: the run directory has no readable candidates.csv. "
            "Run <code>lensminer score</code> to write it.</p>"
        )
    return _page("LensMiner similarity search", _form({}, k) + candidates)


def _similar_page(run: SimilarityRun, params: dict[str, str], result: dict[str, Any]) -> str:
    k = result["k"]
    query = result["query"]
    neighbours = result["neighbours"]
    tiles = "".join(
        _tile(
            record, k, "neighbour", f"#{record['rank']}", f"similarity {record['similarity']:.4f}"
        )
        for record in neighbours
    )
    body = (
        _form(params, run.default_k)
        + '<h2>Query</h2>\n<div class="query">'
        + _tile(query, k, "query", f"row {query['row']}", f"{result['embedding']} embedding")
        + "</div>\n"
        + f"<h2>{len(neighbours)} most similar objects</h2>\n"
        + f'<div class="grid">{tiles}</div>'
    )
    return _page(f"Objects similar to {query['target_id']}", body)


def create_web_app(config: LensMinerConfig) -> Starlette:
    """Create the similarity-search web app over the run directory ``config.run_dir``.

    The index, the stores and the top of ``candidates.csv`` are opened here, once. Endpoints are
    synchronous, so Starlette runs them in its thread pool.

    Raises
    ------
    StoreNotFoundError, StoreError
        As :class:`SimilarityRun` does, if the run has no index or stores that match it.
    """
    run = SimilarityRun(config)

    def index_page(request: Request) -> HTMLResponse:
        return HTMLResponse(_index_page(run))

    def similar_page(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        try:
            result = run.search(parse_query(params, run.default_k))
        except RequestError as error:
            logger.info("rejected search %s: %s", request.url.query, error)
            body = _form(params, run.default_k, str(error))
            return HTMLResponse(_page("Search failed", body), status_code=error.status_code)
        return HTMLResponse(_similar_page(run, params, result))

    def similar_api(request: Request) -> JSONResponse:
        try:
            result = run.search(parse_query(dict(request.query_params), run.default_k))
        except RequestError as error:
            logger.info("rejected API search %s: %s", request.url.query, error)
            return JSONResponse({"error": str(error)}, status_code=error.status_code)
        return JSONResponse(result)

    def cutout(request: Request) -> Response:
        row = int(request.path_params["row"])
        try:
            run.check_row(row)
        except RequestError as error:
            logger.info("rejected cutout request for row %d: %s", row, error)
            return Response(str(error), status_code=404, media_type="text/plain")

        png = run.cutout_png(row)
        etag = '"' + hashlib.sha256(png).hexdigest()[:32] + '"'
        headers = {"ETag": etag, "Cache-Control": f"public, max-age={CUTOUT_MAX_AGE}"}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    routes = [
        Route("/", index_page),
        Route("/similar", similar_page),
        Route("/api/similar", similar_api),
        Route("/cutout/{row:int}.png", cutout),
    ]
    app = Starlette(routes=routes)
    app.state.run = run
    return app
