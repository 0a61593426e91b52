//! WBC Image Dataset (white blood cells; Zheng et al. 2018).
//!
//! ```text
//! <download>/                 <- accepted as --root (or one of the "Dataset N" folders)
//!   Dataset 1/001.bmp         (image)   Dataset 1/001.png   (mask)
//!   Dataset 2/001.bmp                   Dataset 2/001.png
//! ```
//! Masks code classes by grey level: 0 background, 128 cytoplasm, 255 nucleus; labels
//! 0 background, **1 cytoplasm, 2 nucleus** (grey levels within 30 of a level accepted).
//! Case ids are `d1_001`, `d2_001`; each image counts as its own patient.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{files, name_of, subdirs};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::io::file_stem;
use crate::labels::{LabelCoding, LabelDefinition};

/// WBC's labels.
pub fn labels() -> LabelDefinition {
    LabelDefinition::new(
        &[(0, "background"), (1, "cytoplasm"), (2, "nucleus")],
        LabelCoding::GreyLevels {
            levels: vec![(0, 0), (128, 1), (255, 2)],
            tolerance: 30,
        },
    )
}

/// `Dataset 1` -> `Some(1)`.
fn dataset_number(p: &Path) -> Option<u32> {
    let n = name_of(p);
    n.strip_prefix("Dataset").map(str::trim).and_then(|s| s.parse().ok())
}

/// Scans the WBC dataset at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let folders: Vec<(u32, PathBuf)> = if let Some(n) = dataset_number(root) {
        vec![(n, root.to_path_buf())]
    } else {
        let mut found: Vec<(u32, PathBuf)> = subdirs(root)?
            .into_iter()
            .filter_map(|d| dataset_number(&d).map(|n| (n, d)))
            .collect();
        if found.is_empty() {
            for sub in subdirs(root)? {
                found.extend(
                    subdirs(&sub)?
                        .into_iter()
                        .filter_map(|d| dataset_number(&d).map(|n| (n, d))),
                );
            }
        }
        found
    };
    if folders.is_empty() {
        return Err(DataError::layout(
            root,
            "no WBC folders (\"Dataset 1/\", \"Dataset 2/\") here or one level below",
        ));
    }
    let mut ds = Dataset {
        kind: DatasetKind::Wbc,
        root: root.to_path_buf(),
        name: "WBC".into(),
        labels: labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    for (n, dir) in folders {
        let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
        for f in files(&dir)? {
            let lower = name_of(&f).to_ascii_lowercase();
            if lower.ends_with(".bmp") || lower.ends_with(".jpg") {
                images.insert(file_stem(&f), f);
            } else if lower.ends_with(".png") {
                masks.insert(file_stem(&f), f);
            }
        }
        if images.is_empty() && masks.is_empty() {
            ds.empty_folder(&dir, "NNN.bmp images with their NNN.png masks");
            continue;
        }
        for (stem, m) in &masks {
            if !images.contains_key(stem) {
                ds.issue(m, "mask without its image", true);
            }
        }
        for (stem, image) in images {
            let Some(mask) = masks.get(&stem) else {
                ds.issue(&image, "image without its .png mask", true);
                continue;
            };
            let id = format!("d{n}_{stem}");
            let mut meta = BTreeMap::new();
            meta.insert("subset".to_string(), format!("Dataset {n}"));
            ds.cases.push(Case {
                id: id.clone(),
                patient: id,
                images: vec![image],
                labels: vec![LabelSource::Map(mask.clone())],
                modality: Modality::Photo,
                meta,
            });
        }
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
