#!/usr/bin/env python3
"""Generate the agreement fixtures for `crates/sgp-eval` (Dice, IoU, HD95, NSD).

CI has no Python, so the inputs and the reference values are committed as JSON:
`crates/sgp-eval/tests/fixtures/metric_cases.json`.

Reference values come from a float64 SciPy implementation of MONAI's conventions
(surface = mask XOR its binary erosion with the cross structuring element and a
background border; exact Euclidean distances to the *other* mask's surface via
`scipy.ndimage.distance_transform_edt` with the voxel spacing; numpy's linear
95th percentile; NSD counts distances <= tolerance). Every value is cross-checked
against MONAI itself (`compute_dice`, `compute_iou`, `compute_hausdorff_distance`
with percentile=95, `compute_surface_dice`), which works in float32, so that check
uses a looser tolerance. Undefined values (MONAI's NaN or inf) are stored as null.

Usage (from the repository root):
    . /work/pyenv/venv/bin/activate
    python tools/eval/gen_metric_fixtures.py [--out crates/sgp-eval/tests/fixtures/metric_cases.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import numpy as np
from scipy import ndimage

SEED = 20261130
# MONAI computes distances in float32: its values are compared to ours loosely.
MONAI_ATOL_DISTANCE = 2e-4
MONAI_ATOL_RATIO = 1e-6
# A tolerance this close to a measured distance would make NSD depend on rounding.
TIE_MARGIN = 1e-6


# ---------------------------------------------------------------- reference (float64)


def edges(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion (cross element, outside = background)."""
    if not mask.any():
        return np.zeros_like(mask)
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(from_edges: np.ndarray, to_edges: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each voxel of `from_edges` to the nearest voxel of `to_edges`."""
    dist = ndimage.distance_transform_edt(~to_edges, sampling=spacing)
    return dist[from_edges]


def reference_metrics(pred: np.ndarray, gt: np.ndarray, label: int, spacing, tol: float) -> dict:
    a = pred == label
    b = gt == label
    na, nb = int(a.sum()), int(b.sum())
    inter = int((a & b).sum())
    union = int((a | b).sum())
    out = {"label": label, "dice": None, "iou": None, "hd95": None, "nsd": None}
    if nb > 0:
        out["dice"] = 2.0 * inter / (na + nb)
        out["iou"] = inter / union
    ea, eb = edges(a), edges(b)
    if ea.any() and eb.any():
        d_ab = surface_distances(ea, eb, spacing)
        d_ba = surface_distances(eb, ea, spacing)
        out["hd95"] = float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
        out["nsd"] = float(((d_ab <= tol).sum() + (d_ba <= tol).sum()) / (d_ab.size + d_ba.size))
        out["_all_distances"] = np.concatenate([d_ab, d_ba])
    elif ea.any() or eb.any():
        out["nsd"] = 0.0
    return out


# ---------------------------------------------------------------- MONAI cross-check


def monai_metrics(pred: np.ndarray, gt: np.ndarray, labels, spacing, tol: float):
    import torch
    from monai.metrics import (
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    def one_hot(x):
        return torch.from_numpy(np.stack([(x == l) for l in labels])[None].astype(np.float32))

    p, g = one_hot(pred), one_hot(gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = compute_dice(p, g, include_background=True, ignore_empty=True)[0].numpy()
        iou = compute_iou(p, g, include_background=True, ignore_empty=True)[0].numpy()
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=list(spacing)
        )[0].numpy()
        nsd = compute_surface_dice(
            p, g, class_thresholds=[tol] * len(labels), include_background=True, spacing=list(spacing)
        )[0].numpy()
    return dice, iou, hd, nsd


def check_against_monai(case: dict, pred, gt) -> None:
    dice, iou, hd, nsd = monai_metrics(pred, gt, case["labels"], case["spacing"], case["nsd_tolerance"])
    for i, ref in enumerate(case["expected"]):
        for key, vals, atol in (
            ("dice", dice, MONAI_ATOL_RATIO),
            ("iou", iou, MONAI_ATOL_RATIO),
            ("hd95", hd, MONAI_ATOL_DISTANCE),
            ("nsd", nsd, MONAI_ATOL_RATIO),
        ):
            m = float(vals[i])
            ours = ref[key]
            if ours is None:
                assert not math.isfinite(m), f"{case['name']} label {ref['label']} {key}: MONAI {m}, ref null"
            else:
                assert math.isfinite(m) and abs(m - ours) <= atol * max(1.0, abs(ours)), (
                    f"{case['name']} label {ref['label']} {key}: MONAI {m} vs ref {ours}"
                )


# ---------------------------------------------------------------- random inputs


def blob(rng, shape, center=None, radius=None, roughness=0.5) -> np.ndarray:
    """A rough ellipsoid: an ellipsoid perturbed by smoothed noise."""
    nd = len(shape)
    if center is None:
        center = [rng.uniform(0.2, 0.8) * s for s in shape]
    if radius is None:
        radius = [rng.uniform(0.12, 0.35) * s for s in shape]
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    r2 = sum(((g - c) / max(r, 0.6)) ** 2 for g, c, r in zip(grids, center, radius))
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.5)
    noise /= max(np.abs(noise).max(), 1e-9)
    return (r2 + roughness * noise) < 1.0


def perturb(rng, mask: np.ndarray) -> np.ndarray:
    """A plausible prediction of `mask`: shifted, dilated or eroded, with speckles."""
    out = mask.copy()
    shift = rng.integers(-2, 3, size=mask.ndim)
    out = np.roll(out, shift, axis=tuple(range(mask.ndim)))
    op = rng.integers(0, 3)
    if op == 1:
        out = ndimage.binary_dilation(out, iterations=int(rng.integers(1, 3)))
    elif op == 2:
        out = ndimage.binary_erosion(out, iterations=1)
    speckle = rng.random(mask.shape) < 0.002
    return out ^ speckle


def random_spacing(rng, nd, anisotropic=True):
    if not anisotropic:
        return [1.0] * nd
    sp = [round(float(rng.uniform(0.3, 2.5)), 4) for _ in range(nd)]
    if nd == 3 and rng.random() < 0.5:
        sp[rng.integers(0, 3)] = round(float(rng.uniform(2.5, 5.0)), 4)
    return sp


def compose(shape, masks) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint16)
    for label, m in masks:
        lab[m] = label
    return lab


def random_case(rng, nd, name, anisotropic=True, n_labels=None, border=False):
    shape = tuple(int(rng.integers(18, 60)) for _ in range(nd)) if nd == 2 else tuple(
        int(rng.integers(10, 32)) for _ in range(nd)
    )
    n_labels = n_labels or int(rng.integers(1, 4))
    gt_masks, pred_masks = [], []
    for label in range(1, n_labels + 1):
        center = None
        if border:
            center = [rng.choice([0.0, s - 1.0]) if rng.random() < 0.6 else rng.uniform(0.2, 0.8) * s for s in shape]
        g = blob(rng, shape, center=center)
        gt_masks.append((label, g))
        pred_masks.append((label, perturb(rng, g)))
    return dict(name=name, spacing=random_spacing(rng, nd, anisotropic)), compose(shape, pred_masks), compose(
        shape, gt_masks
    ), list(range(1, n_labels + 1))


def special_cases(rng):
    """Hand-built edge cases: empty masks, single voxels, full images, thin structures."""
    cases = []
    # Label 2 in gt only, label 3 in pred only, label 4 nowhere (but requested).
    shape = (40, 36)
    g1 = blob(rng, shape)
    g2 = blob(rng, shape, center=[30, 8], radius=[5, 4])
    p3 = blob(rng, shape, center=[8, 28], radius=[4, 6])
    gt = compose(shape, [(1, g1), (2, g2 & ~g1)])
    pred = compose(shape, [(1, perturb(rng, g1)), (3, p3)])
    cases.append((dict(name="2d_empty_labels", spacing=[0.8, 1.2]), pred, gt, [1, 2, 3, 4]))
    # 3D, same idea, anisotropic.
    shape = (20, 24, 12)
    g1 = blob(rng, shape)
    g2 = blob(rng, shape, center=[3, 3, 3], radius=[3, 3, 2])
    p3 = blob(rng, shape, center=[16, 20, 9], radius=[3, 3, 2])
    gt = compose(shape, [(1, g1), (2, g2 & ~g1)])
    pred = compose(shape, [(1, perturb(rng, g1)), (3, p3 & ~g1)])
    cases.append((dict(name="3d_empty_labels", spacing=[0.7, 0.9, 3.0]), pred, gt, [1, 2, 3, 4]))
    # Single voxels.
    gt = np.zeros((15, 17, 9), np.uint16)
    pred = np.zeros_like(gt)
    gt[3, 4, 5] = 1
    pred[9, 12, 1] = 1
    gt[0, 0, 0] = 2
    pred[0, 0, 0] = 2
    cases.append((dict(name="3d_single_voxels", spacing=[1.1, 0.6, 2.2]), pred, gt, [1, 2]))
    # Whole image is label 1 in gt: its surface is the image border.
    gt = np.ones((25, 31), np.uint16)
    pred = compose((25, 31), [(1, blob(rng, (25, 31), center=[12, 15], radius=[10, 13]))])
    cases.append((dict(name="2d_full_image_gt", spacing=[0.5, 1.5]), pred, gt, [1]))
    # One-voxel-thin structures (everything is surface) touching the border.
    gt = np.zeros((30, 28, 8), np.uint16)
    pred = np.zeros_like(gt)
    gt[:, 5, 2] = 1
    gt[7, :, :] = 2
    pred[:, 6, 3] = 1
    pred[8, 3:, :] = 2
    cases.append((dict(name="3d_thin_border", spacing=[0.9, 0.9, 2.5]), pred, gt, [1, 2]))
    # Identical masks: Dice 1, HD95 0, NSD 1.
    gt = compose((22, 19, 14), [(1, blob(rng, (22, 19, 14))), (5, blob(rng, (22, 19, 14)))])
    cases.append((dict(name="3d_identical", spacing=[1.0, 1.3, 2.0]), gt.copy(), gt, [1, 5]))
    # Non-contiguous, high label values.
    gt = compose((48, 40), [(300, blob(rng, (48, 40))), (65535, blob(rng, (48, 40), center=[40, 33]))])
    pred = compose((48, 40), [(300, perturb(rng, gt == 300)), (65535, perturb(rng, gt == 65535))])
    cases.append((dict(name="2d_high_labels", spacing=[1.0, 1.0]), pred, gt, [300, 65535]))
    return cases


# ---------------------------------------------------------------- output


def rle(arr: np.ndarray):
    """Run-length encoding of the C-order flattening: [[value, count], ...]."""
    flat = arr.ravel(order="C")
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [flat.size]])
    return [[int(flat[s]), int(e - s)] for s, e in zip(starts, ends)]


def pick_tolerance(rng, distances_list, spacing) -> float:
    """A tolerance in mm that no measured distance sits within TIE_MARGIN of."""
    for _ in range(1000):
        tol = round(float(rng.uniform(0.5, 4.0) * min(spacing) * 2), 4)
        if all(np.all(np.abs(d - tol) > TIE_MARGIN) for d in distances_list):
            return tol
    raise RuntimeError("no tie-free tolerance found")


def build_case(rng, meta, pred, gt, labels):
    spacing = meta["spacing"]
    refs = [reference_metrics(pred, gt, l, spacing, 1.0) for l in labels]
    tol = pick_tolerance(rng, [r["_all_distances"] for r in refs if "_all_distances" in r], spacing)
    expected = []
    for l in labels:
        r = reference_metrics(pred, gt, l, spacing, tol)
        r.pop("_all_distances", None)
        expected.append(r)
    case = dict(
        name=meta["name"],
        shape=list(gt.shape),
        spacing=spacing,
        nsd_tolerance=tol,
        labels=labels,
        gt_rle=rle(gt),
        pred_rle=rle(pred),
        expected=expected,
    )
    check_against_monai(case, pred, gt)
    return case


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="crates/sgp-eval/tests/fixtures/metric_cases.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    cases = []
    for i in range(6):
        cases.append(build_case(rng, *_unpack(random_case(rng, 2, f"2d_random_{i}", anisotropic=i % 3 != 0))))
    for i in range(3):
        cases.append(build_case(rng, *_unpack(random_case(rng, 2, f"2d_border_{i}", border=True))))
    for i in range(6):
        cases.append(build_case(rng, *_unpack(random_case(rng, 3, f"3d_random_{i}", anisotropic=i % 3 != 0))))
    for i in range(3):
        cases.append(build_case(rng, *_unpack(random_case(rng, 3, f"3d_border_{i}", border=True))))
    for meta, pred, gt, labels in special_cases(rng):
        cases.append(build_case(rng, meta, pred, gt, labels))
    doc = {
        "generator": "tools/eval/gen_metric_fixtures.py",
        "seed": SEED,
        "layout": "label maps are run-length encoded ([value, count] pairs) in C order over `shape`; "
        "spacing is per array axis in mm; null means undefined (MONAI NaN/inf)",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, args.out)
    n_values = sum(len(c["expected"]) for c in cases)
    print(f"wrote {len(cases)} cases ({n_values} label results) to {args.out}; all agree with MONAI")


def _unpack(t):
    meta, pred, gt, labels = t
    return meta, pred, gt, labels


if __name__ == "__main__":
    main()
