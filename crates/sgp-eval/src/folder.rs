//! Evaluate a folder of predictions against a folder of ground-truth label maps, like
//! `nnUNetv2_evaluate_folder`.
//!
//! * Files (NIfTI `.nii`/`.nii.gz`, PNG and the other rasters `sgp-data` reads) are paired by
//!   case name: the file name without its image extension (`case_01.nii.gz` → `case_01`).
//!   Files on one side only are listed in the report and not evaluated.
//! * Spacing comes from the ground truth (NIfTI pixdim per array axis; 1 for rasters).
//! * Axes of length 1 are dropped (while more than two axes remain), so 2D data stored as
//!   `(x, y, 1)` NIfTI is evaluated as 2D rather than as a one-slice volume that is all surface.
//! * Labels default to every non-zero label found in any ground-truth file.
//! * Images for the overlays come from `image_dir`, or else from the ground truth folder's
//!   sibling with `labels` replaced by `images` (`labelsTr` → `imagesTr`); a case's image is
//!   `<case>.<ext>` or nnU-Net's `<case>_0000.<ext>`.
//! * Outputs in `out_dir`, each written atomically: `metrics.csv`, `summary.json`,
//!   `summary.md`, `overlays/<case>.png` and, optionally, `dice_per_case.png`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use ndarray::{ArrayD, Axis};
use rayon::prelude::*;

use crate::error::{EvalError, Result};
use crate::metrics::{evaluate_labels, present_labels, LabelMetrics, MetricOptions};
use crate::overlay::{render_dice_bar_chart, render_overlay, Orientation, OverlayOptions};
use crate::report::{write_atomic, CaseMetrics, Report, Unmatched};

/// Options of [`evaluate_folder`].
#[derive(Debug, Clone)]
pub struct FolderOptions {
    /// Labels to evaluate; `None`: every non-zero label found in the ground truth.
    pub labels: Option<Vec<u16>>,
    /// Spacing use, HD percentile and NSD tolerance.
    pub metrics: MetricOptions,
    /// Where the images for the overlays are; `None`: look next to the ground truth.
    pub image_dir: Option<PathBuf>,
    /// Write `overlays/<case>.png`.
    pub overlays: bool,
    /// How the overlays look.
    pub overlay: OverlayOptions,
    /// Write `dice_per_case.png`.
    pub bar_chart: bool,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions {
            labels: None,
            metrics: MetricOptions::default(),
            image_dir: None,
            overlays: true,
            overlay: OverlayOptions::default(),
            bar_chart: false,
        }
    }
}

/// What [`evaluate_folder`] did.
#[derive(Debug, Clone)]
pub struct FolderOutcome {
    /// The metrics, as written to `summary.json`.
    pub report: Report,
    /// Every file written, in `out_dir`.
    pub written: Vec<PathBuf>,
    /// The image folder the overlays used, if any.
    pub image_dir: Option<PathBuf>,
}

/// The case name of a file: its name without the image extension; `None` for files that are
/// not images or labels (`dataset.json`, hidden files).
pub fn case_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    if name.starts_with('.') || sgp_data::file_kind(path).is_none() {
        return None;
    }
    Some(sgp_data::file_stem(path))
}

/// The image and label files of a folder by case name.
pub fn list_cases(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| EvalError::io(dir, e))?;
    let mut cases = BTreeMap::new();
    for entry in entries {
        let path = entry.map_err(|e| EvalError::io(dir, e))?.path();
        if !path.is_file() {
            continue;
        }
        let Some(case) = case_name(&path) else {
            continue;
        };
        if let Some(first) = cases.insert(case.clone(), path.clone()) {
            return Err(EvalError::DuplicateCase {
                case,
                dir: dir.to_path_buf(),
                first: first.display().to_string(),
                second: path.display().to_string(),
            });
        }
    }
    Ok(cases)
}

