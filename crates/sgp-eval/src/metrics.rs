//! Dice, IoU, HD95 and NSD per label, with MONAI's conventions.
//!
//! # Conventions (they change numbers, so they are fixed here)
//! * **Surface**: a mask's surface voxels are the mask minus its binary erosion by the cross
//!   structuring element (4 neighbours in 2D, 6 in 3D), one iteration. Outside the array counts
//!   as background, so a mask touching the border has surface voxels there. (MONAI:
//!   `get_mask_edges` with SciPy's `binary_erosion`.)
//! * **Distances** are exact Euclidean distances in mm, from each surface voxel of one mask to
//!   the nearest surface voxel of the other (MONAI's `get_surface_distance`), using the spacing
//!   per array axis.
//! * **HD95** = max(95th percentile of the distances from the prediction's surface to the
//!   ground truth's, the same from ground truth to prediction). The percentile is linearly
//!   interpolated (numpy's default, `torch.quantile`'s too).
//! * **NSD** (normalised surface Dice at tolerance τ mm) = (prediction surface voxels within τ of
//!   the ground-truth surface + ground-truth surface voxels within τ of the prediction surface)
//!   / (|∂pred| + |∂gt|). A distance equal to τ counts as within (up to 1e-9 relative rounding).
//! * **Empty masks** (MONAI's default behaviour, its NaN shown as `None`; checked against
//!   MONAI 1.6.1 `compute_dice`/`compute_iou` with `ignore_empty=True`,
//!   `compute_hausdorff_distance`, `compute_surface_dice`):
//!
//!   | ground truth | prediction | Dice | IoU | HD95 | NSD |
//!   |---|---|---|---|---|---|
//!   | absent | absent | None | None | None | None |
//!   | present | absent | 0 | 0 | None | 0 |
//!   | absent | present | None | None | None | 0 |
//!
//!   Aggregates skip `None`, so a missed structure lowers mean Dice and NSD but not mean HD95
//!   (the report shows how many cases each mean covers).
//!
//! An axis of length 1 is an axis like any other: voxels on both of its sides are outside the
//! array, so a `(x, y, 1)` volume is all surface. Squeeze such axes to evaluate 2D data stored
//! as 3D (the folder evaluation does).
//!
//! # Speed
//! One pass over the arrays counts voxels and finds each label's bounding box (over the union
//! of prediction and ground truth); surface distances are then computed inside that box only,
//! which is exact (outside it both masks are background), with rayon over labels.

use std::borrow::Cow;

use ndarray::ArrayViewD;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::edt::squared_edt;
use crate::error::{EvalError, Result};

/// The percentile of the Hausdorff distance reported as HD95.
pub const HD_PERCENTILE: f64 = 95.0;
/// Relative slack on the NSD tolerance so that a distance equal to τ counts as within even
/// when rounding puts it a few ulps above.
const NSD_TIE_SLACK: f64 = 1e-9;
/// Marks a label value that was not asked for.
const NO_SLOT: u32 = u32::MAX;

/// Options of the metric computation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricOptions {
    /// NSD tolerance τ in mm (same for every label).
    pub nsd_tolerance_mm: f64,
}

impl Default for MetricOptions {
    /// τ = 1 mm: a common choice for organ segmentation; set it per task.
    fn default() -> Self {
        MetricOptions { nsd_tolerance_mm: 1.0 }
    }
}

/// Metrics of one label in one case. `None` marks a value that is undefined for the case
/// (see the module docs for when).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    /// The label value.
    pub label: u16,
    /// Dice coefficient.
    pub dice: Option<f64>,
    /// Intersection over union (Jaccard).
    pub iou: Option<f64>,
    /// 95th-percentile Hausdorff distance, mm.
    pub hd95: Option<f64>,
    /// Normalised surface distance at the tolerance of [`MetricOptions`].
    pub nsd: Option<f64>,
    /// Voxels of this label in the ground truth.
    pub gt_voxels: u64,
    /// Voxels of this label in the prediction.
    pub pred_voxels: u64,
}

impl LabelMetrics {
    /// The row of a label absent from both masks.
    pub fn absent(label: u16) -> Self {
        LabelMetrics {
            label,
            dice: None,
            iou: None,
            hd95: None,
            nsd: None,
            gt_voxels: 0,
            pred_voxels: 0,
        }
    }
}

