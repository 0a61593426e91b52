//! Prompt-free inference: segment images and volumes from a support set, for every class in
//! one run. [`SgpPredictor`] is what `cargo xtask predict`, `cargo xtask eval` and the tests
//! call; it composes `sgp-memory` (support pool and cache, selection, PMG, the 3D memory
//! bank) and `sgp-pma` (the SGP head) and re-implements neither.
//!
//! ```no_run
//! # fn main() -> sgp::Result<()> {
//! use sgp::predictor::{CaseData, PredictorOptions, SgpPredictor};
//! let loaded = sgp::load_pretrained("facebook/sam2.1-hiera-tiny", &Default::default())?;
//! let predictor = SgpPredictor::training_free(&loaded.model, PredictorOptions::default())?;
//! let weights = sgp_memory::WeightsId::of_file(&loaded.weights_path)?;
//! let mut pool = predictor.pool(sgp_memory::SupportCache::in_memory(64), weights);
//! let ds = sgp_data::load(sgp_data::DatasetKind::Demo, "datasets/demo".as_ref())?;
//! for case in &ds.cases[1..] {
//!     predictor.add_support_case(&mut pool, &CaseData::read(case, &ds.labels, 2)?)?;
//! }
//! let query = CaseData::read(&ds.cases[0], &ds.labels, 2)?;
//! let out = predictor.predict_case(&query, &mut pool, &mut |_, _| {})?;
//! # let _ = out; Ok(()) }
//! ```
//!
//! # The data path
//!
//! * A case is a stack of 2D planes ([`CaseData`]): a raster image is one RGB plane (values
//!   / 255); a NIfTI or DICOM image is grey, its intensities mapped to [0, 1] over the whole
//!   volume by the modality's default ([`sgp_data::preprocess::IntensityMethod::default_for`]),
//!   cut into slices along `axis` in [`sgp_data::preprocess::slice_2d`]'s convention (a 2D
//!   NIfTI is one slice). Grey planes are repeated over the three channels.
//! * Every plane reaches the model through SAM2's own transform ([`sgp_sam2::Preprocess`]):
//!   antialiased resize to S×S and ImageNet normalisation; masks are resized the same way.
//! * Outputs come back to each plane's size by bilinear resizing (logits for 2D; the
//!   probabilities, which the bank averages between passes, for 3D), then the label map is
//!   the argmax over classes with background where every class is below 0.5
//!   ([`sgp_memory::label_map`]).
//!
//! # Supports
//!
//! Support cases contribute planes holding at least one class: all of them for 2D cases,
//! up to [`PredictorOptions::support_slices`] evenly spread slices for volumes. Support
//! items are tagged with the *patient* id, so selection never takes a support from the
//! query's own patient. A 2D query selects its own supports per class (top-k similarity);
//! a volume selects once, from the embedding of its middle slice, and propagates.
//!
//! # Heads and ablations
//!
//! The final logits come from an [`SgpHead`] (PMA + hierarchical decoder): a trained one,
//! or, training-free, a fresh head with γ = 0 and R = 0, which is exactly the `sgp_init`
//! pipeline (pseudo-mask → box → SAM2's decoder). [`Ablation`] switches parts off:
//! `no_pmg` decodes the query with no support memory at all (SAM2's no-memory path, so the
//! pseudo-mask is SAM2's unprompted guess), `no_pma` outputs the pseudo-mask itself (no PMA,
//! no decoder), `no_3dm` segments a volume slice by slice with the supports only.

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, ArrayD, IxDyn};
use sgp_data::preprocess::{normalize_intensity, set_slice_2d, slice_2d, IntensityMethod};
use sgp_data::{Case, FileKind, LabelDefinition, Modality, Volume};
use sgp_memory::volume::slice_embedding;
use sgp_memory::{
    label_map, BankKind, ClassSupports, Pmg, PmgOutput, PropagationOptions, QuerySlices, Selection, SliceContext,
    SupportCache, SupportItem, SupportPool, SupportPropagator, WeightsId,
};
use sgp_pma::{HeadDims, PmgParts, SgpHead, SgpHeadConfig};
use sgp_sam2::Direction;
use sgp_sam2::{logits_to_size, PreparedFeatures, Preprocess, Sam2Model};

