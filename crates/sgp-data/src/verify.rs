//! Dataset integrity check (`cargo xtask data verify`), in the spirit of nnU-Net's
//! `--verify_dataset_integrity`: every case is opened, images and labels are compared, and
//! every problem is collected rather than stopping at the first.

use std::collections::BTreeMap;
use std::fmt;

use rayon::prelude::*;

use crate::dataset::{Case, Dataset};
use crate::io::{self, NiftiGeometry};

/// Relative tolerance on spacing and affine entries when comparing image and label geometry.
const GEOMETRY_TOLERANCE: f64 = 1e-4;

/// Severity of a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing (an empty mask on a "normal" image, an unlabelled test image).
    Warning,
    /// Makes the case, and so the dataset, unusable as is.
    Error,
}

/// One finding about one case or file.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Case id, or a path for layout-level findings.
    pub subject: String,
    /// What is wrong, in words.
    pub message: String,
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VerifyReport {
    /// The layout (`acdc`, `camus`, ...).
    pub kind: String,
    /// The folder the loader settled on.
    pub root: String,
    /// Number of cases found.
    pub cases: usize,
    /// Number of cases with labels.
    pub labelled: usize,
    /// Label value -> number of cases containing it.
    pub label_cases: BTreeMap<u16, usize>,
    /// Label value -> name, from the dataset's definition.
    pub label_names: BTreeMap<u16, String>,
    /// Modality -> number of cases.
    pub modalities: BTreeMap<String, usize>,
    /// Smallest and largest array shapes seen (by number of voxels).
    pub shapes: Vec<Vec<usize>>,
    /// Every problem found, layout-level first, then per case.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// Number of errors.
    pub fn errors(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Error).count()
    }
    /// Number of warnings.
    pub fn warnings(&self) -> usize {
        self.findings.iter().filter(|f| f.severity == Severity::Warning).count()
    }
    /// Usable: at least one labelled case and no errors.
    pub fn is_usable(&self) -> bool {
        self.errors() == 0 && self.labelled > 0
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset {} at {}", self.kind, self.root)?;
        writeln!(f, "  cases: {} ({} labelled)", self.cases, self.labelled)?;
        let m: Vec<String> = self.modalities.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        writeln!(f, "  modalities: {}", m.join(", "))?;
        for (v, n) in &self.label_cases {
            let name = self.label_names.get(v).cloned().unwrap_or_else(|| "?".into());
            writeln!(f, "  label {v} ({name}): present in {n} case(s)")?;
        }
        if let (Some(a), Some(b)) = (self.shapes.first(), self.shapes.last()) {
            writeln!(f, "  shapes: smallest {a:?}, largest {b:?}")?;
        }
        for x in &self.findings {
            let tag = match x.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "warning",
            };
            writeln!(f, "  {tag}: {}: {}", x.subject, x.message)?;
        }
        write!(
            f,
            "  result: {} ({} error(s), {} warning(s))",
            if self.is_usable() { "OK" } else { "UNUSABLE" },
            self.errors(),
            self.warnings()
        )
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= GEOMETRY_TOLERANCE * a.abs().max(b.abs()).max(1.0)
}

fn geometry_mismatch(a: &NiftiGeometry, b: &NiftiGeometry) -> Option<String> {
    let (pa, pb) = (a.pixdim(), b.pixdim());
    if !pa.iter().zip(pb).all(|(x, y)| close(x.abs(), y.abs())) {
        return Some(format!("pixdim {pa:?} vs {pb:?}"));
    }
    let (aa, ab) = (a.affine(), b.affine());
    if !aa.iter().flatten().zip(ab.iter().flatten()).all(|(x, y)| close(*x, *y)) {
        return Some(format!("affine {aa:?} vs {ab:?}"));
    }
    None
}

struct CaseResult {
    findings: Vec<Finding>,
    labels_present: Vec<u16>,
    shape: Option<Vec<usize>>,
}

