"""Labelled grids of grey-scale images saved as PNG: translation previews, training samples, demos,
phantom pictures.

Each cell is one 2D array, windowed to 8 bits either with a fixed (low, high) window for its
column or its row (e.g. a CT window in HU, so images compare) or per image between robust
percentiles, scaled so that its longer side fills a square tile (aspect ratio kept), and centred
on black. A cell may carry a mask whose outline is drawn over it in colour (e.g. the liver).
Row labels run down the left, column labels along the top, in PIL's default font.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from targan_cli.config import IntensitySettings
from targan_cli.errors import TarganError
from targan_cli.io.atomic import atomic_output

Window = tuple[float, float]
Colour = tuple[int, int, int]

# Per-image windows ignore the darkest and brightest 0.5 % (a few hot voxels).
AUTO_PERCENTILES = (0.5, 99.5)
MARGIN = 6  # pixels around labels and between tiles
BACKGROUND = 0
TEXT = 255
OUTLINE_COLOUR: Colour = (255, 64, 64)  # red, unlike any grey


def modality_window(settings: IntensitySettings) -> Window:
    """The one display window of a modality, in its stored units: CT its HU window, MR from 0 to
    ``reference_high`` (the typical robust maximum of the training volumes), so that every image
    of one modality, input, translation or truth, is shown alike."""
    if settings.kind == "ct":
        return settings.window
    if settings.reference_high is None:
        raise ValueError("an MR window needs reference_high (the weights' intensity settings)")
    return 0.0, float(settings.reference_high)


def describe_window(name: str, settings: IntensitySettings) -> str:
    """``modality_window`` in words, for a caption: "ct: HU -160 to 240"."""
    low, high = modality_window(settings)
    return f"{name}: {'HU ' if settings.kind == 'ct' else ''}{low:.0f} to {high:.0f}"


def window_to_uint8(image: np.ndarray, window: Window | None = None) -> np.ndarray:
    """A 2D array -> uint8 through ``window`` = (low, high), or the image's own robust range."""
    values = np.asarray(image, dtype=np.float32)
    low, high = window if window is not None else np.percentile(values, AUTO_PERCENTILES)
    if not high > low:  # a blank image: show it black rather than divide by zero
        return np.zeros(values.shape, dtype=np.uint8)
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return np.round(unit * 255.0).astype(np.uint8)


def _tile(image: np.ndarray, window: Window | None, size: int, outline: np.ndarray | None = None,
          colour: Colour = OUTLINE_COLOUR) -> Image.Image:
    """One cell as a square ``size`` tile: grey ("L"), or RGB with the boundary of ``outline`` in ``colour``.

    The outline is the inner band of the mask, one image pixel wide at the tile's scale (at
    least one tile pixel), so it reads the same whatever the zoom.
    """
    grey = Image.fromarray(window_to_uint8(image, window), mode="L")
    scale = size / max(grey.size)
    shown = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    corner = ((size - shown[0]) // 2, (size - shown[1]) // 2)
    tile = Image.new("L", (size, size), BACKGROUND)
    tile.paste(grey.resize(shown, Image.Resampling.BILINEAR), corner)
    if outline is None:
        return tile
    mask = Image.fromarray(np.asarray(outline, dtype=bool).astype(np.uint8), mode="L")
    inside = np.asarray(mask.resize(shown, Image.Resampling.NEAREST)) > 0  # (shown height, shown width)
    band = inside & ~ndimage.binary_erosion(inside, iterations=max(1, round(scale)))
    pixels = np.array(tile.convert("RGB"))  # (size, size, 3)
    pixels[corner[1]:corner[1] + shown[1], corner[0]:corner[0] + shown[0]][band] = colour
    return Image.fromarray(pixels, mode="RGB")


def _check_grid(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                column_labels: Sequence[str], column_windows: Sequence[Window | None] | None,
                row_windows: Sequence[Window | None] | None,
                outlines: Sequence[Sequence[np.ndarray | None]] | None,
                cell_windows: Sequence[Sequence[Window | None]] | None = None) -> None:
    if not rows or not column_labels:
        raise ValueError("a montage needs at least one row and one column")
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    if sum(windows is not None for windows in (column_windows, row_windows, cell_windows)) > 1:
        raise ValueError("give column, row or cell windows, not several")
    if cell_windows is not None and [len(row) for row in cell_windows] != [len(column_labels)] * len(rows):
        raise ValueError(f"cell windows must be {len(rows)} rows of {len(column_labels)}")
    if column_windows is not None and len(column_windows) != len(column_labels):
        raise ValueError(f"{len(column_labels)} columns but {len(column_windows)} column windows")
    if row_windows is not None and len(row_windows) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_windows)} row windows")
    if outlines is not None and len(outlines) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(outlines)} rows of outlines")
    for index, row in enumerate(rows):
        if len(row) != len(column_labels):
            raise ValueError(f"row {index} has {len(row)} images, expected {len(column_labels)}")
        for column, image in enumerate(row):
            if np.ndim(image) != 2 or 0 in np.shape(image):
                raise ValueError(f"montage images must be non-empty 2D arrays, got shape {np.shape(image)}")
            if outlines is None:
                continue
            if len(outlines[index]) != len(row):
                raise ValueError(f"row {index} has {len(row)} images but {len(outlines[index])} outlines")
            mask = outlines[index][column]
            if mask is not None and np.shape(mask) != np.shape(image):
                raise ValueError(f"the outline mask of row {index}, column {column} has shape "
                                 f"{np.shape(mask)}, its image {np.shape(image)}")


