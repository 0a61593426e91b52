//! The common dataset representation every layout loader produces.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::ArrayD;

use crate::error::{DataError, Result};
use crate::io::{self, FileKind, Volume};
use crate::labels::LabelDefinition;

/// The dataset layouts this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// ACDC cine-MRI (`layouts::acdc`).
    Acdc,
    /// CAMUS echocardiography, NIfTI release (`layouts::camus`).
    Camus,
    /// BUSI breast ultrasound (`layouts::busi`).
    Busi,
    /// REFUGE fundus optic disc/cup (`layouts::refuge`).
    Refuge,
    /// WBC white blood cells (`layouts::wbc`).
    Wbc,
    /// An nnU-Net raw dataset (`layouts::nnunet`).
    Nnunet,
    /// BiomedParse-style PNG folders (`layouts::biomedparse`).
    Biomedparse,
    /// A generic images/ + masks/ pair (`layouts::folder`).
    Folder,
    /// The bundled `datasets/demo` (`layouts::demo`).
    Demo,
}

impl DatasetKind {
    /// All kinds, in the order the CLI lists them.
    pub const ALL: [DatasetKind; 9] = [
        DatasetKind::Acdc,
        DatasetKind::Camus,
        DatasetKind::Busi,
        DatasetKind::Refuge,
        DatasetKind::Wbc,
        DatasetKind::Nnunet,
        DatasetKind::Biomedparse,
        DatasetKind::Folder,
        DatasetKind::Demo,
    ];

    /// Which images the layout's official release ships without labels, or `None` when it
    /// labels every image (then a missing label file is always an error). nnU-Net's
    /// `imagesTs/` is unlabelled by definition and is not counted here: no label is expected
    /// there.
    pub fn unlabelled_release(self) -> Option<&'static str> {
        match self {
            DatasetKind::Acdc => Some("the 2017 ACDC release has no ground truth for testing/"),
            DatasetKind::Refuge => Some("REFUGE's test images were first released without masks"),
            _ => None,
        }
    }

    /// The CLI name (`acdc`, `camus`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Acdc => "acdc",
            DatasetKind::Camus => "camus",
            DatasetKind::Busi => "busi",
            DatasetKind::Refuge => "refuge",
            DatasetKind::Wbc => "wbc",
            DatasetKind::Nnunet => "nnunet",
            DatasetKind::Biomedparse => "biomedparse",
            DatasetKind::Folder => "folder",
            DatasetKind::Demo => "demo",
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase();
        DatasetKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            DataError::InvalidArgument(format!(
                "unknown dataset kind {s:?}; expected one of {}",
                DatasetKind::ALL.map(|k| k.name()).join(", ")
            ))
        })
    }
}

/// Imaging modality, which decides the default intensity preprocessing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Modality {
    /// Computed tomography (Hounsfield units).
    Ct,
    /// Magnetic resonance (arbitrary units).
    Mr,
    /// Ultrasound (grey levels).
    Us,
    /// Photographs: fundus, microscopy, dermoscopy, endoscopy (8-bit colour or grey).
    Photo,
    /// Anything else, by name.
    Other(String),
}

impl Modality {
    /// Parse free text (`"CT"`, `"MRI"`, `"T2"`, `"ultrasound"`, `"fundus"`, ...).
    pub fn parse(s: &str) -> Modality {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "ct" | "computed tomography" => Modality::Ct,
            "mr" | "mri" | "t1" | "t2" | "flair" | "t1w" | "t2w" | "t1gd" | "adc" | "cine-mri" | "dwi" => Modality::Mr,
            "us" | "ultrasound" | "echo" | "echocardiography" => Modality::Us,
            "photo" | "fundus" | "microscopy" | "dermoscopy" | "endoscope" | "endoscopy" | "rgb" | "pathology"
            | "oct" => Modality::Photo,
            _ if l.contains("ct") && !l.contains("oct") => Modality::Ct,
            _ if l.starts_with("mr") || l.contains("mri") => Modality::Mr,
            _ => Modality::Other(s.trim().to_string()),
        }
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Modality::Ct => f.write_str("CT"),
            Modality::Mr => f.write_str("MR"),
            Modality::Us => f.write_str("US"),
            Modality::Photo => f.write_str("photo"),
            // Layouts that cannot tell (NIfTI in a generic folder) leave the name empty.
            Modality::Other(s) if s.is_empty() => f.write_str("unspecified"),
            Modality::Other(s) => f.write_str(s),
        }
    }
}

/// One file contributing to a case's label map.
#[derive(Debug, Clone, PartialEq)]
pub enum LabelSource {
    /// A label map decoded with the dataset's [`crate::labels::LabelCoding`].
    Map(PathBuf),
    /// A binary mask (anything above grey 127, or label > 0 in NIfTI) painted as `class`.
    Binary {
        /// The mask file.
        path: PathBuf,
        /// The label its foreground becomes.
        class: u16,
    },
}

