//! Per-case tables, per-class aggregation and the report files (CSV, JSON, Markdown).
//!
//! Aggregation: for each label and metric, the mean and the **population** standard deviation
//! (numpy's default `ddof = 0`, i.e. divided by n) over the cases where the value is defined.
//! Undefined values (see [`crate::metrics`]: a label absent from the ground truth has no Dice,
//! a missing prediction has no HD95) are left out of both, and each statistic carries its `n`
//! so that a left-out case stays visible. "Mean over classes" is the unweighted mean of the
//! per-class means (nnU-Net's `foreground_mean`).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::{LabelMetrics, HD_PERCENTILE};

/// What the `std` fields mean, written into `summary.json`.
pub const STD_DEFINITION: &str = "population standard deviation (ddof = 0) over the cases where the value is defined";

/// The metrics of every evaluated label of one case.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMetrics {
    /// The case name (file name without extension).
    pub case: String,
    /// One entry per evaluated label.
    pub metrics: Vec<LabelMetrics>,
}

impl CaseMetrics {
    /// Mean Dice over the labels where it is defined.
    pub fn mean_dice(&self) -> Option<f64> {
        mean(self.metrics.iter().filter_map(|m| m.dice))
    }
}

/// Mean and population std of one metric over the cases where it is defined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Mean over the cases where the value is defined.
    pub mean: Option<f64>,
    /// Population standard deviation ([`STD_DEFINITION`]).
    pub std: Option<f64>,
    /// Cases that contributed.
    pub n: usize,
}

impl Stat {
    /// The statistic of `values` (`None`s when empty).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Stat {
        let v: Vec<f64> = values.into_iter().collect();
        let n = v.len();
        match mean(v.iter().copied()) {
            None => Stat {
                mean: None,
                std: None,
                n,
            },
            Some(m) => {
                let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n as f64;
                Stat {
                    mean: Some(m),
                    std: Some(var.sqrt()),
                    n,
                }
            }
        }
    }
}

/// Aggregates of one label over all cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// The label value.
    pub label: u16,
    /// Cases whose ground truth contains the label.
    pub cases_with_label: usize,
    /// Dice over the cases.
    pub dice: Stat,
    /// IoU over the cases.
    pub iou: Stat,
    /// HD95 over the cases, mm.
    pub hd95: Stat,
    /// NSD over the cases.
    pub nsd: Stat,
}

/// Unweighted mean of the per-class means.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanOverClasses {
    /// Mean of the classes' mean Dice.
    pub dice: Option<f64>,
    /// Mean of the classes' mean IoU.
    pub iou: Option<f64>,
    /// Mean of the classes' mean HD95, mm.
    pub hd95: Option<f64>,
    /// Mean of the classes' mean NSD.
    pub nsd: Option<f64>,
}

/// Files present on one side only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Unmatched {
    /// Prediction cases without ground truth (not evaluated).
    pub pred_only: Vec<String>,
    /// Ground-truth cases without prediction (not evaluated).
    pub gt_only: Vec<String>,
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// NSD tolerance used, mm.
    pub nsd_tolerance_mm: f64,
    /// Hausdorff percentile used (95).
    pub hd_percentile: f64,
    /// What `std` means ([`STD_DEFINITION`]).
    pub std: String,
    /// The evaluated labels.
    pub labels: Vec<u16>,
    /// Number of evaluated cases.
    pub n_cases: usize,
    /// Aggregates per label.
    pub per_class: Vec<ClassSummary>,
    /// Unweighted means over the labels.
    pub mean_over_classes: MeanOverClasses,
    /// Cases on one side only.
    pub unmatched: Unmatched,
    /// Every case's metrics.
    pub cases: Vec<CaseMetrics>,
}

impl Report {
    /// Aggregate per-case metrics. Every case should hold a row for each of `labels`; a missing
    /// row is treated as a label absent from both masks.
    pub fn new(cases: Vec<CaseMetrics>, labels: &[u16], nsd_tolerance_mm: f64, unmatched: Unmatched) -> Report {
        let per_class: Vec<ClassSummary> = labels
            .iter()
            .map(|&label| {
                let rows: Vec<&LabelMetrics> = cases
                    .iter()
                    .filter_map(|c| c.metrics.iter().find(|m| m.label == label))
                    .collect();
                ClassSummary {
                    label,
                    cases_with_label: rows.iter().filter(|m| m.gt_voxels > 0).count(),
                    dice: Stat::of(rows.iter().filter_map(|m| m.dice)),
                    iou: Stat::of(rows.iter().filter_map(|m| m.iou)),
                    hd95: Stat::of(rows.iter().filter_map(|m| m.hd95)),
                    nsd: Stat::of(rows.iter().filter_map(|m| m.nsd)),
                }
            })
            .collect();
        let over = |f: fn(&ClassSummary) -> Option<f64>| mean(per_class.iter().filter_map(f));
        let mean_over_classes = MeanOverClasses {
            dice: over(|c| c.dice.mean),
            iou: over(|c| c.iou.mean),
            hd95: over(|c| c.hd95.mean),
            nsd: over(|c| c.nsd.mean),
        };
        Report {
            nsd_tolerance_mm,
            hd_percentile: HD_PERCENTILE,
            std: STD_DEFINITION.to_string(),
            labels: labels.to_vec(),
            n_cases: cases.len(),
            per_class,
            mean_over_classes,
            unmatched,
            cases,
        }
    }