use crate::{Error, Result};

/// Parts of SGP to switch off (the ablations of the paper's Table V).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ablation {
    /// No support conditioning: the query is decoded on its own features.
    pub no_pmg: bool,
    /// No PMA and no hierarchical decoder: the pseudo-mask is the output.
    pub no_pma: bool,
    /// No 3D memory bank: volumes are segmented slice by slice.
    pub no_3dm: bool,
}

impl Ablation {
    /// The variant's name in tables (`full`, `no-pmg`, ...).
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        if self.no_pmg {
            parts.push("no-pmg");
        }
        if self.no_pma {
            parts.push("no-pma");
        }
        if self.no_3dm {
            parts.push("no-3dm");
        }
        if parts.is_empty() {
            "full".into()
        } else {
            parts.join("+")
        }
    }
}

/// How the predictor selects supports and propagates.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictorOptions {
    /// K, the supports per class and query.
    pub support_size: usize,
    /// How supports are chosen (top-k similarity by default).
    pub selection: Selection,
    /// The 3D bank policy.
    pub bank: BankKind,
    /// Slice memories the FIFO / similarity bank keeps; None: K.
    pub bank_size: Option<usize>,
    /// Which way(s) through a volume.
    pub direction: Direction,
    /// Slice axis of volumes (2: the NIfTI z axis).
    pub axis: usize,
    /// Slices a support volume contributes (evenly spread over those with a class).
    pub support_slices: usize,
    /// Classes to segment; None: every class the supports hold.
    pub classes: Option<Vec<u32>>,
    /// Parts switched off.
    pub ablation: Ablation,
}

impl Default for PredictorOptions {
    fn default() -> Self {
        Self {
            support_size: 4,
            selection: Selection::TopK,
            bank: BankKind::Similarity,
            bank_size: None,
            direction: Direction::BothWays,
            axis: 2,
            support_slices: 5,
            classes: None,
            ablation: Ablation::default(),
        }
    }
}

/// A case as model-ready planes plus what is needed to write results back on its grid.
#[derive(Debug, Clone)]
pub struct CaseData {
    /// Case id (output file names).
    pub id: String,
    /// Patient id (leave-one-out in selection).
    pub patient: String,
    /// The image as read (grid, geometry; grey intensities as stored).
    pub image: Volume<f32>,
    /// The planes: `[3, h, w]` in [0, 1].
    planes: Planes,
    /// Label map on the image grid, when the case is labelled.
    pub labels: Option<Volume<u16>>,
    /// Whether the image is a raster picture (outputs as PNG) rather than NIfTI/DICOM.
    pub raster: bool,
}

#[derive(Debug, Clone)]
enum Planes {
    /// One RGB picture `[3, h, w]`.
    Rgb(Tensor),
    /// Grey volume in [0, 1], `(d0, d1, d2)`, sliced along `axis`; or a 2D grey image
    /// stored `(d0, d1)` (one plane, transposed like a slice).
    Grey { data: ArrayD<f32>, axis: usize },
}

impl CaseData {
    /// Reads a dataset case (image and, when labelled, its decoded label map).
    pub fn read(case: &Case, def: &LabelDefinition, axis: usize) -> Result<Self> {
        let path = case
            .images
            .first()
            .ok_or_else(|| Error::Input(format!("case {} has no image", case.id)))?;
        let labels = if case.labels.is_empty() {
            None
        } else {
            Some(case.read_labels(def)?)
        };
        let mut data = Self::from_path(path, &case.modality, axis)?;
        data.id = case.id.clone();
        data.patient = case.patient.clone();
        if let Some(l) = &labels {
            if l.shape() != data.image.shape() {
                return Err(Error::Input(format!(
                    "case {}: labels {:?} and image {:?} differ in shape",
                    case.id,
                    l.shape(),
                    data.image.shape()
                )));
            }
        }
        data.labels = labels;
        Ok(data)
    }

