//! CAMUS (Cardiac Acquisitions for Multi-structure Ultrasound Segmentation), NIfTI release.
//!
//! ```text
//! CAMUS_public/                         <- accepted as --root (or database_nifti/ inside it)
//!   database_nifti/patient0001/patient0001_2CH_ED.nii.gz      (+ _gt.nii.gz)
//!   database_nifti/patient0001/patient0001_2CH_ES.nii.gz      (+ _gt.nii.gz)
//!   database_nifti/patient0001/patient0001_4CH_{ED,ES}[_gt].nii.gz
//!   database_nifti/patient0001/patient0001_2CH_half_sequence.nii.gz  (ignored)
//!   database_split/...                                        (ignored)
//! ```
//! One case per patient, view and phase (`patient0001_2CH_ED`); labels 1 LV (endocardium),
//! 2 MYO, 3 LA. The older `.mhd/.raw` release is refused with a clear message.
//!
//! The NIfTI release labels every image, so an image without its `_gt` file and a patient
//! folder without any ED/ES image are errors (no `allow_unlabelled` here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{files, name_of, subdirs};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::labels::{LabelCoding, LabelDefinition};

/// CAMUS's labels.
pub fn labels() -> LabelDefinition {
    LabelDefinition::new(
        &[(0, "background"), (1, "LV"), (2, "MYO"), (3, "LA")],
        LabelCoding::Integer,
    )
}

fn is_patient_dir(p: &Path) -> bool {
    let n = name_of(p);
    n.len() > 7 && n.starts_with("patient") && n[7..].chars().all(|c| c.is_ascii_digit())
}

fn patients_root(root: &Path) -> Option<PathBuf> {
    let has = |p: &Path| subdirs(p).map(|d| d.iter().any(|x| is_patient_dir(x))).unwrap_or(false);
    super::find_root(
        root,
        &[
            "",
            "database_nifti",
            "CAMUS_public/database_nifti",
            "training",
            "database",
        ],
        has,
    )
}

/// Scans CAMUS (NIfTI release) at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let base = patients_root(root).ok_or_else(|| {
        DataError::layout(
            root,
            "no CAMUS patient folders (patientNNNN/) here or in database_nifti/",
        )
    })?;
    let mut ds = Dataset {
        kind: DatasetKind::Camus,
        root: base.clone(),
        name: "CAMUS".into(),
        labels: labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    let mut saw_mhd = false;
    for dir in subdirs(&base)?.into_iter().filter(|d| is_patient_dir(d)) {
        let patient = name_of(&dir);
        let names: Vec<String> = files(&dir)?.iter().map(|p| name_of(p)).collect();
        saw_mhd |= names.iter().any(|n| n.ends_with(".mhd"));
        if names.is_empty() {
            ds.empty_folder(&dir, &format!("{patient}_{{2CH,4CH}}_{{ED,ES}}.nii.gz"));
            continue;
        }
        let cases_before = ds.cases.len();
        for view in ["2CH", "4CH"] {
            for phase in ["ED", "ES"] {
                let stem = format!("{patient}_{view}_{phase}");
                let image: PathBuf = dir.join(format!("{stem}.nii.gz"));
                let gt = dir.join(format!("{stem}_gt.nii.gz"));
                if !image.is_file() {
                    if !names.iter().any(|n| n.starts_with(&stem)) {
                        continue; // a view that was not acquired
                    }
                    ds.issue(
                        &image,
                        "image missing (only other files of this view/phase exist)",
                        true,
                    );
                    continue;
                }
                let labels = if gt.is_file() {
                    vec![LabelSource::Map(gt)]
                } else {
                    ds.issue(&gt, "ground truth missing", true);
                    Vec::new()
                };
                let mut meta = BTreeMap::new();
                meta.insert("view".to_string(), view.to_string());
                meta.insert("phase".to_string(), phase.to_string());
                ds.cases.push(Case {
                    id: stem,
                    patient: patient.clone(),
                    images: vec![image],
                    labels,
                    modality: Modality::Us,
                    meta,
                });
            }
        }
        if ds.cases.len() == cases_before && !names.iter().any(|n| n.ends_with(".mhd")) {
            ds.empty_folder(&dir, &format!("{patient}_{{2CH,4CH}}_{{ED,ES}}.nii.gz"));
        }
    }
    if ds.cases.is_empty() && saw_mhd {
        return Err(DataError::layout(
            &base,
            "this is the .mhd/.raw CAMUS release; only the NIfTI release (database_nifti/) is supported",
        ));
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
