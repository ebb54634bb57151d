"""Synthetic abdominal phantoms: the default data of targan-cli, in the DATA layout.

Each case is a random 3D anatomy (body wall, liver with vessels and sometimes lesions, spleen,
kidneys, stomach, gallbladder, bowel, aorta and IVC, spine, ribs, lung bases and heart) defined
as a continuous function of patient coordinates in mm (RAS+: x to the patient's right, y
anterior, z superior). A modality grid samples it, with partial-volume supersampling, and a
contrast table turns tissues into values: Hounsfield units for CT (Gaussian noise), scanner-like
positive values for T1w and T2w (smooth bias field, Rician noise).

Training cases of each modality come from different anatomies (unpaired, as CT and MR patients
differ in CHAOS); each test case is one anatomy rendered in every modality, and also in every
other modality on this modality's grid (``paired/``), so that translations can be compared voxel
by voxel. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
from scipy import ndimage

from targan_cli.config import DatasetSpec, default_modalities, read_json
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import atomic_output, check_writable
from targan_cli.io.montage import save_montage
from targan_cli.io.volume import Volume, read_volume, to_slices, write_volume


class Tissue(IntEnum):
    """Tissue classes of the phantom; ``CONTRAST`` gives each one a value per modality."""

    AIR = 0
    LUNG = 1
    FAT = 2
    MUSCLE = 3
    BOWEL = 4
    GAS = 5
    LIVER = 6
    LIVER_VESSEL = 7
    CYST = 8
    METASTASIS = 9
    SPLEEN = 10
    KIDNEY = 11
    RENAL_SINUS = 12
    FLUID = 13
    BLOOD = 14
    CORTICAL_BONE = 15
    MARROW = 16
    DISC = 17
    CSF = 18
    HEART = 19


LIVER_TISSUES = (Tissue.LIVER, Tissue.LIVER_VESSEL, Tissue.CYST, Tissue.METASTASIS)
"""What the liver label covers: parenchyma with its vessels and lesions (as in CHAOS)."""

# Mean value of each tissue: CT in HU (non-contrast), T1w (in-phase GRE) and T2w on a
# scanner-like 0..~1500 scale. Orderings that matter: T1 fat > liver > spleen > muscle, fluid
# dark; T2 fluid > spleen > liver; CT bone > liver > fat. The T1w liver sits about 1.25 times
# muscle and 1.06 times spleen (in-phase GRE), below the T1w body mean, not at it.
CONTRAST: dict[str, dict[Tissue, float]] = {
    "ct": {
        Tissue.AIR: -1000, Tissue.LUNG: -850, Tissue.FAT: -100, Tissue.MUSCLE: 50,
        Tissue.BOWEL: 35, Tissue.GAS: -950, Tissue.LIVER: 60, Tissue.LIVER_VESSEL: 38,
        Tissue.CYST: 8, Tissue.METASTASIS: 32, Tissue.SPLEEN: 50, Tissue.KIDNEY: 30,
        Tissue.RENAL_SINUS: -80, Tissue.FLUID: 10, Tissue.BLOOD: 40, Tissue.CORTICAL_BONE: 900,
        Tissue.MARROW: 250, Tissue.DISC: 90, Tissue.CSF: 10, Tissue.HEART: 40,
    },
    "t1w": {
        Tissue.AIR: 0, Tissue.LUNG: 20, Tissue.FAT: 1100, Tissue.MUSCLE: 400,
        Tissue.BOWEL: 380, Tissue.GAS: 0, Tissue.LIVER: 500, Tissue.LIVER_VESSEL: 280,
        Tissue.CYST: 150, Tissue.METASTASIS: 340, Tissue.SPLEEN: 470, Tissue.KIDNEY: 450,
        Tissue.RENAL_SINUS: 900, Tissue.FLUID: 150, Tissue.BLOOD: 200, Tissue.CORTICAL_BONE: 60,
        Tissue.MARROW: 700, Tissue.DISC: 350, Tissue.CSF: 150, Tissue.HEART: 300,
    },
    "t2w": {
        Tissue.AIR: 0, Tissue.LUNG: 15, Tissue.FAT: 700, Tissue.MUSCLE: 250,
        Tissue.BOWEL: 450, Tissue.GAS: 0, Tissue.LIVER: 300, Tissue.LIVER_VESSEL: 120,
        Tissue.CYST: 1400, Tissue.METASTASIS: 650, Tissue.SPLEEN: 650, Tissue.KIDNEY: 750,
        Tissue.RENAL_SINUS: 600, Tissue.FLUID: 1350, Tissue.BLOOD: 80, Tissue.CORTICAL_BONE: 50,
        Tissue.MARROW: 450, Tissue.DISC: 700, Tissue.CSF: 1450, Tissue.HEART: 120,
    },
}
PHANTOM_MODALITIES = tuple(m.name for m in default_modalities())  # ("t1w", "t2w", "ct")

SCAN_LENGTH_MM = 200.0  # cranio-caudal range of every volume: lung bases to the lower kidneys
FIELD_SPACING_MM = 6.0  # lattice of the smooth random fields that deform and texture the anatomy
FIELD_EXTENT_MM = 200.0  # the lattice covers [-extent, extent] on every axis (mirrored beyond)
PSF_SIGMA = 0.6  # in-plane point-spread function of every scanner, in pixels


@dataclass(frozen=True)
class Ellipsoid:
    """An organ primitive in standard-patient mm: centre, semi-axes, rotation about z (radians).

    ``deform`` scales a smooth random field added to the normalised radius, sampled at
    ``field_offset`` so that organs get independent shapes from one field.
    """

    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    angle: float = 0.0
    deform: float = 0.0
    field_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Lesion:
    """A round liver lesion: centre and radius in standard-patient mm, and its tissue."""

    center: tuple[float, float, float]
    radius: float
    tissue: Tissue  # CYST or METASTASIS


@dataclass(frozen=True, eq=False)
class Anatomy:
    """One random patient. Points are mapped to standard-patient coordinates by ``scale`` (x, y, z).

    ``fields`` (4, X, Y, Z) holds unit-variance smooth noise: organ deformation, bowel loops,
    bowel gas and hepatic vessels.
    """

    scale: tuple[float, float, float]
    body_axes: tuple[float, float]  # half-width and half-depth of the body at z = 0 (mm)
    body_exponent: float  # of the superellipse outline: 2 is an ellipse, larger is boxier
    body_taper: tuple[float, float]  # linear change of width and depth per 150 mm along z
    lobulation: tuple[float, float]  # amplitude and phase of a three-lobed outline ripple
    fat_mm: float  # subcutaneous fat thickness, anterior
    organs: dict[str, Ellipsoid]
    lesions: tuple[Lesion, ...]
    spine_y: float  # vertebral body centre (anterior-posterior)
    disc_phase: float  # z of a disc, in mm
    dome_heights: tuple[float, float]  # right and left diaphragm domes (z, mm)
    scan_center_z: float  # middle of the scanned range (standard coordinates)
    fields: np.ndarray

    def tissues(self, points: np.ndarray) -> np.ndarray:
        """Tissue class (uint8) at each point of ``points`` (N, 3) in patient mm (RAS+)."""
        standard = np.asarray(points, dtype=np.float64) / np.asarray(self.scale)
        return _paint(self, standard[:, 0], standard[:, 1], standard[:, 2])


def _smooth_fields(rng: np.random.Generator) -> np.ndarray:
    """Unit-variance Gaussian-smoothed noise on the field lattice, one channel per purpose."""
    count = int(round(2 * FIELD_EXTENT_MM / FIELD_SPACING_MM)) + 1
    sigmas_mm = (30.0, 11.0, 9.0, 7.0)  # deformation, bowel loops, bowel gas, vessels
    fields = np.empty((len(sigmas_mm), count, count, count), dtype=np.float32)
    for channel, sigma in enumerate(sigmas_mm):
        noise = rng.standard_normal((count, count, count))
        smooth = ndimage.gaussian_filter(noise, sigma / FIELD_SPACING_MM, mode="wrap", truncate=3.0)
        fields[channel] = (smooth - smooth.mean()) / smooth.std()
    return fields


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one patient: body habitus, organ positions, sizes and shapes, lesions."""

    def jitter(values: tuple[float, ...], spread: float) -> tuple[float, ...]:
        return tuple(float(v + rng.uniform(-spread, spread)) for v in values)

    def resize(values: tuple[float, ...], spread: float) -> tuple[float, ...]:
        return tuple(float(v * rng.uniform(1 - spread, 1 + spread)) for v in values)

    def offset() -> tuple[float, float, float]:
        return tuple(float(v) for v in rng.uniform(-150, 150, size=3))

    def organ(center: tuple[float, float, float], axes: tuple[float, float, float], angle: float = 0.0,
              deform: float = 0.0, move: float = 8.0, grow: float = 0.1) -> Ellipsoid:
        return Ellipsoid(jitter(center, move), resize(axes, grow),
                         angle + rng.uniform(-0.15, 0.15), deform, offset())

    spine_y = -40.0 + rng.uniform(-5, 5)
    in_plane_scale = float(rng.uniform(0.88, 1.1))
    organs = {
        "liver_right": organ((68, -8, 6), (78, 95, 82), deform=0.10),
        "liver_left": organ((-28, 42, 28), (62, 36, 40), angle=-0.3, deform=0.10),
        "gallbladder": organ((42, 38, -35), (16, 20, 32), angle=0.6, deform=0.05, move=6),
        "stomach": organ((-48, 34, 36), (45, 36, 48), angle=-0.4, deform=0.08),
        "spleen": organ((-88, -42, 34), (62, 26, 52), angle=2.3, deform=0.06, move=6),
        "kidney_right": organ((68, spine_y - 8, -60), (28, 30, 52), angle=0.5, deform=0.04, move=5),
        "kidney_left": organ((-68, spine_y - 6, -42), (28, 30, 52), angle=-0.5, deform=0.04, move=5),
        "heart": organ((-18, 32, 150), (75, 58, 90), deform=0.04, move=5),
    }
    lesions = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):  # in the right lobe, half of the patients
        center = (float(rng.uniform(35, 95)), float(rng.uniform(-50, 35)), float(rng.uniform(-25, 45)))
        kind = Tissue.CYST if rng.random() < 0.4 else Tissue.METASTASIS
        lesions.append(Lesion(center, float(rng.uniform(7, 22)), kind))
    return Anatomy(
        scale=(in_plane_scale, in_plane_scale, float(rng.uniform(0.9, 1.1))),
        body_axes=(float(rng.uniform(138, 160)), float(rng.uniform(100, 118))),
        body_exponent=float(rng.uniform(2.2, 2.8)),
        body_taper=(float(rng.uniform(-0.08, 0.05)), float(rng.uniform(-0.05, 0.08))),
        lobulation=(float(rng.uniform(0.0, 0.04)), float(rng.uniform(0, 2 * np.pi))),
        fat_mm=float(rng.uniform(8, 30)),
        organs=organs,
        lesions=tuple(lesions),
        spine_y=spine_y,
        disc_phase=float(rng.uniform(0, 32)),
        dome_heights=(float(rng.uniform(62, 74)), float(rng.uniform(50, 62))),
        scan_center_z=float(rng.uniform(-12, 0)),
        fields=_smooth_fields(rng),
    )