    /// Reads an image file (PNG/JPEG/BMP/TIFF, NIfTI) or a DICOM series folder, unlabelled.
    /// Its id and patient are the file stem.
    pub fn from_path(path: &std::path::Path, modality: &Modality, axis: usize) -> Result<Self> {
        let id = if path.is_dir() {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            sgp_data::file_stem(path)
        };
        if path.is_dir() {
            let image = sgp_data::dicom::read_series(path)?;
            let planes = grey_planes(&image, modality, axis)?;
            return Ok(Self {
                patient: id.clone(),
                id,
                image,
                planes,
                labels: None,
                raster: false,
            });
        }
        match sgp_data::file_kind(path) {
            Some(FileKind::Raster) => {
                let rgb = sgp_data::read_rgb(path)?;
                let planes = Planes::Rgb(crate::pipeline::image::rgb_to_tensor(&rgb)?);
                let image = sgp_data::read_image(path)?;
                Ok(Self {
                    patient: id.clone(),
                    id,
                    image,
                    planes,
                    labels: None,
                    raster: true,
                })
            }
            Some(FileKind::Nifti { .. }) => {
                let image = sgp_data::read_image(path)?;
                let planes = grey_planes(&image, modality, axis)?;
                Ok(Self {
                    patient: id.clone(),
                    id,
                    image,
                    planes,
                    labels: None,
                    raster: false,
                })
            }
            None => Err(Error::Input(format!(
                "{}: not an image this tool reads (PNG, JPEG, BMP, TIFF, NIfTI, or a DICOM series folder)",
                path.display()
            ))),
        }
    }

    /// Attaches a label map (on the image's grid).
    pub fn with_labels(mut self, labels: Volume<u16>) -> Result<Self> {
        if labels.shape() != self.image.shape() {
            return Err(Error::Input(format!(
                "case {}: labels {:?} and image {:?} differ in shape",
                self.id,
                labels.shape(),
                self.image.shape()
            )));
        }
        self.labels = Some(labels);
        Ok(self)
    }

    /// Number of planes (1 for 2D images).
    pub fn num_planes(&self) -> usize {
        match &self.planes {
            Planes::Rgb(_) => 1,
            Planes::Grey { data, axis } => {
                if data.ndim() == 2 {
                    1
                } else {
                    data.shape()[*axis]
                }
            }
        }
    }

    /// Whether this case is a volume (more than one plane is possible along the axis).
    pub fn is_volume(&self) -> bool {
        matches!(&self.planes, Planes::Grey { data, .. } if data.ndim() == 3 && data.shape().iter().filter(|&&d| d > 1).count() == 3)
    }

    /// Plane `k` as `[3, h, w]` in [0, 1].
    pub fn plane(&self, k: usize) -> Result<Tensor> {
        match &self.planes {
            Planes::Rgb(t) if k == 0 => Ok(t.clone()),
            Planes::Rgb(_) => Err(Error::Input(format!("plane {k} of a 2D image"))),
            Planes::Grey { data, axis } => {
                let grey = plane_of(data, *axis, k)?;
                let (h, w) = grey.dim();
                let t = Tensor::from_vec(grey.iter().copied().collect::<Vec<f32>>(), (1, h, w), &Device::Cpu)?;
                Ok(Tensor::cat(&[&t, &t, &t], 0)?)
            }
        }
    }

    /// Label plane `k` as `(h, w)`, in the same convention as [`Self::plane`].
    pub fn label_plane(&self, k: usize) -> Result<Option<Array2<u16>>> {
        let Some(labels) = &self.labels else {
            return Ok(None);
        };
        Ok(Some(match &self.planes {
            Planes::Rgb(_) => to_2d(&labels.data)?,
            Planes::Grey { axis, .. } => plane_of(&squeeze_2d(&labels.data), *axis, k)?,
        }))
    }

    /// An empty label map on the image grid.
    fn empty_labels(&self) -> ArrayD<u16> {
        ArrayD::zeros(IxDyn(self.image.shape()))
    }

