"""Tests of the local cutout server over real HTTP against the simulated sky."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from lensminer.infra.sources import SimulatedSkySource
from lensminer.infra.survey_server import READY_LINE, FaultConfig, create_app, serve_in_thread
from lensminer.rgb import fits_to_picture
from lensminer.sky import SimulatedSky

SKY = SimulatedSky(seed=3, lens_fraction=0.05)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(create_app(SimulatedSkySource(SKY))) as url:
        yield url


def get_fits(base_url: str, **params: object) -> fits.HDUList:
    response = httpx.get(base_url + "fits-cutout", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return fits.open(io.BytesIO(response.content))


def test_fits_header_and_shape(base_url: str) -> None:
    hdul = get_fits(base_url, ra=150.25, dec=2.5, size=64, pixscale=0.3, bands="grz")
    header = hdul[0].header
    assert hdul[0].data.shape == (3, 64, 64)
    assert header["BITPIX"] == -32
    assert header["BANDS"] == "grz"
    assert [header["BAND0"], header["BAND1"], header["BAND2"]] == ["g", "r", "z"]
    assert header["CTYPE1"] == "RA---TAN"
    assert header["CTYPE2"] == "DEC--TAN"
    assert header["CRVAL1"] == 150.25
    assert header["CRVAL2"] == 2.5
    assert header["CRPIX1"] == 32.5
    assert header["CRPIX2"] == 32.5
    assert header["CD1_1"] == pytest.approx(-0.3 / 3600)
    assert header["CD2_2"] == pytest.approx(0.3 / 3600)
    assert header["IMAGEW"] == 64
    assert header["IMAGEH"] == 64
    assert header["VERSION"] == "DR9"


def test_fits_width_height_and_defaults(base_url: str) -> None:
    hdul = get_fits(base_url, ra=10.0, dec=-3.0, width=40, height=30)
    assert hdul[0].data.shape == (3, 30, 40)
    assert hdul[0].header["CRPIX1"] == 20.5
    assert hdul[0].header["CRPIX2"] == 15.5
    assert hdul[0].header["CD2_2"] == pytest.approx(0.262 / 3600)
    assert get_fits(base_url, ra=10.0, dec=-3.0)[0].data.shape == (3, 256, 256)


def test_fits_single_band_is_2d(base_url: str) -> None:
    assert get_fits(base_url, ra=10.0, dec=-3.0, size=16, bands="r")[0].data.shape == (16, 16)


def test_fits_unknown_band_falls_back(base_url: str) -> None:
    assert get_fits(base_url, ra=10.0, dec=-3.0, size=16, bands="gxz")[0].header["BANDS"] == "grz"


def test_fits_alias_and_layer(base_url: str) -> None:
    response = httpx.get(
        base_url + "cutout.fits", params={"ra": 1, "dec": 1, "size": 8, "layer": "ls-dr10"}
    )
    assert response.status_code == 200
    assert fits.getheader(io.BytesIO(response.content))["VERSION"] == "DR10"


def test_fits_equals_direct_render(base_url: str) -> None:
    data = get_fits(base_url, ra=150.123456, dec=2.654321, size=80, pixscale=0.262)[0].data
    np.testing.assert_array_equal(
        data.astype(np.float32), SKY.render(150.123456, 2.654321, 80, 0.262)
    )


def test_fits_invvar_and_maskbits(base_url: str) -> None:
    hdul = get_fits(base_url, ra=20.0, dec=5.0, size=16, invvar=1, maskbits=1)
    sigma = np.array(SKY.truth(20.0, 5.0).noise_sigma)
    assert hdul[1].header["IMAGETYP"] == "INVVAR"
    np.testing.assert_allclose(hdul[1].data[:, 0, 0], 1 / sigma**2, rtol=1e-5)
    assert hdul["MASKBITS"].data.shape == (16, 16)
    assert not hdul["MASKBITS"].data.any()


@pytest.mark.parametrize(
    "params", [{"dec": 2.0}, {"ra": "abc", "dec": 2.0}, {"ra": 1.0, "dec": 95.0}]
)
def test_fits_invalid_position_400(base_url: str, params: dict) -> None:
    response = httpx.get(base_url + "fits-cutout", params=params)
    assert response.status_code == 400
    assert "ra" in response.text or "dec" in response.text


def test_fits_unknown_layer(base_url: str) -> None:
    response = httpx.get(base_url + "fits-cutout", params={"ra": 1, "dec": 1, "layer": "ls-dr99"})
    assert 400 <= response.status_code < 500
    assert "no such layer" in response.text


def test_fits_size_cap(base_url: str) -> None:
    response = httpx.get(base_url + "fits-cutout", params={"ra": 1, "dec": 1, "size": 3001})
    assert response.status_code == 400
    assert "3000" in response.text


def test_jpeg_is_flipped_rgb_of_fits(base_url: str) -> None:
    params = {"ra": 150.2, "dec": 2.2, "size": 96}
    cube = get_fits(base_url, **params)[0].data.astype(np.float32)
    response = httpx.get(base_url + "jpeg-cutout", params=params)
    assert response.headers["content-type"] == "image/jpeg"
    picture = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float64)
    expected = fits_to_picture(cube).astype(np.float64)
    # JPEG compression changes noisy pixels by a few levels; a vertical flip changes more.
    difference = np.abs(picture - expected).mean()
    assert difference < 4.0
    assert np.abs(picture - expected[::-1]).mean() > 2 * difference


def test_jpeg_alias(base_url: str) -> None:
    response = httpx.get(base_url + "cutout.jpg", params={"ra": 1, "dec": 1, "size": 20})
    assert Image.open(io.BytesIO(response.content)).size == (20, 20)


def test_truth_endpoint(base_url: str) -> None:
    response = httpx.get(base_url + "sim/truth", params={"ra": 150.5, "dec": 2.5})
    assert response.json() == json.loads(json.dumps(SKY.truth(150.5, 2.5).to_dict()))


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_fault_shares() -> None:
    faults = FaultConfig(
        error_rate=0.1,
        rate_limit_rate=0.1,
        timeout_rate=0.1,
        truncate_rate=0.1,
        slow_rate=0.1,
        retry_after=7,
        timeout_hold=1.5,
        slow_delay=0.3,
        seed=1,
    )
    app = create_app(SimulatedSkySource(SKY), faults)
    n = 300

    with serve_in_thread(app) as url, httpx.Client(timeout=1.0) as client:

        def fetch(index: int) -> str:
            start = time.monotonic()
            try:
                response = client.get(
                    url + "fits-cutout", params={"ra": 30 + index * 0.01, "dec": 0, "size": 8}
                )
            except httpx.TimeoutException:
                return "timeout"
            if response.status_code == 503:
                return "error"
            if response.status_code == 429:
                assert response.headers["Retry-After"] == "7"
                return "rate_limit"
            try:
                fits.getdata(io.BytesIO(response.content))
            except (OSError, TypeError, ValueError):
                return "truncate"
            return "slow" if time.monotonic() - start > 0.25 else "ok"

        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = Counter(pool.map(fetch, range(n)))

    sigma = np.sqrt(n * 0.1 * 0.9)
    for kind in ("error", "rate_limit", "timeout", "truncate", "slow"):
        assert abs(outcomes[kind] - 0.1 * n) < 4 * sigma, (kind, outcomes)
        assert outcomes[kind] == app.state.fault_counts[kind], (kind, outcomes)


def test_fault_retry_can_succeed() -> None:
    faults = FaultConfig(error_rate=0.5, seed=0)
    with serve_in_thread(create_app(SimulatedSkySource(SKY), faults)) as url:
        statuses = [
            httpx.get(url + "fits-cutout", params={"ra": 1, "dec": 1, "size": 8}).status_code
            for _ in range(20)
        ]
    assert set(statuses) == {200, 503}


def test_fault_config_rejects_excess() -> None:
    with pytest.raises(ValueError, match="at most 1"):
        FaultConfig(error_rate=0.6, truncate_rate=0.6)


def test_main_subprocess_serves_until_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "lensminer.infra.survey_server",
        "--sky",
        "--seed",
        "3",
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = process.stdout.readline().strip()
        assert line.startswith(READY_LINE + " http://127.0.0.1:")
        url = line.split()[1]
        response = httpx.get(
            url + "fits-cutout", params={"ra": 150.1, "dec": 2.1, "size": 16}, timeout=30
        )
        assert response.status_code == 200
        np.testing.assert_array_equal(
            fits.getdata(io.BytesIO(response.content)).astype(np.float32),
            SKY.render(150.1, 2.1, 16, 0.262),
        )
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
