//! Pictures people look at: contour overlays and a per-case Dice bar chart, as PNG.
//!
//! # Overlay colours
//! * ground-truth contour: **green** `#00FF00`;
//! * predicted contour: **magenta** `#FF00FF`;
//! * where both contours run on the same pixel: **white**.
//!
//! The background is the image when one is given (grey, clipped to its 1st–99th percentile
//! in the shown slice), otherwise a grey rendering of the ground-truth labels. A contour is
//! drawn along every label boundary (between two labels or a label and background), so
//! multi-label maps show each structure. Small images are enlarged (nearest neighbour, by an
//! integer factor) before contours are drawn, so contours stay one screen pixel thin and follow
//! voxel edges.
//!
//! # Orientation
//! 2D raster images `(row, col)` are shown as they are. NIfTI arrays `(x, y[, z])` are shown as
//! axial slices `z`, with `x` to the right and `y` upwards (rows are `y` reversed). In-plane
//! anisotropic spacing is not resampled.

use image::{Rgb, RgbImage};
use ndarray::{Array2, ArrayView2, ArrayViewD, Axis};

use crate::error::{EvalError, Result};

/// Ground-truth contour colour.
pub const GT_COLOUR: Rgb<u8> = Rgb([0, 255, 0]);
/// Predicted contour colour.
pub const PRED_COLOUR: Rgb<u8> = Rgb([255, 0, 255]);
/// Colour where both contours coincide.
pub const BOTH_COLOUR: Rgb<u8> = Rgb([255, 255, 255]);

/// How the array axes map to the picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// `(row, col)`: raster images.
    RowCol,
    /// `(x, y[, z])`: NIfTI; shown with `x` right and `y` up.
    NiftiXyz,
}

/// Which slice(s) of a 3D volume to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceChoice {
    /// The slice with the most ground-truth foreground (prediction if the ground truth is empty).
    MostForeground,
    /// A given slice index along the last axis.
    Index(usize),
    /// Up to this many slices, evenly spread over the slices with foreground, tiled.
    Montage(usize),
}

/// Options of [`render_overlay`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayOptions {
    /// Which slice of a volume is drawn.
    pub slice: SliceChoice,
    /// Pictures are enlarged until their shorter side reaches this many pixels (up to 16×).
    pub min_size: u32,
}

impl Default for OverlayOptions {
    fn default() -> Self {
        OverlayOptions {
            slice: SliceChoice::MostForeground,
            min_size: 384,
        }
    }
}

/// Render ground-truth and predicted contours over the image (or a grey rendering of the
/// ground truth). Accepts 2D arrays, or 3D arrays sliced along the last axis.
pub fn render_overlay(
    gt: ArrayViewD<'_, u16>,
    pred: ArrayViewD<'_, u16>,
    image: Option<ArrayViewD<'_, f32>>,
    orientation: Orientation,
    options: &OverlayOptions,
) -> Result<RgbImage> {
    if gt.shape() != pred.shape() {
        return Err(EvalError::Shape(format!(
            "prediction {:?} vs ground truth {:?}",
            pred.shape(),
            gt.shape()
        )));
    }
    if let Some(img) = &image {
        if img.shape() != gt.shape() {
            return Err(EvalError::Shape(format!(
                "image {:?} vs ground truth {:?}",
                img.shape(),
                gt.shape()
            )));
        }
    }
    if gt.iter().next().is_none() {
        return Err(EvalError::Shape(format!(
            "nothing to draw in an array of shape {:?}",
            gt.shape()
        )));
    }
    match gt.ndim() {
        2 => {
            let plane = |a: ArrayViewD<'_, u16>| display_plane(a.into_dimensionality().ok(), orientation);
            let (g, p) = (plane(gt.view())?, plane(pred.view())?);
            let im = match &image {
                Some(i) => Some(display_plane(i.view().into_dimensionality().ok(), orientation)?),
                None => None,
            };
            let scale = scale_for(g.dim(), options.min_size);
            Ok(render_plane(
                g.view(),
                p.view(),
                im.as_ref().map(|a| a.view()),
                scale,
                None,
            ))
        }
        3 => {
            let depth = gt.shape()[2];
            let slices = choose_slices(&gt, &pred, options.slice)?;
            let tile = |z: usize| -> Result<RgbImage> {
                let g = display_plane(gt.index_axis(Axis(2), z).into_dimensionality().ok(), orientation)?;
                let p = display_plane(pred.index_axis(Axis(2), z).into_dimensionality().ok(), orientation)?;
                let im = match &image {
                    Some(i) => Some(display_plane(
                        i.index_axis(Axis(2), z).into_dimensionality().ok(),
                        orientation,
                    )?),
                    None => None,
                };
                let scale = scale_for(g.dim(), options.min_size / if slices.len() > 1 { 2 } else { 1 });
                Ok(render_plane(
                    g.view(),
                    p.view(),
                    im.as_ref().map(|a| a.view()),
                    scale,
                    Some(format!("z={z}/{depth}")),
                ))
            };
            let tiles = slices.iter().map(|&z| tile(z)).collect::<Result<Vec<_>>>()?;
            Ok(montage(&tiles))
        }
        n => Err(EvalError::Shape(format!("overlays need 2D or 3D arrays, got {n} axes"))),
    }
}

