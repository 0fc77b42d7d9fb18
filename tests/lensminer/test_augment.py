"""Tests of the evaluation view and the batched training augmentations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lensminer.augment import (
    FWHM_PER_SIGMA,
    Augmentation,
    add_noise,
    affine_matrices,
    affine_transform,
    blur_radius,
    border_noise_sigma,
    center_crop,
    evaluation_view,
    gaussian_blur,
    jitter_crop,
    lower_median,
    redden,
    resample_window,
    viewer_stretch,
)
from lensminer.config import AugmentConfig
from lensminer.exceptions import ConfigError


def _stretch_reference(flux: np.ndarray, scales=(6.0, 3.4, 2.2), offset=0.03, q=20.0) -> np.ndarray:
    """Per-pixel NumPy version of the viewer formula for one (3, H, W) g, r, z image."""
    out = np.zeros_like(flux, dtype=np.float64)
    for y in range(flux.shape[1]):
        for x in range(flux.shape[2]):
            v = [max(0.0, float(flux[b, y, x]) * scales[b] + offset) for b in range(3)]
            intensity = sum(v) / 3
            for channel, band in enumerate((2, 1, 0)):  # red = z, green = r, blue = g
                value = (
                    0.0
                    if intensity == 0
                    else v[band] * math.asinh(q * intensity) / math.sqrt(q) / intensity
                )
                out[channel, y, x] = min(max(value, 0.0), 1.0)
    return out


def test_stretch_matches_reference() -> None:
    rng = np.random.default_rng(0)
    flux = rng.normal(0.0, 0.3, size=(2, 3, 9, 9)).astype(np.float32)
    flux[0, :, 0, 0] = -1.0  # every band clipped to zero
    found = viewer_stretch(torch.from_numpy(flux), "grz").numpy()
    for index in range(2):
        np.testing.assert_allclose(
            found[index], _stretch_reference(flux[index]), rtol=1e-5, atol=1e-6
        )


def test_stretch_extreme_flux() -> None:
    flux = torch.tensor([1e-30, 1e-3, 1e6, 1e30]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    found = viewer_stretch(flux.contiguous(), "grz")
    expected = torch.stack(
        [torch.from_numpy(_stretch_reference(image.numpy())).float() for image in flux]
    )
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


def test_stretch_band_order() -> None:
    rng = np.random.default_rng(1)
    flux = torch.from_numpy(rng.normal(0.0, 0.3, size=(1, 3, 5, 5)).astype(np.float32))
    torch.testing.assert_close(
        viewer_stretch(flux[:, [2, 0, 1]], "zgr"), viewer_stretch(flux, "grz")
    )


def test_stretch_nonfinite_is_zero_flux() -> None:
    flux = torch.zeros(1, 3, 2, 2)
    flux[0, 1, 0, 0] = float("nan")
    out = viewer_stretch(flux, "grz")
    torch.testing.assert_close(out[..., 0, 0], out[..., 1, 1])


def test_stretch_missing_band() -> None:
    with pytest.raises(ConfigError, match="lack 'z'"):
        viewer_stretch(torch.zeros(1, 3, 4, 4), "gri")


def test_center_crop_offsets() -> None:
    images = torch.arange(2 * 1 * 152 * 152, dtype=torch.float32).reshape(2, 1, 152, 152)
    torch.testing.assert_close(center_crop(images, 96), images[..., 28:124, 28:124])


def test_center_crop_upsamples_small() -> None:
    out = center_crop(torch.ones(1, 3, 64, 64), 96)
    assert out.shape == (1, 3, 96, 96)
    torch.testing.assert_close(out, torch.ones(1, 3, 96, 96))


def test_evaluation_view_jpeg() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 152, 152), dtype=torch.uint8, generator=generator)
    out = evaluation_view(images, image_format="jpeg", bands="grz")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, images[..., 28:124, 28:124].float() / 255)


def test_evaluation_view_fits() -> None:
    rng = np.random.default_rng(2)
    flux = torch.from_numpy(rng.normal(0.0, 0.2, size=(2, 3, 100, 100)).astype(np.float32))
    config = AugmentConfig(rgb_q=10.0)
    out = evaluation_view(flux, image_format="fits", bands="grz", crop_size=96, config=config)
    assert out.shape == (2, 3, 96, 96)
    torch.testing.assert_close(out, viewer_stretch(flux[..., 2:98, 2:98], "grz", q=10.0))


def test_evaluation_view_rejects_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="uint8"):
        evaluation_view(torch.zeros(1, 3, 96, 96), image_format="jpeg", bands="grz")


def test_evaluation_view_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="'png'"):
        evaluation_view(torch.zeros(1, 3, 96, 96), image_format="png", bands="grz")


# ----------------------------------------------------------------------------- training steps


def _flux(seed: int, shape=(2, 3, 64, 64), sigma: float = 0.05) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(0.0, sigma, size=shape).astype(np.float32))


def test_redden_same_ebv_is_identity() -> None:
    flux = _flux(3)
    ebv = torch.tensor([0.05, 0.4])
    torch.testing.assert_close(redden(flux, ebv, ebv, (3.214, 2.165, 1.211)), flux)


def test_redden_analytic_transmission() -> None:
    flux = torch.ones(1, 3, 2, 2)
    out = redden(flux, torch.tensor([0.0]), torch.tensor([1.0]), (3.214, 2.165, 1.211))
    expected = torch.tensor([10 ** (-0.4 * 3.214), 10 ** (-0.4 * 2.165), 10 ** (-0.4 * 1.211)])
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_rotation_90_is_rot90() -> None:
    images = _flux(4, shape=(1, 3, 33, 33))
    matrices = affine_matrices(
        torch.tensor([math.pi / 2]),
        torch.tensor([False]),
        torch.tensor([False]),
        torch.tensor([1.0]),
    )
    out = affine_transform(images, matrices)
    # Output pixel (x, y) samples input (-y, x) about the centre: a counter-clockwise rot90
    # of the (row, column) array, i.e. transpose then flip of the rows.
    expected = torch.flip(images.transpose(-1, -2), dims=[-2])
    torch.testing.assert_close(
        out[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], atol=1e-5, rtol=1e-5
    )


def test_flip_x_mirrors_columns() -> None:
    images = _flux(5, shape=(1, 1, 16, 16))
    matrices = affine_matrices(
        torch.tensor([0.0]), torch.tensor([True]), torch.tensor([False]), torch.tensor([1.0])
    )
    torch.testing.assert_close(affine_transform(images, matrices), torch.flip(images, dims=[-1]))


def test_affine_matches_scipy() -> None:
    images = _flux(6, shape=(3, 2, 48, 48))
    angle = torch.tensor([0.3, 2.0, 4.5])
    flip_x, flip_y = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    scale = torch.tensor([0.9, 1.1, 1.03])
    matrices = affine_matrices(angle, flip_x, flip_y, scale)
    out = affine_transform(images, matrices).numpy()

    centre = (48 - 1) / 2
    for b in range(3):
        m = matrices[b].double().numpy()
        # scipy works in (row, column) = (y, x) index order.
        m_rc = np.array([[m[1, 1], m[1, 0]], [m[0, 1], m[0, 0]]])
        offset = centre - m_rc @ np.array([centre, centre])
        for c in range(2):
            reference = ndimage.affine_transform(
                images[b, c].double().numpy(), m_rc, offset=offset, order=1, mode="reflect"
            )
            np.testing.assert_allclose(out[b, c, 8:-8, 8:-8], reference[8:-8, 8:-8], atol=1e-5)


def test_resample_window_equals_transform_then_crop() -> None:
    images = _flux(16, shape=(3, 2, 60, 60))
    matrices = affine_matrices(
        torch.tensor([0.4, 3.0, 5.5]),
        torch.tensor([True, False, False]),
        torch.tensor([False, False, True]),
        torch.tensor([0.92, 1.0, 1.07]),
    )
    shift = torch.tensor([[0, 0], [3, -2], [-4, 4]])
    expected = jitter_crop(affine_transform(images, matrices), 40, shift)
    torch.testing.assert_close(
        resample_window(images, matrices, shift, 40), expected, atol=1e-5, rtol=1e-5
    )


def test_valid_blur_equals_padded_interior() -> None:
    images = _flux(17, shape=(2, 3, 50, 50))
    sigma = torch.tensor([[0.0, 1.5, 2.5], [2.0, 0.5, 1.0]])
    radius = blur_radius(sigma)
    valid = gaussian_blur(images, sigma, padding="valid")
    assert valid.shape == (2, 3, 50 - 2 * radius, 50 - 2 * radius)
    torch.testing.assert_close(
        valid, gaussian_blur(images, sigma)[..., radius:-radius, radius:-radius]
    )


def test_blur_zero_sigma_is_identity() -> None:
    images = _flux(7)
    torch.testing.assert_close(gaussian_blur(images, torch.zeros(2, 3)), images)


def test_blur_matches_scipy() -> None:
    images = _flux(8, shape=(2, 3, 40, 40))
    sigma = torch.tensor([[0.0, 1.2, 3.0], [2.5, 0.7, 4.0]])
    out = gaussian_blur(images, sigma).numpy()
    for b in range(2):
        for c in range(3):
            reference = ndimage.gaussian_filter(
                images[b, c].double().numpy(), float(sigma[b, c]), mode="mirror", truncate=4.0
            )
            # The batch shares one kernel radius (4 x the largest sigma), so narrower kernels
            # keep a little more tail than scipy's.
            np.testing.assert_allclose(out[b, c], reference, atol=2e-5)


def test_blur_keeps_flux() -> None:
    images = torch.zeros(1, 1, 41, 41)
    images[0, 0, 20, 20] = 1.0
    out = gaussian_blur(images, torch.tensor([[2.0]]))
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))
    # The variance of the blurred point along one axis is sigma**2, less a little (< 0.1 %)
    # because the kernel is cut at 4 sigma.
    offsets = torch.arange(-20, 21, dtype=torch.float32)
    assert abs(float((out[0, 0].sum(0) * offsets**2).sum()) - 4.0) < 4e-3


def test_jitter_crop_matches_slicing() -> None:
    images = _flux(9, shape=(3, 2, 30, 30))
    shift = torch.tensor([[0, 0], [-3, 2], [3, -3]])
    out = jitter_crop(images, 20, shift)
    for b in range(3):
        row, col = 5 + int(shift[b, 0]), 5 + int(shift[b, 1])
        torch.testing.assert_close(out[b], images[b, :, row : row + 20, col : col + 20])


def test_jitter_crop_out_of_bounds() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        jitter_crop(torch.zeros(1, 1, 20, 20), 16, torch.tensor([[3, 0]]))


def test_border_sigma_ignores_central_source() -> None:
    images = _flux(10, shape=(2, 3, 96, 96), sigma=0.01)
    images[..., 30:66, 30:66] += 5.0
    estimate = border_noise_sigma(images, 8)
    torch.testing.assert_close(estimate, torch.full((2, 3), 0.01), rtol=0.05, atol=0)


def test_lower_median_matches_torch() -> None:
    values = _flux(18, shape=(4, 3, 101)).reshape(4, 3, 101)
    for length in (101, 100, 1):
        rows = values[..., :length]
        torch.testing.assert_close(lower_median(rows), rows.median(dim=-1).values)


def test_lower_median_nan_row() -> None:
    values = torch.arange(12.0).reshape(3, 4)
    values[1, 2] = float("nan")
    found = lower_median(values)
    assert bool(torch.isnan(found[1]))
    torch.testing.assert_close(found[[0, 2]], torch.tensor([1.0, 9.0]))


def test_blur_gain_scales_output() -> None:
    images = _flux(19, shape=(2, 3, 40, 40))
    sigma = torch.tensor([[0.0, 1.2, 3.0], [2.5, 0.7, 4.0]])
    gain = torch.tensor([[0.5, 1.0, 2.0], [0.1, 3.0, 1.5]])
    expected = gaussian_blur(images, sigma, padding="valid") * gain[:, :, None, None]
    found = gaussian_blur(images, sigma, padding="valid", gain=gain)
    torch.testing.assert_close(found, expected)


def test_noise_reaches_target() -> None:
    generator = torch.Generator().manual_seed(11)
    own = 0.004
    images = _flux(11, shape=(4, 3, 96, 96), sigma=own)
    target = torch.tensor([0.002, 0.013, 0.06]).expand(4, 3)
    out = add_noise(images, target, border_noise_sigma(images, 8), generator)
    # A sample std of 9216 pixels is within about 2 % of the true value (5 sigma of its scatter);
    # the band with a target below its own noise keeps its own level.
    expected = torch.tensor([own, 0.013, 0.06]).expand(4, 3)
    torch.testing.assert_close(out.std(dim=(-2, -1)), expected, rtol=0.04, atol=0)


# ----------------------------------------------------------------------------- Augmentation


def test_augmentation_deterministic_with_seed() -> None:
    augment = Augmentation(image_format="fits", bands="grz")
    flux = _flux(12, shape=(4, 3, 152, 152), sigma=0.01)
    first = augment(flux, generator=torch.Generator().manual_seed(0))
    second = augment(flux, generator=torch.Generator().manual_seed(0))
    third = augment(flux, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, third)


def test_augmentation_fits_output() -> None:
    augment = Augmentation(image_format="fits", bands="grz")
    flux = _flux(13, shape=(4, 3, 152, 152), sigma=0.01)
    flux[0, 1, 5, 5] = float("nan")
    out = augment(
        flux,
        ebv=torch.tensor([0.02, float("nan"), 0.1, 0.0]),
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (4, 3, 96, 96)
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def _reference_fits_view(
    flux: np.ndarray, ebv: float, psf_fwhm: np.ndarray, draws, index: int, config: AugmentConfig
) -> np.ndarray:
    """Noise-free training view of one (3, S, S) g, r, z cutout, step by step with SciPy."""
    side, size = flux.shape[-1], config.crop_size
    centre = (side - 1) / 2
    coefficients = np.asarray(config.reddening_coefficients)
    flux = flux * 10.0 ** (-0.4 * coefficients * (float(draws.ebv_new[index]) - ebv))[:, None, None]

    matrix = (
        affine_matrices(
            draws.angle[index : index + 1],
            draws.flip[index : index + 1, 0],
            draws.flip[index : index + 1, 1],
            draws.scale[index : index + 1],
        )[0]
        .double()
        .numpy()
    )
    m_rc = np.array([[matrix[1, 1], matrix[1, 0]], [matrix[0, 1], matrix[0, 0]]])
    offset = centre - m_rc @ np.array([centre, centre])
    flux = np.stack(
        [ndimage.affine_transform(b, m_rc, offset=offset, order=1, mode="reflect") for b in flux]
    )

    own = psf_fwhm / 0.262 / FWHM_PER_SIGMA * float(draws.scale[index])
    sigma = np.sqrt(np.maximum(draws.psf_sigma_target[index].double().numpy() ** 2 - own**2, 0))
    flux = np.stack(
        [ndimage.gaussian_filter(b, s, mode="mirror") for b, s in zip(flux, sigma, strict=True)]
    )

    row, col = (side - size) // 2 + draws.shift[index].numpy()
    flux = flux[:, row : row + size, col : col + size]
    return _stretch_reference(flux.astype(np.float32))


def test_augmentation_matches_scipy_reference() -> None:
    config = AugmentConfig(crop_size=32, jitter=3)
    augment = Augmentation(config, image_format="fits", bands="grz")
    flux = _flux(20, shape=(3, 3, 72, 72), sigma=0.005)
    ebv = torch.tensor([0.01, 0.08, 0.0])
    psf_fwhm = torch.tensor([[1.0, 1.2, 0.9], [1.5, 1.4, 1.3], [1.1, 1.0, 1.6]])
    draws = augment.sample(3, "cpu", torch.Generator().manual_seed(3))
    draws = dataclasses.replace(
        draws, noise_sigma_target=torch.zeros_like(draws.noise_sigma_target)
    )

    found = augment(flux, ebv=ebv, psf_fwhm=psf_fwhm, parameters=draws).numpy()
    for index in range(3):
        expected = _reference_fits_view(
            flux[index].double().numpy(),
            float(ebv[index]),
            psf_fwhm[index].numpy(),
            draws,
            index,
            config,
        )
        # The batch shares one blur radius, so narrower kernels keep a little more tail than
        # scipy's (see test_blur_matches_scipy); the rest agrees to float32 rounding.
        np.testing.assert_allclose(found[index], expected, atol=2e-5, rtol=0)


def test_augmentation_blur_to_own_psf_changes_nothing() -> None:
    # With the target PSF at the image's own width, the blur step must be a no-op: the view
    # equals the one made with a target below the own width (which clamps to no blur).
    config = AugmentConfig(scale_range=(1.0, 1.0), noise_sigma_ranges=((0.0, 0.0),) * 3)
    augment = Augmentation(config, image_format="fits", bands="grz")
    flux = _flux(14, shape=(2, 3, 152, 152), sigma=0.01)
    psf_fwhm = torch.tensor([[1.3, 1.2, 1.1], [1.5, 1.0, 0.9]])
    own_sigma = psf_fwhm / 0.262 / FWHM_PER_SIGMA
    draws = augment.sample(2, "cpu", torch.Generator().manual_seed(0))

    at_own = dataclasses.replace(draws, psf_sigma_target=own_sigma)
    below_own = dataclasses.replace(draws, psf_sigma_target=own_sigma * 0.5)
    wider = dataclasses.replace(draws, psf_sigma_target=own_sigma * 2.0)
    view = {
        name: augment(flux, psf_fwhm=psf_fwhm, parameters=d)
        for name, d in (("own", at_own), ("below", below_own), ("wider", wider))
    }
    torch.testing.assert_close(view["own"], view["below"], atol=1e-6, rtol=0)
    assert not torch.allclose(view["own"], view["wider"], atol=1e-3)


def test_augmentation_jpeg_output() -> None:
    augment = Augmentation(image_format="jpeg", bands="grz")
    images = torch.randint(
        0, 256, (3, 3, 120, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = augment(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 96, 96)
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


def test_augmentation_jpeg_without_noise_is_geometric() -> None:
    config = AugmentConfig(
        rotate=False,
        flip_probability=0.0,
        scale_range=(1.0, 1.0),
        jpeg_noise_sigma_range=(0.0, 0.0),
    )
    augment = Augmentation(config, image_format="jpeg", bands="grz")
    images = torch.randint(
        0, 256, (2, 3, 110, 110), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    draws = augment.sample(2, "cpu", torch.Generator().manual_seed(2))
    out = augment(images, parameters=draws)
    expected = jitter_crop(images.float() / 255, 96, draws.shift)
    # grid_sample's identity resampling is exact up to float32 rounding of the coordinates.
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("side", [64, 100])
def test_augmentation_small_cutout(side: int) -> None:
    # 64 px is resized up to the 96 px crop; 100 px leaves room for a jitter of 2 px only.
    augment = Augmentation(image_format="fits", bands="grz")
    flux = _flux(15, shape=(2, 3, side, side), sigma=0.01)
    out = augment(flux, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 96, 96)
    assert bool(torch.isfinite(out).all())


def test_augmentation_limits_jitter() -> None:
    config = AugmentConfig(
        rotate=False,
        flip_probability=0.0,
        scale_range=(1.0, 1.0),
        jpeg_noise_sigma_range=(0.0, 0.0),
    )
    augment = Augmentation(config, image_format="jpeg", bands="grz")
    images = torch.randint(
        0, 256, (1, 3, 100, 100), dtype=torch.uint8, generator=torch.Generator().manual_seed(3)
    )
    draws = augment.sample(1, "cpu", torch.Generator().manual_seed(0))
    draws = dataclasses.replace(draws, shift=torch.tensor([[7, -7]]))
    out = augment(images, parameters=draws)
    expected = jitter_crop(images.float() / 255, 96, torch.tensor([[2, -2]]))
    torch.testing.assert_close(out, expected, atol=5e-5, rtol=0)


def test_augmentation_unsupported_band() -> None:
    with pytest.raises(ConfigError, match="'i'"):
        Augmentation(image_format="fits", bands="griz")


# ----------------------------------------------------------------------------- real data


def _read_fits(path) -> np.ndarray:
    from astropy.io import fits

    with fits.open(path) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32)


def test_stretch_equals_viewer_rgb_on_real_fits(shared_data) -> None:
    rgb = pytest.importorskip("lensminer.rgb")
    flux = _read_fits(shared_data / "decals-fits" / "example_a.fits")
    expected = rgb.viewer_rgb(flux[None], "grz")
    found = viewer_stretch(torch.from_numpy(flux[None]), "grz").numpy()
    np.testing.assert_allclose(found, expected, atol=2e-6, rtol=0)


def test_evaluation_view_on_real_fits(shared_data) -> None:
    rgb = pytest.importorskip("lensminer.rgb")
    flux = _read_fits(shared_data / "decals-fits" / "example_b.fits")
    view = evaluation_view(torch.from_numpy(flux[None]), image_format="fits", bands="grz").numpy()
    expected = rgb.viewer_rgb(flux[None, :, 164:260, 164:260], "grz")
    np.testing.assert_allclose(view, expected, atol=2e-6, rtol=0)


def test_augmentation_on_real_fits(shared_data) -> None:
    flux = torch.from_numpy(_read_fits(shared_data / "decals-fits" / "example_bad_pix.fits")[None])
    out = Augmentation(image_format="fits", bands="grz")(
        flux, generator=torch.Generator().manual_seed(0)
    )
    assert bool(torch.isfinite(out).all())
