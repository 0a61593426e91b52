//! BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020).
//!
//! ```text
//! <download>/                                  <- accepted as --root
//!   Dataset_BUSI_with_GT/benign/benign (1).png
//!   Dataset_BUSI_with_GT/benign/benign (1)_mask.png
//!   Dataset_BUSI_with_GT/benign/benign (4)_mask_1.png     (extra lesion: merged)
//!   Dataset_BUSI_with_GT/{malignant,normal}/...
//! ```
//! Label 1 = lesion (benign or malignant: the class is in `meta["class"]`). Masks are binary
//! PNGs (0/255, thresholded at 127). Normal images have empty masks by design. BUSI has no
//! patient identifiers: each image counts as its own patient (a known limitation of the data).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{files, name_of};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::labels::{LabelCoding, LabelDefinition};

const CLASSES: [&str; 3] = ["benign", "malignant", "normal"];

/// BUSI's labels.
pub fn labels() -> LabelDefinition {
    LabelDefinition::new(
        &[(0, "background"), (1, "lesion")],
        LabelCoding::Binary { threshold: 127 },
    )
}

fn busi_root(root: &Path) -> Option<PathBuf> {
    super::find_root(
        root,
        &["", "Dataset_BUSI_with_GT", "Dataset_BUSI/Dataset_BUSI_with_GT"],
        |p| CLASSES.iter().any(|c| p.join(c).is_dir()),
    )
}

/// `benign (4)_mask_1.png` -> `Some(("benign (4)", 1))`, `benign (4)_mask.png` -> `(…, 0)`.
fn parse_mask_name(stem: &str) -> Option<(String, u32)> {
    let idx = stem.rfind("_mask")?;
    let (base, rest) = stem.split_at(idx);
    let rest = &rest["_mask".len()..];
    if rest.is_empty() {
        Some((base.to_string(), 0))
    } else {
        rest.strip_prefix('_')?.parse().ok().map(|n| (base.to_string(), n))
    }
}

/// Scans BUSI at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let base = busi_root(root).ok_or_else(|| {
        DataError::layout(
            root,
            "no BUSI class folders (benign/, malignant/, normal/) here or in Dataset_BUSI_with_GT/",
        )
    })?;
    let mut ds = Dataset {
        kind: DatasetKind::Busi,
        root: base.clone(),
        name: "BUSI".into(),
        labels: labels(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    for class in CLASSES {
        let dir = base.join(class);
        if !dir.is_dir() {
            ds.issue(&dir, "class folder missing", false);
            continue;
        }
        let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut masks: BTreeMap<String, Vec<(u32, PathBuf)>> = BTreeMap::new();
        if !files(&dir)?
            .iter()
            .any(|f| name_of(f).to_ascii_lowercase().ends_with(".png"))
        {
            ds.empty_folder(&dir, "<class> (N).png images with their _mask.png");
            continue;
        }
        for f in files(&dir)? {
            let name = name_of(&f);
            if !name.to_ascii_lowercase().ends_with(".png") {
                continue;
            }
            let stem = crate::io::file_stem(&f);
            match parse_mask_name(&stem) {
                Some((base, n)) => masks.entry(base).or_default().push((n, f)),
                None => {
                    images.insert(stem, f);
                }
            }
        }
        for (stem, mut mlist) in masks.clone() {
            if !images.contains_key(&stem) {
                mlist.sort();
                ds.issue(&mlist[0].1, "mask without its image", true);
            }
        }
        for (stem, image) in images {
            let mut mlist = masks.remove(&stem).unwrap_or_default();
            mlist.sort();
            if mlist.is_empty() {
                ds.issue(&image, "image without a mask (_mask.png)", true);
                continue;
            }
            let mut meta = BTreeMap::new();
            meta.insert("class".to_string(), class.to_string());
            ds.cases.push(Case {
                id: stem.clone(),
                patient: stem,
                images: vec![image],
                labels: mlist
                    .into_iter()
                    .map(|(_, p)| LabelSource::Binary { path: p, class: 1 })
                    .collect(),
                modality: Modality::Us,
                meta,
            });
        }
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::parse_mask_name;

    #[test]
    fn mask_names() {
        assert_eq!(parse_mask_name("benign (4)_mask"), Some(("benign (4)".into(), 0)));
        assert_eq!(parse_mask_name("benign (4)_mask_1"), Some(("benign (4)".into(), 1)));
        assert_eq!(parse_mask_name("benign (4)"), None);
        assert_eq!(parse_mask_name("x_mask_a"), None);
    }
}
