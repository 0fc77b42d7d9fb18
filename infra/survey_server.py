"""A local stand-in for the Legacy Survey cutout service, with optional fault injection.

Endpoints under ``/viewer/`` follow the public service: ``fits-cutout`` (alias ``cutout.fits``)
and ``jpeg-cutout`` (alias ``cutout.jpg``) take ``ra``, ``dec``, ``layer``, ``pixscale``,
``size``, ``width``, ``height``, ``bands``, and for FITS ``invvar`` and ``maskbits``. With a
simulated sky, ``sim/truth?ra=..&dec=..`` returns the object at a position as JSON.

With a :class:`~lensminer.infra.sources.SimulatedBrickSource`, the server also serves brick
coadds as a data release does:
``/dr9/south/coadd/<AAA>/<brick>/legacysurvey-<brick>-image-<band>.fits.fz`` (also
``-invvar-<band>`` and ``-maskbits``) and the table ``/dr9/south/survey-bricks.fits`` of
the bricks it covers. Brick files support HTTP range requests, and bricks outside the covered
footprint return 404.

Run it as a process for the demo::

    python -m lensminer.infra.survey_server --sky --seed 0 --lens-fraction 0.05 --port 0
    python -m lensminer.infra.survey_server --sky --bricks-catalog targets.csv

It prints ``LENSMINER_SURVEY_SERVER <base URL>`` once it accepts connections and serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from astropy.io import fits
from astropy.table import Table
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lensminer.exceptions import SurveyServerError
from lensminer.infra.sources import (
    CutoutSource,
    ImageDirectorySource,
    SimulatedBrickSource,
    SimulatedSkySource,
    cutout_wcs,
)
from lensminer.sky import SimulatedSky

__all__ = ["BRICKS_PREFIX", "FaultConfig", "brick_root", "create_app", "main", "serve_in_thread"]

logger = logging.getLogger(__name__)

#: Maximum width or height in pixels, as in the public service's code.
MAX_SIZE = 3000

#: Layers the server accepts and their default bands.
LAYERS: dict[str, str] = {
    "ls-dr9": "grz",
    "ls-dr9-north": "grz",
    "ls-dr9-south": "grz",
    "ls-dr10": "griz",
    "ls-dr10-south": "griz",
    "ls-dr10-grz": "grz",
    "ls-dr8": "grz",
    "ls-dr8-north": "grz",
    "ls-dr8-south": "grz",
    "decals-dr5": "grz",
    "decals-dr7": "grz",
}

READY_LINE = "LENSMINER_SURVEY_SERVER"

#: URL path of the data-release directory under which brick coadds are served.
BRICKS_PREFIX = "/dr9/south"

_COADD_FILE = re.compile(
    r"legacysurvey-(?P<brick>\d{4}[pm]\d{3})-(?:(?:image|invvar)-[a-z]|maskbits)\.fits\.fz"
)


def brick_root(base_url: str) -> str:
    """Return the data-release root for bricks, given the server's ``.../viewer/`` base URL."""
    return base_url.rstrip("/").removesuffix("/viewer") + BRICKS_PREFIX


