//! ACDC (Automated Cardiac Diagnosis Challenge, 2017): cine-MRI, end-diastole and end-systole.
//!
//! ```text
//! database/                      <- accepted as --root (or its parent, or training/ or testing/)
//!   training/patient001/Info.cfg                    ED: 1  ES: 12  Group: DCM ...
//!   training/patient001/patient001_frame01.nii.gz   (+ patient001_frame01_gt.nii.gz)
//!   training/patient001/patient001_frame12.nii.gz   (+ _gt)
//!   testing/patient101/...
//! ```
//! One case per patient and phase (`patient001_ED`, `patient001_ES`); labels 1 RV, 2 MYO, 3 LV.
//!
//! A missing ground truth or an empty patient folder is an error. The 2017 release shipped
//! `testing/` without ground truth: there, `ScanOptions::allow_unlabelled`
//! (`data verify --allow-unlabelled`) keeps such cases as unlabelled ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{find_root, name_of, subdirs};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::labels::{LabelCoding, LabelDefinition};

/// ACDC's labels.
pub fn labels() -> LabelDefinition {
    LabelDefinition::new(
        &[(0, "background"), (1, "RV"), (2, "MYO"), (3, "LV")],
        LabelCoding::Integer,
    )
}

fn is_patient_dir(p: &Path) -> bool {
    let n = name_of(p);
    n.len() > 7 && n.starts_with("patient") && n[7..].chars().all(|c| c.is_ascii_digit())
}

fn has_patients(p: &Path) -> bool {
    subdirs(p).map(|d| d.iter().any(|x| is_patient_dir(x))).unwrap_or(false)
}

/// Folders holding `patientNNN/` directories, found from the given root.
fn patient_parents(root: &Path) -> Vec<PathBuf> {
    if has_patients(root) {
        return vec![root.to_path_buf()];
    }
    for base in ["", "database", "ACDC/database", "ACDC"] {
        let b = if base.is_empty() {
            root.to_path_buf()
        } else {
            root.join(base)
        };
        let found: Vec<PathBuf> = ["training", "testing"]
            .iter()
            .map(|s| b.join(s))
            .filter(|p| has_patients(p))
            .collect();
        if !found.is_empty() {
            return found;
        }
    }
    if let Some(p) = find_root(root, &["ACDC/database/training"], has_patients) {
        return vec![p];
    }
    Vec::new()
}

/// Parse `Info.cfg` (`Key: value` lines).
pub fn parse_info(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    Ok(out)
}

/// Scans ACDC at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let parents = patient_parents(root);
    if parents.is_empty() {
        return Err(DataError::layout(
            root,
            "no ACDC patient folders (patientNNN/) here, in training/ or testing/, or in database/{training,testing}",
        ));
    }
    let mut ds = Dataset {
        kind: DatasetKind::Acdc,
        root: if parents.len() == 1 {
            parents[0].clone()
        } else {
            parents[0].parent().unwrap_or(root).to_path_buf()
        },
        name: "ACDC".into(),
        labels: labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    for parent in &parents {
        let split = name_of(parent);
        for dir in subdirs(parent)?.into_iter().filter(|d| is_patient_dir(d)) {
            let patient = name_of(&dir);
            if super::files(&dir)?.is_empty() {
                ds.empty_folder(&dir, "Info.cfg and the ED/ES frames");
                continue;
            }
            let info_path = dir.join("Info.cfg");
            let info = match parse_info(&info_path) {
                Ok(i) => i,
                Err(e) => {
                    ds.issue(&info_path, format!("cannot read Info.cfg: {e}"), true);
                    continue;
                }
            };
            for phase in ["ED", "ES"] {
                let frame: u32 = match info.get(phase).and_then(|v| v.trim().parse().ok()) {
                    Some(f) => f,
                    None => {
                        ds.issue(&info_path, format!("no integer {phase} frame"), true);
                        continue;
                    }
                };
                let image = dir.join(format!("{patient}_frame{frame:02}.nii.gz"));
                let gt = dir.join(format!("{patient}_frame{frame:02}_gt.nii.gz"));
                if !image.is_file() {
                    ds.issue(&image, format!("{phase} frame image missing"), true);
                    continue;
                }
                let mut meta = BTreeMap::new();
                meta.insert("phase".to_string(), phase.to_string());
                meta.insert("frame".to_string(), frame.to_string());
                meta.insert("split".to_string(), split.clone());
                if let Some(g) = info.get("Group") {
                    meta.insert("group".to_string(), g.clone());
                }
                let labels = if gt.is_file() {
                    vec![LabelSource::Map(gt)]
                } else {
                    if split == "testing" {
                        ds.missing_label(&gt, format!("{phase} ground truth missing"));
                    } else {
                        ds.issue(&gt, format!("{phase} ground truth missing"), true);
                    }
                    Vec::new()
                };
                ds.cases.push(Case {
                    id: format!("{patient}_{phase}"),
                    patient: patient.clone(),
                    images: vec![image],
                    labels,
                    modality: Modality::Mr,
                    meta,
                });
            }
        }
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