def render_montage(rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                   column_labels: Sequence[str], *, column_windows: Sequence[Window | None] | None = None,
                   row_windows: Sequence[Window | None] | None = None,
                   outlines: Sequence[Sequence[np.ndarray | None]] | None = None,
                   outline_colour: Colour = OUTLINE_COLOUR, tile_size: int = 192,
                   cell_windows: Sequence[Sequence[Window | None]] | None = None,
                   caption: str | None = None) -> Image.Image:
    """The labelled grid as a PIL image (see the module docstring): grey-scale ("L"), or RGB
    when ``outlines`` are given; ``caption`` is a line of text under the grid."""
    _check_grid(rows, row_labels, column_labels, column_windows, row_windows, outlines, cell_windows)
    mode = "L" if outlines is None else "RGB"
    text = TEXT if mode == "L" else (TEXT, TEXT, TEXT)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_height = max(measure.textbbox((0, 0), label, font=font)[3] for label in [*row_labels, *column_labels])
    label_width = max(measure.textlength(label, font=font) for label in row_labels)
    left = int(np.ceil(label_width)) + 2 * MARGIN
    top = text_height + 2 * MARGIN
    step = tile_size + MARGIN
    if cell_windows is not None:  # windows[r][c]: one grid, whichever way the windows were given
        windows = [list(row) for row in cell_windows]
    elif row_windows is not None:
        windows = [[window] * len(column_labels) for window in row_windows]
    else:
        windows = [list(column_windows or [None] * len(column_labels))] * len(rows)
    bottom = text_height + 2 * MARGIN if caption else 0
    width = max(left + len(column_labels) * step, int(np.ceil(measure.textlength(caption or "", font=font))) + 2 * MARGIN)
    canvas = Image.new(mode, (width, top + len(rows) * step + bottom), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, label in enumerate(column_labels):
        draw.text((left + column * step, MARGIN), label, fill=text, font=font)
    for row_index, (row, label) in enumerate(zip(rows, row_labels)):
        y = top + row_index * step
        draw.text((MARGIN, y + (tile_size - text_height) // 2), label, fill=text, font=font)
        for column, image in enumerate(row):
            outline = outlines[row_index][column] if outlines is not None else None
            canvas.paste(_tile(image, windows[row_index][column], tile_size, outline, outline_colour),
                         (left + column * step, y))
    if caption:
        draw.text((MARGIN, top + len(rows) * step + MARGIN), caption, fill=text, font=font)
    return canvas


def save_montage(path: str | Path, rows: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str],
                 column_labels: Sequence[str], overwrite: bool = False, *,
                 column_windows: Sequence[Window | None] | None = None,
                 row_windows: Sequence[Window | None] | None = None,
                 outlines: Sequence[Sequence[np.ndarray | None]] | None = None,
                 outline_colour: Colour = OUTLINE_COLOUR, tile_size: int = 192,
                 cell_windows: Sequence[Sequence[Window | None]] | None = None, caption: str | None = None) -> Path:
    """Write the labelled grid ``rows[r][c]`` as a PNG, atomically.

    ``column_windows[c]`` (or ``row_windows[r]``, or ``cell_windows[r][c]``: one of the three) is
    a fixed (low, high) window for column ``c`` (row ``r``, cell ``r, c``) or None for a window per
    image (robust percentiles); every image is scaled to a ``tile_size`` square tile.
    ``outlines[r][c]``, a bool mask of the image's shape or None, is outlined in
    ``outline_colour``; ``caption`` is written under the grid (say what the windows are).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TarganError("a montage is written as PNG: the name must end in .png", path)
    image = render_montage(rows, row_labels, column_labels, column_windows=column_windows,
                           row_windows=row_windows, outlines=outlines, outline_colour=outline_colour,
                           tile_size=tile_size, cell_windows=cell_windows, caption=caption)
    with atomic_output(path, overwrite=overwrite, kind="png") as temporary:
        image.save(temporary, format="PNG")
    return path
