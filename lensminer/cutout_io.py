"""Parse and validate cutout service responses (FITS and JPEG bytes).

A Legacy Survey ``fits-cutout`` response is one primary HDU holding a big-endian float32 cube of
shape (n_bands, height, width) in nanomaggies, with ``BANDS``/``BANDn`` keywords and a TAN WCS
whose CD matrix gives the pixel scale. Extra HDUs with ``IMAGETYP`` ``INVVAR`` or ``MASKBITS``
follow when the request sets ``invvar`` or ``maskbits``; a requested plane must be present with
the image's shape. Everything that does not match the request raises
:class:`~lensminer.exceptions.CutoutParseError`, so the download stage can retry the request or
record the row as failed instead of storing a wrong image.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from PIL import Image, UnidentifiedImageError

from lensminer.exceptions import CutoutParseError
from lensminer.stores import RowStatus

__all__ = ["ParsedCutout", "parse_fits_cutout", "parse_jpeg_cutout", "read_fits_cutout_file"]

logger = logging.getLogger(__name__)

FITS_MAGIC = b"SIMPLE  ="
JPEG_MAGIC = b"\xff\xd8\xff"
PIXSCALE_RTOL = 1e-3


@dataclass(frozen=True)
class ParsedCutout:
    """A validated cutout.

    Attributes
    ----------
    image
        float32 nanomaggies of shape (n_bands, size, size), row 0 south (FITS), or uint8 RGB of
        shape (3, size, size), row 0 north (JPEG). Native byte order; bad pixels set to 0.
    status
        ``RowStatus.OK``, or ``RowStatus.NO_COVERAGE`` when every pixel is 0.
    n_bad_pixels
        Count of pixels without data: NaN or infinite values (replaced by 0) plus pixels that are
        exactly 0, which the service returns where no exposure covers the sky. For FITS only.
    bands
        Band letters in plane order, from the header (or the request when the header has none).
    pixscale
        Pixel scale in arcsec per pixel from the WCS, or None when the header has no WCS.
    invvar
        float32 inverse variance in nanomaggies^-2, same shape as ``image``, when returned.
    maskbits
        int32 maskbits plane of shape (size, size), when returned.
    """

    image: np.ndarray
    status: RowStatus
    n_bad_pixels: int = 0
    bands: str = ""
    pixscale: float | None = None
    invvar: np.ndarray | None = None
    maskbits: np.ndarray | None = None


def _excerpt(data: bytes, limit: int = 60) -> str:
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


def _open_fits(data: bytes) -> fits.HDUList:
    if not data.startswith(FITS_MAGIC):
        raise CutoutParseError(
            f"response is not FITS ({len(data)} bytes starting {_excerpt(data)})"
        )
    try:
        # astropy only warns about a short file; the size check below turns that into an error.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            hdus = fits.open(io.BytesIO(data), memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, TypeError) as error:
        raise CutoutParseError(f"response is not valid FITS: {error}") from error
    return hdus


def _check_complete(hdus: fits.HDUList, n_bytes: int) -> None:
    for index, hdu in enumerate(hdus):
        info = hdus.fileinfo(index)
        needed = info["datLoc"] + hdu.size
        if needed > n_bytes:
            raise CutoutParseError(
                f"FITS response is truncated: HDU {index} needs {needed} bytes, got {n_bytes}"
            )


def _header_bands(header: fits.Header) -> str | None:
    if "BANDS" in header:
        return str(header["BANDS"]).strip()
    letters = []
    while f"BAND{len(letters)}" in header:
        letters.append(str(header[f"BAND{len(letters)}"]).strip())
    return "".join(letters) or None


def _header_pixscale(header: fits.Header) -> float | None:
    if "CD1_1" in header:
        # Legacy Survey cutouts have no rotation: CD1_2 = CD2_1 = 0.
        return abs(float(header["CD1_1"])) * 3600.0
    if "CDELT1" in header:
        return abs(float(header["CDELT1"])) * 3600.0
    return None


def _extra_plane(hdus: fits.HDUList, kind: str) -> np.ndarray | None:
    for hdu in hdus[1:]:
        label = str(hdu.header.get("IMAGETYP", hdu.header.get("EXTNAME", ""))).strip().upper()
        if kind in label and hdu.data is not None:
            return np.asarray(hdu.data)
    return None


def _cube(
    data: np.ndarray | None, bands: str, size: int | None, what: str = "FITS image"
) -> np.ndarray:
    if data is None:
        raise CutoutParseError("FITS response has no image data in its primary HDU")
    if data.ndim == 2:
        data = data[np.newaxis]
    expected = (len(bands), size, size) if size is not None else (len(bands), *data.shape[1:])
    if data.ndim != 3 or data.shape != expected:
        raise CutoutParseError(
            f"{what} has shape {data.shape}, expected {expected} (bands {bands!r})"
        )
    return data


def _maskbits_plane(data: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    expected = image_shape[1:]
    if data.shape != expected:
        raise CutoutParseError(f"MASKBITS plane has shape {data.shape}, expected {expected}")
    if not np.issubdtype(data.dtype, np.integer):
        raise CutoutParseError(
            f"MASKBITS plane has dtype {data.dtype.name}, expected an integer type"
        )
    return data.astype(np.int32)


def _parse_fits(
    data: bytes,
    bands: str | None,
    size: int | None,
    pixscale: float | None,
    want_invvar: bool = False,
    want_maskbits: bool = False,
) -> ParsedCutout:
    with _open_fits(data) as hdus:
        _check_complete(hdus, len(data))
        header = hdus[0].header

        # Compare the header's description with the request.
        found_bands = _header_bands(header)
        if bands is not None and found_bands is not None and found_bands != bands:
            raise CutoutParseError(f"FITS header has bands {found_bands!r}, requested {bands!r}")
        found_pixscale = _header_pixscale(header)
        if (
            pixscale is not None
            and found_pixscale is not None
            and not np.isclose(found_pixscale, pixscale, rtol=PIXSCALE_RTOL, atol=0)
        ):
            raise CutoutParseError(
                f"FITS pixel scale is {found_pixscale:.5f} arcsec/pixel, requested {pixscale:.5f}"
            )
        plane_bands = found_bands or bands
        if plane_bands is None:
            raise CutoutParseError(
                "FITS header has no BANDS or BAND0 keyword; pass bands to name the planes"
            )

        # Read the pixels. astropy raises when the data are shorter than the header states.
        try:
            raw = hdus[0].data
            invvar = _extra_plane(hdus, "INVVAR")
            maskbits = _extra_plane(hdus, "MASKBITS")
        except (TypeError, ValueError, OSError) as error:
            raise CutoutParseError(f"FITS response is truncated or corrupt: {error}") from error
        cube = _cube(raw, plane_bands, size)

    # A requested plane must be there. A response cut exactly at an HDU boundary also lacks it.
    if want_invvar and invvar is None:
        raise CutoutParseError("response has no INVVAR HDU, but the request set invvar=1")
    if want_maskbits and maskbits is None:
        raise CutoutParseError("response has no MASKBITS HDU, but the request set maskbits=1")

    # Native-endian float32 copy, with NaN and inf set to 0.
    image = cube.astype(np.float32)
    nonfinite = ~np.isfinite(image)
    if nonfinite.any():
        image[nonfinite] = 0.0
    n_bad = int(np.count_nonzero(image == 0))  # includes the replaced NaN and inf pixels
    status = RowStatus.OK if image.any() else RowStatus.NO_COVERAGE

    if invvar is not None:
        invvar = np.nan_to_num(
            _cube(invvar, plane_bands, size, "INVVAR plane").astype(np.float32),
            nan=0.0,
            posinf=0.0,
            neginf=0.0,
        )
    if maskbits is not None:
        maskbits = _maskbits_plane(maskbits, image.shape)
    return ParsedCutout(
        image=image,
        status=status,
        n_bad_pixels=n_bad,
        bands=plane_bands,
        pixscale=found_pixscale,
        invvar=invvar,
        maskbits=maskbits,
    )


def parse_fits_cutout(
    data: bytes,
    *,
    bands: str,
    size: int,
    pixscale: float,
    invvar: bool = False,
    maskbits: bool = False,
) -> ParsedCutout:
    """Parse a ``fits-cutout`` response and check it against the request.

    Parameters
    ----------
    data
        Response body.
    bands, size, pixscale
        The request: band letters in order, side in pixels and arcsec per pixel. The pixel scale
        must match the header's CD matrix (or CDELT) within a relative 1e-3.
    invvar, maskbits
        Whether the request set ``invvar=1`` or ``maskbits=1``. A requested plane must be in the
        response. Planes that were not requested are parsed when present.

    Returns
    -------
    ParsedCutout
        ``image`` float32 of shape (len(bands), size, size); a 2-D single-band response becomes
        (1, size, size). ``invvar`` has the image's shape and ``maskbits`` is (size, size).

    Raises
    ------
    CutoutParseError
        If the bytes are not FITS, are truncated, the shape, bands or pixel scale differ from
        the request, or a requested plane is missing or has the wrong shape.
    """
    return _parse_fits(data, bands, size, pixscale, invvar, maskbits)


def read_fits_cutout_file(
    path: str | Path,
    *,
    bands: str | None = None,
    size: int | None = None,
    pixscale: float | None = None,
) -> ParsedCutout:
    """Read and validate a saved FITS cutout; checks left as None take their values from the header.

    Raises
    ------
    CutoutParseError
        As :func:`parse_fits_cutout`, with the path in the message.
    """
    data = Path(path).read_bytes()
    try:
        return _parse_fits(data, bands, size, pixscale)
    except CutoutParseError as error:
        raise CutoutParseError(f"{path}: {error}") from error


def parse_jpeg_cutout(data: bytes, *, size: int) -> ParsedCutout:
    """Parse a ``jpeg-cutout`` response into uint8 RGB of shape (3, size, size), row 0 north.

    NOTE: the viewer renders empty sky as flat grey rather than black, so a JPEG without coverage
    is not detected and gets ``RowStatus.OK``.

    Raises
    ------
    CutoutParseError
        If the bytes are not a complete JPEG or the image is not ``size`` x ``size``.
    """
    if not data.startswith(JPEG_MAGIC):
        raise CutoutParseError(
            f"response is not JPEG ({len(data)} bytes starting {_excerpt(data)})"
        )
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            rgb = np.asarray(picture.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise CutoutParseError(f"JPEG response is truncated or corrupt: {error}") from error

    if rgb.shape[:2] != (size, size):
        raise CutoutParseError(
            f"JPEG image is {rgb.shape[1]}x{rgb.shape[0]} pixels, requested {size}x{size}"
        )
    return ParsedCutout(
        image=np.ascontiguousarray(rgb.transpose(2, 0, 1)), status=RowStatus.OK, bands="grz"
    )
