"""The trivial baselines a translation must beat, and the verdict computed from the table."""

import numpy as np
import pytest

from targan_cli.core.intensity import body_mask, match_histogram, normalize
from targan_cli.data.dataset import open_data_dir
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.io.volume import read_volume, to_slices
from targan_cli.workflows.evaluate import (HISTOGRAM_LABEL, IDENTITY_LABEL, MEAN_FILL_LABEL, Column, Record,
                                           build_result, trivial_baselines, verdict)


def test_histogram_matching_takes_the_reference_quantile_at_each_rank() -> None:
    values = np.array([[[3.0, 1.0], [4.0, 2.0]]])  # (1, 2, 2)
    mask = np.ones_like(values, dtype=bool)
    reference = np.linspace(10.0, 20.0, 11)  # the quantile function of U(10, 20)
    matched = match_histogram(values, mask, reference)
    # ranks 3, 1, 4, 2 of 4 -> levels 0.625, 0.125, 0.875, 0.375
    assert matched.tolist() == [[[16.25, 11.25], [18.75, 13.75]]]
    outside = match_histogram(values, mask & (values > 2), reference, background=-1.0)
    assert outside[0, 0, 1] == -1.0 and outside[0, 1, 1] == -1.0
    assert outside[0, 0, 0] == pytest.approx(12.5) and outside[0, 1, 0] == pytest.approx(17.5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines") / "data"
    write_phantom_dataset(root, cases=2, test_cases=1, size=24, slices=4, seed=1)
    return open_data_dir(root)


def test_baselines_copy_fill_and_match(data) -> None:
    baselines, notes = trivial_baselines(data, data.spec.modalities, 24)
    assert [b.label for b in baselines] == [IDENTITY_LABEL, MEAN_FILL_LABEL, HISTOGRAM_LABEL] and notes == []
    identity, mean_fill, histogram = baselines
    ct = data.spec.modalities[data.spec.modality_names.index("ct")]
    means = []
    for case in data.cases("train", "ct"):  # the CT body mean, by hand
        normalized = normalize(to_slices(read_volume(case.image))[0], ct.intensity)
        means.append(normalized[body_mask(normalized)].mean())
    case = data.cases("test", "t1w")[0]
    t1w = data.spec.modalities[data.spec.modality_names.index("t1w")]
    slices = normalize(to_slices(read_volume(case.image))[0], t1w.intensity)
    body = body_mask(slices)
    assert identity.translate(case, slices, "t1w", "ct") is slices
    filled = mean_fill.translate(case, slices, "t1w", "ct")
    assert np.allclose(filled[body], np.mean(means), atol=1e-6) and np.all(filled[~body] == -1.0)
    matched = histogram.translate(case, slices, "t1w", "ct")
    assert np.all(matched[~body] == -1.0)
    order = np.argsort(slices[body], kind="stable")
    assert np.all(np.diff(matched[body][order]) >= -1e-6)  # the input's order of intensities is kept
    assert matched[body].min() < filled[body][0] < matched[body].max()


def test_the_verdict_is_computed_from_the_numbers() -> None:
    columns = [Column("psnr", "ct", "body"), Column("mae", "ct", "body")]
    values = {"model": ([30.0, 32.0], [0.10, 0.12]), IDENTITY_LABEL: ([20.0, 21.0], [0.30, 0.31]),
              MEAN_FILL_LABEL: ([31.0, 35.0], [0.05, 0.06])}
    records = [Record(model, column.metric, column.target, column.region, f"case{i}", "t1w", value)
               for model, cells in values.items() for column, pair in zip(columns, cells)
               for i, value in enumerate(pair)]
    result = build_result("t", list(values), columns, records, {})
    text = verdict(result, "model")
    assert text == ("model beats identity (copy input) in 2 of 2 columns (2 with 95 % intervals apart); "
                    "body mean-fill in 0 of 2 columns.")
    values[MEAN_FILL_LABEL] = ([31.0, 35.0], [0.15, 0.16])  # now the model's MAE is better
    records = [Record(model, column.metric, column.target, column.region, f"case{i}", "t1w", value)
               for model, cells in values.items() for column, pair in zip(columns, cells)
               for i, value in enumerate(pair)]
    assert verdict(build_result("t", list(values), columns, records, {}), "model").endswith(
        "body mean-fill in 1 of 2 columns (1 with 95 % intervals apart), not in PSNR ct body.")
