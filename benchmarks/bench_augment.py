"""Benchmark of the batched torch augmentations against a per-image NumPy/SciPy loop.

Both paths make one training view of each cutout in a batch of synthetic FITS cutouts
(float32 nanomaggies, 3 x 152 x 152) with the same parameters. The seven steps are reddening,
flips and rotation with scaling (one bilinear resampling), PSF blur, jitter crop, noise and the
viewer RGB stretch. The reference runs ``scipy.ndimage.affine_transform`` and
``scipy.ndimage.gaussian_filter`` image by image and band by band, as a Dataset ``__getitem__``
would. Timed batches of the two paths alternate, and the speed-up is the ratio of their median
times per batch. The target is a speed-up of at least 10x. The report also times each step of the
torch path on its own, to show where the time goes.

The reference always runs on the CPU in one process. ``--threads`` sets the torch CPU threads, so
``--threads 1`` compares one core with one core. ``--device cuda`` runs the torch path on a GPU.

Run from the repository root::

    .venv/bin/python benchmarks/bench_augment.py --batch 64 --repeats 5
    .venv/bin/python benchmarks/bench_augment.py --batch 256 --repeats 5 --device cuda

Results go to standard output as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage

from lensminer.augment import (
    FWHM_PER_SIGMA,
    Augmentation,
    AugmentParameters,
    add_noise,
    affine_matrices,
    blur_radius,
    border_noise_sigma,
    gaussian_blur,
    resample_window,
    viewer_stretch,
)
from lensminer.config import AugmentConfig
from lensminer.rgb import viewer_rgb


def reference_view(
    flux: np.ndarray,
    ebv: float,
    psf_fwhm: np.ndarray,
    draws: AugmentParameters,
    index: int,
    config: AugmentConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Make one view of one (3, S, S) cutout with NumPy and SciPy, band by band."""
    side = flux.shape[-1]
    centre = (side - 1) / 2

    # 1. Reddening.
    coefficients = np.asarray(config.reddening_coefficients)
    flux = flux * 10.0 ** (-0.4 * coefficients * (float(draws.ebv_new[index]) - ebv))[:, None, None]

    # 2-3. Flips, rotation and scaling.
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
    matrix_rc = np.array([[matrix[1, 1], matrix[1, 0]], [matrix[0, 1], matrix[0, 0]]])
    offset = centre - matrix_rc @ np.array([centre, centre])
    flux = np.stack(
        [
            ndimage.affine_transform(band, matrix_rc, offset=offset, order=1, mode="reflect")
            for band in flux
        ]
    )

    # 4. PSF blur.
    own = psf_fwhm / 0.262 / FWHM_PER_SIGMA * float(draws.scale[index])
    target = draws.psf_sigma_target[index].numpy()
    sigma = np.sqrt(np.maximum(target**2 - own**2, 0.0))
    flux = np.stack(
        [
            ndimage.gaussian_filter(band, s, mode="mirror")
            for band, s in zip(flux, sigma, strict=True)
        ]
    )

    # 5. Jitter crop.
    size = config.crop_size
    row, col = (side - size) // 2 + draws.shift[index].numpy()
    flux = flux[:, row : row + size, col : col + size]

    # 6. Noise.
    own_noise = border_noise_sigma(
        torch.from_numpy(flux[None].astype(np.float32)), config.noise_border
    )[0].numpy()
    added = np.sqrt(np.maximum(draws.noise_sigma_target[index].numpy() ** 2 - own_noise**2, 0.0))
    flux = flux + rng.normal(size=flux.shape) * added[:, None, None]

    # 7. RGB stretch.
    return viewer_rgb(flux.astype(np.float32), "grz")


def _first_rows(draws: AugmentParameters, count: int) -> AugmentParameters:
    fields = {field.name: getattr(draws, field.name)[:count] for field in dataclasses.fields(draws)}
    return AugmentParameters(**fields)


def _to_device(draws: AugmentParameters, device: torch.device) -> AugmentParameters:
    fields = {
        field.name: getattr(draws, field.name).to(device) for field in dataclasses.fields(draws)
    }
    return AugmentParameters(**fields)


