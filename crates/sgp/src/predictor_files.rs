//! `cargo xtask predict` as a library call: supports from a dataset folder, one image or
//! volume in, one label map out (PNG for 2D pictures, NIfTI with the input's geometry for
//! NIfTI and DICOM), written atomically.

use std::path::{Path, PathBuf};

use sgp_data::{Dataset, DatasetKind, Modality};
use sgp_memory::{CacheOptions, SupportCache, WeightsId};
use sgp_sam2::Sam2Model;

use crate::model::{SgpModel, SgpModelConfig};
use crate::predictor::{CaseData, PredictorOptions, SgpPredictor};
use crate::train::TrainConfig;
use crate::{Error, Result};
use sgp_pma::SgpHead;

/// Which head produces the final logits.
#[derive(Debug, Clone)]
pub enum HeadChoice {
    /// A fresh head (γ = 0, R = 0): the training-free `sgp_init` pipeline.
    TrainingFree,
    /// A trained head file ([`sgp_pma::SgpHead::save`]).
    File(PathBuf),
    /// No head: the pseudo-mask is the output.
    PseudoMaskOnly,
    /// A trained run's head (see [`load_run`]).
    Trained(Box<SgpHead>),
}

/// Builds the predictor for a head choice.
pub fn predictor_for_head<'m>(
    model: &'m Sam2Model,
    head: &HeadChoice,
    options: PredictorOptions,
) -> Result<SgpPredictor<'m>> {
    match head {
        HeadChoice::TrainingFree => SgpPredictor::training_free(model, options),
        HeadChoice::File(p) => SgpPredictor::with_head_file(model, p, options),
        HeadChoice::PseudoMaskOnly => SgpPredictor::new(model, None, options),
        HeadChoice::Trained(h) => SgpPredictor::new(model, Some((**h).clone()), options),
    }
}

/// A trained run (`cargo xtask train`'s folder) ready for inference.
pub struct LoadedRun {
    /// The model: SAM2 with the run's LoRA adapters and fine-tuned modules, and its head.
    pub model: SgpModel,
    /// The run's configuration (`config.json`): dataset, split seed and fractions, K, axis.
    pub config: TrainConfig,
    /// The checkpoint loaded (`best.safetensors`, else `last.safetensors`).
    pub checkpoint: PathBuf,
}

impl LoadedRun {
    /// The head to predict with (none when the run trained without PMA).
    pub fn head(&self) -> HeadChoice {
        match self.model.head() {
            Some(h) => HeadChoice::Trained(Box::new(h.clone())),
            None => HeadChoice::PseudoMaskOnly,
        }
    }

    /// Cache identity of the run's weights: the checkpoint's base hash and step.
    pub fn weights_id(&self) -> Result<WeightsId> {
        let base = WeightsId::of_file(&self.checkpoint)?;
        Ok(base)
    }
}

/// Loads a trained run: its configuration, the base weights it started from, then the best
/// (else last) checkpoint's parameters, refused when the base weights differ from the
/// checkpoint's.
pub fn load_run(dir: &Path, device: &candle_core::Device) -> Result<LoadedRun> {
    let _span = tracing::info_span!("load_run", run = %dir.display()).entered();
    let bad = |e: crate::TrainError| Error::Input(format!("run {}: {e}", dir.display()));
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: TrainConfig = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{}: not a training configuration: {e}", config_path.display())))?;
    let checkpoint = ["best.safetensors", "last.safetensors"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Input(format!(
                "run {}: no best.safetensors or last.safetensors",
                dir.display()
            ))
        })?;
    let (sam2, base) = crate::train::model_source(&config, device).map_err(bad)?;
    let model_cfg = SgpModelConfig {
        sam2,
        trainable: config.trainable.clone(),
        head: config.head.clone(),
        ablation: config.ablation,
        support_grad: config.support_grad,
        seed: config.seed,
    };
    let model = SgpModel::new(model_cfg, &base, device).map_err(bad)?;
    let ck = crate::checkpoint::load(&checkpoint, device).map_err(bad)?;
    ck.check_base(model.base_hash()).map_err(bad)?;
    model.load_params(&ck.params).map_err(bad)?;
    model.set_train(false);
    Ok(LoadedRun {
        model,
        config,
        checkpoint,
    })
}