/// The 2D array as displayed (rows, cols).
fn display_plane<T: Copy>(plane: Option<ArrayView2<'_, T>>, orientation: Orientation) -> Result<Array2<T>> {
    let plane = plane.ok_or_else(|| EvalError::Shape("expected a 2D slice".into()))?;
    Ok(match orientation {
        Orientation::RowCol => plane.to_owned(),
        // (x, y) -> rows are y from top (largest) to bottom, columns are x.
        Orientation::NiftiXyz => {
            let mut t = plane.t().to_owned();
            t.invert_axis(Axis(0));
            t
        }
    })
}

/// Slice indices along the last axis for a 3D pair.
fn choose_slices(gt: &ArrayViewD<'_, u16>, pred: &ArrayViewD<'_, u16>, choice: SliceChoice) -> Result<Vec<usize>> {
    let depth = gt.shape()[2];
    let count = |a: &ArrayViewD<'_, u16>| -> Vec<usize> {
        a.axis_iter(Axis(2))
            .map(|s| s.iter().filter(|&&v| v != 0).count())
            .collect()
    };
    let gt_counts = count(gt);
    let pred_counts = count(pred);
    Ok(match choice {
        SliceChoice::Index(z) if z < depth => vec![z],
        SliceChoice::Index(z) => {
            return Err(EvalError::InvalidArgument(format!(
                "slice {z} is outside a volume of {depth} slices"
            )));
        }
        SliceChoice::MostForeground => {
            let counts = if gt_counts.iter().any(|&c| c > 0) {
                &gt_counts
            } else {
                &pred_counts
            };
            // First slice of the maximum; the middle one when everything is empty.
            let best = counts
                .iter()
                .enumerate()
                .fold((depth / 2, 0usize), |acc, (z, &c)| if c > acc.1 { (z, c) } else { acc });
            vec![best.0]
        }
        SliceChoice::Montage(max_tiles) => {
            let with_fg: Vec<usize> = (0..depth).filter(|&z| gt_counts[z] + pred_counts[z] > 0).collect();
            let k = max_tiles.max(1).min(with_fg.len());
            if k == 0 {
                vec![depth / 2]
            } else {
                // Evenly spread, centred in each of k equal parts.
                (0..k).map(|i| with_fg[(2 * i + 1) * with_fg.len() / (2 * k)]).collect()
            }
        }
    })
}

fn scale_for((rows, cols): (usize, usize), min_size: u32) -> usize {
    let short = rows.min(cols).max(1);
    let long = rows.max(cols).max(1);
    let want = (min_size as usize).div_ceil(short).clamp(1, 16);
    // Keep pictures under 4096 pixels on a side.
    want.min((4096 / long).max(1))
}

