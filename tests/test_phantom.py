"""The phantom generator: layout, determinism, anatomy vs labels, contrasts, geometry, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from targan_cli.config import DatasetSpec
from targan_cli.data.dataset import open_data_dir
from targan_cli.data.phantom import (
    PHANTOM_MODALITIES,
    SCAN_LENGTH_MM,
    Tissue,
    default_slices,
    liver_label,
    modality_grid,
    phantom_steps,
    random_anatomy,
    random_scanner,
    render,
    render_montage,
    sample_tissues,
    write_phantom_dataset,
)
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.montage import MARGIN, OUTLINE_COLOUR
from targan_cli.io.volume import Volume, read_volume, to_slices

SIZE, SLICES = 40, 8  # CT 8 slices of 30 mm, MR 4 of 60 mm: fast, still spans the liver


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "data"
    steps = []
    summary = write_phantom_dataset(root, cases=2, size=SIZE, slices=SLICES, seed=3, test_cases=1,
                                    progress=steps.append)
    return root, summary, steps


def _read(path: Path):
    volume = read_volume(path)
    return np.asarray(volume.array), volume


def test_layout_is_complete_and_readable(dataset):
    root, summary, steps = dataset
    spec = DatasetSpec.from_dict(json.loads((root / "dataset.json").read_text()))
    assert spec.modality_names == PHANTOM_MODALITIES == ("t1w", "t2w", "ct")
    assert spec.target == "liver" and spec.name == "phantom"
    expected = set()
    for modality in PHANTOM_MODALITIES:
        for case in summary.train_cases[modality]:
            expected |= {f"train/{modality}/images/{case}.nii.gz", f"train/{modality}/labels/{case}.nii.gz"}
        for case in summary.test_cases:
            expected |= {f"test/{modality}/images/{case}.nii.gz", f"test/{modality}/labels/{case}.nii.gz"}
            expected |= {f"test/{modality}/paired/{other}/{case}.nii.gz"
                         for other in PHANTOM_MODALITIES if other != modality}
    written = {str(p.relative_to(root)) for p in root.rglob("*.nii.gz")}
    assert written == expected and summary.files == len(expected) == 3 * 2 * 2 + 3 * 4
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert sum(steps) == len(steps) == phantom_steps(2, 1) == 9
    data = open_data_dir(root)  # the dataset layer accepts the layout
    test_cases = data.cases("test", "ct")
    assert [c.case_id for c in test_cases] == list(summary.test_cases)
    assert set(test_cases[0].paired) == {"t1w", "t2w"}


def test_training_cases_are_different_patients_per_modality(dataset):
    root, summary, _ = dataset
    ids = [set(summary.train_cases[m]) for m in PHANTOM_MODALITIES]
    assert all(len(s) == 2 for s in ids) and len(set.union(*ids)) == 6
    assert not set.union(*ids) & set(summary.test_cases)
    liver_ml = []
    for modality in PHANTOM_MODALITIES:
        for case in summary.train_cases[modality]:
            label, volume = _read(root / "train" / modality / "labels" / f"{case}.nii.gz")
            liver_ml.append(label.sum() * np.prod(volume.spacing) / 1000)
    assert len({round(v) for v in liver_ml}) == 6  # six different livers


def test_labels_are_binary_on_the_image_grid_and_cover_most_slices(dataset):
    root, summary, _ = dataset
    slices_with_liver = []
    for label_file in sorted(root.rglob("labels/*.nii.gz")):
        label, label_volume = _read(label_file)
        image, image_volume = _read(label_file.parent.parent / "images" / label_file.name)
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        assert label.shape == image.shape
        np.testing.assert_allclose(label_volume.affine, image_volume.affine, atol=1e-4)
        slices, _ = to_slices(label_volume)
        with_liver = slices.reshape(len(slices), -1).sum(axis=1) > 0
        assert with_liver.mean() >= 0.5, label_file  # the liver is in most slices
        if "/ct/" in str(label_file):
            assert not with_liver.all(), label_file  # but not all: empty masks exist
        slices_with_liver.extend(with_liver)
    assert np.mean(slices_with_liver) < 0.9


def test_ct_liver_label_marks_liver_tissue(dataset):
    root, summary, _ = dataset
    for modality, case in [("ct", c) for c in summary.train_cases["ct"]] + [("ct", summary.test_cases[0])]:
        split = "test" if case in summary.test_cases else "train"
        image, _ = _read(root / split / modality / "images" / f"{case}.nii.gz")
        label, _ = _read(root / split / modality / "labels" / f"{case}.nii.gz")
        core = ndimage.binary_erosion(label > 0, structure=np.ones((3, 3, 1)))
        liver_hu = np.median(image[core])  # thick slices: partial volume with the diaphragm, vessels
        soft_tissue = np.median(image[(label == 0) & (image > -500)])  # the rest of the body
        assert 45 < liver_hu < 75
        assert abs(liver_hu - soft_tissue) > 20


def test_paired_renderings_share_the_grid_and_the_anatomy(dataset):
    root, summary, _ = dataset
    case = summary.test_cases[0]
    liver_ml = []
    for modality in PHANTOM_MODALITIES:
        image, image_volume = _read(root / "test" / modality / "images" / f"{case}.nii.gz")
        label, _ = _read(root / "test" / modality / "labels" / f"{case}.nii.gz")
        liver_ml.append(label.sum() * np.prod(image_volume.spacing) / 1000)
        for other in PHANTOM_MODALITIES:
            if other == modality:
                continue
            paired, paired_volume = _read(root / "test" / modality / "paired" / other / f"{case}.nii.gz")
            assert paired.shape == image.shape
            np.testing.assert_allclose(paired_volume.affine, image_volume.affine, atol=1e-4)
            if other == "ct":  # the same liver, voxel for voxel: CT values inside this grid's label
                core = ndimage.binary_erosion(label > 0, structure=np.ones((3, 3, 1)))
                outside = np.median(paired[(label == 0) & (paired > -500)])
                assert 35 < np.median(paired[core]) < 75 and outside < 0
    assert max(liver_ml) / min(liver_ml) < 1.25  # one patient, three grids


def test_geometry_differs_per_modality_and_ct_slices_are_thinner(dataset):
    root, summary, _ = dataset
    case = summary.test_cases[0]
    volumes = {m: read_volume(root / "test" / m / "images" / f"{case}.nii.gz") for m in PHANTOM_MODALITIES}
    affines = [v.affine for v in volumes.values()]
    assert not np.allclose(affines[0], affines[1]) and not np.allclose(affines[0], affines[2])
    assert volumes["ct"].shape == (SIZE, SIZE, SLICES) and volumes["t1w"].shape[2] == SLICES // 2
    assert summary.slices == {"t1w": SLICES // 2, "t2w": SLICES // 2, "ct": SLICES}
    for volume in volumes.values():
        pixel = volume.spacing[0]
        assert 340 / SIZE <= pixel <= 440 / SIZE and volume.spacing[1] == pytest.approx(pixel)
    for modality in PHANTOM_MODALITIES:  # the whole body fits in the field of view
        ct, _ = _read(root / "test" / modality / ("images" if modality == "ct" else "paired/ct") / f"{case}.nii.gz")
        edges = np.concatenate([ct[0].ravel(), ct[-1].ravel(), ct[:, 0].ravel(), ct[:, -1].ravel()])
        assert edges.max() < -900, modality
    assert volumes["ct"].spacing[2] < volumes["t1w"].spacing[2]
    assert volumes["ct"].spacing[2] < volumes["t2w"].spacing[2]
    # ~200 mm of abdomen in every modality, from the lung bases to the lower kidneys
    for volume in volumes.values():
        assert 170 < volume.shape[2] * volume.spacing[2] < 230
    assert SCAN_LENGTH_MM / default_slices(256) == pytest.approx(3.0, rel=0.05)  # CT at full size
    assert 16 <= default_slices(64) <= 24


@pytest.mark.parametrize("layout", PHANTOM_MODALITIES)
def test_canonical_slices_show_the_abdomen_upright(layout):
    """Whatever voxel order a modality's files use, reoriented slices show the usual display."""
    anatomy = random_anatomy(np.random.default_rng(7))
    grid = modality_grid(layout, anatomy, 40, 12, np.random.default_rng(1))
    tissues = sample_tissues(anatomy, grid)
    ct = render(tissues, grid, random_scanner("ct", np.random.default_rng(2)), np.random.default_rng(3))
    ct, _ = to_slices(Volume(ct, grid.affine))  # (Z, H, W)
    label, _ = to_slices(Volume(liver_label(tissues), grid.affine))
    height, width = label.shape[1:]
    _, liver_row, liver_column = ndimage.center_of_mass(label)
    _, bone_row, bone_column = ndimage.center_of_mass(ct > 400)
    assert liver_column < width / 2  # patient's right on the image left
    assert bone_row > height / 2  # spine posterior, at the bottom
    assert abs(bone_column - width / 2) < width / 8  # spine in the midline
    body = ct > -500  # slices inferior -> superior: lung bases (air in the body) at the top
    enclosed_air = (ndimage.binary_fill_holes(body, structure=np.ones((1, 3, 3))) & ~body).sum(axis=(1, 2))
    assert enclosed_air[-1] > 2 * enclosed_air[0]


