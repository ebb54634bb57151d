"""io/montage.py: outline masks drawn in colour on their tiles, and windows per row.

The grid layout, column windows and atomic saving are tested in test_translate.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from targan_cli.io.montage import MARGIN, OUTLINE_COLOUR, render_montage


def _tile(canvas: np.ndarray, row_from_bottom: int, tile_size: int) -> np.ndarray:
    """A tile of the last column: tiles end MARGIN pixels before the right and bottom edges."""
    step = tile_size + MARGIN
    bottom = canvas.shape[0] - MARGIN - row_from_bottom * step
    return canvas[bottom - tile_size:bottom, -step:-MARGIN]


def test_outline_is_drawn_in_colour_on_the_mask_boundary_of_its_tile() -> None:
    image = np.arange(48, dtype=float).reshape(8, 6)  # taller than wide: centred with side bands
    mask = np.zeros((8, 6), dtype=bool)
    mask[2:7, 1:5] = True
    canvas = render_montage([[image]], ["row"], ["column"], outlines=[[mask]], tile_size=16)
    assert canvas.mode == "RGB"
    pixels = np.asarray(canvas)
    coloured = np.all(pixels == OUTLINE_COLOUR, axis=-1)
    # Zoom 2, 12 pixels wide centred in 16: the mask covers tile rows 4-13 and columns 4-11, and
    # its outline is one image pixel (two tile pixels) wide.
    expected = np.zeros((16, 16), dtype=bool)
    expected[4:14, 4:12] = True
    expected[6:12, 6:10] = False
    np.testing.assert_array_equal(_tile(coloured, 0, 16), expected)
    assert coloured.sum() == expected.sum()  # nothing else in the colour, labels included
    above = pixels[:-16 - MARGIN]  # the column label, in white (anti-aliased grey), not in colour
    assert above.max() > 200 and np.all((above[..., 0] == above[..., 1]) & (above[..., 1] == above[..., 2]))
    grey = _tile(pixels, 0, 16)[~expected]
    assert np.all((grey[:, 0] == grey[:, 1]) & (grey[:, 1] == grey[:, 2]))


def test_outlines_in_another_colour_and_cells_without_a_mask() -> None:
    image = np.ones((4, 4))
    mask = np.ones((4, 4), dtype=bool)
    canvas = render_montage([[image, image]], ["r"], ["with", "without"], outlines=[[mask, None]],
                            outline_colour=(0, 255, 0), tile_size=4)
    pixels = np.asarray(canvas)
    green = np.all(pixels == (0, 255, 0), axis=-1)
    ring = np.ones((4, 4), dtype=bool)
    ring[1:3, 1:3] = False
    step = 4 + MARGIN
    np.testing.assert_array_equal(green[-step:-MARGIN, -2 * step:-step - MARGIN], ring)
    assert green.sum() == ring.sum()


def test_row_windows_apply_to_every_image_of_their_row() -> None:
    image = np.full((5, 5), 100.0)
    canvas = render_montage([[image, image], [image, image]], ["wide", "narrow"], ["a", "b"],
                            row_windows=[(0.0, 200.0), (0.0, 100.0)], tile_size=10)
    assert canvas.mode == "L"  # no outlines: grey-scale as before
    pixels = np.asarray(canvas)
    assert np.all(_tile(pixels, 1, 10) == 128) and np.all(_tile(pixels, 0, 10) == 255)


@pytest.mark.parametrize(("options", "message"), [
    (dict(row_windows=[None], column_windows=[None]), "not several"),
    (dict(row_windows=[None, None]), "1 rows but 2 row windows"),
    (dict(outlines=[]), "1 rows but 0 rows of outlines"),
    (dict(outlines=[[np.zeros((3, 4), dtype=bool)]]), r"has shape \(3, 4\), its image \(4, 4\)"),
    (dict(outlines=[[None, None]]), "1 images but 2 outlines"),
])
def test_mismatched_windows_and_outlines_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_montage([[np.zeros((4, 4))]], ["r"], ["c"], **options)
