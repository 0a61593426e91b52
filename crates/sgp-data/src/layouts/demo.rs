//! The bundled demo (`datasets/demo/`, see its PROVENANCE.md): an nnU-Net-raw-like folder whose
//! `dataset.json` also lists `cases` with their own modality and patient, because the demo
//! mixes CT and MR scans.
//!
//! ```text
//! datasets/demo/dataset.json   {"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz",
//!                               "cases": [{"id": "lung1", "patient": "lung1", "modality": "CT",
//!                                          "image": "imagesTr/lung1_0000.nii.gz",
//!                                          "label": "labelsTr/lung1.nii.gz"}, ...]}
//! datasets/demo/imagesTr/<id>_0000.nii.gz
//! datasets/demo/labelsTr/<id>.nii.gz
//! ```
//! Without a `cases` list the folder is read as plain nnU-Net raw.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde_json::Value;

use super::nnunet;
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};

/// Where the demo lives, relative to the repository root.
pub const DEFAULT_ROOT: &str = "datasets/demo";

/// Scans the bundled demo dataset at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let base = nnunet::dataset_root(root)?;
    let json_path = base.join("dataset.json");
    let dj = nnunet::read_dataset_json(&json_path)?;
    let Some(list) = dj.raw.get("cases").and_then(Value::as_array) else {
        let mut ds = nnunet::load(&base)?;
        ds.kind = DatasetKind::Demo;
        return Ok(ds);
    };
    let mut ds = Dataset {
        kind: DatasetKind::Demo,
        root: base.clone(),
        name: dj.name.clone(),
        labels: dj.labels.clone(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    for (i, entry) in list.iter().enumerate() {
        let field = |k: &str| entry.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(id), Some(image)) = (field("id"), field("image")) else {
            ds.issue(&json_path, format!("cases[{i}] lacks \"id\" or \"image\""), true);
            continue;
        };
        // Paths stay inside the dataset folder.
        let relative_ok = |p: &str| {
            Path::new(p)
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        };
        if !relative_ok(&image) || field("label").is_some_and(|l| !relative_ok(&l)) {
            ds.issue(
                &json_path,
                format!("cases[{i}]: paths must be relative and stay inside the folder"),
                true,
            );
            continue;
        }
        let image_path = base.join(&image);
        if !image_path.is_file() {
            ds.issue(&image_path, "image listed in dataset.json is missing", true);
            continue;
        }
        let labels = match field("label") {
            Some(l) => {
                let p = base.join(l);
                if !p.is_file() {
                    ds.issue(&p, "label listed in dataset.json is missing", true);
                    continue;
                }
                vec![LabelSource::Map(p)]
            }
            None => Vec::new(),
        };
        let mut meta = BTreeMap::new();
        for k in ["structure", "split"] {
            if let Some(v) = field(k) {
                meta.insert(k.to_string(), v);
            }
        }
        ds.cases.push(Case {
            patient: field("patient").unwrap_or_else(|| id.clone()),
            id,
            images: vec![image_path],
            labels,
            modality: Modality::parse(&field("modality").unwrap_or_default()),
            meta,
        });
    }
    if ds.cases.is_empty() && ds.issues.is_empty() {
        return Err(DataError::layout(&base, "dataset.json lists no cases"));
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
