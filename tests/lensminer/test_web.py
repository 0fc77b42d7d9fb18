"""Tests of the similarity-search web app, served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import io
import re

import fsspec
import httpx
import numpy as np
import pytest
import zarr
from astropy.table import Table
from PIL import Image
from typer.testing import CliRunner

from lensminer import stores
from lensminer.cli import app as cli_app
from lensminer.config import LensMinerConfig
from lensminer.exceptions import StoreError
from lensminer.infra.survey_server import serve_in_thread
from lensminer.plots import cutouts_to_display
from lensminer.similarity import build_index, find_similar
from lensminer.web import N_CANDIDATES, create_web_app

N_ROWS, DIM, SIZE, SHARD_ROWS = 60, 8, 16, 16
MISSING_ROW = 7  # a row whose cutout failed, so it has no embedding
EVIL_ROW = 11
EVIL_ID = "<script>alert('x')</script>&\"x\""
LAYOUT = stores.CutoutLayout("grz", SIZE, 0.262, "fits", "ls-dr9", "http://127.0.0.1/viewer/")


def _ra(rows: np.ndarray) -> np.ndarray:
    return 150.0 + 0.01 * np.asarray(rows)


def _write_candidates(
    url: str, rows: np.ndarray, target_ids: list[str], labels: np.ndarray, storage_options
) -> None:
    table = Table(
        {
            "rank": np.arange(1, rows.size + 1),
            "row": rows,
            "target_id": [target_ids[row] for row in rows],
            "ra": _ra(rows),
            "dec": np.full(rows.size, 2.0),
            "score": np.linspace(0.99, 0.5, rows.size),
            "label": labels[rows],
            "split": ["unlabelled"] * rows.size,
            "viewer": ["https://www.legacysurvey.org/viewer"] * rows.size,
        }
    )
    buffer = io.StringIO()
    table.write(buffer, format="ascii.csv")
    with fsspec.open(url, "w", **(storage_options or {})) as handle:
        handle.write(buffer.getvalue())


def _make_run(run_dir, *, candidates: bool = True, storage_options=None) -> LensMinerConfig:
    """Write a cutout store, an embedding store, an index and candidates.csv into ``run_dir``."""
    rng = np.random.default_rng(11)
    target_ids = [f"obj{i:03d}" for i in range(N_ROWS)]
    target_ids[EVIL_ROW] = EVIL_ID
    labels = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=N_ROWS)
    status = np.full(N_ROWS, int(stores.RowStatus.OK), dtype=np.uint8)
    status[MISSING_ROW] = int(stores.RowStatus.FAILED)
    ok = status == int(stores.RowStatus.OK)
    config = LensMinerConfig(run_dir=str(run_dir), storage={"options": storage_options or {}})

    # Cutouts: faint noise in nanomaggies with one bright pixel in FITS row 0, the south edge.
    images = rng.normal(0.0, 0.01, size=(N_ROWS, 3, SIZE, SIZE)).astype(np.float32)
    images[:, :, 0, 3] = 5.0
    cutouts = stores.create_cutout_store(
        config.cutouts_url,
        target_id=target_ids,
        ra=_ra(np.arange(N_ROWS)),
        dec=np.full(N_ROWS, 2.0),
        layout=LAYOUT,
        shard_rows=SHARD_ROWS,
        chunk_rows=SHARD_ROWS,
        columns={"label": labels},
        storage_options=storage_options,
    )
    cutouts["images"][:] = images * ok[:, None, None, None]
    cutouts["status"][:] = status

    embeddings = stores.create_embedding_store(
        config.embeddings_url,
        target_id=np.asarray(target_ids),
        representation_dim=DIM,
        projection_dim=4,
        dtype="float32",
        shard_rows=SHARD_ROWS,
        storage_options=storage_options,
    )
    embeddings["representation"][:] = (
        rng.normal(size=(N_ROWS, DIM)).astype(np.float32) * ok[:, None]
    )
    embeddings["projection"][:] = rng.normal(size=(N_ROWS, 4)).astype(np.float32) * ok[:, None]
    embeddings["valid"][:] = ok
    for index in range(stores.shard_count(N_ROWS, SHARD_ROWS)):
        stores.mark_shard_done(cutouts, index)
        stores.mark_shard_done(embeddings, index)
    build_index(
        config.embeddings_url,
        config.url("similarity.faiss"),
        config.similarity,
        storage_options=storage_options,
    )

    if candidates:
        ranked = np.array(
            [EVIL_ROW, *[row for row in range(N_ROWS) if row not in (EVIL_ROW, MISSING_ROW)]]
        )
        _write_candidates(config.url("candidates.csv"), ranked, target_ids, labels, storage_options)
    return config


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> LensMinerConfig:
    return _make_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def client(run_config):
    with serve_in_thread(create_web_app(run_config)) as url:
        base_url = url.removesuffix("viewer/")
        with httpx.Client(base_url=base_url, timeout=30.0) as http:
            yield http


def _reference(config: LensMinerConfig, **query) -> Table:
    return find_similar(
        config.url("similarity.faiss"), config.embeddings_url, config.cutouts_url, **query
    )


def _tile_rows(page: str, css_class: str) -> list[int]:
    return [int(row) for row in re.findall(rf'<figure class="{css_class}" data-row="(\d+)"', page)]


def test_similar_page_order(client, run_config):
    response = client.get("/similar", params={"row": 3, "k": 12})
    expected = _reference(run_config, row=3, k=12)
    assert response.status_code == 200
    assert _tile_rows(response.text, "query") == [3]
    assert _tile_rows(response.text, "neighbour") == list(expected["row"])


def test_similar_page_similarities(client, run_config):
    page = client.get("/similar", params={"row": 3, "k": 12}).text
    expected = _reference(run_config, row=3, k=12)
    displayed = re.findall(r"similarity (-?\d\.\d{4})", page)
    assert displayed == [f"{value:.4f}" for value in expected["similarity"]]


def test_similar_page_viewer_links(client):
    page = client.get("/similar", params={"row": 20, "k": 1}).text
    assert "https://www.legacysurvey.org/viewer?ra=150.200000&amp;dec=2.000000" in page
    assert "layer=ls-dr9&amp;zoom=16" in page


def test_similar_page_by_position(client, run_config):
    # Row 20 is at RA 150.2, and a position 2 arcsec east of it still resolves to it.
    params = {"ra": 150.2 + 2 / 3600, "dec": 2.0, "k": 5}
    page = client.get("/similar", params=params).text
    expected = _reference(run_config, ra=params["ra"], dec=2.0, k=5)
    assert _tile_rows(page, "query") == [expected.meta["query_row"]]
    assert _tile_rows(page, "neighbour") == list(expected["row"])


def test_api_matches_find_similar(client, run_config):
    response = client.get("/api/similar", params={"row": 0, "k": 10})
    expected = _reference(run_config, row=0, k=10)
    result = response.json()
    neighbours = result["neighbours"]
    assert response.status_code == 200
    assert result["query"]["row"] == 0
    assert [n["row"] for n in neighbours] == list(expected["row"])
    assert [n["rank"] for n in neighbours] == list(expected["rank"])
    assert [n["target_id"] for n in neighbours] == list(expected["target_id"])
    np.testing.assert_allclose([n["similarity"] for n in neighbours], expected["similarity"])
    np.testing.assert_allclose([n["ra"] for n in neighbours], expected["ra"])


def test_api_labels(client, run_config):
    labels = zarr.open_group(run_config.cutouts_url, mode="r")["label"][:]
    neighbours = client.get("/api/similar", params={"row": 0, "k": 30}).json()["neighbours"]
    expected = [None if labels[n["row"]] < 0 else int(labels[n["row"]]) for n in neighbours]
    assert [n["label"] for n in neighbours] == expected


def test_api_default_k(client, run_config):
    result = client.get("/api/similar", params={"row": 0}).json()
    assert len(result["neighbours"]) == run_config.similarity.k


@pytest.mark.parametrize(
    ("params", "status", "message"),
    [
        ({"row": "abc"}, 400, "row must be a whole number, got 'abc'"),
        ({"row": "60"}, 400, "row 60 is out of range: the stores have rows 0 to 59"),
        ({"row": "-1"}, 400, "row -1 is out of range"),
        (
            {"row": str(MISSING_ROW)},
            404,
            f"row {MISSING_ROW} has no embedding because its cutout status is FAILED",
        ),
        ({"ra": "10", "dec": "-30"}, 404, "no embedded object within 5 arcsec of RA 10, Dec -30"),
        ({"ra": "abc", "dec": "2"}, 400, "RA must be a number in degrees"),
        ({"ra": "nan", "dec": "2"}, 400, "RA must be a finite number"),
        ({"ra": "361", "dec": "2"}, 400, "RA must be in [0, 360) degrees, got 361"),
        ({"ra": "150", "dec": "-91"}, 400, "Dec must be in [-90, 90] degrees"),
        ({"ra": "150"}, 400, "give a row number, or both RA and Dec in degrees"),
        ({"row": "1", "ra": "150", "dec": "2"}, 400, "not both"),
        ({"row": "1", "k": "0"}, 400, "k must be between 1 and 100, got 0"),
        ({"row": "1", "k": "many"}, 400, "k must be a whole number"),
        ({}, 400, "give a row number"),
    ],
)
def test_similar_page_bad_input(client, params, status, message):
    response = client.get("/similar", params=params)
    assert response.status_code == status
    assert message in response.text
    assert '<form action="/similar"' in response.text
    assert "Traceback" not in response.text


def test_similar_page_keeps_form_values(client):
    page = client.get("/similar", params={"ra": "abc", "dec": "2", "k": "7"}).text
    assert 'name="ra" value="abc"' in page
    assert 'name="k" value="7"' in page


def test_api_bad_input(client):
    response = client.get("/api/similar", params={"row": "x1"})
    assert response.status_code == 400
    assert response.json() == {"error": "row must be a whole number, got 'x1'"}


def test_api_position_not_found(client):
    response = client.get("/api/similar", params={"ra": 10, "dec": -30})
    assert response.status_code == 404
    assert "no embedded object" in response.json()["error"]
    assert "deg away" in response.json()["error"]


def test_cutout_png(client, run_config):
    response = client.get("/cutout/5.png")
    image = Image.open(io.BytesIO(response.content))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.format == "PNG"
    assert image.size == (SIZE, SIZE)
    assert image.mode == "RGB"


def test_cutout_png_north_up(client, run_config):
    stored = zarr.open_group(run_config.cutouts_url, mode="r")["images"][5:6]
    pixels = np.asarray(Image.open(io.BytesIO(client.get("/cutout/5.png").content)))
    np.testing.assert_array_equal(
        pixels, cutouts_to_display(stored, image_format="fits", bands="grz")[0]
    )
    # The bright pixel sits in FITS row 0 (south), so it is on the bottom row of the picture.
    assert pixels[-1, 3].sum() > 3 * 200
    assert pixels[0, 3].sum() < pixels[-1, 3].sum()


def test_cutout_etag(client):
    first = client.get("/cutout/5.png")
    again = client.get("/cutout/5.png", headers={"If-None-Match": first.headers["etag"]})
    other = client.get("/cutout/6.png")
    assert "max-age" in first.headers["cache-control"]
    assert again.status_code == 304
    assert again.content == b""
    assert other.headers["etag"] != first.headers["etag"]


def test_cutout_out_of_range(client):
    assert client.get(f"/cutout/{N_ROWS}.png").status_code == 404


def test_cutout_not_a_number(client):
    assert client.get("/cutout/abc.png").status_code == 404


def test_index_lists_candidates(client):
    page = client.get("/").text
    rows = _tile_rows(page, "candidate")
    assert len(rows) == N_CANDIDATES
    assert rows[:3] == [EVIL_ROW, 0, 1]
    assert f'href="/similar?row={EVIL_ROW}&amp;k=10"' in page
    assert f'src="/cutout/{EVIL_ROW}.png"' in page
    assert '<form action="/similar"' in page


def test_target_id_escaped(client):
    pages = {
        "index": client.get("/").text,
        "query": client.get("/similar", params={"row": EVIL_ROW, "k": 3}).text,
    }
    for name, page in pages.items():
        assert "<script>" not in page, name
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;&quot;x&quot;" in page, name


def test_error_message_escaped(client):
    page = client.get("/similar", params={"row": "<b>1</b>"}).text
    assert "<b>1</b>" not in page
    assert "&lt;b&gt;1&lt;/b&gt;" in page


def test_api_returns_raw_target_id(client):
    result = client.get("/api/similar", params={"row": EVIL_ROW, "k": 1}).json()
    assert result["query"]["target_id"] == EVIL_ID


def test_app_without_candidates(tmp_path):
    config = _make_run(tmp_path, candidates=False)
    with serve_in_thread(create_web_app(config)) as url:
        page = httpx.get(url.removesuffix("viewer/"), timeout=30.0).text
    assert "no readable candidates.csv" in page


def test_app_without_index(tmp_path):
    config = _make_run(tmp_path, candidates=False)
    (tmp_path / "similarity.faiss").unlink()
    with pytest.raises(StoreError, match="no similarity index"):
        create_web_app(config)


def test_cli_web_help():
    result = CliRunner().invoke(cli_app, ["web", "--help"])
    assert result.exit_code == 0
    assert "--port" in result.output
    assert "--host" in result.output


def test_app_on_s3(s3_endpoint):
    config = _make_run("s3://lensminer-test/web-run", storage_options=s3_endpoint)
    expected = find_similar(
        config.url("similarity.faiss"),
        config.embeddings_url,
        config.cutouts_url,
        row=4,
        k=5,
        storage_options=s3_endpoint,
    )
    with serve_in_thread(create_web_app(config)) as url:
        with httpx.Client(base_url=url.removesuffix("viewer/"), timeout=30.0) as http:
            result = http.get("/api/similar", params={"row": 4, "k": 5}).json()
            png = http.get("/cutout/4.png")
            index_page = http.get("/").text
    assert [n["row"] for n in result["neighbours"]] == list(expected["row"])
    assert Image.open(io.BytesIO(png.content)).size == (SIZE, SIZE)
    assert len(_tile_rows(index_page, "candidate")) == N_CANDIDATES