def test_tissue_contrasts_in_rendered_images():
    anatomy = random_anatomy(np.random.default_rng(11))
    means = {}
    for contrast in ("ct", "t1w", "t2w"):
        grid = modality_grid(contrast, anatomy, 64, 12, np.random.default_rng(1))
        tissues = sample_tissues(anatomy, grid)
        image = render(tissues, grid, random_scanner(contrast, np.random.default_rng(2)), np.random.default_rng(3))
        pure = (tissues == tissues[..., :1]).all(axis=-1)
        for tissue in (Tissue.FAT, Tissue.LIVER, Tissue.SPLEEN, Tissue.MARROW):
            core = ndimage.binary_erosion(pure & (tissues[..., 0] == tissue), structure=np.ones((3, 3, 1)))
            assert core.sum() >= 3, (contrast, tissue.name)
            means[contrast, tissue] = image[core].mean()
        if contrast != "ct":
            assert image.min() >= 0  # magnitude images
            corner = image[:4, :4]  # air: only the Rician noise floor
            assert corner.mean() < 0.05 * np.percentile(image, 99)
        else:
            assert abs(image[:4, :4].mean() + 1000) < 20
    fat, liver, spleen, bone = Tissue.FAT, Tissue.LIVER, Tissue.SPLEEN, Tissue.MARROW
    assert means["t1w", fat] > means["t1w", liver] > means["t1w", spleen]
    assert means["t2w", spleen] > means["t2w", liver]
    assert means["t2w", fat] > means["t2w", liver]
    assert means["ct", bone] > means["ct", liver] > means["ct", fat]
    assert 40 < means["ct", liver] < 80 and -130 < means["ct", fat] < -70