/// The sorted non-zero labels present in a label map.
pub fn present_labels(labels: ArrayViewD<'_, u16>) -> Vec<u16> {
    let mut seen = vec![false; 1 << 16];
    for &v in labels.iter() {
        seen[v as usize] = true;
    }
    (1..=u16::MAX).filter(|&v| seen[v as usize]).collect()
}

/// Metrics of the given labels between a predicted and a ground-truth label map.
///
/// `spacing` is in mm per array axis (NIfTI pixdim; 1 for PNG pixels). Works for any number
/// of axes (2D images, 3D volumes) and any memory layout. Label 0 is background and cannot be
/// asked for. Results come in the order of `labels`.
pub fn evaluate_labels(
    pred: ArrayViewD<'_, u16>,
    gt: ArrayViewD<'_, u16>,
    spacing: &[f64],
    labels: &[u16],
    options: &MetricOptions,
) -> Result<Vec<LabelMetrics>> {
    validate(pred.shape(), gt.shape(), spacing, options)?;
    if let Some(dup) = labels.iter().enumerate().find(|(i, l)| labels[..*i].contains(l)) {
        return Err(EvalError::InvalidArgument(format!("label {} is listed twice", dup.1)));
    }
    if labels.contains(&0) {
        return Err(EvalError::InvalidArgument(
            "label 0 is background and is not evaluated".into(),
        ));
    }
    let _span = tracing::debug_span!("evaluate_labels", shape = ?gt.shape(), n_labels = labels.len()).entered();
    let grid = Grid::new(pred, gt, spacing)?;
    let mut slot_of = vec![NO_SLOT; labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0)];
    for (slot, &l) in labels.iter().enumerate() {
        slot_of[l as usize] = slot as u32;
    }
    let stats = grid.scan(&slot_of, labels.len());
    Ok(labels
        .par_iter()
        .enumerate()
        .map(|(slot, &label)| grid.label_metrics(label, slot, &stats, options.nsd_tolerance_mm))
        .collect())
}

/// Metrics of two binary masks (reported as label 1).
pub fn evaluate_masks(
    pred: ArrayViewD<'_, bool>,
    gt: ArrayViewD<'_, bool>,
    spacing: &[f64],
    options: &MetricOptions,
) -> Result<LabelMetrics> {
    validate(pred.shape(), gt.shape(), spacing, options)?;
    let p = pred.mapv(u16::from);
    let g = gt.mapv(u16::from);
    let mut out = evaluate_labels(p.view(), g.view(), spacing, &[1], options)?;
    out.pop()
        .ok_or_else(|| EvalError::InvalidArgument("no result for label 1".into()))
}

fn validate(pred: &[usize], gt: &[usize], spacing: &[f64], options: &MetricOptions) -> Result<()> {
    if pred != gt {
        return Err(EvalError::Shape(format!("prediction {pred:?} vs ground truth {gt:?}")));
    }
    if gt.is_empty() {
        return Err(EvalError::Shape("label maps need at least one axis".into()));
    }
    if spacing.len() != gt.len() {
        return Err(EvalError::InvalidArgument(format!(
            "{} spacing values for {} array axes",
            spacing.len(),
            gt.len()
        )));
    }
    if let Some(s) = spacing.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(EvalError::InvalidArgument(format!(
            "spacing must be finite and positive, got {s}"
        )));
    }
    let tol = options.nsd_tolerance_mm;
    if !(tol.is_finite() && tol >= 0.0) {
        return Err(EvalError::InvalidArgument(format!(
            "NSD tolerance must be finite and >= 0 mm, got {tol}"
        )));
    }
    Ok(())
}

/// Both label maps in C order over the same axes, with the spacing permuted alike.
struct Grid<'a> {
    pred: Cow<'a, [u16]>,
    gt: Cow<'a, [u16]>,
    shape: Vec<usize>,
    spacing: Vec<f64>,
}