def _field(anatomy: Anatomy, channel: int, x: np.ndarray, y: np.ndarray, z: np.ndarray,
           offset: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """One channel of the anatomy's smooth fields at standard-patient points (linear interpolation)."""
    scale = 1.0 / FIELD_SPACING_MM
    coords = np.stack([(x + offset[0] + FIELD_EXTENT_MM) * scale,
                       (y + offset[1] + FIELD_EXTENT_MM) * scale,
                       (z + offset[2] + FIELD_EXTENT_MM) * scale])
    return ndimage.map_coordinates(anatomy.fields[channel], coords, order=1, mode="mirror")


def _inside(anatomy: Anatomy, organ: Ellipsoid, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Normalised radius of ``organ`` at the points (< 1 inside), deformed by the shape field.

    Points outside the organ's bounding box get 2 without further work.
    """
    cx, cy, cz = organ.center
    margin = 1 + 3 * organ.deform  # the field rarely exceeds 3 standard deviations
    reach = max(organ.semi_axes[:2]) * margin
    box = (np.abs(x - cx) < reach) & (np.abs(y - cy) < reach) & (np.abs(z - cz) < organ.semi_axes[2] * margin)
    radius = np.full(x.shape, 2.0)
    if not box.any():
        return radius
    xb, yb, zb = x[box], y[box], z[box]
    cos, sin = np.cos(organ.angle), np.sin(organ.angle)
    u = ((xb - cx) * cos + (yb - cy) * sin) / organ.semi_axes[0]
    v = (-(xb - cx) * sin + (yb - cy) * cos) / organ.semi_axes[1]
    w = (zb - cz) / organ.semi_axes[2]
    inner = np.sqrt(u * u + v * v + w * w)
    if organ.deform:
        inner += organ.deform * _field(anatomy, 0, xb, yb, zb, organ.field_offset)
    radius[box] = inner
    return radius


def _paint(anatomy: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Tissue at standard-patient points, painting structures in order (later ones on top)."""
    organs = anatomy.organs

    # Body: a lobulated superellipse whose width and depth change smoothly along z.
    exponent = anatomy.body_exponent
    widen, deepen = anatomy.body_taper
    lobulation, lobe_phase = anatomy.lobulation
    zn = z / 150.0
    half_width = anatomy.body_axes[0] * (1 + widen * zn - 0.10 * zn**2)
    half_depth = anatomy.body_axes[1] * (1 + deepen * zn - 0.06 * zn**2)
    half_depth = np.where(y < 0, 0.97 * half_depth, half_depth)  # flatter back, lying on a table
    theta = np.arctan2(y, x)
    lobes = 1 + lobulation * np.cos(3 * theta + lobe_phase + 2 * zn) + 0.03 * np.cos(2 * theta)
    q = (np.abs(x / half_width) ** exponent + np.abs(y / half_depth) ** exponent) ** (1 / exponent) / lobes
    tissue = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    body = np.flatnonzero(q < 1)
    if not body.size:
        return tissue
    x, y, z, theta, q = x[body], y[body], z[body], theta[body], q[body]
    depth = np.hypot(x, y) * (1 / np.maximum(q, 1e-6) - 1)  # mm below the skin, along the ray from the centre
    inner = np.full(x.shape, Tissue.FAT, dtype=np.uint8)  # what ``body`` points hold, painted in order

    sin_t, cos_t = np.sin(theta), np.cos(theta)
    fat = anatomy.fat_mm * (0.75 + 0.35 * sin_t + 0.25 * np.abs(cos_t)) + 3
    muscle = 11 + 3 * np.abs(cos_t)
    inner[depth > fat] = Tissue.MUSCLE
    cavity = depth > fat + muscle
    inner[cavity] = Tissue.FAT

    spine_y = anatomy.spine_y + 0.0004 * (z + 40) ** 2  # mild lumbar lordosis
    vertebra_radius = 17 + np.clip(-z, -60, 150) * 0.03
    canal_y = spine_y - vertebra_radius - 10

    # Diaphragm: two domes; lungs and heart above it inside the rib cage.
    right_dome, left_dome = anatomy.dome_heights
    diaphragm = np.maximum(right_dome - ((x - 50) ** 2 + (y + 5) ** 2) / 260,
                           left_dome - ((x + 55) ** 2 + (y + 15) ** 2) / 260)
    thorax = cavity & (z > diaphragm)
    abdomen = cavity & (z <= diaphragm)

    # Small bowel: winding loops (a band of a smooth random field) with gas pockets.
    bowel_zone = abdomen & (y > spine_y + 15) & (z < 20 + 0.4 * y)
    loops = np.zeros(x.shape, dtype=bool)
    loops[bowel_zone] = np.abs(_field(anatomy, 1, x[bowel_zone], y[bowel_zone], z[bowel_zone])) < 0.6
    inner[loops] = Tissue.BOWEL
    gas = np.zeros(x.shape, dtype=bool)
    gas[loops] = _field(anatomy, 2, x[loops], y[loops], z[loops]) > 1.3
    inner[gas] = Tissue.GAS

    # Colon: ascending (right), transverse (anterior) and descending (left) tubes, gas and stool.
    transverse_z = -48 - 0.22 * x
    wobble = np.ones(x.shape)
    wobble[abdomen] += 0.3 * _field(anatomy, 0, x[abdomen], y[abdomen], z[abdomen], (90.0, -70.0, 40.0))
    colon = (
        (np.hypot(x - 92, y - 5) < 22 * wobble) & (z < -45)
        | (np.hypot(x + 98, y + 10) < 18 * wobble) & (z < 5)
        | (np.hypot(y - 52, z - transverse_z) < 20 * wobble) & (x > -98) & (x < 92)
    ) & abdomen
    inner[colon] = Tissue.BOWEL
    colon_gas = np.zeros(x.shape, dtype=bool)
    colon_gas[colon] = _field(anatomy, 2, x[colon] + 100, y[colon], z[colon]) > -0.3
    inner[colon_gas] = Tissue.GAS

    inner[thorax] = Tissue.MUSCLE  # the diaphragm
    inner[thorax & (z > diaphragm + 6)] = Tissue.LUNG
    inner[thorax & (_inside(anatomy, organs["heart"], x, y, z) < 1)] = Tissue.HEART

    # Liver: right and left lobes (a smooth union), with vessels and lesions; it stays out of the
    # retroperitoneum left of the IVC, where the aorta and the crura are.
    liver_radius = np.minimum(_inside(anatomy, organs["liver_right"], x, y, z),
                              _inside(anatomy, organs["liver_left"], x, y, z))
    retroperitoneum = (x < 12) & (y < spine_y + vertebra_radius + 26)
    liver = abdomen & (liver_radius < 1) & ~retroperitoneum
    inner[liver] = Tissue.LIVER
    vessels = liver & (liver_radius < 0.9)
    vessels[vessels] = np.abs(_field(anatomy, 3, x[vessels], y[vessels], z[vessels])) < 0.13
    inner[vessels] = Tissue.LIVER_VESSEL
    for lesion in anatomy.lesions:
        lx, ly, lz = lesion.center
        inner[liver & ((x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 < lesion.radius**2)] = lesion.tissue

    inner[abdomen & (_inside(anatomy, organs["gallbladder"], x, y, z) < 1)] = Tissue.FLUID
    stomach = abdomen & (_inside(anatomy, organs["stomach"], x, y, z) < 1)
    inner[stomach] = Tissue.FLUID
    stomach_top = organs["stomach"].center[1] + 0.45 * organs["stomach"].semi_axes[1]
    inner[stomach & (y > stomach_top)] = Tissue.GAS  # air-fluid level: gas rises anteriorly
    inner[abdomen & (_inside(anatomy, organs["spleen"], x, y, z) < 1)] = Tissue.SPLEEN
    for name in ("kidney_right", "kidney_left"):
        kidney = organs[name]
        radius = _inside(anatomy, kidney, x, y, z)
        inner[cavity & (radius < 1)] = Tissue.KIDNEY
        medial = -np.sign(kidney.center[0])
        sinus = Ellipsoid((kidney.center[0] + medial * 14, kidney.center[1] + 6, kidney.center[2]),
                          (11, 10, 0.55 * kidney.semi_axes[2]))
        inner[cavity & (radius < 1) & (_inside(anatomy, sinus, x, y, z) < 1)] = Tissue.RENAL_SINUS

    # Back muscles: paraspinal (always) and psoas (lower abdomen, widening downwards).
    psoas_radius = np.clip((-35 - z) * 0.3 + 6, 0, 24)
    for sign in (-1.0, 1.0):
        inner[((x - sign * 33) / 30) ** 2 + ((y - canal_y + 16) / 22) ** 2 < 1] = Tissue.MUSCLE
        psoas = (x - sign * (vertebra_radius + psoas_radius * 0.6)) ** 2 + (y - spine_y - 4) ** 2
        inner[cavity & (psoas < psoas_radius**2) & (psoas_radius > 0)] = Tissue.MUSCLE

    # Great vessels: aorta left of the midline, IVC to the right, anterior to the spine.
    aorta = (x + 16) ** 2 + (y - spine_y - vertebra_radius - 12) ** 2 < 11**2
    ivc = ((x - 24) / 14) ** 2 + ((y - spine_y - vertebra_radius - 16) / 10) ** 2 < 1
    inner[cavity & (aorta | ivc)] = Tissue.BLOOD

    # Spine: vertebral bodies between discs, the canal, posterior elements; ribs in the wall.
    vertebra = x**2 + (y - spine_y) ** 2 < vertebra_radius**2
    inner[vertebra] = Tissue.CORTICAL_BONE
    inner[vertebra & (x**2 + (y - spine_y) ** 2 < (vertebra_radius - 3) ** 2)] = Tissue.MARROW
    inner[vertebra & (np.mod(z - anatomy.disc_phase, 32.0) < 7.0)] = Tissue.DISC
    canal_distance = np.hypot(x, y - canal_y)
    arch = (canal_distance < 16) & (y < spine_y - vertebra_radius + 4)
    inner[arch | (np.abs(x) < 5) & (y < canal_y - 9) & (y > canal_y - 45)] = Tissue.CORTICAL_BONE
    inner[canal_distance < 9] = Tissue.CSF
    from_back = np.abs(theta + np.pi / 2)  # 0 at the spine, pi at the front
    from_back = np.where(from_back > np.pi, 2 * np.pi - from_back, from_back)
    ribs = ((np.mod(z + 35 * from_back, 34.0) < 9.0) & (z > -70 + 25 * from_back)
            & (from_back > 0.4) & (from_back < np.pi - 0.45)
            & (depth > fat + 2) & (depth < fat + muscle + 3))
    inner[ribs] = Tissue.CORTICAL_BONE
    tissue[body] = inner
    return tissue


# ----------------------------------------------------------------------------- imaging


@dataclass(frozen=True, eq=False)
class Scanner:
    """How one modality images one patient: tissue means, noise and (MR) bias field."""

    contrast: str  # "ct", "t1w" or "t2w": a key of CONTRAST
    values: np.ndarray  # (len(Tissue),) mean value of each tissue
    noise_sigma: float  # Gaussian (CT) or Rician (MR) noise level, in stored units
    bias: np.ndarray  # (6,) log-bias coefficients on x, y, z, x^2, y^2, xy (per 200 mm); zeros for CT

    @property
    def is_ct(self) -> bool:
        return self.contrast == "ct"


def random_scanner(contrast: str, rng: np.random.Generator) -> Scanner:
    """Per-patient tissue values (small jitter, MR gain), noise level and bias field."""
    if contrast not in CONTRAST:
        raise ValueError(f"the phantom has no contrast {contrast!r}; it knows {', '.join(CONTRAST)}")
    means = np.array([CONTRAST[contrast][tissue] for tissue in Tissue], dtype=np.float64)
    if contrast == "ct":
        values = means + rng.uniform(-4, 4, size=means.shape) * (np.abs(means) < 500)
        return Scanner(contrast, values, float(rng.uniform(8, 16)), np.zeros(6))
    gain = rng.uniform(0.8, 1.25)
    values = means * gain * rng.uniform(0.95, 1.05, size=means.shape)
    return Scanner(contrast, values, float(gain * rng.uniform(12, 22)), rng.uniform(-0.15, 0.15, size=6))


# Voxel axes of each modality's files, as RAS+ directions: CT like a DICOM conversion (LPS),
# T1w in RAS, T2w with permuted in-plane axes and slices stored head to foot.
_AXES = {
    "ct": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),
    "t1w": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    "t2w": ((0, -1, 0), (-1, 0, 0), (0, 0, -1)),
}
_FIELD_OF_VIEW_MM = {"ct": (340.0, 400.0), "t1w": (360.0, 420.0), "t2w": (360.0, 420.0)}
# Where each scanner puts its origin relative to the patient (a frame of reference of its own).
_SCANNER_ORIGIN_MM = {"ct": (0.0, 150.0, -620.0), "t1w": (0.0, 10.0, 40.0), "t2w": (-3.0, -12.0, 25.0)}


@dataclass(frozen=True, eq=False)
class Grid:
    """A modality's voxel grid: ``affine`` maps indices to scanner RAS+ mm (the file's affine);
    a patient point p lies at scanner position p + ``patient_offset``."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    patient_offset: np.ndarray

    def patient_points(self, indices: np.ndarray) -> np.ndarray:
        """Patient mm (N, 3) of fractional voxel indices (N, 3)."""
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3] - self.patient_offset


def default_slices(size: int) -> int:
    """CT slices per volume: 3 mm at 256 x 256, thicker in proportion for smaller images."""
    return max(4, round(size * SCAN_LENGTH_MM / (3.0 * 256)))


def slice_count(contrast: str, ct_slices: int) -> int:
    """MR volumes have half as many slices as CT, twice as thick, over the same range."""
    return ct_slices if contrast == "ct" else (ct_slices + 1) // 2


def modality_grid(contrast: str, anatomy: Anatomy, size: int, slices: int, rng: np.random.Generator) -> Grid:
    """A size x size x slices grid over the abdomen with the modality's field of view and axes."""
    low, high = _FIELD_OF_VIEW_MM[contrast]
    widest = 2 * anatomy.body_axes[0] * anatomy.scale[0] * (1.08 + anatomy.lobulation[0])
    pixel = max(float(rng.uniform(low, high)), widest + 45) / size  # a larger patient, a larger FOV
    thickness = SCAN_LENGTH_MM * anatomy.scale[2] / slices
    directions = np.array(_AXES[contrast], dtype=np.float64).T  # columns: RAS+ direction of each axis
    linear = directions * np.array([pixel, pixel, thickness])
    offset = np.array(_SCANNER_ORIGIN_MM[contrast]) + rng.uniform(-8, 8, size=3)
    center = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10),
                       anatomy.scan_center_z * anatomy.scale[2] + rng.uniform(-6, 6)])
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = center + offset - linear @ ((np.array([size, size, slices]) - 1) / 2)
    return Grid((size, size, slices), affine, offset)


