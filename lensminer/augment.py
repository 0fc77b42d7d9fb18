"""Batched image views for training and embedding, as torch operations on the training device.

:func:`evaluation_view` is the deterministic view used for embedding: a centre crop and, for FITS
stores, the Legacy Survey viewer's asinh RGB stretch. :class:`Augmentation` makes the random
training views of MoCo pretraining (Stein et al. 2022, arXiv 2110.00023).

Image conventions: FITS stores hold float32 nanomaggies of shape (B, C, S, S) with bands in the
store's ``bands`` order; JPEG stores hold uint8 RGB of shape (B, 3, S, S). Every view is float32
RGB in [0, 1] in R, G, B order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lensminer.config import AugmentConfig
from lensminer.exceptions import ConfigError

__all__ = [
    "RGB_BANDS",
    "AugmentParameters",
    "Augmentation",
    "add_noise",
    "affine_matrices",
    "affine_transform",
    "border_noise_sigma",
    "center_crop",
    "evaluation_view",
    "gaussian_blur",
    "jitter_crop",
    "blur_radius",
    "lower_median",
    "redden",
    "resample_window",
    "rgb_band_indices",
    "viewer_stretch",
]

logger = logging.getLogger(__name__)

# The viewer draws z as red, r as green and g as blue.
RGB_BANDS = "zrg"
# Band order of AugmentConfig's per-band tuples (reddening, PSF and noise ranges, RGB scales).
CONFIG_BANDS = "grz"

_warned_upsampling: set[tuple[int, int]] = set()
_warned_jitter: set[tuple[int, int]] = set()


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

    # NOTE: non-finite fluxes (masked or bad pixels) are drawn as zero flux. A sum is finite
    # when every element is, and reading it is cheaper than rewriting every pixel.
    rgb_flux = flux[:, rgb_band_indices(bands)]
    if not bool(torch.isfinite(rgb_flux.sum())):
        rgb_flux = torch.nan_to_num(rgb_flux, nan=0.0, posinf=0.0, neginf=0.0)
    scale = flux.new_tensor([scales[CONFIG_BANDS.index(band)] for band in RGB_BANDS]).view(
        1, 3, 1, 1
    )

    values = (rgb_flux * scale).add_(offset).clamp_(min=0.0)
    intensity = values.mean(dim=1, keepdim=True)

    # Where I = 0 every channel is 0, so any finite gain gives the 0 the formula defines.
    # For x > 0, asinh(x) = log1p(x + x / (1/x + sqrt(1 + 1/x^2))): this form neither
    # overflows nor loses precision near 0, and is several times faster than torch.asinh
    # on CPUs (torch 2.13).
    safe = intensity.clamp_(min=torch.finfo(flux.dtype).tiny)
    x = q * safe
    inverse = x.reciprocal()
    asinh = torch.log1p(x + x / (inverse + torch.sqrt(1.0 + inverse * inverse)))
    gain = asinh.div_(safe * math.sqrt(q))
    return values.mul_(gain).clamp_(0.0, 1.0)


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


# Pixel scale of DR9 cutouts in arcsec per pixel, used when a store does not record its own.
DEFAULT_PIXSCALE = 0.262
# FWHM = 2 sqrt(2 ln 2) sigma for a Gaussian.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# Scale from the median absolute deviation to the standard deviation of a Gaussian.
MAD_TO_SIGMA = 1.482602218505602
# Gaussian kernels are cut at this many sigma, as scipy.ndimage.gaussian_filter does by default.
KERNEL_TRUNCATE = 4.0


def redden(flux: Tensor, ebv_old: Tensor, ebv_new: Tensor, coefficients: Sequence[float]) -> Tensor:
    """Move images from one Galactic reddening to another.

    Each band is multiplied by ``T_new / T_old = 10**(-0.4 * R * (E_new - E_old))``.

    Parameters
    ----------
    flux
        Shape (B, C, H, W), nanomaggies.
    ebv_old, ebv_new
        Shape (B,), E(B-V) in magnitudes: the catalog value and the one to simulate.
    coefficients
        Extinction coefficient R of each of the C bands (A_band = R * E(B-V)).

    Returns
    -------
    Tensor
        Shape (B, C, H, W).
    """
    R = flux.new_tensor(list(coefficients))
    delta = (ebv_new - ebv_old).to(flux.dtype)
    transmission = torch.pow(10.0, -0.4 * delta[:, None] * R[None, :])
    return flux * transmission[:, :, None, None]


def affine_matrices(angle: Tensor, flip_x: Tensor, flip_y: Tensor, scale: Tensor) -> Tensor:
    """Build the (B, 2, 2) maps from output to input pixel offsets about the image centre.

    The output is the input flipped (``flip_x`` mirrors columns, ``flip_y`` rows), then rotated
    by ``angle`` radians, then magnified by ``scale`` (``scale > 1`` enlarges the galaxy).
    Offsets are (x, y) = (column, row).
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    flips = torch.diag_embed(
        torch.stack([1.0 - 2.0 * flip_x.to(angle.dtype), 1.0 - 2.0 * flip_y.to(angle.dtype)], -1)
    )
    return flips @ rotation / scale[:, None, None]


