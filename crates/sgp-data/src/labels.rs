//! Label definitions: which integer means what, and how a dataset's mask files encode it.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::ArrayD;

use crate::error::{DataError, Result};

/// How a mask file's values become label integers.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelCoding {
    /// The file holds label integers (NIfTI label maps, nnU-Net PNGs). A raster mask stored as
    /// 0/255 still becomes 0/1 ([`crate::io::read_labels`]).
    Integer,
    /// A binary mask: grey level above `threshold` is foreground (BUSI, BiomedParse; robust to
    /// the odd anti-aliased or JPEG-damaged pixel).
    Binary {
        /// Grey levels above this are foreground.
        threshold: u16,
    },
    /// Fixed grey levels, each one a label (REFUGE, WBC). A grey value further than `tolerance`
    /// from every level is an error, so a wrong dataset definition cannot pass silently.
    GreyLevels {
        /// `(grey level, label)` pairs.
        levels: Vec<(u16, u16)>,
        /// Largest accepted distance from a level (resized copies are interpolated).
        tolerance: u16,
    },
}

/// The labels of a dataset: their names, whether other values are acceptable, their coding.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelDefinition {
    /// Label value -> name; 0 is the background.
    pub names: BTreeMap<u16, String>,
    /// When true, values missing from `names` are accepted (generic folders whose classes are
    /// not declared).
    pub open: bool,
    /// How mask files encode the labels.
    pub coding: LabelCoding,
}

impl LabelDefinition {
    /// A closed definition from `(value, name)` pairs (background 0 added if missing).
    pub fn new(names: &[(u16, &str)], coding: LabelCoding) -> Self {
        let mut map: BTreeMap<u16, String> = names.iter().map(|(v, n)| (*v, n.to_string())).collect();
        map.entry(0).or_insert_with(|| "background".to_string());
        LabelDefinition {
            names: map,
            open: false,
            coding,
        }
    }

    /// The foreground labels (all but 0), in increasing order.
    pub fn foreground(&self) -> Vec<u16> {
        self.names.keys().copied().filter(|&v| v != 0).collect()
    }

    /// The name of a label, or `label_N` when undeclared.
    pub fn name(&self, label: u16) -> String {
        self.names
            .get(&label)
            .cloned()
            .unwrap_or_else(|| format!("label_{label}"))
    }

    /// Map a mask's raw values to labels according to the coding.
    pub fn decode(&self, raw: ArrayD<u16>, path: &Path) -> Result<ArrayD<u16>> {
        match &self.coding {
            LabelCoding::Integer => Ok(raw),
            LabelCoding::Binary { threshold } => Ok(raw.mapv(|v| u16::from(v > *threshold))),
            LabelCoding::GreyLevels { levels, tolerance } => {
                let mut bad = None;
                let out = raw.mapv(|v| {
                    let best = levels
                        .iter()
                        .min_by_key(|(g, _)| (i32::from(*g) - i32::from(v)).unsigned_abs());
                    match best {
                        Some((g, l)) if (i32::from(*g) - i32::from(v)).unsigned_abs() <= u32::from(*tolerance) => *l,
                        _ => {
                            bad.get_or_insert(v);
                            0
                        }
                    }
                });
                match bad {
                    Some(v) => Err(DataError::labels(
                        path,
                        format!("grey level {v} matches none of the dataset's levels {levels:?}"),
                    )),
                    None => Ok(out),
                }
            }
        }
    }

    /// Values present in `labels` that the definition does not declare (empty when `open`).
    pub fn unexpected_values(&self, labels: &ArrayD<u16>) -> Vec<u16> {
        if self.open {
            return Vec::new();
        }
        let mut seen = vec![false; 65536];
        for &v in labels.iter() {
            seen[v as usize] = true;
        }
        (0..65536usize)
            .filter(|&v| seen[v] && !self.names.contains_key(&(v as u16)))
            .map(|v| v as u16)
            .collect()
    }

    /// Error when `labels` holds undeclared values.
    pub fn check(&self, labels: &ArrayD<u16>, path: &Path) -> Result<()> {
        let bad = self.unexpected_values(labels);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(DataError::labels(
                path,
                format!(
                    "values {bad:?} are not in the dataset's labels {:?}",
                    self.names.keys().collect::<Vec<_>>()
                ),
            ))
        }
    }
}