def sample_tissues(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Tissue at points along the slice axis of every voxel: (X, Y, Z, S) uint8.

    Thick slices are sampled as finely as the pixels (up to 4 points), so that renderings show
    the partial-volume effect of the slice thickness instead of staircase edges.
    """
    spacing = np.sqrt((grid.affine[:3, :3] ** 2).sum(axis=0))
    along = int(np.clip(np.ceil(spacing[2] / min(spacing[0], spacing[1])), 1, 4))
    offsets = (np.arange(along) + 0.5) / along - 0.5
    nx, ny, nz = grid.shape
    plane = np.stack(np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij"), axis=-1).reshape(-1, 2)
    tissues = np.empty((nx, ny, nz, along), dtype=np.uint8)
    for k in range(nz):  # one slice at a time bounds the memory
        indices = np.empty((len(plane), along, 3))
        indices[:, :, :2] = plane[:, None, :]
        indices[:, :, 2] = k + offsets
        points = grid.patient_points(indices.reshape(-1, 3))
        tissues[:, :, k] = anatomy.tissues(points).reshape(nx, ny, along)
    return tissues


def liver_label(tissues: np.ndarray) -> np.ndarray:
    """Liver mask (X, Y, Z) uint8: voxels at least half covered by liver tissue."""
    return (np.isin(tissues, LIVER_TISSUES).mean(axis=-1) >= 0.5).astype(np.uint8)


def render(tissues: np.ndarray, grid: Grid, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Stored values (X, Y, Z) int16: HU for CT, positive scanner units for MR."""
    clean = scanner.values[tissues].mean(axis=-1)  # partial-volume average through the slice
    clean = ndimage.gaussian_filter(clean, sigma=(PSF_SIGMA, PSF_SIGMA, 0), mode="nearest")
    if scanner.is_ct:
        noisy = clean + rng.normal(0.0, scanner.noise_sigma, size=clean.shape)
        return np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)
    indices = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), axis=-1)
    x, y, z = (grid.patient_points(indices.reshape(-1, 3)) / 200.0).T
    basis = np.stack([x, y, z, x * x, y * y, x * y], axis=-1)
    bias = np.exp(basis @ scanner.bias).reshape(grid.shape)
    real = clean * bias + rng.normal(0.0, scanner.noise_sigma, size=clean.shape)
    imaginary = rng.normal(0.0, scanner.noise_sigma, size=clean.shape)
    return np.rint(np.hypot(real, imaginary)).astype(np.int16)  # Rician magnitude