impl<'a> Grid<'a> {
    /// Fortran-ordered inputs (NIfTI) are read through reversed axes instead of being copied:
    /// the metrics do not depend on the order of the axes as long as the spacing follows.
    fn new(pred: ArrayViewD<'a, u16>, gt: ArrayViewD<'a, u16>, spacing: &[f64]) -> Result<Self> {
        let fortran = !gt.is_standard_layout() && gt.t().is_standard_layout();
        let (pred, gt, spacing) = if fortran {
            (
                pred.reversed_axes(),
                gt.reversed_axes(),
                spacing.iter().rev().copied().collect(),
            )
        } else {
            (pred, gt, spacing.to_vec())
        };
        let shape = gt.shape().to_vec();
        Ok(Grid {
            pred: c_order(pred)?,
            gt: c_order(gt)?,
            shape,
            spacing,
        })
    }

    fn ndim(&self) -> usize {
        self.shape.len()
    }

    /// Voxel counts, intersections and bounding boxes of every asked-for label, in one pass
    /// over rows of the last axis (in parallel over row ranges).
    fn scan(&self, slot_of: &[u32], n_slots: usize) -> ScanStats {
        let row_len = self.shape[self.ndim() - 1];
        let n_rows = self.gt.len().checked_div(row_len).unwrap_or(0);
        let n_tasks = (rayon::current_num_threads() * 4).clamp(1, n_rows.max(1));
        let rows_per_task = n_rows.div_ceil(n_tasks).max(1);
        (0..n_rows.div_ceil(rows_per_task))
            .into_par_iter()
            .map(|t| {
                let rows = t * rows_per_task..((t + 1) * rows_per_task).min(n_rows);
                self.scan_rows(rows, slot_of, n_slots)
            })
            .reduce(|| ScanStats::new(n_slots, self.ndim()), ScanStats::merge)
    }

    fn scan_rows(&self, rows: std::ops::Range<usize>, slot_of: &[u32], n_slots: usize) -> ScanStats {
        let nd = self.ndim();
        let row_len = self.shape[nd - 1];
        let mut stats = ScanStats::new(n_slots, nd);
        let mut marks = RowMarks {
            lo: vec![usize::MAX; n_slots],
            hi: vec![0usize; n_slots],
            seen: Vec::new(),
        };
        let mut row_coords = vec![0usize; nd - 1];
        let slot = |v: u16| match slot_of.get(v as usize) {
            Some(&s) if s != NO_SLOT => Some(s as usize),
            _ => None,
        };
        for r in rows {
            let g_row = &self.gt[r * row_len..(r + 1) * row_len];
            let p_row = &self.pred[r * row_len..(r + 1) * row_len];
            for (x, (&g, &p)) in g_row.iter().zip(p_row).enumerate() {
                if g == p {
                    if g == 0 {
                        continue;
                    }
                    if let Some(s) = slot(g) {
                        stats.gt_voxels[s] += 1;
                        stats.pred_voxels[s] += 1;
                        stats.overlap_voxels[s] += 1;
                        marks.touch(s, x);
                    }
                } else {
                    if let Some(s) = slot(g) {
                        stats.gt_voxels[s] += 1;
                        marks.touch(s, x);
                    }
                    if let Some(s) = slot(p) {
                        stats.pred_voxels[s] += 1;
                        marks.touch(s, x);
                    }
                }
            }
            if marks.seen.is_empty() {
                continue;
            }
            let mut rem = r;
            for k in (0..nd - 1).rev() {
                row_coords[k] = rem % self.shape[k];
                rem /= self.shape[k];
            }
            for s in marks.seen.drain(..) {
                let (lo, hi) = stats.bbox_mut(s);
                for k in 0..nd - 1 {
                    lo[k] = lo[k].min(row_coords[k]);
                    hi[k] = hi[k].max(row_coords[k]);
                }
                lo[nd - 1] = lo[nd - 1].min(marks.lo[s]);
                hi[nd - 1] = hi[nd - 1].max(marks.hi[s]);
                marks.lo[s] = usize::MAX;
            }
        }
        stats
    }