@dataclass
class FaultConfig:
    """Shares of cutout requests that fail on purpose, decided per request by a seeded RNG.

    Each request draws one uniform number, so at most one fault hits it, and a retry draws
    again and can succeed. The shares must sum to at most 1.

    Attributes
    ----------
    error_rate
        Share that gets an HTTP 503 response.
    rate_limit_rate
        Share that gets an HTTP 429 response with ``Retry-After: <retry_after>`` (seconds).
    timeout_rate
        Share held for ``timeout_hold`` seconds before the normal response, longer than a
        client's timeout.
    truncate_rate
        Share whose body is cut to its first half, with a matching ``Content-Length``.
    slow_rate
        Share delayed by ``slow_delay`` seconds, then served normally.
    latency
        Seconds added to every response, faulty or not.
    seed
        Seed of the fault RNG.
    """

    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    truncate_rate: float = 0.0
    slow_rate: float = 0.0
    retry_after: float = 1.0
    timeout_hold: float = 30.0
    slow_delay: float = 2.0
    latency: float = 0.0
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        shares = self._shares()
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise SurveyServerError(f"FaultConfig.{name}_rate must be in [0, 1], got {share!r}")
        if sum(shares.values()) > 1.0 + 1e-12:
            raise SurveyServerError(
                f"fault shares sum to {sum(shares.values())}, expected at most 1; lower them"
            )
        for name in ("retry_after", "timeout_hold", "slow_delay", "latency"):
            if getattr(self, name) < 0:
                raise SurveyServerError(
                    f"FaultConfig.{name} must be non-negative seconds, got {getattr(self, name)!r}"
                )
        self._rng = np.random.default_rng(self.seed)

    def _shares(self) -> dict[str, float]:
        return {
            "error": self.error_rate,
            "rate_limit": self.rate_limit_rate,
            "timeout": self.timeout_rate,
            "truncate": self.truncate_rate,
            "slow": self.slow_rate,
        }

    def draw(self) -> str | None:
        """Return the fault kind for the next request (a key of the shares), or None."""
        with self._lock:
            value = float(self._rng.random())
        upper = 0.0
        for kind, share in self._shares().items():
            upper += share
            if value < upper:
                return kind
        return None


@dataclass(frozen=True)
class _CutoutRequest:
    ra: float
    dec: float
    layer: str
    pixscale: float
    width: int
    height: int
    bands: str
    invvar: bool
    maskbits: bool