/// Reads a support source: a dataset root in any layout `sgp-data` reads (`kind`), or, with
/// `kind` None, the layout detected from the folder: `dataset.json` (the bundled demo or
/// nnU-Net raw), then a generic `images/` + `masks/` pair, then every other layout. The
/// first that yields labelled cases without a fatal issue wins.
pub fn load_support_dataset(root: &Path, kind: Option<DatasetKind>) -> Result<Dataset> {
    if !root.is_dir() {
        return Err(Error::Input(format!("--support {}: not a folder", root.display())));
    }
    let usable = |ds: &Dataset| ds.labelled().next().is_some() && !ds.issues.iter().any(|i| i.fatal);
    if let Some(kind) = kind {
        let ds = sgp_data::load(kind, root)?;
        if let Some(bad) = ds.issues.iter().find(|i| i.fatal) {
            return Err(Error::Input(format!(
                "{} as {kind}: {}: {}",
                root.display(),
                bad.path.display(),
                bad.message
            )));
        }
        if ds.labelled().next().is_none() {
            return Err(Error::Input(format!("{} as {kind}: no labelled case", root.display())));
        }
        return Ok(ds);
    }
    let mut order = Vec::new();
    if root.join("dataset.json").is_file() {
        order.extend([DatasetKind::Demo, DatasetKind::Nnunet]);
    }
    order.push(DatasetKind::Folder);
    let rest: Vec<DatasetKind> = DatasetKind::ALL
        .iter()
        .copied()
        .filter(|k| !order.contains(k))
        .collect();
    order.extend(rest);
    let mut tried = Vec::new();
    for kind in order {
        match sgp_data::load(kind, root) {
            Ok(ds) if usable(&ds) => {
                tracing::info!(%kind, cases = ds.cases.len(), "support layout detected");
                return Ok(ds);
            }
            Ok(_) => tried.push(format!("{kind}: no labelled case or a fatal issue")),
            Err(e) => tried.push(format!("{kind}: {e}")),
        }
    }
    Err(Error::Input(format!(
        "--support {}: no dataset layout fits (give --support-kind); tried {}",
        root.display(),
        tried.join("; ")
    )))
}

/// One `predict` run.
#[derive(Debug, Clone)]
pub struct PredictRequest {
    /// Support source (see [`load_support_dataset`]).
    pub support: PathBuf,
    /// Its layout; None: detected.
    pub support_kind: Option<DatasetKind>,
    /// The image (PNG/JPEG/BMP/TIFF, NIfTI) or DICOM series folder to segment.
    pub input: PathBuf,
    /// The label map to write (`.png` for pictures, `.nii`/`.nii.gz` otherwise).
    pub out: PathBuf,
    /// Modality of the input when it is not a case of the support dataset (intensity
    /// mapping); None: the support case's, else min-max.
    pub modality: Option<String>,
    /// Support cache folder; None: memory only.
    pub cache_dir: Option<PathBuf>,
    /// Selection, bank, direction, classes, ablations.
    pub options: PredictorOptions,
}

impl PredictRequest {
    /// Checks what can be checked before a model is loaded: the input exists and the output
    /// extension fits it.
    pub fn validate(&self) -> Result<()> {
        if !self.input.exists() {
            return Err(Error::Input(format!("--input {}: not found", self.input.display())));
        }
        let raster_in =
            !self.input.is_dir() && matches!(sgp_data::file_kind(&self.input), Some(sgp_data::FileKind::Raster));
        if !self.input.is_dir() && sgp_data::file_kind(&self.input).is_none() {
            return Err(Error::Input(format!(
                "--input {}: not an image this tool reads (PNG, JPEG, BMP, TIFF, NIfTI, or a DICOM series folder)",
                self.input.display()
            )));
        }
        let out_kind = sgp_data::file_kind(&self.out);
        match (raster_in, out_kind) {
            (true, Some(sgp_data::FileKind::Raster)) | (false, Some(sgp_data::FileKind::Nifti { .. })) => Ok(()),
            (true, _) => Err(Error::Input(format!(
                "--out {}: a 2D picture gets a PNG label map (name it .png)",
                self.out.display()
            ))),
            (false, _) => Err(Error::Input(format!(
                "--out {}: a volume gets a NIfTI label map (name it .nii.gz)",
                self.out.display()
            ))),
        }
    }
}