    fn label_metrics(&self, label: u16, slot: usize, stats: &ScanStats, tolerance: f64) -> LabelMetrics {
        let n_gt = stats.gt_voxels[slot];
        let n_pred = stats.pred_voxels[slot];
        let overlap = stats.overlap_voxels[slot];
        let mut m = LabelMetrics {
            gt_voxels: n_gt,
            pred_voxels: n_pred,
            ..LabelMetrics::absent(label)
        };
        if n_gt > 0 {
            m.dice = Some(2.0 * overlap as f64 / (n_gt + n_pred) as f64);
            m.iou = Some(overlap as f64 / (n_gt + n_pred - overlap) as f64);
        }
        if n_gt == 0 || n_pred == 0 {
            // One surface is empty: no distance exists, and no surface voxel is matched.
            m.nsd = if n_gt + n_pred > 0 { Some(0.0) } else { None };
            return m;
        }
        let _span = tracing::trace_span!("surface_distances", label).entered();
        let (lo, hi) = stats.bbox(slot);
        let (pred_mask, gt_mask, crop_shape) = self.crop_masks(label, lo, hi);
        let (hd95, nsd) = surface_metrics(&pred_mask, &gt_mask, &crop_shape, &self.spacing, tolerance);
        m.hd95 = Some(hd95);
        m.nsd = Some(nsd);
        m
    }

    /// The two binary masks of `label` inside the box `lo..=hi`.
    fn crop_masks(&self, label: u16, lo: &[usize], hi: &[usize]) -> (Vec<bool>, Vec<bool>, Vec<usize>) {
        let nd = self.ndim();
        let crop_shape: Vec<usize> = lo.iter().zip(hi).map(|(l, h)| h + 1 - l).collect();
        let n: usize = crop_shape.iter().product();
        let strides = c_strides(&self.shape);
        let row_len = crop_shape[nd - 1];
        let mut pred_mask = Vec::with_capacity(n);
        let mut gt_mask = Vec::with_capacity(n);
        let mut coords = vec![0usize; nd - 1];
        for _ in 0..n / row_len {
            let start: usize = (0..nd - 1).map(|k| (lo[k] + coords[k]) * strides[k]).sum::<usize>() + lo[nd - 1];
            pred_mask.extend(self.pred[start..start + row_len].iter().map(|&v| v == label));
            gt_mask.extend(self.gt[start..start + row_len].iter().map(|&v| v == label));
            for k in (0..nd - 1).rev() {
                coords[k] += 1;
                if coords[k] < crop_shape[k] {
                    break;
                }
                coords[k] = 0;
            }
        }
        (pred_mask, gt_mask, crop_shape)
    }
}

fn c_order<'a>(view: ArrayViewD<'a, u16>) -> Result<Cow<'a, [u16]>> {
    Ok(match view.to_slice() {
        Some(slice) => Cow::Borrowed(slice),
        // Logical iteration order is C order.
        None => Cow::Owned(view.iter().copied().collect()),
    })
}

fn c_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    strides
}

/// Extent along the last axis of each label seen in the current row.
struct RowMarks {
    lo: Vec<usize>,
    hi: Vec<usize>,
    seen: Vec<usize>,
}

impl RowMarks {
    #[inline]
    fn touch(&mut self, slot: usize, x: usize) {
        if self.lo[slot] == usize::MAX {
            self.seen.push(slot);
            self.lo[slot] = x;
        }
        self.hi[slot] = x;
    }
}

/// Per-label counters and bounding boxes (inclusive, per axis) of one scan.
struct ScanStats {
    ndim: usize,
    gt_voxels: Vec<u64>,
    pred_voxels: Vec<u64>,
    overlap_voxels: Vec<u64>,
    lo: Vec<usize>,
    hi: Vec<usize>,
}

impl ScanStats {
    fn new(n_slots: usize, ndim: usize) -> Self {
        ScanStats {
            ndim,
            gt_voxels: vec![0; n_slots],
            pred_voxels: vec![0; n_slots],
            overlap_voxels: vec![0; n_slots],
            lo: vec![usize::MAX; n_slots * ndim],
            hi: vec![0; n_slots * ndim],
        }
    }

    fn bbox(&self, slot: usize) -> (&[usize], &[usize]) {
        let r = slot * self.ndim..(slot + 1) * self.ndim;
        (&self.lo[r.clone()], &self.hi[r])
    }

    fn bbox_mut(&mut self, slot: usize) -> (&mut [usize], &mut [usize]) {
        let r = slot * self.ndim..(slot + 1) * self.ndim;
        (&mut self.lo[r.clone()], &mut self.hi[r])
    }

