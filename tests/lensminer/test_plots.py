"""Tests of the candidate grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lensminer import stores
from lensminer.plots import cutouts_to_display, render_grid, write_candidate_grid
from lensminer.rgb import viewer_rgb


def _jpeg_store(url, n=6, size=8):
    """Write a uint8 store whose row i is (10 i, 20 i, 30 i) with a white top-left pixel."""
    layout = stores.CutoutLayout("grz", size, 0.262, "jpeg", "ls-dr9", "http://127.0.0.1/viewer/")
    group = stores.create_cutout_store(
        url,
        target_id=[str(i) for i in range(n)],
        ra=np.zeros(n),
        dec=np.zeros(n),
        layout=layout,
        shard_rows=4,
        chunk_rows=4,
    )
    images = np.zeros((n, 3, size, size), np.uint8)
    for row in range(n):
        images[row] = np.array([10, 20, 30], np.uint8)[:, None, None] * row
    images[:, :, 0, 0] = 255
    group["images"][:] = images
    return url


def test_jpeg_display_keeps_orientation():
    images = np.zeros((1, 3, 4, 4), np.uint8)
    images[0, :, 0, 0] = 200
    display = cutouts_to_display(images, image_format="jpeg", bands="grz")
    assert display.shape == (1, 4, 4, 3)
    assert display[0, 0, 0].tolist() == [200, 200, 200]


def test_fits_display_puts_north_up():
    rng = np.random.default_rng(0)
    flux = rng.uniform(0, 1, size=(2, 3, 5, 5)).astype(np.float32)
    display = cutouts_to_display(flux, image_format="fits", bands="grz")
    expected = (
        np.round(viewer_rgb(flux, "grz")[..., ::-1, :] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal(display, expected)


def test_display_unknown_format_raises():
    with pytest.raises(ValueError, match="'fits' or 'jpeg', got 'png'"):
        cutouts_to_display(np.zeros((1, 3, 4, 4), np.uint8), image_format="png", bands="grz")


def test_grid_size_and_enlargement():
    grid = render_grid(np.zeros((5, 32, 32, 3), np.uint8), ["a"] * 5)
    # ceil(sqrt(5)) = 3 columns, 2 rows; 32 px tiles are enlarged 4x to 128 px.
    assert grid.size == (3 * 128, 2 * (128 + 16))


def test_grid_keeps_large_tiles():
    grid = render_grid(np.zeros((4, 152, 152, 3), np.uint8), ["a"] * 4, columns=4)
    assert grid.size == (4 * 152, 152 + 16)


def test_grid_caption_count_mismatch_raises():
    with pytest.raises(ValueError, match="2 captions for 3 tiles"):
        render_grid(np.zeros((3, 8, 8, 3), np.uint8), ["a", "b"])


def test_grid_caption_is_drawn():
    grid = np.asarray(render_grid(np.zeros((1, 128, 128, 3), np.uint8), ["#1 p=0.999"]))
    assert grid[128:].max() == 255


def test_candidate_grid_follows_ranking(tmp_path):
    url = _jpeg_store(str(tmp_path / "c.zarr"))
    png_url = write_candidate_grid(url, [4, 1, 3], [0.9, 0.8, 0.7], str(tmp_path / "grid.png"))
    with Image.open(png_url) as png:
        pixels = np.asarray(png.convert("RGB"))
    # 2 columns of 128 px tiles (8 px enlarged 16x); sample the centre of each tile.
    assert pixels[64, 64].tolist() == [40, 80, 120]
    assert pixels[64, 128 + 64].tolist() == [10, 20, 30]
    assert pixels[144 + 64, 64].tolist() == [30, 60, 90]


def test_candidate_grid_marker_top_left(tmp_path):
    url = _jpeg_store(str(tmp_path / "c.zarr"))
    png_url = write_candidate_grid(url, [2], [0.5], str(tmp_path / "grid.png"))
    with Image.open(png_url) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[127, 127].tolist() == [20, 40, 60]


def test_candidate_grid_score_count_mismatch(tmp_path):
    url = _jpeg_store(str(tmp_path / "c.zarr"))
    with pytest.raises(ValueError, match="1 scores for 2 rows"):
        write_candidate_grid(url, [0, 1], [0.5], str(tmp_path / "grid.png"))