/// What a `predict` run did.
#[derive(Debug, Clone)]
pub struct PredictOutcome {
    /// The file written.
    pub out: PathBuf,
    /// Classes segmented.
    pub classes: Vec<u32>,
    /// Labelled voxels/pixels per class, in `classes` order.
    pub voxels_per_class: Vec<usize>,
    /// Planes (slices) processed.
    pub planes: usize,
    /// Support cases used (the input's own case left out) and support items encoded.
    pub support_cases: usize,
    /// Support items in the pool.
    pub support_items: usize,
    /// Support encoder runs (0 when every support came from the cache).
    pub support_encoder_calls: usize,
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Runs `predict`: supports from `req.support` (without the input's own case, should it
/// be one), the input segmented for every class, the label map written atomically.
/// `on_plane(done, total)` reports progress over slices.
pub fn predict_to_file(
    model: &Sam2Model,
    weights: &WeightsId,
    head: &HeadChoice,
    req: &PredictRequest,
    on_plane: &mut dyn FnMut(usize, usize),
) -> Result<PredictOutcome> {
    let _span = tracing::info_span!("predict", input = %req.input.display()).entered();
    req.validate()?;
    let ds = load_support_dataset(&req.support, req.support_kind)?;
    let own = ds
        .cases
        .iter()
        .find(|c| c.images.first().is_some_and(|p| same_file(p, &req.input)));
    let modality = match (&req.modality, own) {
        (Some(m), _) => Modality::parse(m),
        (None, Some(c)) => c.modality.clone(),
        (None, None) => Modality::Other(String::new()),
    };
    let mut query = CaseData::from_path(&req.input, &modality, req.options.axis)?;
    if let Some(c) = own {
        query.id = c.id.clone();
        query.patient = c.patient.clone();
        tracing::info!(case = %c.id, "the input is a support case: it and its patient are left out");
    }
    let predictor = predictor_for_head(model, head, req.options.clone())?;
    let cache = match &req.cache_dir {
        Some(dir) => SupportCache::new(CacheOptions {
            dir: Some(dir.clone()),
            ..CacheOptions::default()
        })?,
        None => SupportCache::in_memory(256),
    };
    let mut pool = predictor.pool(cache, weights.clone());
    let mut support_cases = 0;
    for case in ds.labelled() {
        if case.patient == query.patient {
            continue;
        }
        let data = CaseData::read(case, &ds.labels, req.options.axis)?;
        if !predictor.add_support_case(&mut pool, &data)?.is_empty() {
            support_cases += 1;
        }
    }
    if pool.is_empty() {
        return Err(Error::Input(format!(
            "--support {}: no labelled plane left after leaving out the input's patient",
            req.support.display()
        )));
    }
    pool.encode_all(&mut |_, _| {})?;
    let pred = predictor.predict_case(&query, &mut pool, on_plane)?;
    crate::pipeline::write_labels(&req.out, &pred.labels, &query.image)?;
    let voxels_per_class = pred
        .classes
        .iter()
        .map(|&c| pred.labels.iter().filter(|&&v| u32::from(v) == c).count())
        .collect();
    Ok(PredictOutcome {
        out: req.out.clone(),
        classes: pred.classes,
        voxels_per_class,
        planes: pred.planes,
        support_cases,
        support_items: pool.len(),
        support_encoder_calls: pool.encoder_calls(),
    })
}
