"""Tests of the retrying HTTP client against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lensminer.client import CutoutClient, FetchError, TokenBucket, client_version
from lensminer.exceptions import CutoutParseError, DownloadError


class FaultServer:
    """Endpoints that fail as scripted: ``script[key]`` lists the responses of successive calls."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.script: dict[str, list[str]] = {}
        self.user_agents: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    async def handle(self, request: Request) -> Response:
        key = request.query_params.get("key", "")
        with self.lock:
            self.calls[key] += 1
            self.user_agents.append(request.headers.get("user-agent", ""))
            steps = self.script.get(key)
            step = steps.pop(0) if steps else "ok"
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._respond(step)
        finally:
            with self.lock:
                self.in_flight -= 1

    async def _respond(self, step: str) -> Response:
        if step == "ok":
            return Response(b"payload", media_type="application/octet-stream")
        if step == "slow":
            await asyncio.sleep(1.0)
            return Response(b"payload")
        if step == "hold":
            await asyncio.sleep(0.1)
            return Response(b"payload")
        if step == "short":
            # Declares more bytes than it sends, so the connection closes mid-body.
            return Response(b"pay", headers={"content-length": "7"})
        if step == "bad-body":
            return Response(b"junk")
        if step.startswith("429:"):
            return Response(b"slow down", status_code=429, headers={"Retry-After": step[4:]})
        return Response(f"status {step}".encode(), status_code=int(step))


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FaultServer, str]]:
    """Serve a :class:`FaultServer` on 127.0.0.1 for this module's tests."""
    state = FaultServer()
    app = Starlette(routes=[Route("/viewer/fits-cutout", state.handle)])
    runner = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical", lifespan="off")
    )
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start within 10 s")
        time.sleep(0.01)
    port = runner.servers[0].sockets[0].getsockname()[1]
    yield state, f"http://127.0.0.1:{port}/viewer"
    runner.should_exit = True
    thread.join(timeout=5)


def client_for(base_url: str, **kwargs: object) -> CutoutClient:
    settings = {
        "concurrency": 4,
        "rate_limit": 1000.0,
        "timeout": 0.5,
        "max_retries": 3,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "seed": 0,
    }
    settings.update(kwargs)
    return CutoutClient(base_url, **settings)  # type: ignore[arg-type]


async def fetch_one(base_url: str, key: str, **kwargs: object) -> tuple[bytes, CutoutClient]:
    async with client_for(base_url, **kwargs) as client:
        return await client.fetch("fits-cutout", {"key": key}), client


@pytest.mark.parametrize("fault", ["500", "503", "429:0", "slow", "short"])
def test_fetch_retries_transient(server: tuple[FaultServer, str], fault: str) -> None:
    state, base_url = server
    key = f"transient-{fault}"
    state.script[key] = [fault, fault]

    body, client = asyncio.run(fetch_one(base_url, key))

    assert body == b"payload"
    assert state.calls[key] == 3
    assert client.stats.retries == 2


@pytest.mark.parametrize("status", [400, 404, 410])
def test_fetch_client_error_not_retried(server: tuple[FaultServer, str], status: int) -> None:
    state, base_url = server
    key = f"client-{status}"
    state.script[key] = [str(status)]

    with pytest.raises(
        DownloadError, match=rf"HTTP {status} .*status {status}.*key=client-{status}"
    ):
        asyncio.run(fetch_one(base_url, key))
    assert state.calls[key] == 1


def test_fetch_gives_up(server: tuple[FaultServer, str], caplog: pytest.LogCaptureFixture) -> None:
    state, base_url = server
    state.script["down"] = ["502"] * 10

    with pytest.raises(FetchError) as raised:
        asyncio.run(fetch_one(base_url, "down", max_retries=2))

    assert raised.value.attempts == 3
    assert raised.value.reason == "HTTP 502 Bad Gateway"
    assert state.calls["down"] == 3
    assert any(
        "giving up" in record.message and "key=down" in record.message for record in caplog.records
    )


def test_fetch_honours_retry_after(server: tuple[FaultServer, str]) -> None:
    state, base_url = server
    state.script["retry-after"] = ["429:0.3"]

    started = time.perf_counter()
    asyncio.run(fetch_one(base_url, "retry-after", max_backoff=5.0))

    assert time.perf_counter() - started >= 0.3


def test_fetch_parsed_retries_bad_body(server: tuple[FaultServer, str]) -> None:
    state, base_url = server
    state.script["parse"] = ["bad-body"]

    def parse(body: bytes) -> str:
        if body != b"payload":
            raise CutoutParseError(f"unexpected body {body!r}")
        return body.decode()

    async def run() -> str:
        async with client_for(base_url) as client:
            return await client.fetch_parsed("fits-cutout", {"key": "parse"}, parse)

    assert asyncio.run(run()) == "payload"
    assert state.calls["parse"] == 2


def test_fetch_parsed_gives_up_on_bad_body(server: tuple[FaultServer, str]) -> None:
    state, base_url = server
    state.script["parse-bad"] = ["bad-body"] * 5

    def parse(body: bytes) -> bytes:
        raise CutoutParseError("response is not FITS")

    async def run() -> bytes:
        async with client_for(base_url, max_retries=1) as client:
            return await client.fetch_parsed("fits-cutout", {"key": "parse-bad"}, parse)

    with pytest.raises(FetchError, match="invalid response: response is not FITS"):
        asyncio.run(run())


def test_fetch_bounds_concurrency(server: tuple[FaultServer, str]) -> None:
    state, base_url = server
    keys = [f"hold-{i}" for i in range(12)]
    for key in keys:
        state.script[key] = ["hold"]
    state.max_in_flight = 0

    async def run() -> None:
        async with client_for(base_url, concurrency=3) as client:
            await asyncio.gather(*(client.fetch("fits-cutout", {"key": key}) for key in keys))

    asyncio.run(run())
    assert state.max_in_flight == 3


def test_fetch_rate_limit(server: tuple[FaultServer, str]) -> None:
    _, base_url = server

    async def run() -> float:
        async with client_for(base_url, concurrency=8, rate_limit=20.0) as client:
            started = time.perf_counter()
            await asyncio.gather(
                *(client.fetch("fits-cutout", {"key": f"rate-{i}"}) for i in range(11))
            )
            return time.perf_counter() - started

    # One token at the start, then one every 50 ms: the 11th request leaves after 0.5 s.
    assert asyncio.run(run()) >= 0.45


def test_fetch_user_agent(server: tuple[FaultServer, str]) -> None:
    state, base_url = server
    asyncio.run(fetch_one(base_url, "agent"))
    assert state.user_agents[-1].startswith(f"LensMiner/{client_version()} ")


def test_fetch_connection_refused() -> None:
    with pytest.raises(FetchError, match="Connect"):
        asyncio.run(fetch_one("http://127.0.0.1:9/viewer/", "x", max_retries=1))


def test_fetch_requires_context() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        asyncio.run(client_for("http://127.0.0.1:9/").fetch("fits-cutout", {}))


def test_token_bucket_spacing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake clock that advances only by the bucket's own sleeps checks the arithmetic exactly.
    now = [0.0]
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)

    async def run() -> None:
        bucket = TokenBucket(rate=4.0, clock=lambda: now[0])
        for _ in range(5):
            await bucket.acquire()

    asyncio.run(run())
    assert sleeps == pytest.approx([0.25] * 4)


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        CutoutClient("http://127.0.0.1:9/", concurrency=0)
