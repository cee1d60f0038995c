"""Rebuild the DICOM and NIfTI example files from files bundled in PyPI packages (run from the repo root):

    python examples/radiology/dicom/make_medical_examples.py

pydicom's test files (MIT) and nibabel's test data (MIT) are copied unchanged, except one derived file:
mr_small_monochrome1.dcm re-encodes MR_small as MONOCHROME1 (stored values inverted, window mirrored), so
that after the display pipeline it must look like mr_small_jp2k.dcm: a visible check of the inversion.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from nibabel.testing import data_path
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
NIFTI = HERE.parent / "nifti"

COPIES = {
    "CT_small.dcm": "ct_small.dcm",                      # CT, 128x128, 16-bit signed, rescale -1024
    "MR_small_jp2klossless.dcm": "mr_small_jp2k.dcm",    # MR, JPEG 2000 lossless (needs pylibjpeg-openjpeg)
    "examples_ybr_color.dcm": "us_cine.dcm",             # US echo cine, 30 frames, YBR_FULL_422 JPEG baseline
}


def main() -> None:
    for src, dst in COPIES.items():
        shutil.copyfile(get_testdata_file(src), HERE / dst)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.int32)
    top = int(stored.max())
    ds.PixelData = (top - stored).astype(np.int16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter = top - float(ds.WindowCenter)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = "MR_small re-encoded as MONOCHROME1 (values inverted) for MedLoom's example"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medloom", "mr_small_monochrome1"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(HERE / "mr_small_monochrome1.dcm", enforce_file_format=True)
    NIFTI.mkdir(exist_ok=True)
    shutil.copyfile(Path(data_path) / "anatomical.nii", NIFTI / "anatomical.nii")


if __name__ == "__main__":
    main()