impl LabelSource {
    /// The file it reads.
    pub fn path(&self) -> &Path {
        match self {
            LabelSource::Map(p) => p,
            LabelSource::Binary { path, .. } => path,
        }
    }
}

/// One image (possibly multi-channel) with its label files.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Unique within the dataset (`patient001_ED`, `benign (12)`).
    pub id: String,
    /// Patient identifier: splits keep all cases of a patient on one side.
    pub patient: String,
    /// Image file(s): channels in order (nnU-Net `_0000`, `_0001`, ...), usually one.
    pub images: Vec<PathBuf>,
    /// Label files, merged in order (later ones paint over earlier ones). Empty for unlabelled
    /// cases (test sets).
    pub labels: Vec<LabelSource>,
    /// Imaging modality (decides the default intensity mapping).
    pub modality: Modality,
    /// Layout-specific facts: `phase` (ED/ES), `view` (2CH/4CH), `class` (benign/...), `split`.
    pub meta: BTreeMap<String, String>,
}

impl Case {
    /// The first image channel as grey intensities (RGB photographs are converted to luma;
    /// use [`io::read_rgb`] on `images[0]` for colour).
    pub fn read_image(&self) -> Result<Volume<f32>> {
        let first = self
            .images
            .first()
            .ok_or_else(|| DataError::InvalidArgument(format!("case {} has no image", self.id)))?;
        io::read_image(first)
    }

    /// The merged label map of the case, decoded and checked against `def`.
    pub fn read_labels(&self, def: &LabelDefinition) -> Result<Volume<u16>> {
        let mut merged: Option<Volume<u16>> = None;
        for source in &self.labels {
            let path = source.path();
            let decoded = match source {
                LabelSource::Map(p) => {
                    let raw = read_mask_raw(p, def)?;
                    let data = def.decode(raw.data.clone(), p)?;
                    Volume {
                        data,
                        spacing: raw.spacing,
                        geometry: raw.geometry,
                    }
                }
                LabelSource::Binary { path, class } => {
                    let raw = read_mask_raw(path, def)?;
                    let threshold = if matches!(io::file_kind(path), Some(FileKind::Raster)) {
                        127
                    } else {
                        0
                    };
                    raw.map(|&v| if v > threshold { *class } else { 0 })
                }
            };
            merged = Some(match merged {
                None => decoded,
                Some(mut acc) => {
                    if acc.data.shape() != decoded.data.shape() {
                        return Err(DataError::Shape(format!(
                            "{}: mask {:?} differs from the case's first mask {:?}",
                            path.display(),
                            decoded.data.shape(),
                            acc.data.shape()
                        )));
                    }
                    ndarray::Zip::from(&mut acc.data).and(&decoded.data).for_each(|a, &b| {
                        if b != 0 {
                            *a = b;
                        }
                    });
                    acc
                }
            });
        }
        let merged = merged.ok_or_else(|| DataError::InvalidArgument(format!("case {} has no label file", self.id)))?;
        def.check(&merged.data, self.labels[0].path())?;
        Ok(merged)
    }
}

/// Raster masks are read as raw grey levels when the coding interprets grey levels itself;
/// otherwise through [`io::read_labels`] (integer maps, 0/255 -> 0/1).
fn read_mask_raw(path: &Path, def: &LabelDefinition) -> Result<Volume<u16>> {
    use crate::labels::LabelCoding;
    match (&def.coding, io::file_kind(path)) {
        (LabelCoding::Integer, _) | (_, Some(FileKind::Nifti { .. })) => io::read_labels(path),
        _ => io::read_raster_grey_levels(path),
    }
}

/// A problem found while scanning a layout (reported by `data verify`).
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    /// The file or folder concerned.
    pub path: PathBuf,
    /// What is wrong, in words.
    pub message: String,
    /// Fatal issues make the dataset unusable (missing pair, unreadable metadata, empty case
    /// folder).
    pub fatal: bool,
    /// A label file is missing for an image of a part of the layout whose official release
    /// ships some images unlabelled ([`DatasetKind::unlabelled_release`]). Fatal unless
    /// [`ScanOptions::allow_unlabelled`] is set, in which case the case stays as an
    /// unlabelled one and the issue is a warning.
    pub missing_label: bool,
}

/// How [`load_with`] treats what a layout may legitimately lack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanOptions {
    /// Accept images without their label file as unlabelled cases (a warning each) in the
    /// parts of a layout whose official release has unlabelled images (ACDC's `testing/`,
    /// REFUGE's test images). Everywhere else a missing label file stays an error, and
    /// asking for this on a layout whose release labels every image is refused, so that a
    /// damaged copy is never mistaken for a partly labelled release.
    pub allow_unlabelled: bool,
}

