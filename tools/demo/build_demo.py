#!/usr/bin/env python3
"""Rebuild `datasets/demo/` from the pyradiomics 3.0.1 source distribution (BSD-3-Clause).

    pip download --no-deps --no-binary :all: --no-build-isolation pyradiomics==3.0.1 -d /tmp/src
    # (metadata generation needs `versioneer` installed; the data is in the tarball either way)
    pip install pynrrd nibabel numpy
    python tools/demo/build_demo.py /tmp/src/pyradiomics-3.0.1.tar.gz datasets/demo

What it does, per case (`brain1`, `brain2`, `breast1`, `lung1`, `lung2`):
  * reads `data/<case>_image.nrrd` and `data/<case>_label.nrrd` (NRRD, LPS space);
  * converts the NRRD geometry (space directions + origin, LPS) to a NIfTI RAS affine
    (flip the signs of the first two world axes) and writes it as sform AND qform (code 1);
  * crops both to the mask's bounding box plus a margin (in-plane at least 192 voxels or the
    whole extent, +-4 slices), moving the origin so that world coordinates are unchanged;
  * writes `imagesTr/<case>_0000.nii.gz` (int16) and `labelsTr/<case>.nii.gz` (uint8, 0/1);
  * writes `dataset.json` (nnU-Net-raw-like, plus a per-case list with modality and patient).
"""
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

CASES = [
    # id, modality, structure
    ("brain1", "MR", "brain tumour"),
    ("brain2", "MR", "brain tumour"),
    ("breast1", "MR", "breast lesion"),
    ("lung1", "CT", "lung tumour"),
    ("lung2", "CT", "lung tumour"),
]
MIN_INPLANE = 192
MARGIN = 48
MARGIN_Z = 4


def nrrd_affine_ras(header):
    """4x4 voxel->world (RAS) affine from an NRRD header in LPS (or RAS) space."""
    space = header.get("space", "left-posterior-superior")
    dirs = np.asarray(header["space directions"], dtype=np.float64)  # rows: axis vectors
    origin = np.asarray(header["space origin"], dtype=np.float64)
    aff = np.eye(4)
    aff[:3, :3] = dirs.T  # columns are the voxel axes
    aff[:3, 3] = origin
    if space in ("left-posterior-superior", "LPS"):
        aff = np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff
    elif space not in ("right-anterior-superior", "RAS"):
        raise SystemExit(f"unsupported NRRD space {space!r}")
    return aff


def crop_box(mask):
    idx = np.argwhere(mask > 0)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = []
    for ax in range(3):
        n = mask.shape[ax]
        if ax < 2:
            a, b = lo[ax] - MARGIN, hi[ax] + MARGIN
            if b - a < MIN_INPLANE:
                c = (a + b) // 2
                a, b = c - MIN_INPLANE // 2, c + MIN_INPLANE // 2
        else:
            a, b = lo[ax] - MARGIN_Z, hi[ax] + MARGIN_Z
        a, b = max(0, a), min(n, b)
        box.append((int(a), int(b)))
    return box


def save(path, data, affine, dtype):
    img = nib.Nifti1Image(data.astype(dtype), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sdist, out = Path(sys.argv[1]), Path(sys.argv[2])
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(sdist) as tar:
        for case, modality, structure in CASES:
            paths = {}
            for kind in ("image", "label"):
                member = next(m for m in tar.getmembers() if m.name.endswith(f"data/{case}_{kind}.nrrd"))
                tar.extract(member, tmp, filter="data")
                paths[kind] = Path(tmp) / member.name
            image, ih = nrrd.read(str(paths["image"]))  # Fortran index order: [i, j, k]
            label, lh = nrrd.read(str(paths["label"]))
            aff_i, aff_l = nrrd_affine_ras(ih), nrrd_affine_ras(lh)
            if image.shape != label.shape or not np.allclose(aff_i, aff_l, atol=1e-4):
                raise SystemExit(f"{case}: image and label grids differ")
            box = crop_box(label)
            sl = tuple(slice(a, b) for a, b in box)
            start = np.array([a for a, _ in box] + [1.0])
            start[3] = 1.0
            aff = aff_i.copy()
            aff[:3, 3] = (aff_i @ start)[:3]
            save(out / "imagesTr" / f"{case}_0000.nii.gz", image[sl], aff, np.int16)
            save(out / "labelsTr" / f"{case}.nii.gz", (label[sl] > 0), aff, np.uint8)
            spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
            entries.append({
                "id": case,
                "patient": case,
                "modality": modality,
                "structure": structure,
                "image": f"imagesTr/{case}_0000.nii.gz",
                "label": f"labelsTr/{case}.nii.gz",
                "source_shape": list(image.shape),
                "crop": [list(b) for b in box],
                "shape": list(image[sl].shape),
                "spacing": [round(float(s), 6) for s in spacing],
            })
            print(case, image[sl].shape, "voxels in mask:", int((label[sl] > 0).sum()))
    dataset = {
        "name": "sgp-demo",
        "description": "Cropped pyradiomics 3.0.1 test cases (lung CT, brain MR, breast MR) with lesion masks",
        "channel_names": {"0": "mixed (per case: see cases[].modality)"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": len(entries),
        "file_ending": ".nii.gz",
        "licence": "BSD-3-Clause (pyradiomics, Copyright 2017 Harvard Medical School)",
        "cases": entries,
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


if __name__ == "__main__":
    main()
