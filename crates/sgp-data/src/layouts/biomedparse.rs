//! BiomedParse-style PNG folders (the BiomedParseData layout).
//!
//! ```text
//! <dataset>/                           <- accepted as --root
//!   train/<image>.png                  e.g. ISIC_0000_dermoscopy_skin.png
//!   train_mask/<image>_<target>.png    e.g. ISIC_0000_dermoscopy_skin_lesion.png (0/255)
//!   test/  test_mask/                  (also val/, valid/ with _mask folders)
//!   train.json, test.json              (ignored)
//! ```
//! One binary mask per image and target; targets (`+` stands for a space) become classes
//! 1..N in alphabetical order over the whole dataset, painted in that order. Each image counts
//! as its own patient; the split folder is kept in `meta["split"]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{files, name_of};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::io::{file_kind, file_stem, FileKind};
use crate::labels::{LabelCoding, LabelDefinition};

/// An image waiting for class numbers: (stem, split, image, [(target, mask)]).
type Pending = (String, String, PathBuf, Vec<(String, PathBuf)>);

const SPLITS: [&str; 4] = ["train", "val", "valid", "test"];

/// Split an image stem's trailing `_<modality>_<site>` into a modality guess.
fn modality_from_stem(stem: &str) -> Modality {
    let parts: Vec<&str> = stem.split('_').collect();
    if parts.len() >= 3 {
        let m = Modality::parse(parts[parts.len() - 2]);
        if !matches!(m, Modality::Other(_)) {
            return m;
        }
    }
    Modality::Other(String::new())
}

/// Scans a BiomedParse-style dataset at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let splits: Vec<&str> = SPLITS.iter().copied().filter(|s| root.join(s).is_dir()).collect();
    if splits.is_empty() {
        return Err(DataError::layout(
            root,
            "no BiomedParse split folders (train/, test/, ...) here",
        ));
    }
    let mut ds = Dataset {
        kind: DatasetKind::Biomedparse,
        root: root.to_path_buf(),
        name: name_of(root),
        labels: LabelDefinition::new(&[], LabelCoding::Binary { threshold: 127 }),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    // First pass: pair masks with images and collect targets.
    let mut pending: Vec<Pending> = Vec::new();
    let mut targets: BTreeSet<String> = BTreeSet::new();
    for split in splits {
        let images: BTreeMap<String, PathBuf> = files(&root.join(split))?
            .into_iter()
            .filter(|p| file_kind(p) == Some(FileKind::Raster))
            .map(|p| (file_stem(&p), p))
            .collect();
        if images.is_empty() {
            ds.empty_folder(&root.join(split), "the split's .png images");
        }
        let mut masks: BTreeMap<String, Vec<(String, PathBuf)>> = BTreeMap::new();
        let mask_dir = root.join(format!("{split}_mask"));
        if mask_dir.is_dir() {
            for m in files(&mask_dir)?
                .into_iter()
                .filter(|p| file_kind(p) == Some(FileKind::Raster))
            {
                let stem = file_stem(&m);
                // The longest image stem followed by "_<target>".
                let owner = stem
                    .char_indices()
                    .rev()
                    .filter(|(_, c)| *c == '_')
                    .map(|(i, _)| i)
                    .find(|&i| images.contains_key(&stem[..i]));
                match owner {
                    Some(i) => {
                        let target = stem[i + 1..].replace('+', " ");
                        targets.insert(target.clone());
                        masks.entry(stem[..i].to_string()).or_default().push((target, m));
                    }
                    None => ds.issue(
                        &m,
                        "mask whose name does not start with an image name plus \"_<target>\"",
                        true,
                    ),
                }
            }
        } else {
            ds.issue(&mask_dir, "mask folder missing", true);
        }
        for (stem, image) in images {
            let ms = masks.remove(&stem).unwrap_or_default();
            if ms.is_empty() && mask_dir.is_dir() {
                ds.issue(&image, "image without any mask", true);
                continue;
            }
            pending.push((stem, split.to_string(), image, ms));
        }
    }
    let class_of: BTreeMap<String, u16> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), (i + 1) as u16))
        .collect();
    let names: Vec<(u16, &str)> = class_of.iter().map(|(t, c)| (*c, t.as_str())).collect();
    ds.labels = LabelDefinition::new(&names, LabelCoding::Binary { threshold: 127 });
    for (stem, split, image, mut ms) in pending {
        ms.sort_by_key(|(t, _)| class_of.get(t).copied().unwrap_or(0));
        let mut meta = BTreeMap::new();
        meta.insert("split".to_string(), split);
        meta.insert(
            "targets".to_string(),
            ms.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>().join(", "),
        );
        ds.cases.push(Case {
            id: stem.clone(),
            patient: stem.clone(),
            images: vec![image],
            labels: ms
                .into_iter()
                .map(|(t, p)| LabelSource::Binary {
                    path: p,
                    class: class_of.get(&t).copied().unwrap_or(1),
                })
                .collect(),
            modality: modality_from_stem(&stem),
            meta,
        });
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
