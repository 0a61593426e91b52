//! Intensity normalisation per modality, slicing, orientation and array resizing.
//!
//! The pipeline for one slice is: [`normalize_intensity`] (whole volume, to `[0, 1]`) ->
//! [`slice_2d`] -> the model. The model-side transform (resize to S, ImageNet
//! normalisation, logits back to the original size) is `sgp_sam2::Preprocess`, the one
//! copy of SAM2's `SAM2Transforms`; this crate stays free of candle.

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, Axis, IxDyn};

use crate::dataset::Modality;
use crate::error::{DataError, Result};

/// How raw intensities become `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IntensityMethod {
    /// Clip to the `low`..`high` percentiles (0..100, linear interpolation like numpy) of the
    /// voxels (of the foreground mask when one is given), then scale to `[0, 1]`. nnU-Net
    /// computes CT percentiles over the training set's foreground; with no labels at inference
    /// time, the default uses the whole volume.
    Percentile {
        /// Lower percentile (0..100).
        low: f64,
        /// Upper percentile (0..100).
        high: f64,
    },
    /// A fixed window: clip to `level ± width/2` (CT, Hounsfield units), then scale.
    Window {
        /// Window centre.
        level: f32,
        /// Window width (> 0).
        width: f32,
    },
    /// Scale the volume's minimum..maximum to `[0, 1]` (ultrasound, photographs).
    MinMax,
}

impl IntensityMethod {
    /// The default per modality: CT and MR clip to percentiles 0.5/99.5 of the whole volume;
    /// ultrasound, photographs and anything else use min-max.
    pub fn default_for(modality: &Modality) -> Self {
        match modality {
            Modality::Ct | Modality::Mr => IntensityMethod::Percentile { low: 0.5, high: 99.5 },
            _ => IntensityMethod::MinMax,
        }
    }
    /// Soft-tissue CT window (L 40, W 400).
    pub const CT_SOFT_TISSUE: Self = IntensityMethod::Window {
        level: 40.0,
        width: 400.0,
    };
    /// Lung CT window (L -600, W 1500).
    pub const CT_LUNG: Self = IntensityMethod::Window {
        level: -600.0,
        width: 1500.0,
    };
}

/// The `q`-th percentile (0..=100) of finite values, numpy's linear interpolation.
pub fn percentile(values: &[f32], q: f64) -> Option<f32> {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 100.0);
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let (_, &mut a, _) = v.select_nth_unstable_by(lo, f32::total_cmp);
    let b = if hi == lo {
        a
    } else {
        *v[lo + 1..].iter().min_by(|x, y| x.total_cmp(y)).unwrap_or(&a)
    };
    Some(a + (b - a) * (pos - lo as f64) as f32)
}

/// Normalise intensities to `[0, 1]` (non-finite values become 0). `foreground`, when given,
/// restricts the statistics (percentiles, min/max) to the voxels where it is true.
pub fn normalize_intensity(
    data: &ArrayD<f32>,
    method: IntensityMethod,
    foreground: Option<&ArrayD<bool>>,
) -> Result<ArrayD<f32>> {
    if let Some(m) = foreground {
        if m.shape() != data.shape() {
            return Err(DataError::Shape(format!(
                "foreground {:?} vs data {:?}",
                m.shape(),
                data.shape()
            )));
        }
    }
    let sample: Vec<f32> = match foreground {
        Some(m) => data.iter().zip(m.iter()).filter(|(_, &f)| f).map(|(&v, _)| v).collect(),
        None => data.iter().copied().collect(),
    };
    let (lo, hi) = match method {
        IntensityMethod::Window { level, width } => {
            if width.is_nan() || width <= 0.0 {
                return Err(DataError::InvalidArgument(format!(
                    "window width {width} must be positive"
                )));
            }
            (level - width / 2.0, level + width / 2.0)
        }
        IntensityMethod::Percentile { low, high } => {
            if low.is_nan() || high.is_nan() || low >= high {
                return Err(DataError::InvalidArgument(format!("percentiles {low} >= {high}")));
            }
            match (percentile(&sample, low), percentile(&sample, high)) {
                (Some(a), Some(b)) => (a, b),
                _ => (0.0, 0.0),
            }
        }
        IntensityMethod::MinMax => {
            let finite = sample.iter().copied().filter(|v| v.is_finite());
            let lo = finite.clone().fold(f32::INFINITY, f32::min);
            let hi = finite.fold(f32::NEG_INFINITY, f32::max);
            if lo.is_finite() {
                (lo, hi)
            } else {
                (0.0, 0.0)
            }
        }
    };
    let range = hi - lo;
    Ok(data.mapv(|v| {
        if !v.is_finite() || range.is_nan() || range <= 0.0 {
            0.0
        } else {
            ((v.clamp(lo, hi) - lo) / range).clamp(0.0, 1.0)
        }
    }))
}