    /// Writes plane `k` of a label map (`(h, w)` in plane convention) into `out`.
    fn set_plane(&self, out: &mut ArrayD<u16>, k: usize, plane: &Array2<u16>) -> Result<()> {
        match &self.planes {
            Planes::Rgb(_) => {
                let view = plane.view().into_dyn();
                if out.shape() != view.shape() {
                    return Err(Error::Input(format!(
                        "plane {:?} vs image {:?}",
                        view.shape(),
                        out.shape()
                    )));
                }
                out.assign(&view);
            }
            Planes::Grey { data, axis } => {
                if data.ndim() == 2 {
                    // 2D NIfTI stored (x, y) or (x, y, 1): the plane is its transpose.
                    let t = plane.t();
                    let flat: Vec<u16> = t.iter().copied().collect();
                    let arr = ArrayD::from_shape_vec(IxDyn(out.shape()), flat)
                        .map_err(|e| Error::Input(format!("2D label plane: {e}")))?;
                    *out = arr;
                } else {
                    set_slice_2d(out, *axis, k, plane.view())?;
                }
            }
        }
        Ok(())
    }
}

/// A 2D NIfTI (`(x, y)` or `(x, y, 1)`) as `(x, y)`; 3D as is.
fn squeeze_2d<T: Clone>(data: &ArrayD<T>) -> ArrayD<T> {
    if data.ndim() == 3 && data.shape()[2] == 1 && data.shape()[0] > 1 && data.shape()[1] > 1 {
        data.index_axis(ndarray::Axis(2), 0).to_owned()
    } else {
        data.clone()
    }
}

fn grey_planes(image: &Volume<f32>, modality: &Modality, axis: usize) -> Result<Planes> {
    if axis > 2 {
        return Err(Error::Input(format!("the slice axis must be 0, 1 or 2, got {axis}")));
    }
    let data = squeeze_2d(&image.data);
    if data.ndim() != 2 && data.ndim() != 3 {
        return Err(Error::Input(format!(
            "expected a 2D or 3D image, got shape {:?}",
            image.shape()
        )));
    }
    if data.is_empty() {
        return Err(Error::Input("the image is empty".into()));
    }
    let norm = normalize_intensity(&data, IntensityMethod::default_for(modality), None)?;
    Ok(Planes::Grey { data: norm, axis })
}

fn to_2d<T: Clone>(data: &ArrayD<T>) -> Result<Array2<T>> {
    data.clone()
        .into_dimensionality::<ndarray::Ix2>()
        .map_err(|e| Error::Input(format!("expected a 2D array, got {:?}: {e}", data.shape())))
}

/// Plane `k` of a grey array: a 2D array's transpose (like a slice), or a slice of a 3D one.
fn plane_of<T: Clone>(data: &ArrayD<T>, axis: usize, k: usize) -> Result<Array2<T>> {
    if data.ndim() == 2 {
        if k != 0 {
            return Err(Error::Input(format!("plane {k} of a 2D image")));
        }
        return Ok(to_2d(data)?.t().to_owned());
    }
    Ok(slice_2d(data, axis, k)?)
}

/// The SGP head's outputs as the plain struct sgp-pma takes.
fn pmg_parts(p: &PmgOutput) -> PmgParts {
    PmgParts {
        pix_feat_with_mem: p.pix_feat_with_mem.clone(),
        pred_masks: p.pred_masks.clone(),
        pred_masks_high_res: p.pred_masks_high_res.clone(),
        object_score_logits: p.object_score_logits.clone(),
        high_res_feats: p.high_res_feats.clone(),
    }
}

/// What segmenting one case gives.
#[derive(Debug, Clone)]
pub struct CasePrediction {
    /// The label map on the image's grid (class ids, 0 background).
    pub labels: ArrayD<u16>,
    /// The classes segmented.
    pub classes: Vec<u32>,
    /// Planes processed.
    pub planes: usize,
    /// Peak entries of the 3D bank (supports + slices), 0 for 2D.
    pub peak_bank_entries: usize,
}

/// Inference from a support set: see the module docs.
pub struct SgpPredictor<'m> {
    model: &'m Sam2Model,
    head: Option<SgpHead>,
    preprocess: Preprocess,
    options: PredictorOptions,
}

