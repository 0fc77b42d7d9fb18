"""A polite concurrent HTTP client for the cutout service.

:class:`CutoutClient` bounds the requests in flight, spaces them with a token bucket, and retries
transient faults (timeouts, connection errors, truncated bodies, HTTP 5xx and 429, bodies that fail
to parse) with exponential backoff and full jitter. Other HTTP errors fail at once, because
repeating a bad request cannot succeed.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.metadata
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import httpx

from lensminer.exceptions import CutoutParseError, DownloadError

__all__ = ["ClientStats", "CutoutClient", "FetchError", "TokenBucket", "client_version"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
PROJECT_URL = "https://github.com/lensminer/lensminer"
BODY_EXCERPT = 200


def client_version() -> str:
    """Return the installed LensMiner version, or ``0+unknown`` when it is not installed."""
    try:
        return importlib.metadata.version("lensminer")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class FetchError(DownloadError):
    """A request that failed for good.

    Attributes
    ----------
    url
        Request URL with its query string.
    reason
        Short cause without the URL, e.g. ``"HTTP 404 Not Found"``; the download stage stores it
        per row and counts rows by it.
    attempts
        Requests sent, including retries.
    """

    def __init__(self, reason: str, url: str, attempts: int) -> None:
        super().__init__(f"{reason} for {url} after {attempts} attempt(s)")
        self.reason = reason
        self.url = url
        self.attempts = attempts


class _TransientError(Exception):
    """A failure worth retrying; ``retry_after`` is the server's requested delay in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TokenBucket:
    """Token-bucket rate limiter for asyncio.

    The bucket gains ``rate`` tokens per second and stores at most ``capacity`` of them.

    Waiters are served one at a time in arrival order.
    """

    def __init__(
        self, rate: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive requests per second, got {rate!r}")
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._tokens = self.capacity
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until a token is available and take it."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


@dataclass
class ClientStats:
    """Counters of one client's lifetime."""

    requests: int = 0
    retries: int = 0
    failures: int = 0


def _retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class CutoutClient:
    """Concurrent, rate-limited, retrying HTTP client for one cutout service.

    Use it as an async context manager; one client is meant to serve a whole download so its
    connection pool stays warm.

    Parameters
    ----------
    base_url
        Service root, e.g. ``https://www.legacysurvey.org/viewer/``; endpoints are relative to it.
    concurrency
        Requests in flight at once, and the size of the connection pool.
    rate_limit
        Maximum requests per second, retries included.
    timeout
        Per-request timeout in seconds (connect, each read, and waiting for a pooled connection).
    max_retries
        Retries of a transient failure after the first attempt.
    backoff, max_backoff
        Seconds: retry ``n`` (from 0) sleeps a uniform random time in
        [0, min(max_backoff, backoff * 2**n)] ("full jitter"). A 429 or 503 with a ``Retry-After``
        header sleeps that long instead, capped at ``max_backoff``.
    user_agent
        ``User-Agent`` header; by default names LensMiner, its version and its home page.
    seed
        Seed of the jitter's random generator, for reproducible tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        concurrency: int = 8,
        rate_limit: float = 10.0,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        user_agent: str | None = None,
        seed: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries!r}")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.user_agent = user_agent or f"LensMiner/{client_version()} (+{PROJECT_URL})"
        self.stats = ClientStats()
        self._rate_limit = rate_limit
        self._random = random.Random(seed)
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._bucket: TokenBucket | None = None

    async def __aenter__(self) -> CutoutClient:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            limits=limits,
            timeout=httpx.Timeout(self.timeout),
            headers={"User-Agent": self.user_agent},
            follow_redirects=True,
        )
        self._slots = asyncio.Semaphore(self.concurrency)
        self._bucket = TokenBucket(self._rate_limit)
        logger.debug("opened HTTP client for %s (concurrency %d)", self.base_url, self.concurrency)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        logger.debug("closed HTTP client for %s: %s", self.base_url, self.stats)

    async def fetch(self, endpoint: str, params: Mapping[str, Any]) -> bytes:
        """Send ``GET base_url + endpoint`` and return the body of a 200 response.

        Raises
        ------
        FetchError
            A :class:`~lensminer.exceptions.DownloadError` naming the status or error, the URL and
            a body excerpt, after the retries for transient faults, or at once for other 4xx.
        """
        return await self.fetch_parsed(endpoint, params, lambda body: body)

    async def fetch_parsed(
        self, endpoint: str, params: Mapping[str, Any], parse: Callable[[bytes], T]
    ) -> T:
        """Fetch like :meth:`fetch` and return ``parse(body)``.

        A body that makes ``parse`` raise :class:`~lensminer.exceptions.CutoutParseError` (for
        example a FITS file cut short under status 200) is retried like a transient fault.

        Raises
        ------
        FetchError
            When the request or the parse still fails after the retries.
        """
        http, _, _ = self._open_parts()
        url = str(http.build_request("GET", endpoint, params=dict(params)).url)

        for attempt in range(self.max_retries + 1):
            try:
                return await self._attempt(endpoint, params, parse)
            except _TransientError as error:
                if attempt == self.max_retries:
                    self.stats.failures += 1
                    logger.warning(
                        "giving up on %s after %d attempts: %s", url, attempt + 1, error.reason
                    )
                    raise FetchError(error.reason, url, attempt + 1) from error
                delay = self._delay(attempt, error.retry_after)
                self.stats.retries += 1
                logger.debug(
                    "retrying %s in %.2f s (attempt %d): %s", url, delay, attempt + 1, error.reason
                )
                await asyncio.sleep(delay)
            except FetchError as error:
                self.stats.failures += 1
                final = FetchError(error.reason, error.url, attempt + 1)
                logger.warning("request failed without retry: %s", final)
                raise final from error
        raise AssertionError("unreachable: the loop returns or raises")

    def _open_parts(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore, TokenBucket]:
        if self._client is None or self._slots is None or self._bucket is None:
            raise RuntimeError(
                "CutoutClient is not open; use it as 'async with CutoutClient(...) as client'"
            )
        return self._client, self._slots, self._bucket

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return self._random.uniform(0.0, min(self.max_backoff, self.backoff * 2**attempt))

    async def _attempt(
        self, endpoint: str, params: Mapping[str, Any], parse: Callable[[bytes], T]
    ) -> T:
        http, slots, bucket = self._open_parts()

        # One request: wait for a slot and a token, then send it.
        async with slots:
            await bucket.acquire()
            self.stats.requests += 1
            try:
                response = await http.get(endpoint, params=dict(params))
            except httpx.TimeoutException as error:
                raise _TransientError(f"timed out ({type(error).__name__})") from error
            except httpx.TransportError as error:
                # Connection refused or reset, and bodies shorter than their Content-Length.
                raise _TransientError(f"{type(error).__name__}: {error}") from error

        # Classify the status.
        status = response.status_code
        if status == 429 or status >= 500:
            raise _TransientError(
                f"HTTP {status} {response.reason_phrase}",
                _retry_after_seconds(response.headers.get("Retry-After")),
            )
        if status != 200:
            excerpt = response.content[:BODY_EXCERPT].decode("utf-8", "replace").strip()
            raise FetchError(
                f"HTTP {status} {response.reason_phrase} (body: {excerpt!r})", str(response.url), 1
            )

        # A body that does not parse counts as a transient fault.
        try:
            return parse(response.content)
        except CutoutParseError as error:
            raise _TransientError(f"invalid response: {error}") from error