    fn merge(mut self, other: ScanStats) -> ScanStats {
        let add = |a: &mut Vec<u64>, b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        add(&mut self.gt_voxels, &other.gt_voxels);
        add(&mut self.pred_voxels, &other.pred_voxels);
        add(&mut self.overlap_voxels, &other.overlap_voxels);
        self.lo.iter_mut().zip(&other.lo).for_each(|(x, y)| *x = (*x).min(*y));
        self.hi.iter_mut().zip(&other.hi).for_each(|(x, y)| *x = (*x).max(*y));
        self
    }
}

/// Indices (C order) of the surface voxels of `mask`: mask voxels with a face neighbour that
/// is background or outside the grid. Rows of the last axis are shared between threads.
pub(crate) fn surface_indices(mask: &[bool], shape: &[usize]) -> Vec<usize> {
    let row_len = shape[shape.len() - 1];
    if row_len == 0 {
        return Vec::new();
    }
    let n_rows = mask.len() / row_len;
    let rows_per_task = (1usize << 16).div_ceil(row_len).max(1);
    let parts: Vec<Vec<usize>> = (0..n_rows.div_ceil(rows_per_task))
        .into_par_iter()
        .map(|t| surface_rows(mask, shape, t * rows_per_task..((t + 1) * rows_per_task).min(n_rows)))
        .collect();
    parts.concat()
}

fn surface_rows(mask: &[bool], shape: &[usize], rows: std::ops::Range<usize>) -> Vec<usize> {
    let nd = shape.len();
    let strides = c_strides(shape);
    let row_len = shape[nd - 1];
    let mut out = Vec::new();
    let mut coords = vec![0usize; nd - 1];
    let mut rem = rows.start;
    for k in (0..nd - 1).rev() {
        coords[k] = rem % shape[k];
        rem /= shape[k];
    }
    for r in rows {
        let base = r * row_len;
        for x in 0..row_len {
            let i = base + x;
            if !mask[i] {
                continue;
            }
            let mut edge = x == 0 || x + 1 == row_len || !mask[i - 1] || !mask[i + 1];
            let mut k = 0;
            while !edge && k < nd - 1 {
                let s = strides[k];
                edge = coords[k] == 0 || coords[k] + 1 == shape[k] || !mask[i - s] || !mask[i + s];
                k += 1;
            }
            if edge {
                out.push(i);
            }
        }
        for k in (0..nd - 1).rev() {
            coords[k] += 1;
            if coords[k] < shape[k] {
                break;
            }
            coords[k] = 0;
        }
    }
    out
}

/// HD95 and NSD between two non-empty masks on one grid.
fn surface_metrics(pred: &[bool], gt: &[bool], shape: &[usize], spacing: &[f64], tolerance: f64) -> (f64, f64) {
    let pred_surface = surface_indices(pred, shape);
    let gt_surface = surface_indices(gt, shape);
    let mut sites = vec![false; pred.len()];
    let mut dist = Vec::new();
    let mut distances_to = |to: &[usize], from: &[usize], sites: &mut Vec<bool>| -> Vec<f64> {
        sites.iter_mut().for_each(|s| *s = false);
        for &i in to {
            sites[i] = true;
        }
        squared_edt(sites, shape, spacing, &mut dist);
        from.iter().map(|&i| dist[i].sqrt()).collect()
    };
    let mut pred_to_gt = distances_to(&gt_surface, &pred_surface, &mut sites);
    let mut gt_to_pred = distances_to(&pred_surface, &gt_surface, &mut sites);
    let limit = tolerance * (1.0 + NSD_TIE_SLACK);
    let within = pred_to_gt.iter().chain(&gt_to_pred).filter(|&&d| d <= limit).count();
    let nsd = within as f64 / (pred_to_gt.len() + gt_to_pred.len()) as f64;
    let hd = percentile_linear(&mut pred_to_gt, HD_PERCENTILE)
        .unwrap_or(f64::NAN)
        .max(percentile_linear(&mut gt_to_pred, HD_PERCENTILE).unwrap_or(f64::NAN));
    (hd, nsd)
}

