"""The Legacy Survey viewer's asinh colour stretch from g, r, z nanomaggies to RGB.

The viewer maps z to red, r to green and g to blue with per-band scales, adds a small offset, and
compresses the mean brightness ``I`` with ``asinh(q * I) / sqrt(q)`` while keeping the ratios
between bands. The JPEG cutouts of the public service use these
defaults: scales g 6.0, r 3.4, z 2.2, offset 0.03 and q 20.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "VIEWER_PLANES",
    "VIEWER_SCALES",
    "fits_to_picture",
    "to_uint8",
    "viewer_rgb",
    "viewer_rgb_inverse",
]

#: Output plane of each band in (R, G, B) order.
VIEWER_PLANES: dict[str, int] = {"z": 0, "i": 0, "r": 1, "g": 2}

#: Multiplicative scale of each band before the stretch, as in the viewer.
VIEWER_SCALES: dict[str, float] = {"g": 6.0, "r": 3.4, "i": 1.0, "z": 2.2}


def viewer_rgb(
    flux: np.ndarray,
    bands: str = "grz",
    scales: dict[str, float] | None = None,
    offset: float = 0.03,
    q: float = 20.0,
) -> np.ndarray:
    """Stretch a stack of band images into an RGB image the way the Legacy Survey viewer does.

    Each band becomes ``v = max(0, flux * scale + offset)``. With ``I`` the mean of ``v`` over the
    bands, each output plane is ``clip(v * asinh(q * I) / sqrt(q) / I, 0, 1)``, and pixels with
    ``I = 0`` are black.

    Parameters
    ----------
    flux
        Array of shape ``(..., n_bands, H, W)`` in nanomaggies per pixel, bands in ``bands`` order.
    bands
        One character per band. Each band must have a colour plane (g blue, r green, z or i red),
        and no two bands may share a plane.
    scales
        Scale per band; bands not given here use :data:`VIEWER_SCALES`.
    offset
        Offset added after scaling, in scaled units.
    q
        Softening of the asinh stretch; larger values compress bright pixels more.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(..., 3, H, W)`` in [0, 1], planes in R, G, B order. A plane with
        no band (for example blue when ``bands="rz"``) is zero.

    Raises
    ------
    ValueError
        If the band axis does not match ``bands``, a band has no colour plane, or two bands
        share a plane.
    """
    flux = np.asarray(flux)
    if flux.ndim < 3 or flux.shape[-3] != len(bands):
        raise ValueError(
            f"flux has shape {flux.shape}, expected (..., {len(bands)}, H, W) for bands {bands!r}; "
            "pass one image per band in the order of `bands`"
        )
    unknown = [band for band in bands if band not in VIEWER_PLANES]
    if unknown:
        raise ValueError(
            f"bands {unknown!r} have no viewer colour plane; use bands from 'grz' or 'griz'"
        )
    planes = [VIEWER_PLANES[band] for band in bands]
    if len(set(planes)) != len(planes):
        raise ValueError(
            f"bands {bands!r} map two bands to one colour plane; pass at most one of 'i' and 'z'"
        )
    band_scales = {**VIEWER_SCALES, **(scales or {})}

    # Scaled, offset and floored brightness of each band, in float32 unless the input is float64.
    dtype = np.float64 if flux.dtype == np.float64 else np.float32
    scale = np.array([band_scales[band] for band in bands], dtype=dtype)
    scaled = np.maximum(
        dtype(0.0), flux.astype(dtype, copy=False) * scale[:, None, None] + dtype(offset)
    )

    # Stretch the mean brightness and apply the same gain to every band, so colours are kept.
    mean = scaled.mean(axis=-3, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(
            mean > 0, np.arcsinh(dtype(q) * mean) / dtype(np.sqrt(q)) / mean, dtype(0.0)
        )
    stretched = np.clip(scaled * gain, 0.0, 1.0)

    rgb = np.zeros((*flux.shape[:-3], 3, *flux.shape[-2:]), dtype=np.float32)
    for index, plane in enumerate(planes):
        rgb[..., plane, :, :] = stretched[..., index, :, :]
    return rgb


def viewer_rgb_inverse(
    rgb: np.ndarray,
    bands: str = "grz",
    scales: dict[str, float] | None = None,
    offset: float = 0.03,
    q: float = 20.0,
) -> np.ndarray:
    """Recover the band fluxes that :func:`viewer_rgb` stretches into an RGB image.

    The stretch multiplies every band by one gain, so the mean of the output planes is
    ``m = asinh(q * I) / sqrt(q)``. Hence ``I = sinh(sqrt(q) * m) / q``, each band's
    ``v = plane * I / m``, and ``flux = (v - offset) / scale``. The inverse is exact where no
    plane was clipped. A plane clipped at 1 comes back as the flux that reaches 1, a band floored
    at ``v = 0`` comes back as ``-offset / scale``, and black pixels come back at that floor too.

    Parameters
    ----------
    rgb
        Shape ``(..., 3, H, W)``, planes in R, G, B order: float in [0, 1], or uint8 in [0, 255].
    bands, scales, offset, q
        As for :func:`viewer_rgb`; each band is read from its colour plane.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(..., len(bands), H, W)`` in nanomaggies per pixel, bands in
        ``bands`` order.

    Raises
    ------
    ValueError
        If ``rgb`` does not have 3 planes, or ``bands`` is invalid for :func:`viewer_rgb`.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb has shape {rgb.shape}, expected (..., 3, H, W) in R, G, B order")
    unknown = [band for band in bands if band not in VIEWER_PLANES]
    if unknown:
        raise ValueError(
            f"bands {unknown!r} have no viewer colour plane; use bands from 'grz' or 'griz'"
        )
    planes = rgb.astype(np.float64) / 255.0 if rgb.dtype == np.uint8 else rgb.astype(np.float64)
    band_scales = {**VIEWER_SCALES, **(scales or {})}

    # Undo the asinh stretch of the mean brightness, which gives the gain of every plane.
    mean = planes.mean(axis=-3, keepdims=True)
    intensity = np.sinh(np.sqrt(q) * mean) / q
    inverse_gain = np.divide(intensity, mean, out=np.zeros_like(mean), where=mean > 0)
    scaled = planes * inverse_gain  # (..., 3, H, W), v of the band on each plane

    flux = [(scaled[..., VIEWER_PLANES[band], :, :] - offset) / band_scales[band] for band in bands]
    return np.stack(flux, axis=-3).astype(np.float32)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Convert an image with values in [0, 1] to uint8 in [0, 255], rounding to the nearest level.

    Values outside [0, 1] are clipped first. The shape is unchanged.
    """
    return np.round(np.clip(np.asarray(rgb, dtype=np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def fits_to_picture(flux: np.ndarray, bands: str = "grz", **stretch: float) -> np.ndarray:
    """Render a FITS-orientation cube as an ``(H, W, 3)`` uint8 picture oriented like a JPEG cutout.

    FITS row 0 is south and JPEG row 0 is north, so the picture is the RGB stretch flipped
    upside down. East is left in both.

    Parameters
    ----------
    flux
        Array of shape ``(n_bands, H, W)`` in nanomaggies per pixel, FITS orientation.
    bands
        One character per band, as in :func:`viewer_rgb`.
    **stretch
        ``offset`` or ``q`` passed on to :func:`viewer_rgb`.

    Returns
    -------
    numpy.ndarray
        uint8 array of shape ``(H, W, 3)``, row 0 north.
    """
    flux = np.asarray(flux)
    if flux.ndim != 3:
        raise ValueError(f"flux has shape {flux.shape}, expected one cube (n_bands, H, W)")
    rgb = viewer_rgb(flux, bands, **stretch)
    picture = np.flipud(np.moveaxis(rgb, 0, -1))
    return to_uint8(np.ascontiguousarray(picture))
