//! sgp-eval: segmentation metrics, reports and pictures for SAM2-SGP.
//!
//! * [`metrics`]: Dice, IoU, HD95 and NSD per label, spacing-aware, 2D and 3D, following
//!   MONAI's conventions (documented there) so that numbers compare with MONAI's.
//! * [`report`]: per-case tables and per-class mean ± std, as CSV, JSON and Markdown.
//! * [`overlay`]: contour overlays and a per-case Dice bar chart as PNG.
//! * [`folder`]: evaluate a folder of predictions against a folder of labels
//!   (`cargo xtask eval-folder`).
//!
//! The metric core takes `ndarray` views and a spacing; only [`folder`] reads files.
//!
//! ```rust
//! use ndarray::Array2;
//! use sgp_eval::{evaluate_labels, MetricOptions};
//!
//! // Ground truth: label 1 on the left half of a 4×4 image; the prediction misses one pixel.
//! let gt = Array2::from_shape_fn((4, 4), |(_, c)| u16::from(c < 2)).into_dyn();
//! let mut pred = gt.clone();
//! pred[[0, 0]] = 0;
//! let m = evaluate_labels(pred.view(), gt.view(), &[1.0, 1.0], &[1], &MetricOptions::default())?;
//! assert_eq!(m[0].label, 1);
//! assert!((m[0].dice.unwrap() - 14.0 / 15.0).abs() < 1e-12); // 2·7 / (7 + 8)
//! # Ok::<(), sgp_eval::EvalError>(())
//! ```

#![warn(missing_docs)]

mod edt;
pub mod error;
pub mod folder;
mod font;
pub mod metrics;
pub mod overlay;
pub mod report;

pub use error::{EvalError, Result};
pub use folder::{evaluate_folder, FolderOptions, FolderOutcome};
pub use metrics::{evaluate_labels, evaluate_masks, percentile_linear, present_labels, LabelMetrics, MetricOptions};
pub use overlay::{render_dice_bar_chart, render_overlay, Orientation, OverlayOptions, SliceChoice};
pub use report::{CaseMetrics, ClassSummary, Report, Stat, Unmatched};
