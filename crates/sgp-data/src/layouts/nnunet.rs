//! nnU-Net raw datasets (v2 `dataset.json`; v1's `labels`/`modality` keys are read too).
//!
//! ```text
//! Dataset004_Hippocampus/            <- accepted as --root (or nnUNet_raw/ holding exactly one)
//!   dataset.json     {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1},
//!                     "numTraining": 260, "file_ending": ".nii.gz"}
//!   imagesTr/hippocampus_001_0000.nii.gz   (one file per channel: _0000, _0001, ...)
//!   labelsTr/hippocampus_001.nii.gz
//!   imagesTs/...                          (unlabelled; listed with meta split = test)
//! ```
//! nnU-Net has no patient notion: each case id is its own patient. Region-based label entries
//! (`"whole": [1, 2, 3]`) declare their member integers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{files, name_of, subdirs};
use crate::dataset::{sort_cases, Case, Dataset, DatasetKind, LabelSource, Modality};
use crate::error::{DataError, Result};
use crate::labels::{LabelCoding, LabelDefinition};

/// The parts of `dataset.json` we use.
#[derive(Debug, Clone)]
pub struct DatasetJson {
    /// `name`, else the folder name.
    pub name: String,
    /// Channel index -> modality name.
    pub channels: BTreeMap<usize, String>,
    /// The label names and values (regions declare their member integers).
    pub labels: LabelDefinition,
    /// `file_ending` (default `.nii.gz`).
    pub file_ending: String,
    /// `numTraining`, checked against the cases found.
    pub num_training: Option<usize>,
    /// The whole file, for keys we do not interpret.
    pub raw: Value,
}

/// Read and interpret a `dataset.json`.
pub fn read_dataset_json(path: &Path) -> Result<DatasetJson> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let raw: Value = serde_json::from_str(&text).map_err(|e| DataError::parse(path, e.to_string()))?;
    let obj = raw
        .as_object()
        .ok_or_else(|| DataError::parse(path, "not a JSON object"))?;
    let mut channels = BTreeMap::new();
    if let Some(ch) = obj
        .get("channel_names")
        .or_else(|| obj.get("modality"))
        .and_then(Value::as_object)
    {
        for (k, v) in ch {
            let idx: usize = k
                .parse()
                .map_err(|_| DataError::parse(path, format!("channel key {k:?} is not an integer")))?;
            channels.insert(idx, v.as_str().unwrap_or_default().to_string());
        }
    }
    if channels.is_empty() {
        channels.insert(0, String::new());
    }
    let labels_obj = obj
        .get("labels")
        .and_then(Value::as_object)
        .ok_or_else(|| DataError::parse(path, "no \"labels\" object"))?;
    let mut names: BTreeMap<u16, String> = BTreeMap::new();
    let mut members: Vec<u16> = Vec::new();
    let as_label = |v: &Value| v.as_u64().filter(|&x| x <= u16::MAX as u64).map(|x| x as u16);
    for (k, v) in labels_obj {
        if let Some(l) = as_label(v) {
            names.insert(l, k.clone()); // v2: name -> value
        } else if let (Ok(l), Some(n)) = (k.parse::<u16>(), v.as_str()) {
            names.insert(l, n.to_string()); // v1: "value" -> name
        } else if let Some(list) = v.as_array() {
            for x in list {
                members
                    .push(as_label(x).ok_or_else(|| DataError::parse(path, format!("label region {k:?} holds {x}")))?);
            }
        } else {
            return Err(DataError::parse(path, format!("cannot read label entry {k:?}: {v}")));
        }
    }
    for m in members {
        names.entry(m).or_insert_with(|| format!("label_{m}"));
    }
    names.entry(0).or_insert_with(|| "background".into());
    let file_ending = obj
        .get("file_ending")
        .and_then(Value::as_str)
        .unwrap_or(".nii.gz")
        .to_string();
    Ok(DatasetJson {
        name: obj
            .get("name")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| path.parent().map(name_of).unwrap_or_default()),
        channels,
        labels: LabelDefinition {
            names,
            open: false,
            coding: LabelCoding::Integer,
        },
        file_ending,
        num_training: obj.get("numTraining").and_then(Value::as_u64).map(|n| n as usize),
        raw,
    })
}