def affine_transform(
    images: Tensor, matrices: Tensor, *, padding_mode: str = "reflection"
) -> Tensor:
    """Resample images about their centres with bilinear interpolation.

    Parameters
    ----------
    images
        Shape (B, C, S, S), float.
    matrices
        Shape (B, 2, 2), output-to-input maps from :func:`affine_matrices`.
    padding_mode
        ``grid_sample`` padding for pixels that map outside the input: ``"reflection"`` mirrors
        about the edge, ``"zeros"`` fills zero flux, ``"border"`` repeats edge pixels.

    Returns
    -------
    Tensor
        Shape (B, C, S, S).
    """
    # For square images the normalised coordinates of grid_sample are isotropic, so the same
    # 2x2 matrix acts on them with no translation.
    theta = torch.cat([matrices, matrices.new_zeros(matrices.shape[0], 2, 1)], dim=2).to(
        images.dtype
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )


def blur_radius(sigma: Tensor) -> int:
    """Return the kernel radius in pixels that :func:`gaussian_blur` uses for these sigmas."""
    max_sigma = float(sigma.max()) if sigma.numel() else 0.0
    return int(KERNEL_TRUNCATE * max_sigma + 0.5)


def gaussian_blur(
    images: Tensor, sigma: Tensor, *, padding: str = "reflect", gain: Tensor | None = None
) -> Tensor:
    """Blur each image and band with its own circular Gaussian.

    The blur is separable: one grouped convolution along rows and one along columns, with one
    kernel per (image, band). Kernels are cut at ``KERNEL_TRUNCATE * max(sigma)``.

    Parameters
    ----------
    images
        Shape (B, C, H, W), float.
    sigma
        Shape (B, C), Gaussian sigma in pixels; 0 leaves that band unchanged.
    padding
        ``"reflect"`` mirrors the edges without repeating the edge pixel (scipy's
        ``mode="mirror"``) and keeps the size. ``"valid"`` does not pad, so the output loses
        :func:`blur_radius` pixels on each side.
    gain
        Shape (B, C), a factor applied to each image and band with the blur at no extra cost
        (e.g. the reddening transmission); None applies none.

    Returns
    -------
    Tensor
        Shape (B, C, H, W), or (B, C, H - 2r, W - 2r) with ``padding="valid"``.
    """
    batch, channels, height, width = images.shape
    radius = blur_radius(sigma)
    if padding == "reflect":
        radius = min(radius, height - 1, width - 1)
    elif padding != "valid":
        raise ValueError(f"unknown padding {padding!r}; expected 'reflect' or 'valid'")
    if radius == 0:
        return images if gain is None else images * gain[:, :, None, None].to(images.dtype)

    # One normalised 1-D kernel per (image, band); sigma 0 gives a delta kernel.
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.reshape(-1, 1).to(images.dtype)
    safe_sigma = torch.clamp(sigma, min=1e-6)
    kernels = torch.exp(-0.5 * (offsets[None, :] / safe_sigma) ** 2)
    kernels = torch.where(sigma > 1e-3, kernels, (offsets == 0).to(images.dtype)[None, :])
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    column_kernels = kernels if gain is None else kernels * gain.reshape(-1, 1).to(images.dtype)

    # Fold the batch into channels so one grouped convolution applies every kernel.
    groups = batch * channels
    stacked = images.reshape(1, groups, height, width)
    if padding == "reflect":
        stacked = F.pad(stacked, (radius, radius, radius, radius), mode="reflect")
    stacked = F.conv2d(stacked, kernels.view(groups, 1, -1, 1), groups=groups)
    stacked = F.conv2d(stacked, column_kernels.view(groups, 1, 1, -1), groups=groups)
    return stacked.reshape(batch, channels, *stacked.shape[-2:])


