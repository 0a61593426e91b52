#!/usr/bin/env python3
"""Generate the small DICOM test series in fixtures/dicom/ and their NIfTI conversions.

The series is written by pydicom (a well-kept DICOM writer); the NIfTI files of the same
data are made by two independent, well-kept converters, dicom2nifti (no reorientation) and
dcm2niix, so the Rust reader is checked against other people's reading of DICOM geometry,
not against this script's own formulas.

    python3 -m venv /tmp/dcmvenv
    /tmp/dcmvenv/bin/pip install pydicom==3.0.2 nibabel==5.4.2 numpy dicom2nifti==2.6.2 dcm2niix==1.0.20260724
    /tmp/dcmvenv/bin/python tools/dicom/gen_series.py fixtures/dicom

What is written (a few KiB in all):
  oblique_ct/       4 slices of 24 rows x 32 columns, int16 stored values, slope 2,
                    intercept -1024, oblique orientation, non-square pixels, file names in
                    an order unrelated to the slice positions
  oblique_ct_rle/   the same slices, RLE Lossless transfer syntax
  oblique_ct_dicom2nifti.nii.gz, oblique_ct_dcm2niix.nii.gz
  PROVENANCE.md     versions and this command
"""

import datetime
import os
import subprocess
import sys
import tempfile

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

ROWS, COLS, SLICES = 24, 32, 4
PIXEL_SPACING = [0.8, 0.6]  # between rows, between columns (mm)
STEP = 1.5  # mm between slice centres
SLOPE, INTERCEPT = 2.0, -1024.0


def orientation():
    """Row and column cosines of an oblique plane (rotations about two axes)."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rz @ rx
    return r[:, 0], r[:, 1]


def stored_values():
    """Deterministic, structured int16 values: every voxel distinct enough to catch swaps."""
    k, j, i = np.meshgrid(np.arange(SLICES), np.arange(ROWS), np.arange(COLS), indexing="ij")
    v = 300 + 7 * i + 13 * j + 101 * k + ((i * j + 3 * k) % 5)
    return v.astype(np.int16)  # (slice, row, col)


def write_series(out_dir, transfer_syntax):
    os.makedirs(out_dir, exist_ok=True)
    row_cos, col_cos = orientation()
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-12.5, 30.25, 7.0])
    series_uid = "1.2.826.0.1.3680043.8.498.1001"
    study_uid = "1.2.826.0.1.3680043.8.498.1000"
    values = stored_values()
    # Files named so that name order is neither slice order nor its reverse.
    names = {0: "IM_c.dcm", 1: "IM_a.dcm", 2: "IM_d.dcm", 3: "IM_b.dcm"}
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.1002"
        ds.Modality = "CT"
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SGP-TEST-0001"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # Instance numbers run against the positions: readers must not trust them.
        ds.InstanceNumber = SLICES - k
        ds.ImagePositionPatient = [float(x) for x in origin + k * STEP * normal]
        ds.ImageOrientationPatient = [float(x) for x in np.concatenate([row_cos, col_cos])]
        ds.PixelSpacing = PIXEL_SPACING
        ds.SliceThickness = STEP
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = SLOPE
        ds.RescaleIntercept = INTERCEPT
        ds.RescaleType = "HU"
        ds.PixelData = values[k].tobytes()
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, values[k])
        ds.save_as(os.path.join(out_dir, names[k]), enforce_file_format=True)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "fixtures/dicom"
    os.makedirs(out, exist_ok=True)
    plain = os.path.join(out, "oblique_ct")
    write_series(plain, ExplicitVRLittleEndian)
    write_series(os.path.join(out, "oblique_ct_rle"), RLELossless)

    import dicom2nifti
    import dicom2nifti.settings as d2n_settings
    import nibabel

    d2n_settings.disable_validate_slice_increment()  # tiny series; increments are exact anyway
    d2n_out = os.path.join(out, "oblique_ct_dicom2nifti.nii.gz")
    dicom2nifti.dicom_series_to_nifti(plain, d2n_out, reorient_nifti=False)

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["dcm2niix", "-z", "y", "-f", "series", "-o", tmp, "-b", "n", plain],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        img = nibabel.load(os.path.join(tmp, "series.nii.gz"))
        # Re-save through nibabel so the file is small and its header plain; voxels and
        # affine are dcm2niix's.
        nibabel.save(
            nibabel.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), img.affine),
            os.path.join(out, "oblique_ct_dcm2niix.nii.gz"),
        )

    dcm2niix_version = subprocess.run(["dcm2niix", "-v"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(out, "PROVENANCE.md"), "w") as f:
        f.write(
            "# fixtures/dicom\n\n"
            "Synthetic CT-like series (no patient data), generated by "
            "`tools/dicom/gen_series.py` on "
            f"{datetime.date.today().isoformat()} with pydicom {pydicom.__version__}, "
            f"numpy {np.__version__}, nibabel {nibabel.__version__}, "
            f"dicom2nifti {getattr(dicom2nifti, '__version__', '2.6.2')} and dcm2niix "
            f"({dcm2niix_version.splitlines()[-1] if dcm2niix_version else 'PyPI 1.0.20260724'}).\n\n"
            "* `oblique_ct/`: 4 slices, 24 rows × 32 columns, int16, RescaleSlope 2, RescaleIntercept "
            "-1024, oblique ImageOrientationPatient, PixelSpacing 0.8 × 0.6 mm, 1.5 mm steps; file "
            "names and InstanceNumber deliberately out of slice order. Explicit VR Little Endian.\n"
            "* `oblique_ct_rle/`: the same, RLE Lossless.\n"
            "* `oblique_ct_dicom2nifti.nii.gz`: `dicom2nifti.dicom_series_to_nifti(oblique_ct, "
            "reorient_nifti=False)`.\n"
            "* `oblique_ct_dcm2niix.nii.gz`: `dcm2niix -z y` of `oblique_ct/`, re-saved by nibabel "
            "as float32 with dcm2niix's affine (dcm2niix flips the row axis on disk).\n\n"
            "Licence: CC0 (generated data).\n"
        )


if __name__ == "__main__":
    main()
