//! REFUGE (Retinal Fundus Glaucoma Challenge) optic disc / cup masks.
//!
//! The releases differ in folder names (`Training400/{Glaucoma,Non-Glaucoma}/g0001.jpg` with
//! `Annotation-Training400/Disc_Cup_Masks/{Glaucoma,Non-Glaucoma}/g0001.bmp`;
//! `REFUGE-Validation400/V0001.jpg` with `REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp`;
//! REFUGE2's `Train/Images/*.jpg` with `Train/Masks/*.bmp`), so the loader walks `--root`:
//! files under a folder whose name says mask/annotation/GT are masks, the others images, and
//! they pair by file stem.
//!
//! Mask convention of the released files: grey 0 = optic cup, 128 = disc rim (disc outside the
//! cup), 255 = background. Our label map (disjoint classes): **0 background, 1 disc rim,
//! 2 cup**. The whole optic disc, as scored by the challenge, is `label >= 1` (rim plus cup).
//! Grey levels within 30 of a level are accepted (resized copies are interpolated).
//!
//! An image without a mask is an error, unless `ScanOptions::allow_unlabelled`
//! (`data verify --allow-unlabelled`) is given: the test images were first released without
//! masks, and then they load as unlabelled cases.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{name_of, walk};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::io::{file_kind, file_stem, FileKind};
use crate::labels::{LabelCoding, LabelDefinition};

/// REFUGE's labels (see the module docs for the grey-level convention).
pub fn labels() -> LabelDefinition {
    LabelDefinition::new(
        &[(0, "background"), (1, "optic disc rim"), (2, "optic cup")],
        LabelCoding::GreyLevels {
            levels: vec![(255, 0), (128, 1), (0, 2)],
            tolerance: 30,
        },
    )
}

/// Whether a folder name marks annotation files.
pub(crate) fn is_mask_folder(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.contains("mask")
        || l.contains("annotation")
        || l == "gt"
        || l.ends_with("-gt")
        || l.ends_with("_gt")
        || l.contains("groundtruth")
        || l.contains("ground_truth")
        || l == "labels"
}

/// Scans REFUGE at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut ds = Dataset {
        kind: DatasetKind::Refuge,
        root: root.to_path_buf(),
        name: "REFUGE".into(),
        labels: labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    for f in walk(root, 6)? {
        if file_kind(&f) != Some(FileKind::Raster) {
            continue;
        }
        let rel = f.strip_prefix(root).unwrap_or(&f);
        let in_mask_folder = rel
            .parent()
            .map(|p| p.components().any(|c| is_mask_folder(&c.as_os_str().to_string_lossy())))
            .unwrap_or(false);
        let key = file_stem(&f).to_ascii_lowercase();
        let target = if in_mask_folder { &mut masks } else { &mut images };
        if let Some(prev) = target.insert(key.clone(), f.clone()) {
            ds.issue(
                &f,
                format!("duplicate file stem {key:?} (also {})", prev.display()),
                true,
            );
        }
    }
    if images.is_empty() && masks.is_empty() {
        return Err(DataError::layout(root, "no fundus images (.jpg/.png/.bmp) found"));
    }
    for (key, m) in &masks {
        if !images.contains_key(key) {
            ds.issue(m, "mask without its image", true);
        }
    }
    for (key, image) in images {
        let split = image
            .strip_prefix(root)
            .ok()
            .and_then(|r| r.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .filter(|s| !s.contains('.'))
            .unwrap_or_default();
        let mut meta = BTreeMap::new();
        meta.insert("split".to_string(), split);
        if let Some(parent) = image.parent() {
            let p = name_of(parent);
            if p.eq_ignore_ascii_case("glaucoma") || p.eq_ignore_ascii_case("non-glaucoma") {
                meta.insert("class".to_string(), p);
            }
        }
        let labels = match masks.get(&key) {
            Some(m) => vec![LabelSource::Map(m.clone())],
            None => {
                ds.missing_label(&image, "image without a disc/cup mask");
                Vec::new()
            }
        };
        let stem = file_stem(&image);
        ds.cases.push(Case {
            id: stem.clone(),
            patient: stem,
            images: vec![image],
            labels,
            modality: Modality::Photo,
            meta,
        });
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