/// Number of slices along `axis`.
pub fn slice_count<T>(data: &ArrayD<T>, axis: usize) -> Result<usize> {
    data.shape()
        .get(axis)
        .copied()
        .ok_or_else(|| DataError::InvalidArgument(format!("axis {axis} of a {}-D array", data.ndim())))
}

/// One 2D slice of a 3D array, as an image.
///
/// In-plane convention: the two remaining axes `(a, b)` (`a < b`) become `(rows, cols) =
/// (b, a)`, i.e. `slice[[r, c]] = data[.., c, .., r, ..]`. For NIfTI `(x, y, z)` and axis 2 this
/// is `data[:, :, k].T`, how viewers show a stored slice, and it makes 2D NIfTI images (CAMUS,
/// stored `(x, y)` or `(x, y, 1)`) come out as ordinary `(row, col)` images. Orientation is as
/// stored; call [`Reorientation::to_canonical`] first for RAS-canonical slices.
pub fn slice_2d<T: Clone>(data: &ArrayD<T>, axis: usize, index: usize) -> Result<Array2<T>> {
    if data.ndim() != 3 {
        return Err(DataError::Shape(format!(
            "slice_2d needs a 3-D array, got {:?}",
            data.shape()
        )));
    }
    let n = slice_count(data, axis)?;
    if index >= n {
        return Err(DataError::InvalidArgument(format!(
            "slice {index} of {n} along axis {axis}"
        )));
    }
    let s = data.index_axis(Axis(axis), index);
    let s2 = s
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| DataError::Shape(e.to_string()))?;
    Ok(s2.t().to_owned())
}

/// Write a 2D slice (in [`slice_2d`]'s convention) back into a 3D array.
pub fn set_slice_2d<T: Clone>(data: &mut ArrayD<T>, axis: usize, index: usize, slice: ArrayView2<'_, T>) -> Result<()> {
    if data.ndim() != 3 {
        return Err(DataError::Shape(format!(
            "set_slice_2d needs a 3-D array, got {:?}",
            data.shape()
        )));
    }
    let n = slice_count(data, axis)?;
    if index >= n {
        return Err(DataError::InvalidArgument(format!(
            "slice {index} of {n} along axis {axis}"
        )));
    }
    let mut target = data.index_axis_mut(Axis(axis), index);
    let t = slice.t();
    if target.shape() != t.shape() {
        return Err(DataError::Shape(format!(
            "slice {:?} does not fit {:?}",
            slice.shape(),
            target.shape()
        )));
    }
    target.assign(&t.into_dyn());
    Ok(())
}

/// The axis permutation and flips that bring a volume to RAS-canonical order: array axis `w`
/// runs along world axis `w` (R, A, S) with increasing index towards +R/+A/+S. Axes are matched
/// by the affine's dominant direction cosines (oblique scans are approximated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reorientation {
    /// `perm[w]` = stored axis that runs along world axis `w`.
    pub perm: [usize; 3],
    /// Whether that stored axis runs towards -w.
    pub flip: [bool; 3],
}

impl Reorientation {
    /// From a voxel-to-world (RAS) affine.
    #[allow(clippy::needless_range_loop)]
    pub fn from_affine(affine: &[[f64; 4]; 4]) -> Self {
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        let mut used = [false; 3];
        // Greedy on the largest |cosine| first, so each world axis gets one distinct voxel axis.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for w in 0..3 {
            for v in 0..3 {
                let norm = (0..3)
                    .map(|r| affine[r][v] * affine[r][v])
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-12);
                pairs.push(((affine[w][v] / norm).abs(), w, v));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, w, v) in pairs {
            if perm[w] == usize::MAX && !used[v] {
                perm[w] = v;
                used[v] = true;
                flip[w] = affine[w][v] < 0.0;
            }
        }
        Reorientation { perm, flip }
    }

    /// Whether the volume is already canonical.
    pub fn is_identity(&self) -> bool {
        self.perm == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Stored order -> canonical order (3-D arrays).
    pub fn to_canonical<T: Clone>(&self, data: &ArrayD<T>) -> Result<ArrayD<T>> {
        if data.ndim() != 3 {
            return Err(DataError::Shape(format!(
                "reorientation needs a 3-D array, got {:?}",
                data.shape()
            )));
        }
        let mut v = data.view().permuted_axes(IxDyn(&self.perm));
        for (w, &f) in self.flip.iter().enumerate() {
            if f {
                v.invert_axis(Axis(w));
            }
        }
        Ok(v.as_standard_layout().into_owned())
    }

    /// Canonical order -> stored order (undo [`Self::to_canonical`]).
    pub fn from_canonical<T: Clone>(&self, data: &ArrayD<T>) -> Result<ArrayD<T>> {
        if data.ndim() != 3 {
            return Err(DataError::Shape(format!(
                "reorientation needs a 3-D array, got {:?}",
                data.shape()
            )));
        }
        let mut v = data.view();
        for (w, &f) in self.flip.iter().enumerate() {
            if f {
                v.invert_axis(Axis(w));
            }
        }
        let mut inverse = [0usize; 3];
        for (w, &s) in self.perm.iter().enumerate() {
            inverse[s] = w;
        }
        Ok(v.permuted_axes(IxDyn(&inverse)).as_standard_layout().into_owned())
    }
}