def _median_seconds(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Return the median wall time of ``repeats`` calls of ``step`` after one warm-up call."""
    step()
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_seconds(
    augment: Augmentation,
    images: torch.Tensor,
    psf_fwhm: torch.Tensor,
    draws: AugmentParameters,
    repeats: int,
) -> dict[str, float]:
    """Time the steps of the FITS view one by one, on the inputs each step gets in a view."""
    config, device = augment.config, images.device

    # Inputs of each step, made once by running the steps in order.
    own_sigma = psf_fwhm / 0.262 / FWHM_PER_SIGMA * draws.scale[:, None]
    blur_sigma = torch.sqrt(torch.clamp(draws.psf_sigma_target**2 - own_sigma**2, min=0.0))
    window = config.crop_size + 2 * blur_radius(blur_sigma)
    matrices = affine_matrices(draws.angle, draws.flip[:, 0], draws.flip[:, 1], draws.scale)
    resampled = resample_window(images, matrices, draws.shift, window)
    blurred = gaussian_blur(resampled, blur_sigma, padding="valid")
    own_noise = border_noise_sigma(blurred, config.noise_border)
    noisy = add_noise(blurred, draws.noise_sigma_target, own_noise, None)

    steps = {
        "flips_rotation_scaling_crop": lambda: resample_window(
            images, matrices, draws.shift, window
        ),
        "psf_blur": lambda: gaussian_blur(resampled, blur_sigma, padding="valid"),
        "noise_estimate": lambda: border_noise_sigma(blurred, config.noise_border),
        "noise": lambda: add_noise(blurred, draws.noise_sigma_target, own_noise, None),
        "rgb_stretch": lambda: viewer_stretch(noisy, "grz"),
    }
    return {name: _median_seconds(step, repeats, device) for name, step in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="Cutouts per batch.")
    parser.add_argument("--size", type=int, default=152, help="Cutout side in pixels.")
    parser.add_argument(
        "--repeats", type=int, default=5, help="Timed batches of each path, taken in turn."
    )
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads."
    )
    parser.add_argument(
        "--device", default="cpu", help="Device of the torch path, e.g. cpu or cuda."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    config = AugmentConfig()
    augment = Augmentation(config, image_format="fits", bands="grz")
    rng = np.random.default_rng(0)
    flux = rng.normal(0.0, 0.005, size=(args.batch, 3, args.size, args.size)).astype(np.float32)
    ebv = rng.uniform(0.0, 0.1, args.batch).astype(np.float32)
    psf_fwhm = rng.uniform(0.9, 1.6, (args.batch, 3)).astype(np.float32)
    draws = augment.sample(args.batch, "cpu", torch.Generator().manual_seed(0))

    # The torch path's inputs live on its device; the reference reads the CPU copies.
    images = torch.from_numpy(flux).to(device)
    device_ebv = torch.from_numpy(ebv).to(device)
    device_psf = torch.from_numpy(psf_fwhm).to(device)
    device_draws = _to_device(draws, device)
    generator = torch.Generator(device=device)

    def run_torch() -> torch.Tensor:
        views = augment(
            images,
            ebv=device_ebv,
            psf_fwhm=device_psf,
            generator=generator.manual_seed(1),
            parameters=device_draws,
        )
        _synchronize(device)
        return views

    def run_reference() -> np.ndarray:
        return np.stack(
            [
                reference_view(flux[i], float(ebv[i]), psf_fwhm[i], draws, i, config, rng)
                for i in range(args.batch)
            ]
        )

    # One warm-up batch each, then timed batches of the two paths in turn, so that the load of
    # other processes on the machine affects both alike.
    run_torch()
    run_reference()
    torch_seconds, reference_seconds = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_torch()
        torch_seconds.append(time.perf_counter() - start)

        start = time.perf_counter()
        run_reference()
        reference_seconds.append(time.perf_counter() - start)
    step_seconds = _step_seconds(augment, images, device_psf, device_draws, args.repeats)

    # The paths draw different noise, so check agreement on noise-free views of a few cutouts.
    quiet = dataclasses.replace(
        draws, noise_sigma_target=torch.zeros_like(draws.noise_sigma_target)
    )
    count = min(8, args.batch)
    quiet_torch = (
        augment(
            images[:count],
            ebv=device_ebv[:count],
            psf_fwhm=device_psf[:count],
            parameters=_to_device(_first_rows(quiet, count), device),
        )
        .cpu()
        .numpy()
    )
    quiet_reference = np.stack(
        [
            reference_view(flux[i], float(ebv[i]), psf_fwhm[i], quiet, i, config, rng)
            for i in range(count)
        ]
    )
    difference = float(np.max(np.abs(quiet_torch - quiet_reference)))
    torch_per_batch = float(np.median(torch_seconds))
    reference_per_batch = float(np.median(reference_seconds))
    ratios = np.asarray(reference_seconds) / np.asarray(torch_seconds)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "device": str(device),
                "batch": args.batch,
                "size": args.size,
                "repeats": args.repeats,
                "torch_images_per_second": args.batch / torch_per_batch,
                "reference_images_per_second": args.batch / reference_per_batch,
                "speedup": reference_per_batch / torch_per_batch,
                "speedup_per_repeat_min_median_max": [
                    float(ratios.min()),
                    float(np.median(ratios)),
                    float(ratios.max()),
                ],
                "torch_step_milliseconds_per_batch": {
                    name: 1e3 * seconds for name, seconds in step_seconds.items()
                },
                "torch_view_milliseconds_per_batch": 1e3 * torch_per_batch,
                "max_abs_difference_without_noise": difference,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