/// The folder holding `dataset.json`: `root` itself or its single sub-folder that has one.
pub(crate) fn dataset_root(root: &Path) -> Result<PathBuf> {
    if root.join("dataset.json").is_file() {
        return Ok(root.to_path_buf());
    }
    let found: Vec<PathBuf> = subdirs(root)?
        .into_iter()
        .filter(|d| d.join("dataset.json").is_file())
        .collect();
    match found.len() {
        1 => Ok(found[0].clone()),
        0 => Err(DataError::layout(root, "no dataset.json here or in a sub-folder")),
        _ => Err(DataError::layout(
            root,
            format!(
                "several datasets here ({}); pass one of them",
                found.iter().map(|p| name_of(p)).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Files of `dir` ending with `ending`, by the name before it.
fn by_stem(dir: &Path, ending: &str) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    if dir.is_dir() {
        for f in files(dir)? {
            let n = name_of(&f);
            if let Some(stem) = n.strip_suffix(ending) {
                if !n.starts_with('.') {
                    out.insert(stem.to_string(), f);
                }
            }
        }
    }
    Ok(out)
}

/// Scans an nnU-Net raw dataset at `root` (see the module docs for the accepted folders); problems become
/// [`crate::Issue`]s of the returned dataset.
pub fn load(root: &Path) -> Result<Dataset> {
    let base = dataset_root(root)?;
    let dj = read_dataset_json(&base.join("dataset.json"))?;
    let mut ds = Dataset {
        kind: DatasetKind::Nnunet,
        root: base.clone(),
        name: dj.name.clone(),
        labels: dj.labels.clone(),
        cases: Vec::new(),
        issues: Vec::new(),
    };
    let modality = Modality::parse(dj.channels.get(&0).map(String::as_str).unwrap_or(""));
    let n_channels = dj.channels.len();
    for (split, images_dir, labels_dir) in [("train", "imagesTr", Some("labelsTr")), ("test", "imagesTs", None)] {
        let images = by_stem(&base.join(images_dir), &dj.file_ending)?;
        let labels = match labels_dir {
            Some(l) => by_stem(&base.join(l), &dj.file_ending)?,
            None => BTreeMap::new(),
        };
        if split == "train" && !base.join(images_dir).is_dir() {
            ds.issue(&base.join(images_dir), "imagesTr/ missing", true);
        } else if split == "train" && images.is_empty() {
            ds.empty_folder(&base.join(images_dir), &format!("CASE_0000{}", dj.file_ending));
        }
        // Group channel files `CASE_XXXX` by case.
        let mut cases: BTreeMap<String, BTreeMap<usize, PathBuf>> = BTreeMap::new();
        for (stem, path) in images {
            let parsed = stem
                .rsplit_once('_')
                .and_then(|(c, ch)| (ch.len() == 4).then_some(c).zip(ch.parse::<usize>().ok()));
            match parsed {
                Some((case, ch)) => {
                    cases.entry(case.to_string()).or_default().insert(ch, path);
                }
                None => ds.issue(&path, "image name does not end with a 4-digit channel (_0000)", true),
            }
        }
        for (case, label) in &labels {
            if !cases.contains_key(case) {
                ds.issue(label, "label without its image(s)", true);
            }
        }
        for (case, channels) in cases {
            let mut paths = Vec::new();
            for ch in 0..n_channels {
                match channels.get(&ch) {
                    Some(p) => paths.push(p.clone()),
                    None => ds.issue(
                        &base.join(images_dir).join(format!("{case}_{ch:04}{}", dj.file_ending)),
                        "channel missing",
                        true,
                    ),
                }
            }
            if paths.len() != n_channels {
                continue;
            }
            let label = labels.get(&case).cloned();
            if label.is_none() && split == "train" {
                ds.issue(&paths[0], "training image without a label in labelsTr/", true);
                continue;
            }
            let mut meta = BTreeMap::new();
            meta.insert("split".to_string(), split.to_string());
            ds.cases.push(Case {
                id: case.clone(),
                patient: case,
                images: paths,
                labels: label.into_iter().map(LabelSource::Map).collect(),
                modality: modality.clone(),
                meta,
            });
        }
    }
    if let Some(n) = dj.num_training {
        let got = ds
            .cases
            .iter()
            .filter(|c| c.meta.get("split").map(String::as_str) == Some("train"))
            .count();
        if n != got {
            ds.issue(
                &base.join("dataset.json"),
                format!("numTraining is {n} but {got} training cases were found"),
                false,
            );
        }
    }
    sort_cases(&mut ds.cases);
    Ok(ds)
}
