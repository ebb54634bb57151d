"""DICOM series as scanners and PACS export them, for tests: named by UID, .IMA or nothing, without
a preamble, compressed, with a patient, a study and a frame of reference (written with pydicom;
JPEG Lossless and JPEG-LS encoded by python-gdcm, JPEG 2000 by pylibjpeg-openjpeg, RLE by pydicom).
"""

from __future__ import annotations

from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEGLosslessSV1, JPEGLSLossless, RLELossless,
                         generate_uid)
from volume_factories import write_dicom_series

PATIENT = {"PatientName": "Doe^Jane", "PatientID": "P-0042", "PatientBirthDate": "19700101", "PatientSex": "F"}
STUDY = {"StudyDate": "20240131", "StudyTime": "101500", "StudyID": "7", "AccessionNumber": "ACC-1",
         "ReferringPhysicianName": "House^Gregory", "StudyDescription": "Abdomen"}


def _name(style: str, dataset: pydicom.Dataset, index: int) -> str:
    return {"uid": f"{dataset.Modality}.{dataset.SOPInstanceUID}", "ima": f"SCAN.{index + 1:04d}.IMA",
            "none": f"IM_{index + 1:04d}", "dcm": f"slice{index:03d}.dcm"}[style]


_GDCM_SYNTAXES = {JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1,
                  JPEGLSLossless: gdcm.TransferSyntax.JPEGLSLossless}


def _gdcm_encoded(dataset: pydicom.Dataset, syntax: str, scratch: Path) -> bytes:
    """The dataset's pixel data encapsulated in ``syntax`` by GDCM (through a scratch file)."""
    dataset.save_as(scratch, enforce_file_format=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(scratch))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(_GDCM_SYNTAXES[syntax]))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(scratch))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    encoded = pydicom.dcmread(scratch)
    scratch.unlink()
    assert encoded.file_meta.TransferSyntaxUID == syntax
    return encoded.PixelData


def _encode(dataset: pydicom.Dataset, syntax: str, scratch: Path) -> None:
    if syntax == DeflatedExplicitVRLittleEndian:  # the whole dataset is deflated when written
        dataset.file_meta.TransferSyntaxUID = syntax
    elif syntax in _GDCM_SYNTAXES:
        dataset.PixelData = _gdcm_encoded(dataset, syntax, scratch)
        dataset["PixelData"].VR = "OB"
        dataset.file_meta.TransferSyntaxUID = syntax
    else:  # RLE (pydicom), JPEG 2000 (pylibjpeg-openjpeg)
        dataset.compress(syntax, encoding_plugin="pydicom" if syntax == RLELossless else "pylibjpeg")


def scanner_series(folder: Path, stored: np.ndarray, *, names: str = "uid", preamble: bool = True,
                   syntax: str | None = None, series_uid: str | None = None, description: str = "AX BODY",
                   series_number: int = 3, study_uid: str | None = None, frame_uid: str | None = None,
                   **options) -> list[Path]:
    """``write_dicom_series`` (stored (Z, Rows, Columns), ``options`` passed on) made into a scanner
    export: one series UID, study and frame of reference, a patient, files named in ``names``
    style ("uid", "ima", "none", "dcm"), written without the 128-byte preamble and DICM prefix
    unless ``preamble``, pixel data in transfer syntax ``syntax``. Returns the files in slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}-scratch"
    scratch.mkdir(exist_ok=True)
    written = write_dicom_series(scratch, stored, series_uid=series_uid or generate_uid(), **options)
    study_uid, frame_uid = study_uid or generate_uid(), frame_uid or generate_uid()
    files = []
    for index, file in enumerate(written):
        dataset = pydicom.dcmread(file)
        for keyword, value in {**PATIENT, **STUDY}.items():
            setattr(dataset, keyword, value)
        dataset.StudyInstanceUID, dataset.FrameOfReferenceUID = study_uid, frame_uid
        dataset.SeriesDescription, dataset.SeriesNumber = description, series_number
        dataset.PatientPosition = "FFS"
        if syntax is not None:
            _encode(dataset, syntax, scratch / "encoded.dcm")
        target = folder / _name(names, dataset, index)
        if preamble:
            dataset.save_as(target, enforce_file_format=True)
        else:  # the dataset alone, as some media hold it: no preamble, no DICM, no file meta
            dataset.preamble = None
            del dataset.file_meta
            dataset.save_as(target, implicit_vr=True, little_endian=True, enforce_file_format=False)
        files.append(target)
        file.unlink()
    scratch.rmdir()
    return files