/// Separable linear resampling weights for one axis (torch/PIL conventions, half-pixel
/// centres). With `antialias` and downscaling the triangle filter widens to the scale, as
/// torchvision's `Resize(antialias=True)`; otherwise it is plain bilinear with clamped
/// borders, as `F.interpolate(mode="bilinear", align_corners=False)`.
fn linear_weights(n_in: usize, n_out: usize, antialias: bool) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let mut out = Vec::with_capacity(n_out);
    if antialias && scale > 1.0 {
        let support = scale;
        for i in 0..n_out {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
            let xmax = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut w: Vec<f32> = (xmin..xmax)
                .map(|j| {
                    let x = (j as f64 - center + 0.5) / scale;
                    (1.0 - x.abs()).max(0.0) as f32
                })
                .collect();
            let sum: f32 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|x| *x /= sum);
            }
            out.push((xmin, w));
        }
    } else {
        for i in 0..n_out {
            let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
            let x0 = (src.floor() as usize).min(n_in - 1);
            let x1 = (x0 + 1).min(n_in - 1);
            let l = (src - x0 as f64) as f32;
            if x1 == x0 {
                out.push((x0, vec![1.0]));
            } else {
                out.push((x0, vec![1.0 - l, l]));
            }
        }
    }
    out
}

/// Bilinear resize of a 2D image to `(out_h, out_w)` like torch's `interpolate`
/// (`align_corners=False`); `antialias` widens the filter when downsampling, as
/// torchvision's `Resize` does on tensors.
pub fn resize_bilinear(img: ArrayView2<'_, f32>, out_h: usize, out_w: usize, antialias: bool) -> Result<Array2<f32>> {
    let (h, w) = img.dim();
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(DataError::InvalidArgument(format!(
            "resize {h}x{w} -> {out_h}x{out_w}: empty size"
        )));
    }
    let wx = linear_weights(w, out_w, antialias);
    let wy = linear_weights(h, out_h, antialias);
    // Horizontal pass, then vertical.
    let mut tmp = Array2::<f32>::zeros((h, out_w));
    for r in 0..h {
        let row = img.row(r);
        for (c, (x0, ws)) in wx.iter().enumerate() {
            tmp[[r, c]] = ws.iter().enumerate().map(|(k, wt)| wt * row[x0 + k]).sum();
        }
    }
    let mut out = Array2::<f32>::zeros((out_h, out_w));
    for (r, (y0, ws)) in wy.iter().enumerate() {
        for (k, wt) in ws.iter().enumerate() {
            out.row_mut(r).scaled_add(*wt, &tmp.row(y0 + k));
        }
    }
    Ok(out)
}

/// Nearest-neighbour resize of a label map (torch's legacy `nearest`: `src = floor(dst *
/// in / out)`), so labels never blend.
pub fn resize_nearest<T: Copy>(labels: ArrayView2<'_, T>, out_h: usize, out_w: usize) -> Result<Array2<T>> {
    let (h, w) = labels.dim();
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(DataError::InvalidArgument(format!(
            "resize {h}x{w} -> {out_h}x{out_w}: empty size"
        )));
    }
    let sy = h as f64 / out_h as f64;
    let sx = w as f64 / out_w as f64;
    Ok(Array2::from_shape_fn((out_h, out_w), |(r, c)| {
        let y = ((r as f64 * sy).floor() as usize).min(h - 1);
        let x = ((c as f64 * sx).floor() as usize).min(w - 1);
        labels[[y, x]]
    }))
}

/// A 3-D view helper: the volume's data as 3-D (2-D images get a trailing axis of 1).
pub fn as_3d<T>(data: &ArrayD<T>) -> Result<ArrayViewD<'_, T>> {
    match data.ndim() {
        3 => Ok(data.view()),
        2 => Ok(data.view().insert_axis(Axis(2))),
        n => Err(DataError::Shape(format!("expected a 2-D or 3-D array, got {n}-D"))),
    }
}