/// Height of the legend strip above a picture of `width` pixels.
pub(crate) fn legend_height(width: u32) -> u32 {
    crate::font::GLYPH * if width >= 256 { 2 } else { 1 } + 4
}

/// One plane: background, then contours at `scale`×, a legend strip on top with an optional
/// caption.
fn render_plane(
    gt: ArrayView2<'_, u16>,
    pred: ArrayView2<'_, u16>,
    image: Option<ArrayView2<'_, f32>>,
    scale: usize,
    caption: Option<String>,
) -> RgbImage {
    let (rows, cols) = gt.dim();
    let background = match image {
        Some(img) => grey_from_image(img),
        None => grey_from_labels(gt),
    };
    let (h, w) = (rows * scale, cols * scale);
    let thickness = if scale >= 6 { 2 } else { 1 };
    // A black strip above the picture holds the legend, so that it hides nothing.
    let legend_scale = if w >= 256 { 2 } else { 1 };
    let strip = legend_height(w as u32) as usize;
    let mut out = RgbImage::new(w as u32, (h + strip) as u32);
    for y in 0..h {
        for x in 0..w {
            let (r, c) = (y / scale, x / scale);
            let on_gt = on_contour(gt, y, x, scale, thickness);
            let on_pred = on_contour(pred, y, x, scale, thickness);
            let px = match (on_gt, on_pred) {
                (true, true) => BOTH_COLOUR,
                (true, false) => GT_COLOUR,
                (false, true) => PRED_COLOUR,
                (false, false) => {
                    let g = background[[r, c]];
                    Rgb([g, g, g])
                }
            };
            out.put_pixel(x as u32, (y + strip) as u32, px);
        }
    }
    let mut x = 2;
    x = crate::font::draw_text(&mut out, x, 2, "GT", GT_COLOUR, None, legend_scale) + 6 * legend_scale;
    x = crate::font::draw_text(&mut out, x, 2, "pred", PRED_COLOUR, None, legend_scale) + 6 * legend_scale;
    if let Some(c) = caption {
        crate::font::draw_text(&mut out, x, 2, &c, Rgb([255, 255, 0]), None, legend_scale);
    }
    out
}

/// Whether enlarged pixel (y, x) lies on a boundary of `labels`: a non-zero label with a
/// different label (or the picture's edge) within `thickness` enlarged pixels along a row or
/// column.
fn on_contour(labels: ArrayView2<'_, u16>, y: usize, x: usize, scale: usize, thickness: usize) -> bool {
    let (rows, cols) = labels.dim();
    let v = labels[[y / scale, x / scale]];
    if v == 0 {
        return false;
    }
    let (h, w) = (rows * scale, cols * scale);
    for d in 1..=thickness {
        let neighbours = [
            y.checked_sub(d).map(|yy| (yy, x)),
            (y + d < h).then_some((y + d, x)),
            x.checked_sub(d).map(|xx| (y, xx)),
            (x + d < w).then_some((y, x + d)),
        ];
        for n in neighbours {
            match n {
                None => return true,
                Some((yy, xx)) if labels[[yy / scale, xx / scale]] != v => return true,
                _ => {}
            }
        }
    }
    false
}

/// Image intensities clipped to the slice's 1st–99th percentile, as 0..=255 grey.
fn grey_from_image(img: ArrayView2<'_, f32>) -> Array2<u8> {
    let mut finite: Vec<f32> = img.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Array2::zeros(img.dim());
    }
    let pick = |v: &mut Vec<f32>, q: f64| {
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        *v.select_nth_unstable_by(i, f32::total_cmp).1
    };
    let lo = pick(&mut finite, 0.01);
    let hi = pick(&mut finite, 0.99);
    let range = if hi > lo { hi - lo } else { 1.0 };
    img.mapv(|v| {
        if v.is_finite() {
            (((v - lo) / range).clamp(0.0, 1.0) * 255.0).round() as u8
        } else {
            0
        }
    })
}