impl<'m> SgpPredictor<'m> {
    /// A predictor with a trained head (or `None`: the pseudo-mask is the output).
    pub fn new(model: &'m Sam2Model, head: Option<SgpHead>, options: PredictorOptions) -> Result<Self> {
        if options.support_size == 0 {
            return Err(Error::Input("the support size K must be at least 1".into()));
        }
        if options.axis > 2 {
            return Err(Error::Input(format!(
                "the slice axis must be 0, 1 or 2, got {}",
                options.axis
            )));
        }
        if let Some(c) = &options.classes {
            if c.is_empty() || c.contains(&0) {
                return Err(Error::Input(format!(
                    "classes must be non-empty and exclude 0 (background), got {c:?}"
                )));
            }
        }
        Ok(Self {
            model,
            head,
            preprocess: Preprocess::new(model.config().image_size)?,
            options,
        })
    }

    /// Training-free: a fresh head (γ = 0, R = 0), i.e. the `sgp_init` pipeline on the
    /// model's own weights.
    pub fn training_free(model: &'m Sam2Model, options: PredictorOptions) -> Result<Self> {
        let (head, _vars) = SgpHead::init(&SgpHeadConfig::default(), HeadDims::of(model), model.device(), 0)?;
        Self::new(model, Some(head), options)
    }

    /// A trained head from its safetensors file ([`SgpHead::save`]).
    pub fn with_head_file(model: &'m Sam2Model, path: &std::path::Path, options: PredictorOptions) -> Result<Self> {
        let (head, _vars) = SgpHead::load(path, HeadDims::of(model), model.device())?;
        Self::new(model, Some(head), options)
    }

    /// The options.
    pub fn options(&self) -> &PredictorOptions {
        &self.options
    }