fn check_case(case: &Case, ds: &Dataset) -> CaseResult {
    let mut findings = Vec::new();
    let mut err = |m: String| {
        findings.push(Finding {
            severity: Severity::Error,
            subject: case.id.clone(),
            message: m,
        })
    };
    let mut out = CaseResult {
        findings: Vec::new(),
        labels_present: Vec::new(),
        shape: None,
    };
    let mut images = Vec::new();
    for p in &case.images {
        match io::read_image(p) {
            Ok(v) => images.push(v),
            Err(e) => err(format!("unreadable image: {e}")),
        }
    }
    if let Some(first) = images.first() {
        out.shape = Some(first.shape().to_vec());
        for (k, other) in images.iter().enumerate().skip(1) {
            if other.shape() != first.shape() {
                err(format!(
                    "channel {k} shape {:?} differs from channel 0 {:?}",
                    other.shape(),
                    first.shape()
                ));
            }
        }
        if first.data.iter().all(|v| !v.is_finite()) || first.data.is_empty() {
            err("image has no finite voxel".into());
        }
    }
    if !case.labels.is_empty() {
        match case.read_labels(&ds.labels) {
            Ok(labels) => {
                if let Some(img) = images.first() {
                    if labels.shape() != img.shape() {
                        err(format!(
                            "label shape {:?} differs from image shape {:?}",
                            labels.shape(),
                            img.shape()
                        ));
                    } else if let (Some(gi), Some(gl)) = (&img.geometry, &labels.geometry) {
                        if let Some(m) = geometry_mismatch(gi, gl) {
                            err(format!("image and label geometry differ: {m}"));
                        }
                    }
                }
                let mut present = vec![false; 65536];
                labels.data.iter().for_each(|&v| present[v as usize] = true);
                out.labels_present = (0..65536usize).filter(|&v| present[v]).map(|v| v as u16).collect();
                if out.labels_present.iter().all(|&v| v == 0) {
                    findings.push(Finding {
                        severity: Severity::Warning,
                        subject: case.id.clone(),
                        message: "empty mask (no foreground)".into(),
                    });
                }
            }
            Err(e) => findings.push(Finding {
                severity: Severity::Error,
                subject: case.id.clone(),
                message: e.to_string(),
            }),
        }
    }
    out.findings = findings;
    out
}

/// Open every case of `ds` (in parallel) and report problems. `on_case` is called once per
/// case checked (progress bars).
pub fn verify(ds: &Dataset, on_case: &(dyn Fn(&Case) + Sync)) -> VerifyReport {
    let _span = tracing::info_span!("verify", kind = ds.kind.name(), cases = ds.cases.len()).entered();
    let results: Vec<CaseResult> = ds
        .cases
        .par_iter()
        .map(|c| {
            let r = check_case(c, ds);
            on_case(c);
            r
        })
        .collect();
    let mut report = VerifyReport {
        kind: ds.kind.to_string(),
        root: ds.root.display().to_string(),
        cases: ds.cases.len(),
        labelled: ds.labelled().count(),
        label_names: ds.labels.names.clone(),
        ..VerifyReport::default()
    };
    for issue in &ds.issues {
        report.findings.push(Finding {
            severity: if issue.fatal {
                Severity::Error
            } else {
                Severity::Warning
            },
            subject: issue.path.display().to_string(),
            message: issue.message.clone(),
        });
    }
    let mut shapes: Vec<Vec<usize>> = Vec::new();
    for (case, r) in ds.cases.iter().zip(results) {
        *report.modalities.entry(case.modality.to_string()).or_default() += 1;
        for v in r.labels_present {
            *report.label_cases.entry(v).or_default() += 1;
        }
        if let Some(s) = r.shape {
            shapes.push(s);
        }
        report.findings.extend(r.findings);
    }
    shapes.sort_by_key(|s| s.iter().product::<usize>());
    if let (Some(a), Some(b)) = (shapes.first(), shapes.last()) {
        report.shapes = vec![a.clone(), b.clone()];
    }
    let all_empty = report.labelled > 0 && report.label_cases.keys().all(|&v| v == 0);
    if all_empty {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: report.root.clone(),
            message: "every mask is empty".into(),
        });
    }
    if report.labelled == 0 {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: report.root.clone(),
            message: "no labelled case".into(),
        });
    }
    report
}