/// Background black, each label a distinct mid grey (contours stay visible on top).
fn grey_from_labels(labels: ArrayView2<'_, u16>) -> Array2<u8> {
    let mut present: Vec<u16> = labels.iter().copied().filter(|&v| v != 0).collect();
    present.sort_unstable();
    present.dedup();
    let n = present.len().max(1);
    labels.mapv(|v| match present.binary_search(&v) {
        Ok(rank) if v != 0 => (70 + rank * 110 / n) as u8,
        _ => 0,
    })
}

/// Tiles in a near-square grid separated by 4 dark pixels.
fn montage(tiles: &[RgbImage]) -> RgbImage {
    if tiles.len() == 1 {
        return tiles[0].clone();
    }
    let cols = (tiles.len() as f64).sqrt().ceil() as u32;
    let rows = (tiles.len() as u32).div_ceil(cols);
    let (tw, th) = tiles
        .iter()
        .fold((0, 0), |(w, h), t| (w.max(t.width()), h.max(t.height())));
    let gap = 4;
    let mut out = RgbImage::from_pixel(
        cols * tw + (cols - 1) * gap,
        rows * th + (rows - 1) * gap,
        Rgb([40, 40, 40]),
    );
    for (i, t) in tiles.iter().enumerate() {
        let (cx, cy) = ((i as u32 % cols) * (tw + gap), (i as u32 / cols) * (th + gap));
        for (x, y, p) in t.enumerate_pixels() {
            out.put_pixel(cx + x, cy + y, *p);
        }
    }
    out
}

