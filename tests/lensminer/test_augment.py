"""Tests of the evaluation view and the batched training augmentations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensminer.augment import center_crop, evaluation_view, viewer_stretch
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