def create_app(
    source: CutoutSource,
    faults: FaultConfig | None = None,
    *,
    bricks: SimulatedBrickSource | None = None,
) -> Starlette:
    """Build the ASGI app that serves cutouts from ``source``, and brick coadds from ``bricks``.

    ``app.state.fault_counts`` counts the faults injected so far by kind. Brick files get the
    ``latency`` of ``faults`` but no injected faults.
    """
    counts: Counter[str] = Counter()

    async def fits_cutout(request: Request) -> Response:
        return await _serve(request, "fits")

    async def jpeg_cutout(request: Request) -> Response:
        return await _serve(request, "jpeg")

    async def _serve(request: Request, kind: str) -> Response:
        fault = faults.draw() if faults is not None else None
        if faults is not None and faults.latency:
            await asyncio.sleep(faults.latency)
        if fault is not None:
            counts[fault] += 1
            logger.debug("injecting %s fault into %s", fault, request.url)
        if fault == "error":
            return PlainTextResponse("simulated server error; retry the request", status_code=503)
        if fault == "rate_limit":
            return PlainTextResponse(
                "too many requests; retry later",
                status_code=429,
                headers={"Retry-After": f"{faults.retry_after:g}"},  # type: ignore[union-attr]
            )
        if fault == "timeout":
            await asyncio.sleep(faults.timeout_hold)  # type: ignore[union-attr]
        if fault == "slow":
            await asyncio.sleep(faults.slow_delay)  # type: ignore[union-attr]

        try:
            cutout = _parse_request(request, source)
            if kind == "fits":
                body, media_type = (
                    await run_in_threadpool(_fits_body, source, cutout),
                    "application/fits",
                )
            else:
                body, media_type = await run_in_threadpool(_jpeg_body, source, cutout), "image/jpeg"
        except (SurveyServerError, ValueError) as error:
            logger.info("rejected %s: %s", request.url, error)
            return PlainTextResponse(str(error), status_code=400)

        if fault == "truncate":
            body = body[: len(body) // 2]
        return Response(body, media_type=media_type)

    async def truth(request: Request) -> Response:
        if not isinstance(source, SimulatedSkySource):
            return PlainTextResponse(
                "truth is only available with a simulated sky source", status_code=404
            )
        try:
            ra, dec = _parse_position(request)
            obj = source.sky.truth(ra, dec)
        except (SurveyServerError, ValueError) as error:
            logger.info("rejected %s: %s", request.url, error)
            return PlainTextResponse(str(error), status_code=400)
        return JSONResponse(obj.to_dict())

    async def coadd_file(request: Request) -> Response:
        directory, name, filename = (
            request.path_params[key] for key in ("directory", "brick", "filename")
        )
        match = _COADD_FILE.fullmatch(filename)
        brick = bricks.brick(name) if bricks is not None else None
        if brick is None or directory != name[:3] or match is None or match["brick"] != name:
            return PlainTextResponse(
                f"no coadd {directory}/{name}/{filename}: the brick is outside the served "
                "footprint or the file name is not a served coadd",
                status_code=404,
            )
        if faults is not None and faults.latency:
            await asyncio.sleep(faults.latency)
        try:
            path = await run_in_threadpool(bricks.file, brick, filename)  # type: ignore[union-attr]
        except FileNotFoundError as error:
            return PlainTextResponse(str(error), status_code=404)
        return FileResponse(path, media_type="application/fits")

    async def bricks_table(request: Request) -> Response:
        if bricks is None:
            return PlainTextResponse("this server serves no bricks", status_code=404)
        buffer = io.BytesIO()
        fits.BinTableHDU(bricks.bricks_table()).writeto(buffer)
        return Response(buffer.getvalue(), media_type="application/fits")

    routes = [
        Route(BRICKS_PREFIX + "/coadd/{directory}/{brick}/{filename}", coadd_file),
        Route(BRICKS_PREFIX + "/survey-bricks.fits", bricks_table),
        Route("/viewer/fits-cutout", fits_cutout),
        Route("/viewer/fits-cutout/", fits_cutout),
        Route("/viewer/cutout.fits", fits_cutout),
        Route("/viewer/jpeg-cutout", jpeg_cutout),
        Route("/viewer/jpeg-cutout/", jpeg_cutout),
        Route("/viewer/cutout.jpg", jpeg_cutout),
        Route("/viewer/sim/truth", truth),
    ]
    app = Starlette(routes=routes)
    app.state.source = source
    app.state.bricks = bricks
    app.state.fault_counts = counts
    return app


def _parse_position(request: Request) -> tuple[float, float]:
    params = request.query_params
    try:
        ra, dec = float(params["ra"]), float(params["dec"])
    except (KeyError, ValueError):
        raise SurveyServerError(
            f"missing or invalid ra/dec (got ra={params.get('ra')!r}, dec={params.get('dec')!r}); "
            "pass both in decimal degrees, e.g. ?ra=190.1086&dec=1.2005"
        ) from None
    if not (math.isfinite(ra) and math.isfinite(dec)) or not -90.0 <= dec <= 90.0:
        raise SurveyServerError(
            f"invalid position ra={ra!r}, dec={dec!r}; dec must be in [-90, 90] degrees"
        )
    return ra % 360.0, dec


def _parse_int(params: dict[str, str] | object, name: str, default: int) -> int:
    raw = params.get(name)  # type: ignore[attr-defined]
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SurveyServerError(
            f"invalid {name}={raw!r}; pass an integer number of pixels"
        ) from None
    if not 1 <= value <= MAX_SIZE:
        raise SurveyServerError(
            f"invalid {name}={value}; it must be between 1 and {MAX_SIZE} pixels"
        )
    return value


def _parse_request(request: Request, source: CutoutSource) -> _CutoutRequest:
    params = request.query_params
    ra, dec = _parse_position(request)

    layer = params.get("layer", "ls-dr9")
    if layer not in LAYERS:
        raise SurveyServerError(f"no such layer: {layer!r}; known layers are {', '.join(LAYERS)}")

    try:
        pixscale = float(params.get("pixscale", "0.262"))
    except ValueError:
        raise SurveyServerError(
            f"invalid pixscale={params.get('pixscale')!r}; pass arcsec per pixel"
        ) from None
    if not (math.isfinite(pixscale) and pixscale > 0):
        raise SurveyServerError(
            f"invalid pixscale={pixscale!r}; it must be positive arcsec per pixel"
        )

    size = _parse_int(params, "size", 256)
    width = _parse_int(params, "width", size)
    height = _parse_int(params, "height", size)

    # As in the public service, bands with an unknown character fall back to the layer's bands.
    bands = params.get("bands", LAYERS[layer])
    if (
        not bands
        or any(band not in source.bands for band in bands)
        or len(set(bands)) != len(bands)
    ):
        bands = "".join(band for band in LAYERS[layer] if band in source.bands) or source.bands

    flags = {
        name: params.get(name, "").lower() not in ("", "0", "false", "no")
        for name in ("invvar", "maskbits")
    }
    return _CutoutRequest(
        ra, dec, layer, pixscale, width, height, bands, flags["invvar"], flags["maskbits"]
    )


def _fits_body(source: CutoutSource, request: _CutoutRequest) -> bytes:
    """Render the cutout and return it as FITS bytes laid out like the public service's."""
    args = (request.ra, request.dec, request.width, request.height, request.pixscale)
    cube = source.image(*args, request.bands)
    if cube is None:
        cube = np.zeros((len(request.bands), request.height, request.width), dtype=np.float32)

    header = _cutout_header(request, source)
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(_squeeze(cube), header=header)]
    if request.invvar:
        invvar = source.invvar(*args, request.bands)
        if invvar is None:
            invvar = np.zeros_like(cube)
        invvar_header = header.copy()
        invvar_header["IMAGETYP"] = "INVVAR"
        hdus.append(fits.ImageHDU(_squeeze(invvar), header=invvar_header))
    if request.maskbits:
        maskbits = source.maskbits(*args)
        if maskbits is None:
            maskbits = np.zeros((request.height, request.width), dtype=np.int32)
        maskbits_header = cutout_wcs(*args).to_header()
        maskbits_header["IMAGETYP"] = "MASKBITS"
        hdus.append(
            fits.ImageHDU(maskbits.astype(np.int32), header=maskbits_header, name="MASKBITS")
        )

    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _squeeze(cube: np.ndarray) -> np.ndarray:
    """Return a single band as a 2-D image, as the public service does."""
    return (cube[0] if cube.shape[0] == 1 else cube).astype(np.float32, copy=False)


