"""Batched image views for training and embedding, as torch operations on the training device.

:func:`evaluation_view` is the deterministic view used for embedding: a centre crop and, for FITS
stores, the Legacy Survey viewer's asinh RGB stretch. :class:`Augmentation` makes the random
training views of MoCo pretraining (Stein et al. 2022, arXiv 2110.00023).

Image conventions: FITS stores hold float32 nanomaggies of shape (B, C, S, S) with bands in the
store's ``bands`` order; JPEG stores hold uint8 RGB of shape (B, 3, S, S). Every view is float32
RGB in [0, 1] in R, G, B order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lensminer.config import AugmentConfig
from lensminer.exceptions import ConfigError

__all__ = [
    "RGB_BANDS",
    "center_crop",
    "evaluation_view",
    "rgb_band_indices",
    "viewer_stretch",
]

logger = logging.getLogger(__name__)

# The viewer draws z as red, r as green and g as blue.
RGB_BANDS = "zrg"
# Band order of AugmentConfig's per-band tuples (reddening, PSF and noise ranges, RGB scales).
CONFIG_BANDS = "grz"

_warned_upsampling: set[tuple[int, int]] = set()


def rgb_band_indices(bands: str) -> list[int]:
    """Return the channel indices of z, r and g (the viewer's red, green and blue) in ``bands``.

    Raises
    ------
    ConfigError
        If ``bands`` lacks one of g, r and z.
    """
    missing = [band for band in RGB_BANDS if band not in bands]
    if missing:
        raise ConfigError(
            f"bands {bands!r} lack {''.join(missing)!r}; the viewer RGB stretch needs g, r and z "
            "(set survey.bands to include them)"
        )
    return [bands.index(band) for band in RGB_BANDS]


def _config_band_indices(bands: str) -> list[int]:
    """Return, for each band of ``bands``, its index in AugmentConfig's g, r, z tuples."""
    unknown = [band for band in bands if band not in CONFIG_BANDS]
    if unknown:
        raise ConfigError(
            f"bands {bands!r} include {''.join(unknown)!r}, but the augmentation parameters are "
            f"defined for {CONFIG_BANDS!r} only; use a subset of g, r, z"
        )
    return [CONFIG_BANDS.index(band) for band in bands]


def viewer_stretch(
    flux: Tensor,
    bands: str,
    *,
    scales: Sequence[float] = (6.0, 3.4, 2.2),
    offset: float = 0.03,
    q: float = 20.0,
) -> Tensor:
    """Map fluxes to RGB with the Legacy Survey viewer's asinh stretch.

    With ``v = max(0, flux * scale + offset)`` per band and ``I`` the mean of ``v`` over g, r and z,
    each channel is ``clip(v * asinh(q * I) / sqrt(q) / I, 0, 1)``; pixels with ``I = 0`` are 0.

    Parameters
    ----------
    flux
        Shape (B, C, H, W), float, nanomaggies, channels in ``bands`` order.
    bands
        Band of each channel, e.g. ``"grz"``; must include g, r and z. Other bands are ignored.
    scales
        Viewer scales for g, r and z, in that order.
    offset, q
        Additive offset and asinh softening of the viewer.

    Returns
    -------
    Tensor
        Shape (B, 3, H, W), dtype of ``flux``, in [0, 1], channels red (z), green (r), blue (g).
    """
    if flux.ndim != 4 or flux.shape[1] != len(bands):
        raise ValueError(
            f"expected flux of shape (B, {len(bands)}, H, W) for bands {bands!r}, "
            f"got {tuple(flux.shape)}"
        )
    if len(scales) != len(CONFIG_BANDS):
        raise ConfigError(f"rgb_scales {tuple(scales)} must give one scale for each of g, r, z")

    # NOTE: non-finite fluxes (masked or bad pixels) are drawn as zero flux.
    rgb_flux = torch.nan_to_num(flux[:, rgb_band_indices(bands)], nan=0.0, posinf=0.0, neginf=0.0)
    scale = flux.new_tensor([scales[CONFIG_BANDS.index(band)] for band in RGB_BANDS]).view(
        1, 3, 1, 1
    )

    values = torch.clamp(rgb_flux * scale + offset, min=0.0)
    intensity = values.mean(dim=1, keepdim=True)
    safe = torch.where(intensity > 0, intensity, torch.ones_like(intensity))
    gain = torch.where(
        intensity > 0, torch.asinh(q * safe) / math.sqrt(q) / safe, torch.zeros_like(intensity)
    )
    return torch.clamp(values * gain, 0.0, 1.0)


def center_crop(images: Tensor, size: int) -> Tensor:
    """Cut the central ``size`` x ``size`` pixels of square images.

    The crop starts at ``(S - size) // 2``. Images smaller than ``size`` are first resized up to
    ``size`` with bilinear interpolation (a WARNING is logged once per image size), because the
    encoder expects a fixed input size.

    Parameters
    ----------
    images
        Shape (B, C, S, S).

    Returns
    -------
    Tensor
        Shape (B, C, size, size), same dtype as ``images`` (float when resized).
    """
    side = images.shape[-1]
    if images.ndim != 4 or images.shape[-2] != side:
        raise ValueError(f"expected square images of shape (B, C, S, S), got {tuple(images.shape)}")

    if side < size:
        if (side, size) not in _warned_upsampling:
            _warned_upsampling.add((side, size))
            logger.warning(
                "images of %d px are smaller than the %d px crop; resizing them up", side, size
            )
        return F.interpolate(
            images.float(), size=(size, size), mode="bilinear", align_corners=False
        )

    start = (side - size) // 2
    return images[..., start : start + size, start : start + size]


def evaluation_view(
    images: Tensor,
    *,
    image_format: str,
    bands: str,
    crop_size: int = 96,
    config: AugmentConfig | None = None,
) -> Tensor:
    """Make the deterministic view used for embedding: centre crop, then RGB in [0, 1].

    Parameters
    ----------
    images
        FITS stores: float32 nanomaggies, shape (B, C, S, S), channels in ``bands`` order.
        JPEG stores: uint8 RGB, shape (B, 3, S, S).
    image_format
        ``"fits"`` or ``"jpeg"``, the cutout store's ``image_format`` attribute.
    bands
        The cutout store's ``bands`` attribute, e.g. ``"grz"``.
    crop_size
        Side of the output in pixels; images with S < crop_size are resized up to it.
    config
        Supplies ``rgb_scales``, ``rgb_offset`` and ``rgb_q``; defaults to ``AugmentConfig()``.

    Returns
    -------
    Tensor
        Shape (B, 3, crop_size, crop_size), float32 in [0, 1], on the device of ``images``.

    Raises
    ------
    ValueError
        If ``image_format`` is unknown or ``images`` has the wrong shape or dtype for it.
    """
    config = config or AugmentConfig()

    if image_format == "fits":
        if not images.is_floating_point():
            raise ValueError(f"FITS cutouts must be float nanomaggies, got dtype {images.dtype}")
        cropped = center_crop(images.float(), crop_size)
        return viewer_stretch(
            cropped, bands, scales=config.rgb_scales, offset=config.rgb_offset, q=config.rgb_q
        )

    if image_format == "jpeg":
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "JPEG cutouts must be uint8 RGB of shape (B, 3, S, S), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        return center_crop(images.float() / 255.0, crop_size)

    raise ValueError(f"unknown image_format {image_format!r}; expected 'fits' or 'jpeg'")
