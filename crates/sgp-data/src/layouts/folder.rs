//! A generic "images + masks" folder pair.
//!
//! ```text
//! <root>/images/<name>.{png,jpg,bmp,tif,nii,nii.gz}
//! <root>/masks/<name>[_mask|_gt|_label|_seg].{png,bmp,tif,nii,nii.gz}
//! ```
//! (`imgs/`, `image/` and `labels/`, `mask/`, `gt/`, `annotations/` are accepted too.) Masks
//! hold label integers; 0/255 binary masks read as 0/1. The label set is not declared, so any
//! value is accepted (`open` definition). Each image counts as its own patient.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{files, find_root};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::io::{file_kind, file_stem, FileKind};
use crate::labels::{LabelCoding, LabelDefinition};

const IMAGE_DIRS: [&str; 4] = ["images", "imgs", "image", "Images"];
const MASK_DIRS: [&str; 7] = ["masks", "labels", "mask", "gt", "annotations", "Masks", "Labels"];
const MASK_SUFFIXES: [&str; 6] = ["_mask", "_gt", "_label", "_seg", "_segmentation", "_labels"];

/// Scans a generic images/ + masks/ folder at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let images_dir = find_root(root, &IMAGE_DIRS, |_| true)
        .ok_or_else(|| DataError::layout(root, "no images/ folder (images, imgs or image)"))?;
    let masks_dir = find_root(root, &MASK_DIRS, |_| true)
        .ok_or_else(|| DataError::layout(root, "no masks/ folder (masks, labels, mask, gt or annotations)"))?;
    let mut labels = LabelDefinition::new(&[(1, "foreground")], LabelCoding::Integer);
    labels.open = true;
    let mut ds = Dataset {
        kind: DatasetKind::Folder,
        root: root.to_path_buf(),
        name: super::name_of(root),
        labels,
        cases: Vec::new(),
        issues: Vec::new(),
    };
    let mut masks: BTreeMap<String, PathBuf> = BTreeMap::new();
    for m in files(&masks_dir)?.into_iter().filter(|p| file_kind(p).is_some()) {
        let mut stem = file_stem(&m);
        for s in MASK_SUFFIXES {
            if let Some(base) = stem.strip_suffix(s) {
                stem = base.to_string();
                break;
            }
        }
        if file_kind(&m) == Some(FileKind::Raster) && m.to_string_lossy().to_ascii_lowercase().ends_with(".jpg") {
            ds.issue(&m, "JPEG mask: lossy compression alters label values", false);
        }
        if let Some(prev) = masks.insert(stem.clone(), m.clone()) {
            ds.issue(&m, format!("two masks for {stem:?} (also {})", prev.display()), true);
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for image in files(&images_dir)?.into_iter().filter(|p| file_kind(p).is_some()) {
        let stem = file_stem(&image);
        let Some(mask) = masks.get(&stem) else {
            ds.issue(&image, "image without a mask", true);
            continue;
        };
        used.insert(stem.clone());
        let modality = match file_kind(&image) {
            Some(FileKind::Raster) => Modality::Photo,
            _ => Modality::Other(String::new()),
        };
        ds.cases.push(Case {
            id: stem.clone(),
            patient: stem,
            images: vec![image],
            labels: vec![LabelSource::Map(mask.clone())],
            modality,
            meta: BTreeMap::new(),
        });
    }
    for (stem, m) in &masks {
        if !used.contains(stem) {
            ds.issue(m, "mask without its image", true);
        }
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