def _cutout_header(request: _CutoutRequest, source: CutoutSource) -> fits.Header:
    version = re.search(r"dr(\d+)", request.layer)
    header = fits.Header()
    header["SURVEY"] = source.survey
    header["VERSION"] = f"DR{version.group(1)}" if version else request.layer
    header["IMAGETYP"] = "image"
    header["BANDS"] = request.bands
    for index, band in enumerate(request.bands):
        header[f"BAND{index}"] = band
    header["CTYPE1"] = ("RA---TAN", "TANgent plane")
    header["CTYPE2"] = ("DEC--TAN", "TANgent plane")
    header["CRVAL1"] = (request.ra, "Reference RA")
    header["CRVAL2"] = (request.dec, "Reference Dec")
    header["CRPIX1"] = ((request.width + 1) / 2, "Reference x")
    header["CRPIX2"] = ((request.height + 1) / 2, "Reference y")
    header["CD1_1"] = (-request.pixscale / 3600.0, "CD matrix")
    header["CD1_2"] = (0.0, "CD matrix")
    header["CD2_1"] = (0.0, "CD matrix")
    header["CD2_2"] = (request.pixscale / 3600.0, "CD matrix")
    header["IMAGEW"] = (float(request.width), "Image width")
    header["IMAGEH"] = (float(request.height), "Image height")
    return header


def _jpeg_body(source: CutoutSource, request: _CutoutRequest) -> bytes:
    picture = source.picture(
        request.ra, request.dec, request.width, request.height, request.pixscale, request.bands
    )
    buffer = io.BytesIO()
    Image.fromarray(picture, mode="RGB").save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