/// Evaluate every case present in both folders and write the reports into `out_dir`.
/// `progress`, when given, is set to the number of cases and advanced per case.
pub fn evaluate_folder(
    pred_dir: &Path,
    gt_dir: &Path,
    out_dir: &Path,
    options: &FolderOptions,
    progress: Option<&ProgressBar>,
) -> Result<FolderOutcome> {
    let _span = tracing::info_span!("evaluate_folder", pred = %pred_dir.display(), gt = %gt_dir.display()).entered();
    if let Some(labels) = &options.labels {
        if labels.is_empty() {
            return Err(EvalError::InvalidArgument("the label list is empty".into()));
        }
    }
    let preds = list_cases(pred_dir)?;
    let gts = list_cases(gt_dir)?;
    let unmatched = Unmatched {
        pred_only: preds.keys().filter(|c| !gts.contains_key(*c)).cloned().collect(),
        gt_only: gts.keys().filter(|c| !preds.contains_key(*c)).cloned().collect(),
    };
    for c in &unmatched.pred_only {
        tracing::warn!(case = %c, "prediction without ground truth: not evaluated");
    }
    for c in &unmatched.gt_only {
        tracing::warn!(case = %c, "ground truth without prediction: not evaluated");
    }
    let pairs: Vec<(&String, &PathBuf, &PathBuf)> = gts
        .iter()
        .filter_map(|(c, g)| preds.get(c).map(|p| (c, p, g)))
        .collect();
    if pairs.is_empty() {
        return Err(EvalError::NoMatchedCases {
            pred: pred_dir.to_path_buf(),
            gt: gt_dir.to_path_buf(),
        });
    }
    let image_dir = match &options.image_dir {
        Some(d) if d.is_dir() => Some(d.clone()),
        Some(d) => {
            return Err(EvalError::io(
                d,
                std::io::Error::new(std::io::ErrorKind::NotFound, "image folder not found"),
            ))
        }
        None if options.overlays => sibling_image_dir(gt_dir),
        None => None,
    };
    let images = match &image_dir {
        Some(d) => list_cases(d)?,
        None => BTreeMap::new(),
    };
    std::fs::create_dir_all(out_dir).map_err(|e| EvalError::io(out_dir, e))?;
    let overlay_dir = out_dir.join("overlays");
    if options.overlays {
        std::fs::create_dir_all(&overlay_dir).map_err(|e| EvalError::io(&overlay_dir, e))?;
    }
    if let Some(pb) = progress {
        pb.set_length(pairs.len() as u64);
    }

    let results: Vec<(CaseMetrics, Vec<u16>, Option<PathBuf>)> = pairs
        .par_iter()
        .map(|&(case, pred_path, gt_path)| {
            let image = images.get(case).or_else(|| images.get(&format!("{case}_0000")));
            let r = evaluate_case(
                case,
                pred_path,
                gt_path,
                image.map(|p| p.as_path()),
                &overlay_dir,
                options,
            )
            .map_err(|e| e.in_case(case));
            if let Some(pb) = progress {
                pb.inc(1);
            }
            r
        })
        .collect::<Result<_>>()?;

    let labels: Vec<u16> = match &options.labels {
        Some(l) => l.clone(),
        None => results
            .iter()
            .flat_map(|(_, present, _)| present.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    if labels.is_empty() {
        tracing::warn!("no label found in the ground truth: nothing to evaluate");
    }
    let mut written: Vec<PathBuf> = Vec::new();
    let cases: Vec<CaseMetrics> = results
        .into_iter()
        .map(|(mut c, _, overlay)| {
            written.extend(overlay);
            c.metrics = labels
                .iter()
                .map(|&l| {
                    c.metrics
                        .iter()
                        .find(|m| m.label == l)
                        .copied()
                        .unwrap_or_else(|| LabelMetrics::absent(l))
                })
                .collect();
            c
        })
        .collect();
    let report = Report::new(cases, &labels, options.metrics.nsd_tolerance_mm, unmatched);

    let mut write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = out_dir.join(name);
        write_atomic(&path, bytes)?;
        written.push(path);
        Ok(())
    };
    write("metrics.csv", report.to_csv().as_bytes())?;
    write("summary.json", report.to_json()?.as_bytes())?;
    write("summary.md", report.to_markdown().as_bytes())?;
    if options.bar_chart {
        let bars: Vec<(String, Option<f64>)> = report.cases.iter().map(|c| (c.case.clone(), c.mean_dice())).collect();
        write(
            "dice_per_case.png",
            &png_bytes(&render_dice_bar_chart(&bars), "dice_per_case.png")?,
        )?;
    }
    Ok(FolderOutcome {
        report,
        written,
        image_dir,
    })
}

/// `.../labelsTr` → `.../imagesTr` (also `labels` → `images`), when that folder exists.
fn sibling_image_dir(gt_dir: &Path) -> Option<PathBuf> {
    let name = gt_dir.file_name()?.to_string_lossy();
    if !name.contains("labels") {
        return None;
    }
    let candidate = gt_dir.with_file_name(name.replacen("labels", "images", 1));
    candidate.is_dir().then_some(candidate)
}

/// Read one pair, compute its metrics (and overlay). Returns the metrics, the labels present
/// in its ground truth, and the overlay written.
fn evaluate_case(
    case: &str,
    pred_path: &Path,
    gt_path: &Path,
    image_path: Option<&Path>,
    overlay_dir: &Path,
    options: &FolderOptions,
) -> Result<(CaseMetrics, Vec<u16>, Option<PathBuf>)> {
    let _span = tracing::debug_span!("case", case).entered();
    let read = |p: &Path| {
        sgp_data::read_labels(p).map_err(|source| EvalError::Data {
            path: p.to_path_buf(),
            source,
        })
    };
    let gt = read(gt_path)?;
    let pred = read(pred_path)?;
    if gt.data.shape() != pred.data.shape() {
        return Err(EvalError::Shape(format!(
            "prediction {:?} ({}) vs ground truth {:?} ({})",
            pred.data.shape(),
            pred_path.display(),
            gt.data.shape(),
            gt_path.display()
        )));
    }
    if gt
        .spacing
        .iter()
        .zip(&pred.spacing)
        .any(|(a, b)| (a - b).abs() > 1e-3 * a.abs().max(b.abs()))
    {
        tracing::warn!(case, gt = ?gt.spacing, pred = ?pred.spacing, "prediction spacing differs; using the ground truth's");
    }
    let (gt_data, spacing) = squeeze(gt.data, &gt.spacing);
    let (pred_data, _) = squeeze(pred.data, &pred.spacing);
    let present = present_labels(gt_data.view());
    let labels: Vec<u16> = match &options.labels {
        Some(l) => l.clone(),
        None => {
            let mut l: BTreeSet<u16> = present.iter().copied().collect();
            l.extend(present_labels(pred_data.view()));
            l.into_iter().collect()
        }
    };
    let metrics = evaluate_labels(pred_data.view(), gt_data.view(), &spacing, &labels, &options.metrics)?;

    let mut overlay_path = None;
    if options.overlays {
        let orientation = match sgp_data::file_kind(gt_path) {
            Some(sgp_data::FileKind::Nifti { .. }) => Orientation::NiftiXyz,
            _ => Orientation::RowCol,
        };
        let image = image_path.and_then(|p| match sgp_data::read_image(p) {
            Ok(v) => {
                let (data, _) = squeeze(v.data, &v.spacing);
                if data.shape() == gt_data.shape() {
                    Some(data)
                } else {
                    tracing::warn!(case, image = %p.display(), "image grid differs from the labels; drawing without it");
                    None
                }
            }
            Err(e) => {
                tracing::warn!(case, image = %p.display(), error = %e, "image unreadable; drawing without it");
                None
            }
        });
        let picture = render_overlay(
            gt_data.view(),
            pred_data.view(),
            image.as_ref().map(|i| i.view()),
            orientation,
            &options.overlay,
        )?;
        let path = overlay_dir.join(format!("{case}.png"));
        write_atomic(&path, &png_bytes(&picture, case)?)?;
        overlay_path = Some(path);
    }
    Ok((
        CaseMetrics {
            case: case.to_string(),
            metrics,
        },
        present,
        overlay_path,
    ))
}

/// Drop axes of length 1 (and their spacing) while more than two axes remain.
fn squeeze<T>(mut data: ArrayD<T>, spacing: &[f64]) -> (ArrayD<T>, Vec<f64>) {
    let mut spacing: Vec<f64> = spacing.to_vec();
    spacing.resize(data.ndim(), 1.0);
    let mut k = data.ndim();
    while k > 0 && data.ndim() > 2 {
        k -= 1;
        if data.shape()[k] == 1 {
            data = data.index_axis_move(Axis(k), 0);
            spacing.remove(k);
        }
    }
    (data, spacing)
}

fn png_bytes(img: &image::RgbImage, what: &str) -> Result<Vec<u8>> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| EvalError::Encode {
            what: format!("{what} (PNG)"),
            message: e.to_string(),
        })?;
    Ok(buf.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_strip_image_extensions() {
        assert_eq!(case_name(Path::new("/a/case_01.nii.gz")).as_deref(), Some("case_01"));
        assert_eq!(case_name(Path::new("x.v2.nii")).as_deref(), Some("x.v2"));
        assert_eq!(case_name(Path::new("img.PNG")).as_deref(), Some("img"));
        assert_eq!(case_name(Path::new("dataset.json")), None);
        assert_eq!(case_name(Path::new(".hidden.png")), None);
    }

    #[test]
    fn squeeze_drops_singleton_axes_but_keeps_two() {
        let (a, s) = squeeze(ArrayD::<u8>::zeros(vec![4, 5, 1]), &[0.5, 0.7, 3.0]);
        assert_eq!((a.shape(), s), (&[4usize, 5][..], vec![0.5, 0.7]));
        let (a, s) = squeeze(ArrayD::<u8>::zeros(vec![1, 1, 6]), &[1.0, 2.0, 3.0]);
        assert_eq!((a.shape(), s), (&[1usize, 6][..], vec![1.0, 3.0]));
        let (a, _) = squeeze(ArrayD::<u8>::zeros(vec![3, 1]), &[1.0, 1.0]);
        assert_eq!(a.shape(), &[3, 1]);
    }
}