# ----------------------------------------------------------------------------- QC failure cases

# The inputs translate's quality control must flag (core/qc.py; bench/qc.py measures how often it
# does): a wrong --from, an intensity-inverted image, heavy noise, a non-abdominal body part, a
# volume without a body.
QC_FAILURES = ("wrong_from", "inverted", "noise", "non_abdominal", "empty")
# The --from a wrong_from case claims for each true modality.
WRONG_SOURCE = {"t1w": "t2w", "t2w": "t1w", "ct": "t1w"}
# A head (skull, brain, ventricles) in each contrast, for the non-abdominal case.
_HEAD = {"ct": (-1000.0, 1100.0, 35.0, 8.0), "t1w": (0.0, 60.0, 520.0, 150.0), "t2w": (0.0, 50.0, 380.0, 1400.0)}


def qc_failure(kind: str, image: np.ndarray, contrast: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A failure case made from a clean phantom ``image`` (X, Y, Z) of ``contrast``: the stored
    values to translate and the --from to claim. The array keeps the shape (and so the grid)."""
    values = image.astype(np.float64)
    is_ct = contrast == "ct"
    if kind == "wrong_from":
        return image.copy(), WRONG_SOURCE[contrast]
    if kind == "inverted":
        changed = values.max() + values.min() - values
    elif kind == "noise":  # a third of the body's intensity range, far above any scanner's
        spread = 400.0 if is_ct else float(np.percentile(values, 99.5))
        changed = values + rng.normal(0.0, spread / 3, size=values.shape)
    elif kind == "non_abdominal":
        air, skull, brain, fluid = _HEAD[contrast]
        x, y = np.meshgrid(*(np.linspace(-1, 1, n) for n in image.shape[:2]), indexing="ij")
        radius = np.sqrt((x / 0.75) ** 2 + (y / 0.6) ** 2)[..., None] * np.ones(image.shape[2])
        ventricle = (np.abs(x) < 0.12)[..., None] & (np.abs(y) < 0.3)[..., None]
        changed = np.where(radius < 0.85, np.where(ventricle, fluid, brain), np.where(radius < 1.0, skull, air))
        changed = changed + rng.normal(0.0, 10.0 if is_ct else 15.0, size=image.shape)
    elif kind == "empty":  # air and scanner noise only
        changed = -1000.0 + rng.normal(0.0, 10.0, size=image.shape) if is_ct else np.abs(
            rng.normal(0.0, 15.0, size=image.shape))
    else:
        raise ValueError(f"unknown QC failure {kind!r}; one of {', '.join(QC_FAILURES)}")
    if not is_ct:
        changed = np.abs(changed)  # MR magnitudes stay positive
    return np.rint(np.clip(changed, -1024, 32767)).astype(np.int16), contrast


# ----------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class PhantomSummary:
    """What ``write_phantom_dataset`` wrote."""

    root: Path
    modalities: tuple[str, ...]
    train_cases: dict[str, tuple[str, ...]]  # modality -> case ids (different patients per modality)
    test_cases: tuple[str, ...]  # the same patients in every modality
    slices: dict[str, int]  # slices per volume, by modality
    files: int  # NIfTI files written


def phantom_steps(cases: int, test_cases: int) -> int:
    """How many progress steps ``write_phantom_dataset`` reports: one per case and modality."""
    return len(PHANTOM_MODALITIES) * (cases + test_cases)


_ANATOMY, _GRID, _SCANNER, _NOISE = range(4)  # what a random stream is for


def _rng(seed: int, case_index: int, purpose: int, *modalities: int) -> np.random.Generator:
    """An independent generator per seed, case, purpose and modality indices, so that no case
    depends on the others and a paired rendering shares its patient's scanner settings."""
    return np.random.default_rng([seed, case_index, purpose, *modalities])


MAX_SIZE, MAX_SLICES = 1024, 2048  # a 1024 x 1024 x 2048 CT is 4 GiB of int16 already


def _check_options(cases: int, size: int, slices: int | None, seed: int, test_cases: int) -> None:
    for name, value, minimum in (("--cases", cases, 1), ("--size", size, 16), ("--seed", seed, 0),
                                 ("--test-cases", test_cases, 0), ("--slices", slices, 4)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UsageError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    for name, value, maximum in (("--size", size, MAX_SIZE), ("--slices", slices, MAX_SLICES)):
        if value is not None and value > maximum:
            raise UsageError(f"{name} must be at most {maximum}, got {value}")


def write_phantom_dataset(
    out: str | Path,
    *,
    cases: int = 6,
    size: int = 64,
    slices: int | None = None,
    seed: int = 0,
    test_cases: int = 2,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PhantomSummary:
    """Write a phantom dataset in the DATA layout and return what it holds.

    ``cases`` training cases per modality, each a different patient; ``test_cases`` patients
    imaged in every modality, with ``paired/`` renderings on each modality's grid. ``size`` is the
    in-plane matrix; ``slices`` the CT slice count (default ``default_slices(size)``; MR gets half).
    The folder is built beside ``out`` and moved into place when complete. An existing non-empty
    ``out`` is replaced only with ``overwrite`` and only if this tool made it (``io.atomic.check_writable``).
    """
    _check_options(cases, size, slices, seed, test_cases)
    out = check_writable(out, overwrite, is_dir=True, kind="dataset")
    spec = DatasetSpec(
        modalities=default_modalities(PHANTOM_MODALITIES), target="liver", name="phantom",
        description=(f"synthetic abdominal phantoms (seed {seed}, {size} x {size}): unpaired training "
                     "cases per modality, test cases imaged in every modality"),
    )
    names = spec.modality_names
    ct_slices = default_slices(size) if slices is None else slices
    counts = {name: slice_count(name, ct_slices) for name in names}
    advance = progress or (lambda n: None)
    train: dict[str, tuple[str, ...]] = {}
    files = 0

    def write(path: Path, contrast: str, grid: Grid, array: np.ndarray, label: bool = False) -> None:
        nonlocal files
        write_volume(path, Volume(array, grid.affine, modality="CT" if contrast == "ct" else "MR"), label=label)
        files += 1

    with atomic_output(out, overwrite=True, is_dir=True, kind="dataset", command="data phantom") as staging:
        (staging / "dataset.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        for m, name in enumerate(names):  # unpaired training: other patients for each modality
            ids = []
            folder = staging / "train" / name
            for j in range(cases):
                index = m * cases + j
                case = f"phantom_{index:03d}"
                anatomy = random_anatomy(_rng(seed, index, _ANATOMY))
                grid = modality_grid(name, anatomy, size, counts[name], _rng(seed, index, _GRID, m))
                tissues = sample_tissues(anatomy, grid)
                scanner = random_scanner(name, _rng(seed, index, _SCANNER, m))
                image = render(tissues, grid, scanner, _rng(seed, index, _NOISE, m, m))
                write(folder / "images" / f"{case}.nii.gz", name, grid, image)
                write(folder / "labels" / f"{case}.nii.gz", name, grid, liver_label(tissues), label=True)
                ids.append(case)
                advance(1)
            train[name] = tuple(ids)
        test_ids = []
        for t in range(test_cases):  # paired test: one patient, every modality, every grid
            index = len(names) * cases + t
            case = f"phantom_{index:03d}"
            anatomy = random_anatomy(_rng(seed, index, _ANATOMY))
            scanners = [random_scanner(name, _rng(seed, index, _SCANNER, c)) for c, name in enumerate(names)]
            for g, name in enumerate(names):
                folder = staging / "test" / name
                grid = modality_grid(name, anatomy, size, counts[name], _rng(seed, index, _GRID, g))
                tissues = sample_tissues(anatomy, grid)
                write(folder / "labels" / f"{case}.nii.gz", name, grid, liver_label(tissues), label=True)
                for c, other in enumerate(names):
                    image = render(tissues, grid, scanners[c], _rng(seed, index, _NOISE, g, c))
                    target = folder / "images" if other == name else folder / "paired" / other
                    write(target / f"{case}.nii.gz", other, grid, image)
                advance(1)
            test_ids.append(case)
    return PhantomSummary(out, names, train, tuple(test_ids), counts, files)


# ----------------------------------------------------------------------------- montage


def render_montage(
    root: str | Path, path: str | Path, *, case: str | None = None, columns: int = 5,
    zoom: int = 2, overwrite: bool = False,
) -> Path:
    """A PNG of one test case: a row per modality, ``columns`` canonical axial slices, liver outlined
    in red (``io.montage``'s grid, tiles ``zoom`` times the slice size).

    Slices are taken at the same fractions of each volume's extent, so columns show similar
    levels in every modality. CT uses the dataset's window; MR is scaled to its 99.5th percentile.
    """
    root = Path(root)
    spec = DatasetSpec.from_dict(read_json(root / "dataset.json"))
    if case is None:
        images = sorted((root / "test" / spec.modality_names[0] / "images").glob("*.nii.gz"))
        if not images:
            raise TarganError("has no test cases to show", root / "test")
        case = images[0].name[: -len(".nii.gz")]
    fractions = np.linspace(0.8, 0.2, columns)  # of the extent, superior to inferior
    rows, outlines, windows = [], [], []
    for modality in spec.modalities:
        folder = root / "test" / modality.name
        image, _ = to_slices(read_volume(folder / "images" / f"{case}.nii.gz"))  # (Z, H, W)
        label, _ = to_slices(read_volume(folder / "labels" / f"{case}.nii.gz"))
        levels = np.rint(fractions * (len(image) - 1)).astype(int)
        rows.append([image[level] for level in levels])
        outlines.append([label[level] > 0 for level in levels])
        if modality.intensity.kind == "ct":
            windows.append(modality.intensity.window)
        else:
            windows.append((0.0, max(float(np.percentile(image, 99.5)), 1.0)))
    tile_size = zoom * max(max(row[0].shape) for row in rows)
    return save_montage(path, rows, spec.modality_names, [f"{fraction:.0%} up the scan" for fraction in fractions],
                        overwrite, row_windows=windows, outlines=outlines, tile_size=tile_size)