@contextlib.contextmanager
def serve_in_thread(
    app: Starlette, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0
) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread and yield its base URL.

    The URL has the form ``http://127.0.0.1:<port>/viewer/``; ``port=0`` picks a free port. The
    context waits until the server accepts connections and stops it on exit, waiting at most 2
    seconds for requests still in progress.

    Raises
    ------
    SurveyServerError
        If the server does not start within ``startup_timeout`` seconds.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="survey-server", daemon=True)
    thread.start()

    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise SurveyServerError(
                f"survey server failed to start on {host}:{port} within {startup_timeout} s"
            )
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{host}:{bound_port}/viewer/"
    logger.info("survey server listening at %s", url)

    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        logger.info("survey server at %s stopped", url)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lensminer.infra.survey_server",
        description="Serve Legacy Survey style cutouts from a simulated sky or a folder of images.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sky", action="store_true", help="serve the simulated sky")
    mode.add_argument(
        "--images", metavar="DIR", help="serve FITS and PNG/JPEG images from this folder"
    )
    parser.add_argument(
        "--catalog",
        metavar="CSV",
        help="table naming the pictures in --images (file and position columns)",
    )
    parser.add_argument(
        "--png-pixscale", type=float, help="pixel scale of the pictures in arcsec per pixel"
    )
    parser.add_argument(
        "--bricks-catalog",
        metavar="CSV",
        help="with --sky, also serve brick coadds under /dr9/south/ with a galaxy at each ra, dec "
        "(degrees) of this table",
    )
    parser.add_argument(
        "--bricks-quantize-level",
        type=float,
        help="write brick images with lossy RICE_1 at this quantize level (default: lossless)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated sky (default 0)")
    parser.add_argument(
        "--lens-fraction",
        type=float,
        default=0.05,
        help="share of positions with a lens (default 0.05)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=0, help="port to bind; 0 picks a free one (default 0)"
    )
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of requests that get a faulty response, split equally between 503, 429 "
        "and truncated bodies",
    )
    parser.add_argument(
        "--timeout-rate",
        type=float,
        default=0.0,
        help="share of requests held for --timeout-hold seconds",
    )
    parser.add_argument(
        "--timeout-hold",
        type=float,
        default=30.0,
        help="seconds that a timeout fault delays the response",
    )
    parser.add_argument(
        "--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429"
    )
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds added to every response"
    )
    parser.add_argument(
        "--fault-seed", type=int, default=0, help="seed of the fault RNG (default 0)"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; return the process exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    bricks = None
    try:
        if args.bricks_catalog and not args.sky:
            raise SurveyServerError(
                "--bricks-catalog needs --sky: bricks are drawn from the simulated sky"
            )
        if args.sky:
            sky = SimulatedSky(seed=args.seed, lens_fraction=args.lens_fraction)
            source: CutoutSource = SimulatedSkySource(sky)
            if args.bricks_catalog:
                bricks = SimulatedBrickSource(
                    sky,
                    Table.read(args.bricks_catalog, format="ascii.csv"),
                    quantize_level=args.bricks_quantize_level,
                )
        else:
            source = ImageDirectorySource(
                args.images, catalog=args.catalog, png_pixscale=args.png_pixscale
            )
        share = args.fault_rate / 3.0
        faults = FaultConfig(
            error_rate=share,
            rate_limit_rate=share,
            truncate_rate=share,
            timeout_rate=args.timeout_rate,
            timeout_hold=args.timeout_hold,
            retry_after=args.retry_after,
            latency=args.latency,
            seed=args.fault_seed,
        )
    except (SurveyServerError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    try:
        with serve_in_thread(
            create_app(source, faults, bricks=bricks), host=args.host, port=args.port
        ) as url:
            print(f"{READY_LINE} {url}", flush=True)
            while not stop.wait(timeout=1.0):
                pass
    finally:
        if bricks is not None:
            bricks.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
