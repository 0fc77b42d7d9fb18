"""PNG grids of cutouts for visual inspection of ranked lens candidates."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lensminer import storage, stores
from lensminer.rgb import fits_to_picture

__all__ = ["cutouts_to_display", "render_grid", "write_candidate_grid"]

logger = logging.getLogger(__name__)

CAPTION_HEIGHT = 16
MIN_TILE_SIZE = 128


def cutouts_to_display(images: np.ndarray, *, image_format: str, bands: str) -> np.ndarray:
    """Convert stored cutouts to display RGB with north up.

    Parameters
    ----------
    images
        Cutouts of shape (B, C, H, W): float32 nanomaggies in FITS order (row 0 is south) when
        ``image_format`` is ``"fits"``, uint8 RGB from the JPEG service (row 0 is north) when
        ``"jpeg"``.
    image_format
        ``"fits"`` or ``"jpeg"``, the cutout store's ``image_format`` attribute.
    bands
        Band letters of the FITS planes, e.g. ``"grz"``.

    Returns
    -------
    np.ndarray
        uint8 array of shape (B, H, W, 3), north up and east left as on the sky viewer.
    """
    if image_format == "jpeg":
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"JPEG cutouts must have shape (B, 3, H, W), got {images.shape}")
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1))

    if image_format == "fits":
        # fits_to_picture flips FITS rows (row 0 south) so that north is up.
        return np.stack(
            [fits_to_picture(image, bands) for image in np.asarray(images, dtype=np.float32)]
        )

    raise ValueError(f"image_format must be 'fits' or 'jpeg', got {image_format!r}")


def render_grid(
    tiles: np.ndarray, captions: Sequence[str], *, columns: int | None = None
) -> Image.Image:
    """Draw cutouts in a grid with a caption strip under each tile.

    Parameters
    ----------
    tiles
        uint8 RGB images of shape (B, H, W, 3), north up.
    captions
        One caption per tile, drawn in the strip below it.
    columns
        Tiles per row; defaults to the ceiling of sqrt(B).

    Returns
    -------
    PIL.Image.Image
        RGB image. Tiles smaller than 128 px are enlarged by an integer factor with
        nearest-neighbour sampling so that single pixels stay visible.
    """
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(
            f"tiles must be uint8 of shape (B, H, W, 3), got {tiles.dtype} {tiles.shape}"
        )
    if len(captions) != tiles.shape[0]:
        raise ValueError(
            f"got {len(captions)} captions for {tiles.shape[0]} tiles; pass one caption per tile"
        )
    if tiles.shape[0] == 0:
        raise ValueError("cannot draw a grid of 0 tiles")

    n_tiles, height, width = tiles.shape[:3]
    columns = columns or math.ceil(math.sqrt(n_tiles))
    n_rows = math.ceil(n_tiles / columns)
    factor = max(1, math.ceil(MIN_TILE_SIZE / max(height, width)))
    tile_w, tile_h = width * factor, height * factor
    cell_h = tile_h + CAPTION_HEIGHT

    canvas = Image.new("RGB", (columns * tile_w, n_rows * cell_h), color=(0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=CAPTION_HEIGHT - 4)
    for index, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        left = (index % columns) * tile_w
        top = (index // columns) * cell_h
        image = Image.fromarray(tile, mode="RGB")
        if factor > 1:
            image = image.resize((tile_w, tile_h), Image.Resampling.NEAREST)
        canvas.paste(image, (left, top))
        draw.text((left + 2, top + tile_h + 1), caption, fill=(255, 255, 255), font=font)
    return canvas


def write_candidate_grid(
    cutouts_url: str,
    rows: Sequence[int],
    scores: Sequence[float],
    grid_url: str,
    *,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a PNG grid of ranked cutouts, each captioned with its rank and score.

    Parameters
    ----------
    cutouts_url
        URL of the cutout store.
    rows
        Store row numbers in rank order (the first is rank 1).
    scores
        Lens probability of each row, the same length as ``rows``.
    grid_url
        fsspec URL of the PNG to write.

    Returns
    -------
    str
        ``grid_url``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape[0] != len(scores):
        raise ValueError(
            f"got {len(scores)} scores for {rows.shape[0]} rows; pass one score per row"
        )

    group = stores.open_store(cutouts_url, "cutouts", storage_options=storage_options)
    attrs = group.attrs.asdict()

    images = group["images"].get_orthogonal_selection((rows,))

    tiles = cutouts_to_display(images, image_format=attrs["image_format"], bands=attrs["bands"])
    captions = [f"#{rank} p={score:.3f}" for rank, score in enumerate(scores, start=1)]
    png = render_grid(tiles, captions)

    buffer = io.BytesIO()
    png.save(buffer, format="PNG")
    options = storage_options if storage.is_remote(grid_url) else None
    with fsspec.open(grid_url, "wb", **(options or {})) as handle:
        handle.write(buffer.getvalue())
    logger.debug("wrote a grid of %d cutouts to %s", rows.shape[0], grid_url)
    return grid_url