    /// `summary.json`: every number at full precision (shortest round-trip form), `null` for
    /// undefined values.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map(|s| s + "\n")
            .map_err(|e| EvalError::Encode {
                what: "summary.json".into(),
                message: e.to_string(),
            })
    }

    /// `metrics.csv`: `case,label,dice,iou,hd95,nsd`, one row per case and label, empty fields
    /// where undefined, full precision.
    pub fn to_csv(&self) -> String {
        metrics_csv(&self.cases)
    }

    /// The Markdown summary table (per class mean ± std, then the mean over classes).
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let tol = fmt_tolerance(self.nsd_tolerance_mm);
        let _ = writeln!(md, "| label | cases | Dice | IoU | HD95 (mm) | NSD@{tol}mm |");
        let _ = writeln!(md, "|---:|---:|---|---|---|---|");
        for c in &self.per_class {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                c.label,
                c.cases_with_label,
                fmt_stat(&c.dice, 4, self.n_cases),
                fmt_stat(&c.iou, 4, self.n_cases),
                fmt_stat(&c.hd95, 2, self.n_cases),
                fmt_stat(&c.nsd, 4, self.n_cases),
            );
        }
        let m = &self.mean_over_classes;
        let opt = |v: Option<f64>, d| v.map_or("–".to_string(), |x| fmt_num(x, d));
        let _ = writeln!(
            md,
            "| **mean** | | {} | {} | {} | {} |",
            opt(m.dice, 4),
            opt(m.iou, 4),
            opt(m.hd95, 2),
            opt(m.nsd, 4)
        );
        let _ = writeln!(
            md,
            "\n{} cases; mean ± population std over the cases where a value is defined \
             (n shown when fewer than all cases); HD95 is undefined when either mask is empty.",
            self.n_cases
        );
        if !self.unmatched.pred_only.is_empty() || !self.unmatched.gt_only.is_empty() {
            let _ = writeln!(
                md,
                "Unmatched: {} prediction(s) without ground truth, {} ground truth(s) without prediction.",
                self.unmatched.pred_only.len(),
                self.unmatched.gt_only.len()
            );
        }
        md
    }
}

/// The per-case CSV table; see [`Report::to_csv`].
pub fn metrics_csv(cases: &[CaseMetrics]) -> String {
    let mut csv = String::from("case,label,dice,iou,hd95,nsd\n");
    let field = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for c in cases {
        for m in &c.metrics {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{}",
                csv_escape(&c.case),
                m.label,
                field(m.dice),
                field(m.iou),
                field(m.hd95),
                field(m.nsd)
            );
        }
    }
    csv
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn fmt_num(x: f64, decimals: usize) -> String {
    format!("{x:.decimals$}")
}

/// Tolerances read better without trailing zeros (1mm, 2.5mm).
fn fmt_tolerance(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_stat(s: &Stat, decimals: usize, n_cases: usize) -> String {
    match (s.mean, s.std) {
        (Some(m), Some(sd)) => {
            let base = format!("{m:.decimals$} ± {sd:.decimals$}");
            if s.n < n_cases {
                format!("{base} (n={})", s.n)
            } else {
                base
            }
        }
        _ => "–".to_string(),
    }
}

fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Write a file atomically: a temporary file in the same folder, then a rename, so that a
/// reader never sees a half-written report.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| EvalError::io(dir, e))?;
    }
    sgp_data::write_atomic(path, bytes).map_err(|source| EvalError::Data {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: u16, dice: Option<f64>, hd95: Option<f64>, gt: u64) -> LabelMetrics {
        LabelMetrics {
            label,
            dice,
            iou: dice,
            hd95,
            nsd: dice,
            gt_voxels: gt,
            pred_voxels: 1,
        }
    }

    #[test]
    fn population_std_and_undefined_values() {
        let cases = vec![
            CaseMetrics {
                case: "a".into(),
                metrics: vec![row(1, Some(1.0), Some(2.0), 5), row(2, None, None, 0)],
            },
            CaseMetrics {
                case: "b,c".into(),
                metrics: vec![row(1, Some(0.5), None, 5), row(2, Some(0.25), Some(4.0), 3)],
            },
        ];
        let r = Report::new(cases, &[1, 2], 2.0, Unmatched::default());
        let c1 = &r.per_class[0];
        assert_eq!(
            c1.dice,
            Stat {
                mean: Some(0.75),
                std: Some(0.25),
                n: 2
            }
        );
        assert_eq!(
            c1.hd95,
            Stat {
                mean: Some(2.0),
                std: Some(0.0),
                n: 1
            }
        );
        assert_eq!(r.per_class[1].dice.n, 1);
        assert_eq!(r.per_class[1].cases_with_label, 1);
        assert_eq!(r.mean_over_classes.dice, Some((0.75 + 0.25) / 2.0));
        let csv = r.to_csv();
        assert_eq!(csv.lines().next(), Some("case,label,dice,iou,hd95,nsd"));
        assert!(csv.contains("\na,2,,,,\n"), "{csv}");
        assert!(csv.contains("\n\"b,c\",1,0.5,0.5,,0.5\n"), "{csv}");
        let md = r.to_markdown();
        assert!(md.contains("| 1 | 2 | 0.7500 ± 0.2500 |"), "{md}");
        assert!(md.contains("2.00 ± 0.00 (n=1)"), "{md}");
        assert!(md.contains("NSD@2mm"), "{md}");
        let back: Report = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn full_precision_in_csv_and_json() {
        let x = 0.123_456_789_012_345_67_f64;
        let cases = vec![CaseMetrics {
            case: "a".into(),
            metrics: vec![row(1, Some(x), Some(x), 1)],
        }];
        let r = Report::new(cases, &[1], 1.0, Unmatched::default());
        let parsed: f64 = r
            .to_csv()
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .nth(2)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(parsed, x);
        let back: Report = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        assert_eq!(back.cases[0].metrics[0].dice, Some(x));
    }

    #[test]
    fn atomic_write_replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path().join("sub")).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        }
    }
}
