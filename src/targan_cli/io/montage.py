"""Labelled grids of grey-scale images saved as PNG: translation previews, training samples, demos.

Each cell is one 2D array, windowed to 8 bits either with a fixed (low, high) window for its
column (e.g. a CT window in HU, so columns compare) or per image between robust percentiles,
scaled so that its longer side fills a square tile (aspect ratio kept), and centred on black.
Row labels run down the left, column labels along the top, in PIL's default font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from targan_cli.errors import TarganError
from targan_cli.io.atomic import atomic_output

Window = tuple[float, float]

# Per-image windows ignore the darkest and brightest 0.5 % (a few hot voxels).
AUTO_PERCENTILES = (0.5, 99.5)
MARGIN = 6  # pixels around labels and between tiles
BACKGROUND = 0
TEXT = 255


def window_to_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """A 2D array -> uint8 through ``window`` = (low, high), or the image's own robust range."""
    values = np.asarray(image, dtype=np.float32)
    low, high = window if window is not None else np.percentile(values, AUTO_PERCENTILES)
    if not high > low:  # a blank image: show it black rather than divide by zero
        return np.zeros(values.shape, dtype=np.uint8)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.round(unit * 255.0).astype(np.uint8)


def _tile(image: np.ndarray, window: Window | None, size: int) -> Image.Image:
    grey = Image.fromarray(window_to_uint8(image, window), mode="L")
    scale = size / max(grey.size)
    grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                       Image.Resampling.BILINEAR)
    tile = Image.new("L", (size, size), BACKGROUND)
    tile.paste(grey, ((size - grey.width) // 2, (size - grey.height) // 2))
    return tile


def _check_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                column_labels: Sequence[str], column_windows: Sequence[Window | None] | None) -> None:
    if not rows or not column_labels:
        raise ValueError("a montage needs at least one row and one column")
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if column_windows is not None and len(column_windows) != len(column_labels):
        raise ValueError(f"{len(column_labels)} columns but {len(column_windows)} column windows")
    for index, row in enumerate(rows):
        if len(row) != len(column_labels):
            raise ValueError(f"row {index} has {len(row)} images, expected {len(column_labels)}")
        for image in row:
            if np.ndim(image) != 2 or 0 in np.shape(image):
                raise ValueError(f"montage images must be non-empty 2D arrays, got shape {np.shape(image)}")


def render_montage(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                   column_labels: Sequence[str], *, column_windows: Sequence[Window | None] | None = None,
                   tile_size: int = 192) -> Image.Image:
    """The labelled grid as a grey-scale PIL image (see the module docstring)."""
    _check_grid(rows, row_labels, column_labels, column_windows)
    windows = list(column_windows) if column_windows is not None else [None] * len(column_labels)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_height = max(measure.textbbox((0, 0), label, font=font)[3] for label in [*row_labels, *column_labels])
    label_width = max(measure.textlength(label, font=font) for label in row_labels)
    left = int(np.ceil(label_width)) + 2 * MARGIN
    top = text_height + 2 * MARGIN
    step = tile_size + MARGIN
    canvas = Image.new("L", (left + len(column_labels) * step, top + len(rows) * step), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(column_labels):
        draw.text((left + column * step, MARGIN), label, fill=TEXT, font=font)
    for row_index, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + row_index * step
        draw.text((MARGIN, y + (tile_size - text_height) // 2), label, fill=TEXT, font=font)
        for column, (image, window) in enumerate(zip(row, windows)):
            canvas.paste(_tile(image, window, tile_size), (left + column * step, y))
    return canvas


def save_montage(path: str | Path, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                 column_labels: Sequence[str], overwrite: bool = False, *,
                 column_windows: Sequence[Window | None] | None = None, tile_size: int = 192) -> Path:
    """Write the labelled grid ``rows[r][c]`` as a PNG, atomically.

    ``column_windows[c]`` is a fixed (low, high) window for column ``c`` or None for a window per
    image (robust percentiles); every image is scaled to a ``tile_size`` square tile.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TarganError("a montage is written as PNG: the name must end in .png", path)
    image = render_montage(rows, row_labels, column_labels, column_windows=column_windows, tile_size=tile_size)
    with atomic_output(path, overwrite=overwrite) as temporary:
        image.save(temporary, format="PNG")
    return path