    /// The model.
    pub fn model(&self) -> &'m Sam2Model {
        self.model
    }

    /// An empty support pool on this model; `weights` names the weights in cache keys
    /// (e.g. [`WeightsId::of_file`], the weights file's hash).
    pub fn pool(&self, cache: SupportCache, weights: WeightsId) -> SupportPool<'m> {
        SupportPool::new(
            self.model,
            weights,
            format!("sgp-predictor/v1 s={}", self.preprocess.image_size()),
            cache,
        )
    }

    /// `[3, h, w]` in [0, 1] → `[3, S, S]` model input (CPU → the model's device).
    fn model_input(&self, rgb01: &Tensor) -> Result<Tensor> {
        Ok(self.preprocess.image(rgb01, self.model.device())?.squeeze(0)?)
    }

    /// Adds a labelled case's planes to the pool (see the module docs for which planes).
    /// Returns the pool indices added (none when no plane holds a wanted class).
    pub fn add_support_case(&self, pool: &mut SupportPool<'m>, case: &CaseData) -> Result<Vec<usize>> {
        let _span = tracing::debug_span!("add_support_case", case = %case.id).entered();
        if case.labels.is_none() {
            return Err(Error::Input(format!("support case {} has no labels", case.id)));
        }
        let n = case.num_planes();
        let mut with_class = Vec::new();
        for k in 0..n {
            let plane = case.label_plane(k)?.unwrap_or_default();
            if plane.iter().any(|&v| v != 0 && self.wanted(u32::from(v))) {
                with_class.push(k);
            }
        }
        let chosen: Vec<usize> = if case.is_volume() {
            spread(&with_class, self.options.support_slices.max(1))
        } else {
            with_class
        };
        let mut added = Vec::new();
        for k in chosen {
            let labels = case.label_plane(k)?.unwrap_or_default();
            let (h, w) = labels.dim();
            let mut masks = BTreeMap::new();
            let present: std::collections::BTreeSet<u16> = labels.iter().copied().filter(|&v| v != 0).collect();
            for c in present {
                if !self.wanted(u32::from(c)) {
                    continue;
                }
                let m: Vec<f32> = labels.iter().map(|&v| f32::from(u8::from(v == c))).collect();
                let m = Tensor::from_vec(m, (h, w), &Device::Cpu)?;
                let m = self.preprocess.mask(&m, self.model.device())?.squeeze(0)?.squeeze(0)?;
                // A structure thinner than a model pixel can vanish in the resize.
                if m.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? > 0.0 {
                    masks.insert(u32::from(c), m);
                }
            }
            if masks.is_empty() {
                continue;
            }
            let image = self.model_input(&case.plane(k)?)?;
            added.push(pool.push(SupportItem {
                image,
                masks,
                case_id: case.patient.clone(),
            })?);
        }
        Ok(added)
    }

    fn wanted(&self, c: u32) -> bool {
        self.options.classes.as_ref().is_none_or(|cs| cs.contains(&c))
    }

    /// The classes to segment with this pool.
    fn classes(&self, pool: &SupportPool<'m>) -> Result<Vec<u32>> {
        let present = pool.classes();
        let classes: Vec<u32> = match &self.options.classes {
            Some(c) => c.clone(),
            None => present.iter().copied().collect(),
        };
        if classes.is_empty() {
            return Err(Error::Input("the support pool holds no labelled class".into()));
        }
        Ok(classes)
    }

    /// Segments one case (2D image or volume) from the pool; `on_plane(done, total)`
    /// reports progress over slice steps.
    pub fn predict_case(
        &self,
        case: &CaseData,
        pool: &mut SupportPool<'m>,
        on_plane: &mut dyn FnMut(usize, usize),
    ) -> Result<CasePrediction> {
        if case.is_volume() {
            self.predict_volume(case, pool, on_plane)
        } else {
            let p = self.predict_image(case, pool)?;
            on_plane(1, 1);
            Ok(p)
        }
    }

    /// Segments a 2D image: its own supports per class, PMG, then the head.
    pub fn predict_image(&self, case: &CaseData, pool: &mut SupportPool<'m>) -> Result<CasePrediction> {
        let _span = tracing::info_span!("predict_image", case = %case.id).entered();
        let classes = self.classes(pool)?;
        let plane = case.plane(0)?;
        let (_, h, w) = plane.dims3()?;
        let x = self.model_input(&plane)?;
        let feats = sgp_memory::support::image_features(self.model, &x.unsqueeze(0)?)?;
        let logits = self.plane_logits(&x, &feats, None, case, pool, &classes)?;
        let labels = self.labels_from_logits(&logits, (h, w), &classes)?;
        let mut out = case.empty_labels();
        case.set_plane(&mut out, 0, &labels)?;
        Ok(CasePrediction {
            labels: out,
            classes,
            planes: 1,
            peak_bank_entries: 0,
        })
    }

    /// Final logits `[N, 1, S, S]` of one plane for every class: supports (given, or
    /// selected for this plane), PMG (or the no-memory path), then the head.
    fn plane_logits(
        &self,
        x: &Tensor,
        feats: &PreparedFeatures,
        supports: Option<&ClassSupports>,
        case: &CaseData,
        pool: &mut SupportPool<'m>,
        classes: &[u32],
    ) -> Result<Tensor> {
        let n = classes.len();
        let feats_b = sgp_memory::support::repeat_features(feats, n)?;
        let pmg = if self.options.ablation.no_pmg {
            unconditioned_pmg(self.model, &feats_b)?
        } else {
            let owned;
            let supports = match supports {
                Some(s) => s,
                None => {
                    let pooled = sgp_memory::support::pooled_of(feats)?;
                    owned = pool.class_supports(
                        &pooled,
                        Some(case.patient.as_str()),
                        classes,
                        self.options.support_size,
                        self.options.selection,
                    )?;
                    &owned
                }
            };
            Pmg::new(self.model).pseudo_mask_per_item(&feats_b, &supports.per_item())?
        };
        self.refine(&pmg, x, n)
    }

    /// The head's final logits, or the pseudo-mask without one.
    fn refine(&self, pmg: &PmgOutput, x: &Tensor, n: usize) -> Result<Tensor> {
        match (&self.head, self.options.ablation.no_pma) {
            (Some(head), false) => {
                let img = x.unsqueeze(0)?.repeat((n, 1, 1, 1))?;
                Ok(head.forward(self.model, &pmg_parts(pmg), &img)?.final_logits)
            }
            _ => Ok(pmg.pred_masks_high_res.clone()),
        }
    }

    /// `[N, 1, S, S]` logits → `(h, w)` label plane.
    fn labels_from_logits(&self, logits: &Tensor, (h, w): (usize, usize), classes: &[u32]) -> Result<Array2<u16>> {
        let up = logits_to_size(logits, (h, w))?;
        let p = candle_nn_sigmoid(&up)?;
        self.labels_from_probabilities_at(&p, (h, w), classes)
    }

    fn labels_from_probabilities_at(&self, p: &Tensor, (h, w): (usize, usize), classes: &[u32]) -> Result<Array2<u16>> {
        let labels = label_map(&p.to_device(&Device::Cpu)?, classes)?;
        let v: Vec<u16> = labels
            .into_iter()
            .map(|l| u16::try_from(l).map_err(|_| Error::Input(format!("class {l} does not fit a label map"))))
            .collect::<Result<_>>()?;
        Array2::from_shape_vec((h, w), v).map_err(|e| Error::Input(format!("label plane: {e}")))
    }

    /// Segments a volume: supports selected once (middle slice), then propagation through
    /// the slices with the 3D bank (or slice by slice under `no_3dm` / `no_pmg`).
    pub fn predict_volume(
        &self,
        case: &CaseData,
        pool: &mut SupportPool<'m>,
        on_slice: &mut dyn FnMut(usize, usize),
    ) -> Result<CasePrediction> {
        let _span = tracing::info_span!("predict_volume", case = %case.id).entered();
        let classes = self.classes(pool)?;
        let n = case.num_planes();
        if n == 0 {
            return Err(Error::Input(format!("case {} has no slice", case.id)));
        }
        let slices = CaseSlices { case, predictor: self };
        let supports = if self.options.ablation.no_pmg {
            None
        } else {
            let middle = slices.slice(n / 2)?;
            let pooled = slice_embedding(self.model, &middle)?;
            Some(pool.class_supports(
                &pooled,
                Some(case.patient.as_str()),
                &classes,
                self.options.support_size,
                self.options.selection,
            )?)
        };
        let mut out = case.empty_labels();
        let mut peak = 0;
        match &supports {
            Some(supports) if !self.options.ablation.no_3dm => {
                let mut prop = SupportPropagator::new(
                    self.model,
                    PropagationOptions {
                        bank: self.options.bank,
                        bank_size: self.options.bank_size,
                        direction: self.options.direction,
                    },
                );
                let failure: RefCell<Option<Error>> = RefCell::new(None);
                // Keep our own error (not its text through sgp-memory's) when a step fails.
                let keep = |e: Error| {
                    let msg = e.to_string();
                    failure.borrow_mut().get_or_insert(e);
                    sgp_memory::Error::Input(msg)
                };
                let r = {
                    let mut refine = |pmg: &PmgOutput, ctx: &SliceContext| -> sgp_memory::Result<Tensor> {
                        let x = slices.slice(ctx.index)?;
                        self.refine(pmg, &x, classes.len()).map_err(keep)
                    };
                    let mut sink = |p: sgp_memory::SlicePrediction| -> sgp_memory::Result<()> {
                        let (h, w) = case.plane_hw(p.index)?;
                        let up = logits_to_size(&p.probabilities, (h, w))?;
                        self.labels_from_probabilities_at(&up, (h, w), &classes)
                            .and_then(|plane| case.set_plane(&mut out, p.index, &plane))
                            .map_err(keep)
                    };
                    prop.run(&slices, supports, &mut refine, &mut sink, on_slice)
                };
                if let Err(e) = r {
                    return Err(failure.into_inner().unwrap_or(Error::Memory(e)));
                }
                peak = prop.stats().peak_entries;
            }
            _ => {
                for k in 0..n {
                    let plane = case.plane(k)?;
                    let (_, h, w) = plane.dims3()?;
                    let x = self.model_input(&plane)?;
                    let feats = sgp_memory::support::image_features(self.model, &x.unsqueeze(0)?)?;
                    let logits = self.plane_logits(&x, &feats, supports.as_ref(), case, pool, &classes)?;
                    let labels = self.labels_from_logits(&logits, (h, w), &classes)?;
                    case.set_plane(&mut out, k, &labels)?;
                    on_slice(k + 1, n);
                }
            }
        }
        Ok(CasePrediction {
            labels: out,
            classes,
            planes: n,
            peak_bank_entries: peak,
        })
    }
}