def resample_window(
    images: Tensor, matrices: Tensor, shift: Tensor, size: int, *, padding_mode: str = "reflection"
) -> Tensor:
    """Resample a ``size`` x ``size`` window of the transformed images in one ``grid_sample``.

    Equal to ``jitter_crop(affine_transform(images, matrices), size, shift)`` but samples only
    the window's pixels, and the window may reach past the image (filled by ``padding_mode``).

    Parameters
    ----------
    images
        Shape (B, C, S, S), float.
    matrices
        Shape (B, 2, 2), output-to-input maps from :func:`affine_matrices`.
    shift
        Shape (B, 2), integer (row, column) shift of the window centre from the image centre,
        in the transformed image.
    size
        Side of the window in pixels.

    Returns
    -------
    Tensor
        Shape (B, C, size, size).
    """
    batch, side = images.shape[0], images.shape[-1]
    centre = (side - 1) / 2
    dtype, device = images.dtype, images.device

    # Pixel offsets of the window's columns (x) and rows (y) from the image centre, in the
    # transformed image, each (B, size).
    start = (side - size) // 2 - centre
    steps = torch.arange(size, device=device, dtype=dtype) + start
    shift = shift.to(dtype)
    x = steps[None, :] + shift[:, 1, None]
    y = steps[None, :] + shift[:, 0, None]

    # Input offsets (M @ (x, y)) in grid_sample's normalised coordinates (align_corners=False),
    # where pixel offset u from the centre maps to 2 u / side. Each grid component is the sum
    # of a row term and a column term, broadcast straight into the (B, size, size, 2) grid.
    matrices = matrices.to(dtype) * (2.0 / side)
    grid = torch.empty(batch, size, size, 2, device=device, dtype=dtype)
    for axis in range(2):
        column_term = (matrices[:, axis, 0, None] * x)[:, None, :]  # (B, 1, size)
        row_term = (matrices[:, axis, 1, None] * y)[:, :, None]  # (B, size, 1)
        torch.add(column_term, row_term, out=grid[..., axis])
    return F.grid_sample(
        images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )


def jitter_crop(images: Tensor, size: int, shift: Tensor) -> Tensor:
    """Cut a ``size`` x ``size`` window per image, centred ``shift`` pixels from the image centre.

    Parameters
    ----------
    images
        Shape (B, C, S, S).
    size
        Side of the crop in pixels.
    shift
        Shape (B, 2), integer (row, column) shifts of the crop centre.

    Returns
    -------
    Tensor
        Shape (B, C, size, size).

    Raises
    ------
    ValueError
        If a shifted window leaves the image.
    """
    batch, _, side, _ = images.shape
    start = (side - size) // 2 + shift.to(torch.long)
    if bool((start < 0).any()) or bool((start + size > side).any()):
        raise ValueError(
            f"a crop of {size} px shifted by up to {int(shift.abs().max())} px does not fit in "
            f"{side} px images; lower augment.jitter or augment.crop_size"
        )

    offsets = torch.arange(size, device=images.device)
    rows = (start[:, 0, None] + offsets)[:, :, None]  # (B, size, 1)
    cols = (start[:, 1, None] + offsets)[:, None, :]  # (B, 1, size)
    index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing puts the batch-broadcast dimensions first: (B, size, size, C).
    return images.permute(0, 2, 3, 1)[index, rows, cols].permute(0, 3, 1, 2)


def border_noise_sigma(images: Tensor, border: int) -> Tensor:
    """Estimate each band's per-pixel noise from its border pixels with the MAD.

    ``sigma = 1.4826 * median(|x - median(x)|)`` over the pixels within ``border`` of the edge,
    which is robust to the light of the central galaxy reaching into the border.

    Parameters
    ----------
    images
        Shape (B, C, H, W).

    Returns
    -------
    Tensor
        Shape (B, C), in the units of ``images``.
    """
    height, width = images.shape[-2:]
    if 2 * border >= min(height, width):
        pixels = images.flatten(-2)
    else:
        # Top and bottom strips, then the left and right strips between them.
        inner = images[..., border : height - border, :]
        strips = [
            images[..., :border, :],
            images[..., height - border :, :],
            inner[..., :border],
            inner[..., width - border :],
        ]
        pixels = torch.cat([strip.flatten(-2) for strip in strips], dim=-1)  # (B, C, n_border)
    deviation = (pixels - lower_median(pixels)[..., None]).abs_()
    return MAD_TO_SIGMA * lower_median(deviation)


def lower_median(values: Tensor) -> Tensor:
    """Return the lower median over the last dimension, as ``values.median(dim=-1)`` does.

    On the CPU the selection runs in ``numpy.partition``, which is about 10 times faster than
    ``torch.median`` there (NumPy 2.4 and torch 2.13 on x86_64). Rows that contain NaN give NaN.

    Parameters
    ----------
    values
        Shape (..., N) with N >= 1, float.

    Returns
    -------
    Tensor
        Shape (...), the element of rank ``(N - 1) // 2`` of each row.
    """
    if values.device.type != "cpu" or values.requires_grad or values.shape[-1] == 0:
        return values.median(dim=-1).values

    rank = (values.shape[-1] - 1) // 2
    array = values.detach().numpy()
    median = torch.from_numpy(np.partition(array, rank, axis=-1)[..., rank].copy())
    has_nan = values.isnan().any(dim=-1)
    if bool(has_nan.any()):
        median = torch.where(has_nan, torch.full_like(median, float("nan")), median)
    return median


def add_noise(
    images: Tensor, target_sigma: Tensor, own_sigma: Tensor, generator: torch.Generator | None
) -> Tensor:
    """Add Gaussian noise that raises each band's per-pixel noise to ``target_sigma``.

    The added sigma is ``sqrt(max(target_sigma**2 - own_sigma**2, 0))``, so a band already at
    least as noisy as the target is left unchanged.

    Parameters
    ----------
    images
        Shape (B, C, H, W).
    target_sigma, own_sigma
        Shape (B, C), in the units of ``images``.

    Returns
    -------
    Tensor
        Shape (B, C, H, W).
    """
    added = torch.sqrt(torch.clamp(target_sigma**2 - own_sigma**2, min=0.0)).to(images.dtype)
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return torch.addcmul(images, noise, added[:, :, None, None])