def test_liver_label_is_the_majority_of_liver_tissue():
    tissues = np.zeros((2, 1, 1, 4), dtype=np.uint8)
    tissues[0, 0, 0] = [Tissue.LIVER, Tissue.LIVER_VESSEL, Tissue.FAT, Tissue.FAT]
    tissues[1, 0, 0] = [Tissue.CYST, Tissue.FAT, Tissue.FAT, Tissue.FAT]
    assert liver_label(tissues).ravel().tolist() == [1, 0]


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path):
    options = dict(cases=1, size=32, slices=4, test_cases=1)
    first = write_phantom_dataset(tmp_path / "a", seed=5, **options)
    write_phantom_dataset(tmp_path / "b", seed=5, **options)
    write_phantom_dataset(tmp_path / "c", seed=6, **options)
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*.nii.gz"))
    assert len(files) == 3 * 2 + 3 * 4
    differs = 0
    for file in files:
        a, volume_a = _read(tmp_path / "a" / file)
        b, volume_b = _read(tmp_path / "b" / file)
        c, _ = _read(tmp_path / "c" / file)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), file
        np.testing.assert_array_equal(volume_a.affine, volume_b.affine)
        differs += a.shape != c.shape or not np.array_equal(a, c)
    assert differs == len(files)


def test_existing_output_is_refused_without_overwrite(tmp_path):
    options = dict(cases=1, size=16, slices=4, test_cases=0)
    out = tmp_path / "data"
    out.mkdir()  # an existing empty folder is fine
    write_phantom_dataset(out, seed=1, **options)
    before = read_volume(out / "train" / "ct" / "images" / "phantom_002.nii.gz").array
    with pytest.raises(TarganError, match="--overwrite"):
        write_phantom_dataset(out, seed=2, **options)
    summary = write_phantom_dataset(out, seed=2, overwrite=True, **options)
    after = read_volume(out / "train" / "ct" / "images" / "phantom_002.nii.gz").array
    assert summary.test_cases == () and not np.array_equal(before, after)
    assert not (out / "test").exists()

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not a dataset")
    with pytest.raises(TarganError, match=r"holds no \.targan\.json") as error:
        write_phantom_dataset(foreign, overwrite=True, **options)
    assert error.value.path == foreign and (foreign / "holiday.jpg").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(TarganError, match="not a folder"):
        write_phantom_dataset(a_file, overwrite=True, **options)