impl CaseData {
    /// `(h, w)` of plane `k`.
    fn plane_hw(&self, k: usize) -> std::result::Result<(usize, usize), sgp_memory::Error> {
        let t = self.plane(k).map_err(|e| sgp_memory::Error::Input(e.to_string()))?;
        let (_, h, w) = t.dims3()?;
        Ok((h, w))
    }
}

/// The slices of a case as model inputs, made on demand (the whole volume never exists as
/// model inputs at once).
struct CaseSlices<'a, 'm> {
    case: &'a CaseData,
    predictor: &'a SgpPredictor<'m>,
}

impl QuerySlices for CaseSlices<'_, '_> {
    fn num_slices(&self) -> usize {
        self.case.num_planes()
    }
    fn slice(&self, idx: usize) -> sgp_memory::Result<Tensor> {
        let plane = self
            .case
            .plane(idx)
            .map_err(|e| sgp_memory::Error::Input(e.to_string()))?;
        self.predictor
            .model_input(&plane)
            .map_err(|e| sgp_memory::Error::Input(e.to_string()))
    }
}

/// The no-PMG ablation: SAM2's own path for a frame without memory (`no_mem_embed`) and
/// without prompt, decoded like PMG decodes.
pub(crate) fn unconditioned_pmg(model: &Sam2Model, feats: &PreparedFeatures) -> Result<PmgOutput> {
    let levels = feats.vision_feats.len();
    let map = |i: usize| -> Result<Tensor> {
        let (h, w) = feats.feat_sizes[i];
        let (_, b, c) = feats.vision_feats[i].dims3()?;
        Ok(feats.vision_feats[i].permute((1, 2, 0))?.reshape((b, c, h, w))?)
    };
    let high_res = if levels == 3 { Some((map(0)?, map(1)?)) } else { None };
    let pix = model.memory_conditioned_features(feats, None, 1)?;
    let heads = model.sam_heads();
    let multimask = model.multimask(heads.cfg.use_multimask(false, 0));
    let out = heads.forward(&pix, None, None, high_res.as_ref().map(|(a, b)| (a, b)), multimask)?;
    Ok(PmgOutput {
        pix_feat_with_mem: pix,
        pred_masks: out.low_res_masks,
        pred_masks_high_res: out.high_res_masks,
        object_score_logits: out.object_score_logits,
        obj_ptr: out.obj_ptr,
        high_res_feats: high_res,
    })
}

fn candle_nn_sigmoid(t: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(&t.to_dtype(DType::F32)?)?)
}

/// Up to `n` items of `v`, evenly spread (first and last included).
fn spread(v: &[usize], n: usize) -> Vec<usize> {
    if v.len() <= n {
        return v.to_vec();
    }
    if n == 1 {
        return vec![v[v.len() / 2]];
    }
    (0..n).map(|i| v[i * (v.len() - 1) / (n - 1)]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_evenly_spaced_items() {
        assert_eq!(spread(&[1, 2, 3], 5), vec![1, 2, 3]);
        assert_eq!(spread(&[0, 1, 2, 3, 4, 5, 6, 7, 8], 3), vec![0, 4, 8]);
        assert_eq!(spread(&[3, 4, 5, 6], 1), vec![5]);
    }

    #[test]
    fn ablation_names() {
        assert_eq!(Ablation::default().name(), "full");
        let a = Ablation {
            no_pma: true,
            no_3dm: true,
            ..Ablation::default()
        };
        assert_eq!(a.name(), "no-pma+no-3dm");
    }
}
