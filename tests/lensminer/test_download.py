"""Tests of the download stage against a real HTTP cutout service on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from astropy.io import fits
from astropy.table import Table
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lensminer.config import DownloadConfig, SurveyConfig
from lensminer.download import cutout_request, download_cutouts
from lensminer.exceptions import ConfigError, StoreError, TargetError
from lensminer.stores import RowStatus, open_store, pending_shards

SIZE = 16
BANDS = "grz"
PIXSCALE = 0.262


# --------------------------------------------------------------------------------------------
# A stand-in cutout service: deterministic FITS per position, with scripted faults
# --------------------------------------------------------------------------------------------


def render_fits(
    ra: float,
    dec: float,
    size: int = SIZE,
    bands: str = BANDS,
    pixscale: float = PIXSCALE,
    *,
    invvar: bool = False,
    maskbits: bool = False,
) -> bytes:
    """Return FITS bytes laid out like a Legacy Survey cutout, with pixels seeded by position.

    ``invvar`` and ``maskbits`` append the service's INVVAR and MASKBITS extensions.
    """
    seed = int(round(ra * 1e5)) * 1_000_003 + int(round((dec + 90) * 1e5))
    rng = np.random.default_rng(seed)
    cube = rng.normal(0.0, 0.01, size=(len(bands), size, size)).astype(">f4")
    header = fits.Header()
    header["BANDS"] = bands
    for index, band in enumerate(bands):
        header[f"BAND{index}"] = band
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = ra, dec
    header["CRPIX1"] = header["CRPIX2"] = (size + 1) / 2
    header["CD1_1"], header["CD2_2"] = -pixscale / 3600, pixscale / 3600
    header["CD1_2"] = header["CD2_1"] = 0.0
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(cube, header=header)]
    if invvar:
        plane = fits.ImageHDU(rng.uniform(1e3, 1e4, cube.shape).astype(">f4"))
        plane.header["IMAGETYP"] = "INVVAR"
        hdus.append(plane)
    if maskbits:
        plane = fits.ImageHDU(rng.integers(0, 1 << 14, (size, size)).astype(">i2"))
        plane.header["IMAGETYP"] = "MASKBITS"
        hdus.append(plane)
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


@dataclass
class StubService:
    """State of the stand-in service: request counts and faults to serve per RA string."""

    latency: float = 0.0
    requests: collections.Counter = field(default_factory=collections.Counter)
    faults: dict[str, list[str]] = field(default_factory=dict)
    empty: set[str] = field(default_factory=set)
    without_planes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def cutout(self, request: Request) -> Response:
        ra_text = request.query_params["ra"]
        with self.lock:
            self.requests[ra_text] += 1
            pending = self.faults.get(ra_text)
            fault = pending.pop(0) if pending else None
        if self.latency:
            await asyncio.sleep(self.latency)

        ra, dec = float(ra_text), float(request.query_params["dec"])
        size = int(request.query_params["size"])
        # A position in without_planes gets a response without the INVVAR and MASKBITS HDUs.
        planes = {
            name: request.query_params.get(name) == "1" and ra_text not in self.without_planes
            for name in ("invvar", "maskbits")
        }
        body = render_fits(ra, dec, size=size, bands=request.query_params["bands"], **planes)
        if ra_text in self.empty:
            body = body[:2880] + bytes(len(body) - 2880)  # header kept, every pixel 0
        if fault == "500":
            return Response("server busy", status_code=500)
        if fault == "429":
            return Response("slow down", status_code=429, headers={"Retry-After": "0"})
        if fault == "404":
            return Response("no such layer", status_code=404)
        if fault == "truncated":
            return Response(body[: len(body) // 2], media_type="application/fits")
        if fault == "slow":
            await asyncio.sleep(1.0)  # longer than the tests' 0.5 s client timeout
        if fault == "garbage":
            return Response(b"<html>maintenance</html>", media_type="text/html")
        return Response(body, media_type="application/fits")


@pytest.fixture
def service() -> Iterator[tuple[StubService, str]]:
    """Serve a fresh :class:`StubService` on 127.0.0.1 and return it with its base URL."""
    state = StubService()
    app = Starlette(routes=[Route("/viewer/fits-cutout", state.cutout)])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test cutout service did not start within 10 s")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield state, f"http://127.0.0.1:{port}/viewer/"
    server.should_exit = True
    thread.join(timeout=5)


def make_targets(n: int, *, label: bool = True) -> Table:
    rng = np.random.default_rng(7)
    table = Table(
        {
            "target_id": [f"T{i:05d}" for i in range(n)],
            "ra": np.round(rng.uniform(10.0, 20.0, n), 6),
            "dec": np.round(rng.uniform(-5.0, 5.0, n), 6),
            "ebv": rng.uniform(0.0, 0.1, n).astype(np.float32),
            "psfsize_g": np.full(n, 1.3, np.float32),
            "psfsize_r": np.full(n, 1.2, np.float32),
            "psfsize_z": np.full(n, 1.1, np.float32),
        }
    )
    if label:
        table["label"] = (np.arange(n) % 3 == 0).astype(np.int8)
    return table


def configs(base_url: str, **download: object) -> tuple[SurveyConfig, DownloadConfig]:
    survey = SurveyConfig(base_url=base_url, size=SIZE, bands=BANDS, pixscale=PIXSCALE)
    settings = {
        "concurrency": 4,
        "rate_limit": 1000.0,
        "timeout": 5.0,
        "max_retries": 3,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "shard_rows": 4,
        "chunk_rows": 2,
    }
    settings.update(download)
    return survey, DownloadConfig(**settings)


def read_store(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    group = open_store(url, "cutouts", storage_options=storage_options)
    return {
        name: np.asarray(group[name][:])
        for name in ("images", "status", "reason", "target_id", "shard_done")
    }


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_download_end_to_end(service: tuple[StubService, str], tmp_path: Path) -> None:
    state, base_url = service
    targets = make_targets(10)
    survey, download = configs(base_url)
    calls: list[tuple[int, int]] = []

    summary = download_cutouts(
        targets,
        str(tmp_path / "c.zarr"),
        survey,
        download,
        progress=lambda d, t: calls.append((d, t)),
    )
    store = read_store(str(tmp_path / "c.zarr"))
    group = open_store(str(tmp_path / "c.zarr"), "cutouts")

    assert summary.counts["OK"] == 10
    assert summary.shards_written == 3
    assert store["shard_done"].all()
    assert store["images"].dtype == np.float32
    for row in range(10):
        expected = fits.getdata(
            io.BytesIO(render_fits(targets["ra"][row], targets["dec"][row]))
        ).astype(np.float32)
        np.testing.assert_array_equal(store["images"][row], expected)
    assert calls[0] == (0, 10)
    assert calls[-1] == (10, 10)
    assert group["label"][:].tolist() == targets["label"].tolist()
    assert group["psf_fwhm"].shape == (10, 3)
    np.testing.assert_array_equal(group["ebv"][:], targets["ebv"])
    assert group.attrs["service_url"] == base_url
    assert group.attrs["download"]["client"].startswith("lensminer ")
    assert sum(state.requests.values()) == 10


def test_download_rerun_fetches_missing_shards(
    service: tuple[StubService, str], tmp_path: Path
) -> None:
    state, base_url = service
    targets = make_targets(12)
    survey, download = configs(base_url)
    url = str(tmp_path / "c.zarr")
    download_cutouts(targets, url, survey, download)

    # Forget shards 1 and 2 as a crash before their flags would.
    group = open_store(url, "cutouts", mode="r+")
    group["shard_done"][1] = False
    group["shard_done"][2] = False
    state.requests.clear()
    summary = download_cutouts(targets, url, survey, download)

    assert summary.shards_written == 2
    assert summary.shards_skipped == 1
    assert sum(state.requests.values()) == 8
    assert not any(repr(float(ra)) in state.requests for ra in targets["ra"][:4])


def test_download_done_store_sends_nothing(
    service: tuple[StubService, str], tmp_path: Path
) -> None:
    state, base_url = service
    targets = make_targets(5)
    survey, download = configs(base_url)
    download_cutouts(targets, str(tmp_path / "c.zarr"), survey, download)
    state.requests.clear()

    summary = download_cutouts(targets, str(tmp_path / "c.zarr"), survey, download)

    assert sum(state.requests.values()) == 0
    assert summary.shards_skipped == 2


def test_download_bad_responses_fail_rows(service: tuple[StubService, str], tmp_path: Path) -> None:
    state, base_url = service
    targets = make_targets(8)
    survey, download = configs(base_url, max_retries=2)
    ra_text = [repr(float(ra)) for ra in targets["ra"]]
    state.faults[ra_text[0]] = ["truncated"] * 3
    state.faults[ra_text[1]] = ["garbage"] * 3
    state.faults[ra_text[2]] = ["404"]
    state.faults[ra_text[3]] = ["500", "truncated"]  # recovers on the third attempt
    state.empty.add(ra_text[4])

    summary = download_cutouts(targets, str(tmp_path / "c.zarr"), survey, download)
    store = read_store(str(tmp_path / "c.zarr"))

    assert store["status"][:5].tolist() == [
        RowStatus.FAILED,
        RowStatus.FAILED,
        RowStatus.FAILED,
        RowStatus.OK,
        RowStatus.NO_COVERAGE,
    ]
    assert "truncated" in store["reason"][0]
    assert "not FITS" in store["reason"][1]
    assert "404" in store["reason"][2]
    assert store["reason"][3] == ""
    assert not store["images"][:3].any()
    assert state.requests[ra_text[2]] == 1
    assert summary.counts == {"PENDING": 0, "OK": 4, "NO_COVERAGE": 1, "FAILED": 3}
    assert len(summary.top_failures) == 3
    assert store["shard_done"].all()


def test_download_rerun_retries_failed_rows(
    service: tuple[StubService, str], tmp_path: Path
) -> None:
    state, base_url = service
    targets = make_targets(8)
    survey, download = configs(base_url, max_retries=0)
    ra_text = [repr(float(ra)) for ra in targets["ra"]]
    state.faults[ra_text[5]] = ["500"]
    url = str(tmp_path / "c.zarr")
    first = download_cutouts(targets, url, survey, download)
    kept = read_store(url)["images"][4].copy()
    state.requests.clear()

    second = download_cutouts(targets, url, survey, download)
    store = read_store(url)

    assert first.counts["FAILED"] == 1
    assert second.counts["OK"] == 8
    assert dict(state.requests) == {ra_text[5]: 1}
    np.testing.assert_array_equal(store["images"][4], kept)
    assert store["images"][5].any()


def test_download_retry_failed_off(service: tuple[StubService, str], tmp_path: Path) -> None:
    state, base_url = service
    targets = make_targets(4)
    survey, download = configs(base_url, max_retries=0)
    state.faults[repr(float(targets["ra"][0]))] = ["500"]
    download_cutouts(targets, str(tmp_path / "c.zarr"), survey, download)
    state.requests.clear()

    summary = download_cutouts(
        targets, str(tmp_path / "c.zarr"), survey, download, retry_failed=False
    )

    assert summary.counts["FAILED"] == 1
    assert sum(state.requests.values()) == 0


def test_download_other_targets_rejected(service: tuple[StubService, str], tmp_path: Path) -> None:
    _, base_url = service
    survey, download = configs(base_url)
    download_cutouts(make_targets(4), str(tmp_path / "c.zarr"), survey, download)

    with pytest.raises(StoreError, match="other targets"):
        download_cutouts(make_targets(5), str(tmp_path / "c.zarr"), survey, download)


def test_request_planes_parameters() -> None:
    survey = SurveyConfig(invvar=True, maskbits=True)
    endpoint, params = cutout_request(survey, 1.0, 2.0)
    _, plain = cutout_request(SurveyConfig(), 1.0, 2.0)

    assert endpoint == "fits-cutout"
    assert params["invvar"] == 1
    assert params["maskbits"] == 1
    assert "invvar" not in plain
    assert "maskbits" not in plain


@pytest.mark.parametrize("plane", ["invvar", "maskbits"])
def test_download_planes_with_jpeg(plane: str, tmp_path: Path) -> None:
    survey = SurveyConfig(
        base_url="http://127.0.0.1:9/viewer/", image_format="jpeg", **{plane: True}
    )
    _, download = configs(survey.base_url)

    with pytest.raises(ConfigError, match="set survey.image_format to 'fits'"):
        cutout_request(survey, 1.0, 2.0)
    with pytest.raises(ConfigError, match=f"optional planes of survey.{plane} need FITS cutouts"):
        download_cutouts(make_targets(2), str(tmp_path / "c.zarr"), survey, download)
    assert not (tmp_path / "c.zarr").exists()


def test_download_planes_match_service(service: tuple[StubService, str], tmp_path: Path) -> None:
    state, base_url = service
    targets = make_targets(6)
    survey, download = configs(base_url, max_retries=1)
    survey = survey.model_copy(update={"invvar": True, "maskbits": True})
    ra_text = [repr(float(ra)) for ra in targets["ra"]]
    state.without_planes.add(ra_text[1])
    url = str(tmp_path / "c.zarr")

    first = download_cutouts(targets, url, survey, download)
    group = open_store(url, "cutouts")
    kept_invvar, kept_maskbits = group["invvar"][0], group["maskbits"][0]

    # The row without planes failed, and every other row contains what the service sent.
    assert first.counts["FAILED"] == 1
    assert group["status"][1] == RowStatus.FAILED
    assert "no INVVAR HDU" in str(group["reason"][1])
    assert not group["invvar"][1].any()
    assert not group["maskbits"][1].any()
    assert state.requests[ra_text[1]] == 2
    for row in (0, 2, 3, 4, 5):
        with fits.open(
            io.BytesIO(
                render_fits(targets["ra"][row], targets["dec"][row], invvar=True, maskbits=True)
            )
        ) as hdus:
            np.testing.assert_array_equal(group["images"][row], hdus[0].data.astype(np.float32))
            np.testing.assert_array_equal(group["invvar"][row], hdus[1].data.astype(np.float32))
            np.testing.assert_array_equal(group["maskbits"][row], hdus[2].data.astype(np.int32))

    # A rerun refetches the failed row only and keeps the planes of the others.
    state.without_planes.clear()
    state.requests.clear()
    second = download_cutouts(targets, url, survey, download)
    group = open_store(url, "cutouts")

    assert second.counts["OK"] == 6
    assert dict(state.requests) == {ra_text[1]: 1}
    assert group["invvar"][1].any()
    np.testing.assert_array_equal(group["invvar"][0], kept_invvar)
    np.testing.assert_array_equal(group["maskbits"][0], kept_maskbits)


def test_download_other_planes_rejected(service: tuple[StubService, str], tmp_path: Path) -> None:
    _, base_url = service
    survey, download = configs(base_url)
    url = str(tmp_path / "c.zarr")
    download_cutouts(make_targets(4), url, survey.model_copy(update={"invvar": True}), download)

    with pytest.raises(
        StoreError, match=r"optional planes \['invvar'\], but this run requests \[\]"
    ):
        download_cutouts(make_targets(4), url, survey, download)


def test_download_missing_columns(tmp_path: Path) -> None:
    survey, download = configs("http://127.0.0.1:9/viewer/")
    with pytest.raises(TargetError, match="target_id"):
        download_cutouts(
            Table({"ra": [1.0], "dec": [2.0]}), str(tmp_path / "c.zarr"), survey, download
        )


def test_download_fault_injection_matches_clean(
    service: tuple[StubService, str], tmp_path: Path
) -> None:
    state, base_url = service
    targets = make_targets(30)
    survey, download = configs(base_url, max_retries=6, timeout=0.5)
    download_cutouts(targets, str(tmp_path / "clean.zarr"), survey, download)

    # About 30% of the rows get one or two transient faults: 5xx, 429, timeouts, cut or junk bodies.
    rng = np.random.default_rng(3)
    kinds = ["500", "429", "truncated", "garbage", "slow"]
    faulty_rows = np.flatnonzero(rng.random(len(targets)) < 0.3)
    for number, row in enumerate(faulty_rows):
        # Each kind in turn, and every other row gets a second fault of the next kind.
        first, second = kinds[number % len(kinds)], kinds[(number + 1) % len(kinds)]
        state.faults[repr(float(targets["ra"][row]))] = [first, second] if number % 2 else [first]
    n_faulty = len(state.faults)
    n_faults = sum(len(faults) for faults in state.faults.values())
    state.requests.clear()
    summary = download_cutouts(targets, str(tmp_path / "faulty.zarr"), survey, download, seed=0)
    clean, faulty = (
        read_store(str(tmp_path / "clean.zarr")),
        read_store(str(tmp_path / "faulty.zarr")),
    )

    assert n_faulty >= 5
    assert summary.counts["OK"] == 30
    assert summary.retries == n_faults
    assert clean["images"].tobytes() == faulty["images"].tobytes()
    assert clean["status"].tolist() == faulty["status"].tolist()


def test_download_s3_store(service: tuple[StubService, str], s3_endpoint: dict) -> None:
    _, base_url = service
    targets = make_targets(6)
    survey, download = configs(base_url)
    url = "s3://lensminer-test/test-download/cutouts.zarr"

    summary = download_cutouts(targets, url, survey, download, storage_options=s3_endpoint)
    store = read_store(url, s3_endpoint)

    assert summary.counts["OK"] == 6
    assert store["shard_done"].all()
    assert store["target_id"].tolist() == list(targets["target_id"])
    assert store["images"][5].any()


KILLED_RUN = textwrap.dedent(
    """
    import sys
    from astropy.table import Table
    from lensminer.config import DownloadConfig, SurveyConfig
    from lensminer.download import download_cutouts

    targets_path, store_url, base_url = sys.argv[1:4]
    survey = SurveyConfig(base_url=base_url, size=16, bands="grz", pixscale=0.262)
    download = DownloadConfig(concurrency=2, rate_limit=1000.0, timeout=5.0, max_retries=1,
                              backoff=0.01, max_backoff=0.05, shard_rows=4, chunk_rows=2)
    download_cutouts(Table.read(targets_path), store_url, survey, download)
    """
)


def test_download_kill_then_rerun_equals_clean(
    service: tuple[StubService, str], tmp_path: Path
) -> None:
    state, base_url = service
    targets = make_targets(40)
    targets_path = tmp_path / "targets.ecsv"
    targets.write(targets_path)
    survey, download = configs(base_url, concurrency=2)
    download_cutouts(targets, str(tmp_path / "clean.zarr"), survey, download)

    # Run the download in a child process and kill it once some, not all, shards are done.
    state.latency = 0.05
    killed_url = str(tmp_path / "killed.zarr")
    script = tmp_path / "run_download.py"
    script.write_text(KILLED_RUN)
    child = subprocess.Popen(
        [sys.executable, str(script), str(targets_path), killed_url, base_url],
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
        try:
            done = 10 - len(pending_shards(open_store(killed_url, "cutouts")))
        except (StoreError, FileNotFoundError, KeyError):
            continue
        if done >= 2:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    state.latency = 0.0

    summary = download_cutouts(targets, killed_url, survey, download)
    clean, resumed = read_store(str(tmp_path / "clean.zarr")), read_store(killed_url)

    assert 2 <= done < 10
    assert summary.shards_skipped >= 2
    for name in ("images", "status", "reason", "target_id", "shard_done"):
        np.testing.assert_array_equal(resumed[name], clean[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# The project's survey server with a simulated sky
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sky_targets() -> Table:
    """Standard targets of 24 simulated objects, each a lens with probability 0.2."""
    sky_module = pytest.importorskip("lensminer.sky")
    from lensminer.targets import standardize_targets

    return standardize_targets(sky_module.SimulatedSky(seed=1, lens_fraction=0.2).catalog(24))


def survey_app(faults: object = None) -> object:
    server_module = pytest.importorskip("lensminer.infra.survey_server")
    sources = pytest.importorskip("lensminer.infra.sources")
    from lensminer.sky import SimulatedSky

    return server_module.create_app(
        sources.SimulatedSkySource(SimulatedSky(seed=1, lens_fraction=0.2)), faults=faults
    )


def test_download_survey_server_faults(sky_targets: Table, tmp_path: Path) -> None:
    from lensminer.infra.survey_server import FaultConfig, serve_in_thread

    # 30% of requests fail: 503, 429 with Retry-After, held past the timeout, or cut in half.
    faults = FaultConfig(
        error_rate=0.1,
        rate_limit_rate=0.05,
        retry_after=0.05,
        timeout_rate=0.05,
        timeout_hold=2.0,
        truncate_rate=0.1,
        seed=3,
    )
    faulty_app = survey_app(faults)
    with serve_in_thread(survey_app()) as clean_url, serve_in_thread(faulty_app) as faulty_url:
        survey, download = configs(
            clean_url, shard_rows=8, chunk_rows=4, timeout=1.0, max_retries=8
        )
        clean = download_cutouts(
            sky_targets,
            str(tmp_path / "clean.zarr"),
            SurveyConfig(base_url=clean_url, size=32),
            download,
        )
        faulty = download_cutouts(
            sky_targets,
            str(tmp_path / "faulty.zarr"),
            SurveyConfig(base_url=faulty_url, size=32),
            download,
            seed=0,
        )
    clean_store, faulty_store = (
        read_store(str(tmp_path / "clean.zarr")),
        read_store(str(tmp_path / "faulty.zarr")),
    )

    assert clean.counts["OK"] == 24
    assert faulty.counts["OK"] == 24
    assert sum(faulty_app.state.fault_counts.values()) >= 5
    assert faulty.retries == sum(faulty_app.state.fault_counts.values())
    assert clean_store["images"].tobytes() == faulty_store["images"].tobytes()
    assert open_store(str(tmp_path / "faulty.zarr"), "cutouts")["label"][:].tolist() == list(
        sky_targets["label"]
    )


def test_download_survey_server_jpeg(sky_targets: Table, tmp_path: Path) -> None:
    from lensminer.infra.survey_server import serve_in_thread

    with serve_in_thread(survey_app()) as url:
        _, download = configs(url)
        survey = SurveyConfig(base_url=url, size=32, image_format="jpeg")
        summary = download_cutouts(sky_targets[:6], str(tmp_path / "j.zarr"), survey, download)
    images = open_store(str(tmp_path / "j.zarr"), "cutouts")["images"]

    assert summary.counts["OK"] == 6
    assert images.dtype == np.uint8
    assert images.shape == (6, 3, 32, 32)
    assert images[:].any()


def test_download_inside_running_loop(service: tuple[StubService, str], tmp_path: Path) -> None:
    _, base_url = service
    survey, download = configs(base_url)

    async def caller() -> int:
        # A synchronous call from a coroutine, as in an async Prefect task or a notebook.
        return download_cutouts(make_targets(4), str(tmp_path / "c.zarr"), survey, download).counts[
            "OK"
        ]

    assert asyncio.run(caller()) == 4


def test_download_survey_server_planes(sky_targets: Table, tmp_path: Path) -> None:
    from lensminer.infra.survey_server import serve_in_thread

    targets = sky_targets[:6]
    with serve_in_thread(survey_app()) as url:
        _, download = configs(url)
        survey = SurveyConfig(base_url=url, size=32, invvar=True, maskbits=True)
        summary = download_cutouts(targets, str(tmp_path / "p.zarr"), survey, download)

        # The same requests, sent directly and read with astropy.
        direct = []
        for row in targets:
            endpoint, params = cutout_request(survey, row["ra"], row["dec"])
            response = httpx.get(url + endpoint, params=params, timeout=30)
            with fits.open(io.BytesIO(response.content)) as hdus:
                direct.append(
                    {
                        "images": hdus[0].data.astype(np.float32),
                        "invvar": hdus[1].data.astype(np.float32),
                        "maskbits": hdus["MASKBITS"].data.astype(np.int32),
                        "imagetyp": hdus[1].header["IMAGETYP"],
                    }
                )
    group = open_store(str(tmp_path / "p.zarr"), "cutouts")

    assert summary.counts["OK"] == 6
    assert group.attrs["planes"] == ["invvar", "maskbits"]
    assert group["invvar"].shape == (6, 3, 32, 32)
    assert group["maskbits"].shape == (6, 32, 32)
    for row, expected in enumerate(direct):
        assert expected["imagetyp"] == "INVVAR"
        np.testing.assert_array_equal(group["images"][row], expected["images"])
        np.testing.assert_array_equal(group["invvar"][row], expected["invvar"])
        np.testing.assert_array_equal(group["maskbits"][row], expected["maskbits"])
    assert (group["invvar"][:] > 0).all()