@pytest.mark.parametrize("option", [dict(size=8), dict(slices=3), dict(cases=0), dict(seed=-1),
                                    dict(test_cases=-1), dict(size=40.5), dict(size=100_000), dict(slices=5000)])
def test_bad_options_are_usage_errors(tmp_path, option):
    with pytest.raises(UsageError):
        write_phantom_dataset(tmp_path / "data", **option)
    assert not (tmp_path / "data").exists()


def _montage_tiles(path: Path, rows: int, columns: int, tile: int) -> np.ndarray:
    """The tiles (rows, columns, tile, tile, 3) of an io.montage PNG: they end MARGIN pixels before
    its right and bottom edges, MARGIN pixels apart."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = pixels.shape
    step = tile + MARGIN
    return np.array([[pixels[height - (rows - r) * step:height - (rows - r) * step + tile,
                             width - (columns - c) * step:width - (columns - c) * step + tile]
                      for c in range(columns)] for r in range(rows)])


def _liver_outlines(root: Path, case: str, columns: int, zoom: int) -> list[list[np.ndarray]]:
    """Per modality and column: the inner band, one slice pixel wide, of the zoomed liver label."""
    outlines = []
    for modality in PHANTOM_MODALITIES:
        label = to_slices(read_volume(root / "test" / modality / "labels" / f"{case}.nii.gz"))[0]
        levels = np.rint(np.linspace(0.8, 0.2, columns) * (len(label) - 1)).astype(int)
        livers = [np.kron(label[level] > 0, np.ones((zoom, zoom), dtype=bool)) for level in levels]
        outlines.append([liver & ~ndimage.binary_erosion(liver, iterations=zoom) for liver in livers])
    return outlines


def test_montage_outlines_the_liver_in_red_in_every_modality(dataset, tmp_path):
    root, summary, _ = dataset
    path = render_montage(root, tmp_path / "montage.png", columns=4, zoom=2)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
    tiles = _montage_tiles(path, rows=3, columns=4, tile=2 * SIZE)
    red = np.all(tiles == OUTLINE_COLOUR, axis=-1)  # (rows, columns, tile, tile)
    outlines = _liver_outlines(root, summary.test_cases[0], columns=4, zoom=2)
    for row, modality in enumerate(PHANTOM_MODALITIES):
        assert any(outline.any() for outline in outlines[row]), modality
        for column, outline in enumerate(outlines[row]):
            np.testing.assert_array_equal(red[row, column], outline)  # red exactly on the liver boundary
    picture = np.asarray(Image.open(path).convert("RGB"))
    assert np.all(picture == OUTLINE_COLOUR, axis=-1).sum() == red.sum()  # nowhere else
    with pytest.raises(TarganError, match="--overwrite"):
        render_montage(root, path)


def test_montage_uses_the_ct_window_of_the_dataset(dataset, tmp_path):
    root, summary, _ = dataset
    spec = json.loads((root / "dataset.json").read_text())
    ct = next(m for m in spec["modalities"] if m["name"] == "ct")
    ct["intensity"].update(window_level=-3000.0, window_width=2.0)  # every HU above it: white
    other = tmp_path / "data"
    other.mkdir()
    (other / "dataset.json").write_text(json.dumps(spec))
    (other / "test").symlink_to(root / "test")
    tiles = _montage_tiles(render_montage(other, tmp_path / "montage.png", columns=4, zoom=2),
                           rows=3, columns=4, tile=2 * SIZE)
    outlines = _liver_outlines(root, summary.test_cases[0], columns=4, zoom=2)
    for column, outline in enumerate(outlines[-1]):
        assert np.all(tiles[-1, column][~outline] == 255)
    assert (tiles[0] < 128).mean() > 0.3  # T1w keeps its own window: dark background