/// A scanned dataset: its cases and label definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The layout it was read as.
    pub kind: DatasetKind,
    /// The folder the loader settled on (after detecting where inside `--root` the data is).
    pub root: PathBuf,
    /// The dataset's name (from its metadata or folder).
    pub name: String,
    /// Label names and coding.
    pub labels: LabelDefinition,
    /// The cases, sorted by id (numbers compare as numbers).
    pub cases: Vec<Case>,
    /// Problems found while scanning (missing pairs, unparsable metadata).
    pub issues: Vec<Issue>,
}

impl Dataset {
    /// Cases that have labels.
    pub fn labelled(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| !c.labels.is_empty())
    }

    /// The case with this id.
    pub fn case(&self, id: &str) -> Option<&Case> {
        self.cases.iter().find(|c| c.id == id)
    }

    pub(crate) fn issue(&mut self, path: &Path, message: impl Into<String>, fatal: bool) {
        self.issues.push(Issue {
            path: path.to_path_buf(),
            message: message.into(),
            fatal,
            missing_label: false,
        });
    }

    /// A label file missing where the official release may lack it (see
    /// [`Issue::missing_label`]); fatal until [`load_with`] applies the options.
    pub(crate) fn missing_label(&mut self, path: &Path, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.to_path_buf(),
            message: message.into(),
            fatal: true,
            missing_label: true,
        });
    }

    /// An error for a case folder (or a folder of cases) that holds none of the files the
    /// layout puts there: an interrupted copy rather than a case to skip.
    pub(crate) fn empty_folder(&mut self, dir: &Path, expected: &str) {
        self.issue(dir, format!("empty case folder (expected {expected})"), true);
    }
}

/// Load a dataset of `kind` from `root` (the unpacked download or a folder inside it), with
/// the default [`ScanOptions`]: every image of a labelled layout needs its label file.
pub fn load(kind: DatasetKind, root: &Path) -> Result<Dataset> {
    load_with(kind, root, &ScanOptions::default())
}

/// [`load`] with explicit [`ScanOptions`].
pub fn load_with(kind: DatasetKind, root: &Path, options: &ScanOptions) -> Result<Dataset> {
    if options.allow_unlabelled && kind.unlabelled_release().is_none() {
        return Err(DataError::InvalidArgument(format!(
            "--allow-unlabelled does not apply to {kind}: its official release labels every image, \
             so a missing label file means a damaged copy"
        )));
    }
    if !root.exists() {
        return Err(DataError::NotFound {
            path: root.to_path_buf(),
            hint: format!("no {kind} dataset there"),
        });
    }
    if !root.is_dir() {
        return Err(DataError::layout(root, "not a folder"));
    }
    let _span = tracing::info_span!("load_dataset", kind = kind.name(), root = %root.display()).entered();
    let ds = match kind {
        DatasetKind::Acdc => crate::layouts::acdc::load(root)?,
        DatasetKind::Camus => crate::layouts::camus::load(root)?,
        DatasetKind::Busi => crate::layouts::busi::load(root)?,
        DatasetKind::Refuge => crate::layouts::refuge::load(root)?,
        DatasetKind::Wbc => crate::layouts::wbc::load(root)?,
        DatasetKind::Nnunet => crate::layouts::nnunet::load(root)?,
        DatasetKind::Biomedparse => crate::layouts::biomedparse::load(root)?,
        DatasetKind::Folder => crate::layouts::folder::load(root)?,
        DatasetKind::Demo => crate::layouts::demo::load(root)?,
    };
    if ds.cases.is_empty() {
        return Err(DataError::layout(&ds.root, format!("no {kind} cases found")));
    }
    let mut ds = ds;
    if options.allow_unlabelled {
        for issue in ds.issues.iter_mut().filter(|i| i.missing_label) {
            issue.fatal = false;
        }
    } else if let Some(note) = kind.unlabelled_release() {
        for issue in ds.issues.iter_mut().filter(|i| i.missing_label) {
            issue.message = format!("{} ({note}: pass --allow-unlabelled to accept it)", issue.message);
        }
    }
    Ok(ds)
}

/// Sort cases by id so every loader's output is deterministic (file system order is not).
pub(crate) fn sort_cases(cases: &mut [Case]) {
    cases.sort_by_cached_key(|c| natural_key(&c.id));
}

/// "benign (2)" < "benign (10)": numbers compare as numbers.
pub(crate) fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for ch in s.chars() {
        if let Some(d) = ch.to_digit(10) {
            num = Some(num.unwrap_or(0).saturating_mul(10).saturating_add(d as u64));
        } else {
            if let Some(n) = num.take() {
                out.push((std::mem::take(&mut text), n));
            }
            text.push(ch);
        }
    }
    out.push((text, num.unwrap_or(0)));
    out
}

/// A label map of the same shape as `reference`, all background (for cases without masks).
pub fn empty_labels_like<T>(reference: &Volume<T>) -> ArrayD<u16> {
    ArrayD::zeros(reference.data.raw_dim())
}
