"""Quality control of a translation: the cycle score, clipping, the modality check and the grade.

The cycle score is the paper's cycle loss measured at inference time: the output translated back
to the source modality by the same generator is compared with the input inside the input's body
mask. It is computed on the model's scale, as the mean absolute difference in [0, 1] units (a
fraction of the source's intensity range: the CT window's width, an MR volume's robust maximum),
per slice and per volume; ``units`` turns it into the source's own units (HU for CT).

The thresholds below were calibrated on phantoms (``bench/qc.py``; the data and rates are in
docs/translate.md, "Can I trust this output?"). They are properties of a model as much as of
an input: a model trained longer reconstructs better, so its clean inputs score lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from targan_cli.core.intensity import slabs

# Cycle score (mean |x - G(G(x, t), s)| in [0, 1] units inside the body) above which a volume
# is "check", and "poor". Calibrated with bench/qc.py on 24 clean phantom volumes (cycle scores
# 0.100 to 0.168) and 120 failure cases (0.176 and up) with a tiny model trained 300 steps.
CYCLE_CHECK = 0.17
CYCLE_POOR = 0.21
# A slice whose cycle score is above CYCLE_POOR is flagged (single slices vary more than volumes);
# a volume with more than this share of flagged body slices is "check" even when its mean passes.
FLAGGED_SHARE_CHECK = 0.25
# A volume whose body covers less than this fraction of its voxels holds no usable anatomy.
MIN_BODY_FRACTION = 0.01
# A slice with less body than this fraction of its pixels gets no cycle score (the body's edge).
MIN_SLICE_BODY_FRACTION = 0.02
# Clipping of more than this fraction of body voxels is stated as a warning.
CLIP_WARNING_FRACTION = 0.01

GRADES = ("ok", "check", "poor")


def scored_slices(body: np.ndarray) -> np.ndarray:
    """(Z,) bool: the slices with enough body (MIN_SLICE_BODY_FRACTION of their pixels) to be scored."""
    return body.sum(axis=(1, 2)) >= MIN_SLICE_BODY_FRACTION * body[0].size


def cycle_errors(source: np.ndarray, reconstructed: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, float]:
    """(per-slice errors (Z,), volume error): mean |source - reconstructed| / 2 inside ``body``.

    ``source`` and ``reconstructed`` are (Z, H, W) in [-1, 1] (the halving puts the difference in
    [0, 1] units); slices with less body than MIN_SLICE_BODY_FRACTION get NaN, as does the volume
    when no slice is scored.
    """
    if not source.shape == reconstructed.shape == body.shape:
        raise ValueError(f"shapes differ: {source.shape}, {reconstructed.shape}, {body.shape}")
    difference = np.abs(source.astype(np.float32) - reconstructed.astype(np.float32)) / 2.0
    counts = body.sum(axis=(1, 2))  # (Z,)
    scored = scored_slices(body)
    sums = np.where(body, difference, 0.0).sum(axis=(1, 2))
    per_slice = np.full(len(counts), np.nan)
    per_slice[scored] = sums[scored] / counts[scored]
    volume = float(sums[scored].sum() / counts[scored].sum()) if scored.any() else float("nan")
    return per_slice, volume


def clipped_fraction(values: np.ndarray, body: np.ndarray, low: float | None, high: float | None) -> float:
    """The fraction of ``body`` voxels of ``values`` at or beyond ``low`` / ``high`` (None: no bound).
    Counted slab by slab (``core.intensity.slabs``), without gathering the body's voxels."""
    count = np.count_nonzero(body)
    if count == 0 or (low is None and high is None):
        return 0.0
    clipped = 0
    for part in slabs(values):
        beyond = values[part] <= low if low is not None else values[part] >= high
        if low is not None and high is not None:
            beyond |= values[part] >= high
        beyond &= body[part]
        clipped += np.count_nonzero(beyond)
    return clipped / count


@dataclass(frozen=True)
class ModalityVote:
    """The modality predicted for most body slices, its share of them, and every modality's share."""

    predicted: str
    share: float
    shares: dict[str, float]


def modality_vote(logits: np.ndarray, names: tuple[str, ...], scored: np.ndarray) -> ModalityVote | None:
    """Majority of per-slice predictions: ``logits`` (Z, n) of the real modalities in the order of
    ``names``; only ``scored`` slices (Z,) vote. None when no slice votes."""
    votes = np.argmax(logits[scored], axis=1)
    if votes.size == 0:
        return None
    counts = np.bincount(votes, minlength=len(names))
    shares = {name: float(count / votes.size) for name, count in zip(names, counts)}
    best = int(np.argmax(counts))
    return ModalityVote(names[best], shares[names[best]], shares)


@dataclass(frozen=True)
class Grade:
    """ok / check / poor, the reasons for anything but ok, and the flagged slices (indices along Z)."""

    grade: str
    reasons: tuple[str, ...]
    flagged: tuple[int, ...]


def grade(per_slice: np.ndarray, volume_error: float, body_fraction: float,
          vote: ModalityVote | None = None, source: str | None = None) -> Grade:
    """The QC grade of a translation from its cycle errors, its body fraction and the modality vote.

    poor: no body (an empty or blank volume), a cycle score above CYCLE_POOR, or most slices
    predicted as another modality than ``source``; check: a cycle score above CYCLE_CHECK or more
    than FLAGGED_SHARE_CHECK of the body slices above CYCLE_POOR (flagged).
    """
    flagged = tuple(int(i) for i in np.flatnonzero(np.nan_to_num(per_slice, nan=0.0) > CYCLE_POOR))
    scored = int(np.count_nonzero(~np.isnan(per_slice)))
    poor: list[str] = []
    check: list[str] = []
    if body_fraction < MIN_BODY_FRACTION or scored == 0:
        poor.append(f"body covers {body_fraction:.1%} of the volume: empty, blank or not a body")
    elif volume_error > CYCLE_POOR:
        poor.append(f"cycle score {volume_error:.3f} above {CYCLE_POOR}")
    elif volume_error > CYCLE_CHECK:
        check.append(f"cycle score {volume_error:.3f} above {CYCLE_CHECK}")
    if scored and len(flagged) > FLAGGED_SHARE_CHECK * scored and not poor:
        check.append(f"{len(flagged)} of {scored} body slices have a cycle score above {CYCLE_POOR}")
    if vote is not None and source is not None and vote.predicted != source:
        poor.append(f"the modality check predicts {vote.predicted} on {vote.share:.0%} of the slices, "
                    f"not {source}")
    if poor:
        return Grade("poor", tuple(poor + check), flagged)
    return Grade("check" if check else "ok", tuple(check), flagged)


def units(error: float, span: float | None) -> float | None:
    """A [0, 1]-unit score in the source's units (``span``: the CT window width in HU, an MR
    volume's robust maximum); None when the scale has no unit (per-slice min-max)."""
    return None if span is None else float(error * span)