/// The `q`-th percentile (0..=100) with linear interpolation between closest ranks, as numpy's
/// default `method="linear"`. Reorders `values`. `None` when empty.
pub fn percentile_linear(values: &mut [f64], q: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * (q / 100.0).clamp(0.0, 1.0);
    let lo = (h.floor() as usize).min(n - 1);
    let t = h - lo as f64;
    let (_, &mut a, rest) = values.select_nth_unstable_by(lo, f64::total_cmp);
    let b = rest.iter().copied().fold(f64::INFINITY, f64::min);
    if lo + 1 >= n || t == 0.0 {
        return Some(a);
    }
    // numpy's `_lerp`: interpolate from the nearer end for accuracy.
    let diff = b - a;
    Some(if t >= 0.5 { b - diff * (1.0 - t) } else { a + diff * t })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3, ArrayD, ShapeBuilder};

    #[test]
    fn percentile_matches_numpy_examples() {
        // numpy.percentile([1, 2, 3, 4], 95) == 3.85; ([5], 95) == 5; ([0, 10], 50) == 5.
        assert!((percentile_linear(&mut [4.0, 1.0, 3.0, 2.0], 95.0).unwrap() - 3.85).abs() < 1e-12);
        assert_eq!(percentile_linear(&mut [5.0], 95.0), Some(5.0));
        assert_eq!(percentile_linear(&mut [10.0, 0.0], 50.0), Some(5.0));
        assert_eq!(percentile_linear(&mut [], 95.0), None);
    }

    #[test]
    fn surface_of_a_filled_square_is_its_ring() {
        let mut mask = vec![false; 36];
        for r in 1..5 {
            for c in 1..5 {
                mask[r * 6 + c] = true;
            }
        }
        assert_eq!(surface_indices(&mask, &[6, 6]).len(), 12);
        // Touching the border: the whole 6x6 image is its own surface ring (20 voxels).
        assert_eq!(surface_indices(&[true; 36], &[6, 6]).len(), 20);
    }

    #[test]
    fn distance_equal_to_tolerance_counts_as_within() {
        // Two vertical lines 3 columns apart with spacing 0.5 mm: every distance is 1.5 mm.
        let mut gt = Array2::<u16>::zeros((8, 10));
        let mut pred = Array2::<u16>::zeros((8, 10));
        gt.column_mut(2).fill(1);
        pred.column_mut(5).fill(1);
        let at = |tol| {
            evaluate_labels(
                pred.view().into_dyn(),
                gt.view().into_dyn(),
                &[1.0, 0.5],
                &[1],
                &MetricOptions { nsd_tolerance_mm: tol },
            )
            .unwrap()[0]
        };
        assert_eq!(at(1.5).nsd, Some(1.0));
        assert_eq!(at(1.4999).nsd, Some(0.0));
        assert!((at(1.5).hd95.unwrap() - 1.5).abs() < 1e-12);
        // sqrt(0.3² + 0.4²) = 0.5 exactly in maths, not in floating point.
        let mut gt = Array2::<u16>::zeros((4, 4));
        let mut pred = Array2::<u16>::zeros((4, 4));
        gt[[0, 0]] = 1;
        pred[[1, 1]] = 1;
        let m = evaluate_labels(
            pred.view().into_dyn(),
            gt.view().into_dyn(),
            &[0.3, 0.4],
            &[1],
            &MetricOptions { nsd_tolerance_mm: 0.5 },
        )
        .unwrap();
        assert_eq!(m[0].nsd, Some(1.0));
    }

    #[test]
    fn fortran_and_c_layouts_agree() {
        let mut gt = Array3::<u16>::zeros((9, 7, 5));
        let mut pred = Array3::<u16>::zeros((9, 7, 5));
        gt.slice_mut(ndarray::s![1..6, 2..5, 1..4]).fill(1);
        gt.slice_mut(ndarray::s![6..9, 0..3, 0..2]).fill(2);
        pred.slice_mut(ndarray::s![2..7, 2..6, 0..4]).fill(1);
        pred.slice_mut(ndarray::s![5..9, 1..3, 0..1]).fill(2);
        let spacing = [0.7, 1.3, 2.9];
        let opts = MetricOptions { nsd_tolerance_mm: 1.5 };
        let c = evaluate_labels(pred.view().into_dyn(), gt.view().into_dyn(), &spacing, &[1, 2], &opts).unwrap();
        let to_f = |a: &Array3<u16>| {
            let mut f = Array3::<u16>::zeros(a.dim().f());
            f.assign(a);
            f
        };
        let (gf, pf) = (to_f(&gt), to_f(&pred));
        assert!(!gf.is_standard_layout());
        let f = evaluate_labels(pf.view().into_dyn(), gf.view().into_dyn(), &spacing, &[1, 2], &opts).unwrap();
        // A strided (non-contiguous) view is copied to C order.
        let big_g = ndarray::concatenate![ndarray::Axis(2), gt, gt];
        let big_p = ndarray::concatenate![ndarray::Axis(2), pred, pred];
        let sv = evaluate_labels(
            big_p.slice(ndarray::s![.., .., ..5]).into_dyn(),
            big_g.slice(ndarray::s![.., .., ..5]).into_dyn(),
            &spacing,
            &[1, 2],
            &opts,
        )
        .unwrap();
        for ((a, b), s) in c.iter().zip(&f).zip(&sv) {
            assert_eq!(a.dice, b.dice);
            assert_eq!(a.nsd, b.nsd);
            assert!((a.hd95.unwrap() - b.hd95.unwrap()).abs() < 1e-12);
            assert_eq!(a, s);
        }
    }

    #[test]
    fn empty_mask_conventions() {
        let mut gt = Array2::<u16>::zeros((6, 6));
        let mut pred = Array2::<u16>::zeros((6, 6));
        gt[[1, 1]] = 1;
        pred[[4, 4]] = 2;
        let m = evaluate_labels(
            pred.view().into_dyn(),
            gt.view().into_dyn(),
            &[1.0, 1.0],
            &[1, 2, 3],
            &MetricOptions::default(),
        )
        .unwrap();
        assert_eq!(
            (m[0].dice, m[0].iou, m[0].hd95, m[0].nsd),
            (Some(0.0), Some(0.0), None, Some(0.0))
        );
        assert_eq!(
            (m[1].dice, m[1].iou, m[1].hd95, m[1].nsd),
            (None, None, None, Some(0.0))
        );
        assert_eq!(m[2], LabelMetrics::absent(3));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let a = ArrayD::<u16>::zeros(vec![4, 4]);
        let b = ArrayD::<u16>::zeros(vec![4, 5]);
        let o = MetricOptions::default();
        assert!(matches!(
            evaluate_labels(a.view(), b.view(), &[1.0, 1.0], &[1], &o),
            Err(EvalError::Shape(_))
        ));
        assert!(evaluate_labels(a.view(), a.view(), &[1.0], &[1], &o).is_err());
        assert!(evaluate_labels(a.view(), a.view(), &[1.0, 0.0], &[1], &o).is_err());
        assert!(evaluate_labels(a.view(), a.view(), &[1.0, f64::NAN], &[1], &o).is_err());
        assert!(evaluate_labels(a.view(), a.view(), &[1.0, 1.0], &[0], &o).is_err());
        assert!(evaluate_labels(a.view(), a.view(), &[1.0, 1.0], &[2, 2], &o).is_err());
        let bad_tol = MetricOptions { nsd_tolerance_mm: -1.0 };
        assert!(evaluate_labels(a.view(), a.view(), &[1.0, 1.0], &[1], &bad_tol).is_err());
        let empty = ArrayD::<u16>::zeros(vec![0, 3]);
        let m = evaluate_labels(empty.view(), empty.view(), &[1.0, 1.0], &[1], &o).unwrap();
        assert_eq!(m[0], LabelMetrics::absent(1));
    }

    #[test]
    fn binary_masks_api() {
        let mut gt = Array2::<bool>::from_elem((5, 5), false);
        gt[[2, 2]] = true;
        let m = evaluate_masks(
            gt.view().into_dyn(),
            gt.view().into_dyn(),
            &[1.0, 1.0],
            &MetricOptions::default(),
        )
        .unwrap();
        assert_eq!((m.dice, m.hd95, m.nsd), (Some(1.0), Some(0.0), Some(1.0)));
    }
}