@dataclass(frozen=True)
class AugmentParameters:
    """Random draws for one batch of training views, B images of C bands.

    Attributes
    ----------
    ebv_new
        (B,) E(B-V) in magnitudes to redden to.
    flip
        (B, 2) bool, mirror columns (x) and rows (y).
    angle
        (B,) rotation in radians.
    scale
        (B,) isotropic magnification.
    psf_sigma_target
        (B, C) target PSF sigma in pixels.
    shift
        (B, 2) int64 (row, column) shift of the crop centre in pixels.
    noise_sigma_target
        (B, C) target per-pixel noise sigma: nanomaggies (FITS) or [0, 1] units (JPEG).
    """

    ebv_new: Tensor
    flip: Tensor
    angle: Tensor
    scale: Tensor
    psf_sigma_target: Tensor
    shift: Tensor
    noise_sigma_target: Tensor


def _uniform(
    shape: tuple[int, ...],
    low: Tensor | float,
    high: Tensor | float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    draw = torch.rand(shape, generator=generator, device=device)
    return low + (high - low) * draw


class Augmentation(nn.Module):
    """Random training views of a batch of cutouts, all steps batched on the images' device.

    FITS cutouts (float32 nanomaggies) go through the seven steps of Stein et al. (2022): Galactic
    reddening to a new E(B-V), flips and rotation, isotropic scaling, PSF blur to a target width,
    a jittered crop, Gaussian noise to a target level, and the viewer's RGB stretch. JPEG cutouts
    (uint8 RGB) get only the geometric steps and the noise, because reddening, PSF matching and
    the stretch need fluxes.

    Parameters
    ----------
    config
        Augmentation parameters; per-band tuples are in g, r, z order.
    image_format
        ``"fits"`` or ``"jpeg"``, the cutout store's ``image_format`` attribute.
    bands
        The cutout store's ``bands`` attribute; for FITS a subset of g, r, z containing all three
        for the RGB stretch.
    pixscale
        Pixel scale in arcsec per pixel, to convert PSF FWHM to pixels.
    """

    def __init__(
        self,
        config: AugmentConfig | None = None,
        *,
        image_format: str,
        bands: str,
        pixscale: float = DEFAULT_PIXSCALE,
    ) -> None:
        super().__init__()
        self.config = config or AugmentConfig()
        self.image_format = image_format
        self.bands = bands
        self.pixscale = pixscale
        if image_format not in ("fits", "jpeg"):
            raise ValueError(f"unknown image_format {image_format!r}; expected 'fits' or 'jpeg'")

        if image_format == "fits":
            rgb_band_indices(bands)
            self._band_index = _config_band_indices(bands)
            for name in (
                "reddening_coefficients",
                "psf_sigma_target_ranges",
                "default_psf_fwhm",
                "noise_sigma_ranges",
            ):
                values = getattr(self.config, name)
                if len(values) != len(CONFIG_BANDS):
                    raise ConfigError(
                        f"augment.{name} has {len(values)} entries, "
                        "expected one for each of g, r, z"
                    )
        else:
            self._band_index = [0, 1, 2]

    @property
    def channels(self) -> int:
        """Number of input channels C."""
        return len(self.bands) if self.image_format == "fits" else 3

    def _per_band(self, values: Sequence, device: torch.device) -> Tensor:
        return torch.tensor(
            [values[i] for i in self._band_index], dtype=torch.float32, device=device
        )

    def sample(
        self, batch: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> AugmentParameters:
        """Draw the random parameters of ``batch`` views, in a fixed order for reproducibility."""
        config, device = self.config, torch.device(device)
        shape = (batch, self.channels)

        ebv_new = _uniform((batch,), *config.ebv_new_range, generator, device)
        flip = torch.rand((batch, 2), generator=generator, device=device) < config.flip_probability
        angle_max = 2.0 * math.pi if config.rotate else 0.0
        angle = _uniform((batch,), 0.0, angle_max, generator, device)
        scale = _uniform((batch,), *config.scale_range, generator, device)

        psf_ranges = self._per_band(config.psf_sigma_target_ranges, device)
        psf_sigma_target = _uniform(shape, psf_ranges[:, 0], psf_ranges[:, 1], generator, device)
        shift = torch.randint(
            -config.jitter, config.jitter + 1, (batch, 2), generator=generator, device=device
        )

        if self.image_format == "fits":
            noise_ranges = self._per_band(config.noise_sigma_ranges, device)
        else:
            noise_ranges = torch.tensor([config.jpeg_noise_sigma_range] * 3, device=device)
        noise_sigma_target = _uniform(
            shape, noise_ranges[:, 0], noise_ranges[:, 1], generator, device
        )

        return AugmentParameters(
            ebv_new, flip, angle, scale, psf_sigma_target, shift, noise_sigma_target
        )

    def forward(
        self,
        images: Tensor,
        *,
        ebv: Tensor | None = None,
        psf_fwhm: Tensor | None = None,
        generator: torch.Generator | None = None,
        parameters: AugmentParameters | None = None,
    ) -> Tensor:
        """Make one random view of each cutout.

        Parameters
        ----------
        images
            FITS: float32 nanomaggies (B, C, S, S); JPEG: uint8 RGB (B, 3, S, S). With
            S < ``crop_size + 2 * jitter`` the jitter is limited to the room left, and with
            S < ``crop_size`` the cutouts are first resized up to ``crop_size`` (the PSF width
            in pixels grows by the same factor). A WARNING is logged once per size.
        ebv
            (B,) catalog E(B-V) in magnitudes; ``None`` or non-finite entries use
            ``config.default_ebv``.
        psf_fwhm
            (B, C) catalog PSF FWHM in arcsec; ``None``, non-finite or non-positive entries use
            ``config.default_psf_fwhm``.
        generator
            Source of randomness on the images' device; ``None`` uses torch's global generator.
        parameters
            Draws to use instead of sampling (from :meth:`sample`).

        Returns
        -------
        Tensor
            (B, 3, crop_size, crop_size) float32 RGB in [0, 1] on the images' device.
        """
        batch, side = images.shape[0], images.shape[-1]
        if images.ndim != 4 or images.shape[1] != self.channels or images.shape[2] != side:
            raise ValueError(
                f"expected {self.image_format} cutouts of shape (B, {self.channels}, S, S), "
                f"got {tuple(images.shape)}"
            )
        if parameters is None:
            parameters = self.sample(batch, images.device, generator)

        # Pixel values as float: nanomaggies (FITS) or [0, 1] (JPEG).
        if self.image_format == "jpeg":
            if images.dtype != torch.uint8:
                raise ValueError(f"JPEG cutouts must be uint8 RGB, got dtype {images.dtype}")
            pixels = images.float() / 255.0
        else:
            if not images.is_floating_point():
                raise ValueError(
                    f"FITS cutouts must be float nanomaggies, got dtype {images.dtype}"
                )
            pixels = images.float()

        # Cutouts too small for the crop are resized up as evaluation_view does, and the jitter
        # is limited to the room left, so training and embedding see the same pixel scale.
        pixels = (
            center_crop(pixels, self.config.crop_size) if side < self.config.crop_size else pixels
        )
        upsampling = pixels.shape[-1] / side
        room = (pixels.shape[-1] - self.config.crop_size) // 2
        if room < self.config.jitter:
            if (side, self.config.jitter) not in _warned_jitter:
                _warned_jitter.add((side, self.config.jitter))
                logger.warning(
                    "cutouts of %d px leave room for a jitter of %d px, not %d px; jittering less",
                    side,
                    room,
                    self.config.jitter,
                )
            parameters = dataclasses.replace(parameters, shift=parameters.shift.clamp(-room, room))

        if self.image_format == "jpeg":
            return self._jpeg_view(pixels, parameters, generator)
        return self._fits_view(
            pixels,
            parameters,
            self._catalog_ebv(ebv, batch, images.device),
            self._catalog_psf(psf_fwhm, batch, images.device) * upsampling,
            generator,
        )

    def _catalog_ebv(self, ebv: Tensor | None, batch: int, device: torch.device) -> Tensor:
        default = torch.full((batch,), self.config.default_ebv, device=device)
        if ebv is None:
            return default
        ebv = ebv.to(device=device, dtype=torch.float32)
        return torch.where(torch.isfinite(ebv), ebv, default)

    def _catalog_psf(self, psf_fwhm: Tensor | None, batch: int, device: torch.device) -> Tensor:
        default = self._per_band(self.config.default_psf_fwhm, device).expand(batch, -1)
        if psf_fwhm is None:
            return default
        psf_fwhm = psf_fwhm.to(device=device, dtype=torch.float32)
        return torch.where(torch.isfinite(psf_fwhm) & (psf_fwhm > 0), psf_fwhm, default)

    def _fits_view(
        self,
        flux: Tensor,
        draws: AugmentParameters,
        ebv: Tensor,
        psf_fwhm: Tensor,
        generator: torch.Generator | None,
    ) -> Tensor:
        config = self.config
        # NOTE: non-finite pixels (bad or masked) become zero flux, so the blur cannot spread NaN.
        # A sum is finite when every element is, and reading it is cheaper than rewriting.
        if not bool(torch.isfinite(flux.sum())):
            flux = torch.nan_to_num(flux, nan=0.0, posinf=0.0, neginf=0.0)

        # 1. Reddening from the catalog E(B-V) to a new one: a factor per image and band, which
        # commutes with the linear steps 2-5 and is applied by the blur's kernels.
        coefficients = [config.reddening_coefficients[i] for i in self._band_index]
        transmission = redden(
            flux.new_ones(flux.shape[0], flux.shape[1], 1, 1), ebv, draws.ebv_new, coefficients
        )[:, :, 0, 0]

        # 2-5. Flips, rotation, scaling and the jittered crop in one resampling of the crop
        # window plus a margin for the blur, so only the pixels that reach the view are computed.
        own_sigma = psf_fwhm / self.pixscale / FWHM_PER_SIGMA * draws.scale[:, None]
        blur_sigma = torch.sqrt(torch.clamp(draws.psf_sigma_target**2 - own_sigma**2, min=0.0))
        margin = blur_radius(blur_sigma)
        matrices = affine_matrices(draws.angle, draws.flip[:, 0], draws.flip[:, 1], draws.scale)
        window = config.crop_size + 2 * margin
        flux = resample_window(
            flux, matrices, draws.shift, window, padding_mode=config.padding_mode
        )

        # 4. PSF blur from the image's own width (which the scaling multiplied by `scale`) to
        # the target, using the margin instead of padding.
        flux = gaussian_blur(flux, blur_sigma, padding="valid", gain=transmission)

        # 6. Noise up to the target level, measured after the blur has smoothed the image's own.
        own_noise = border_noise_sigma(flux, config.noise_border)
        flux = add_noise(flux, draws.noise_sigma_target, own_noise, generator)

        # 7. Viewer RGB stretch.
        return viewer_stretch(
            flux, self.bands, scales=config.rgb_scales, offset=config.rgb_offset, q=config.rgb_q
        )

    def _jpeg_view(
        self, rgb: Tensor, draws: AugmentParameters, generator: torch.Generator | None
    ) -> Tensor:
        config = self.config

        matrices = affine_matrices(draws.angle, draws.flip[:, 0], draws.flip[:, 1], draws.scale)
        rgb = resample_window(
            rgb, matrices, draws.shift, config.crop_size, padding_mode=config.padding_mode
        )

        own_noise = border_noise_sigma(rgb, config.noise_border)
        rgb = add_noise(rgb, draws.noise_sigma_target, own_noise, generator)
        return torch.clamp(rgb, 0.0, 1.0)