/// A bar chart of each case's mean Dice (over its labels), in the given order: y axis 0..1
/// with grid lines every 0.25, case names written vertically under the bars. Cases without a
/// defined Dice get no bar.
pub fn render_dice_bar_chart(cases: &[(String, Option<f64>)]) -> RgbImage {
    use crate::font::{draw_text, draw_text_vertical, GLYPH};
    let n = cases.len().max(1) as u32;
    let bar = (720 / n).clamp(8, 48);
    let (left, right, top, plot_h) = (56u32, 16u32, 28u32, 300u32);
    let name_chars = cases.iter().map(|(c, _)| c.chars().count()).max().unwrap_or(0).min(24) as u32;
    let bottom = 12 + name_chars * GLYPH;
    let width = left + n * bar + right;
    let height = top + plot_h + bottom;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let black = Rgb([0, 0, 0]);
    draw_text(&mut img, left, 8, "mean Dice per case", black, None, 1);
    for i in 0..=4 {
        let y = top + plot_h - plot_h * i / 4;
        for x in left..left + n * bar {
            img.put_pixel(x, y, if i == 0 { black } else { Rgb([210, 210, 210]) });
        }
        draw_text(
            &mut img,
            8,
            y.saturating_sub(4),
            &format!("{:.2}", i as f64 / 4.0),
            black,
            None,
            1,
        );
    }
    for y in top..=top + plot_h {
        img.put_pixel(left, y, black);
    }
    for (i, (name, dice)) in cases.iter().enumerate() {
        let x0 = left + i as u32 * bar;
        if let Some(d) = dice {
            let h = (d.clamp(0.0, 1.0) * plot_h as f64).round() as u32;
            let pad = if bar >= 8 { bar / 8 } else { 0 };
            for x in x0 + pad + 1..x0 + bar - pad {
                for y in top + plot_h - h..top + plot_h {
                    img.put_pixel(x, y, Rgb([52, 101, 164]));
                }
            }
        }
        let label: String = name.chars().take(24).collect();
        let cx = x0 + bar / 2 - GLYPH.min(bar) / 2;
        draw_text_vertical(&mut img, cx, top + plot_h + 6, &label, black);
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};

    #[test]
    fn contours_have_the_documented_colours() {
        let mut gt = Array2::<u16>::zeros((20, 20));
        let mut pred = Array2::<u16>::zeros((20, 20));
        gt.slice_mut(ndarray::s![5..15, 5..15]).fill(1);
        pred.slice_mut(ndarray::s![5..15, 8..18]).fill(1);
        let opts = OverlayOptions {
            slice: SliceChoice::MostForeground,
            min_size: 20,
        };
        let img = render_overlay(
            gt.view().into_dyn(),
            pred.view().into_dyn(),
            None,
            Orientation::RowCol,
            &opts,
        )
        .unwrap();
        let top = legend_height(20);
        assert_eq!((img.width(), img.height()), (20, 20 + top));
        // Left edge of gt only, right edge of pred only, shared top edge inside both.
        assert_eq!(*img.get_pixel(5, top + 10), GT_COLOUR);
        assert_eq!(*img.get_pixel(17, top + 10), PRED_COLOUR);
        assert_eq!(*img.get_pixel(10, top + 5), BOTH_COLOUR);
        // Interior of gt is grey (labels rendering), background is black.
        let inside = img.get_pixel(7, top + 10);
        assert!(inside[0] == inside[1] && inside[0] > 0);
        assert_eq!(*img.get_pixel(1, top + 19), Rgb([0, 0, 0]));
    }

    #[test]
    fn volume_slice_choice_and_nifti_orientation() {
        let mut gt = Array3::<u16>::zeros((12, 10, 6));
        gt.slice_mut(ndarray::s![2..4, 7..9, 1]).fill(1);
        gt.slice_mut(ndarray::s![2..8, 1..6, 4]).fill(2);
        let pred = gt.clone();
        let g = gt.view().into_dyn();
        assert_eq!(
            choose_slices(&g, &pred.view().into_dyn(), SliceChoice::MostForeground).unwrap(),
            vec![4]
        );
        assert_eq!(
            choose_slices(&g, &pred.view().into_dyn(), SliceChoice::Montage(5)).unwrap(),
            vec![1, 4]
        );
        assert!(choose_slices(&g, &pred.view().into_dyn(), SliceChoice::Index(6)).is_err());
        let opts = OverlayOptions {
            slice: SliceChoice::Index(1),
            min_size: 10,
        };
        let img = render_overlay(g, pred.view().into_dyn(), None, Orientation::NiftiXyz, &opts).unwrap();
        // x is the column, y goes up: voxel (x=2, y=7) sits at column 2, row 10-1-7 = 2.
        let top = legend_height(12);
        assert_eq!((img.width(), img.height()), (12, 10 + top));
        assert_eq!(*img.get_pixel(2, top + 2), BOTH_COLOUR);
    }

    #[test]
    fn image_background_and_shape_checks() {
        let gt = Array2::<u16>::zeros((8, 8));
        let mut image = Array2::<f32>::zeros((8, 8));
        image[[3, 3]] = 1000.0;
        let opts = OverlayOptions {
            slice: SliceChoice::MostForeground,
            min_size: 8,
        };
        let img = render_overlay(
            gt.view().into_dyn(),
            gt.view().into_dyn(),
            Some(image.view().into_dyn()),
            Orientation::RowCol,
            &opts,
        )
        .unwrap();
        let top = legend_height(8);
        assert_eq!(*img.get_pixel(3, top + 3), Rgb([255, 255, 255]));
        assert_eq!(*img.get_pixel(6, top + 6), Rgb([0, 0, 0]));
        let other = Array2::<u16>::zeros((8, 9));
        assert!(render_overlay(
            gt.view().into_dyn(),
            other.view().into_dyn(),
            None,
            Orientation::RowCol,
            &opts
        )
        .is_err());
    }

    #[test]
    fn bar_chart_bar_heights_follow_dice() {
        let img = render_dice_bar_chart(&[("a".into(), Some(1.0)), ("b".into(), Some(0.5)), ("c".into(), None)]);
        let bar = (720 / 3u32).clamp(8, 48);
        let bar_top = |i: u32| {
            let x = 56 + i * bar + bar / 2;
            (28..=328).find(|&y| *img.get_pixel(x, y) == Rgb([52, 101, 164]))
        };
        assert_eq!(bar_top(0), Some(28));
        assert_eq!(bar_top(1), Some(28 + 150));
        assert_eq!(bar_top(2), None);
    }
}
