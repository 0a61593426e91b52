//! Training SAM2-SGP: data, the training loop, validation, run folders and resume.
//!
//! # Data
//! The dataset is read with sgp-data's layouts and split by patient (seeded;
//! [`sgp_data::split_by_patient`], no separate support side: the paper draws supports
//! from the training data). Cases become 2D planes (slices along `axis` for volumes) with
//! the predictor's preprocessing ([`crate::predictor::CaseData`]), resized to S
//! (antialiased bilinear for images, nearest for labels).
//! * **Queries**: every training plane × every class present in it, plus planes where
//!   the class is absent (a share `empty_fraction` of the present ones, seeded), which
//!   train toward an empty mask.
//! * **Support pool**: a seeded subset (`pool_size` planes) of the training planes that
//!   hold a class. A query's K supports for class c come from pool planes that hold c
//!   and belong to another patient (never its own case): by default the K most similar
//!   to the query, as at inference ([`TrainSelection::Similar`]), or drawn at random
//!   ([`TrainSelection::Random`]).
//! * **Augmentation** ([`crate::augment`]) on queries (image and mask together), seeded.
//!
//! # Loop
//! One micro-batch is one query × class ([`SgpModel::forward`] and
//! [`crate::loss::sgp_loss`]; with `chunk_slices` > 1 on volumes, a chunk of consecutive
//! slices through the memory bank, [`SgpModel::forward_chunk`], loss averaged over it); `accumulation` micro-batches make one AdamW update
//! ([`crate::optim`]). The epoch order is a seeded shuffle of the query list; the RNG
//! (augmentation, supports) is a single-`u64` SplitMix64. Both are in the checkpoint,
//! so a resumed run continues exactly where the saved one was.
//!
//! # Run folder
//! `config.json` (the resolved [`TrainConfig`]), `metrics.jsonl` (one JSON object per
//! update: step, every loss term, lr, gradient norm, images/s; and one per validation:
//! Dice per class and the mean), `last.safetensors` and `best.safetensors`
//! ([`crate::checkpoint`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use ndarray::{Array2, Array3};
use sgp_data::DatasetKind;
use sgp_memory::SupportItem;
use sgp_pma::SgpHeadConfig;
use sgp_sam2::Sam2Config;

use crate::augment::{AugmentConfig, AugmentParams, Rng};
use crate::checkpoint::{self, CheckpointRef, TrainState};
use crate::loss::{sgp_loss, LossBreakdown, LossInputs, LossWeights};
use crate::model::{Ablation, BaseWeights, SgpModel, SgpModelConfig, SupportGrad, TrainableConfig};
use crate::optim::{AdamW, AdamWConfig, Schedule};
use crate::train_error::{Result, TrainError};

/// Everything a run depends on (written to `config.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Dataset layout (`acdc`, `demo`, ...).
    pub dataset: String,
    /// Dataset folder.
    pub root: PathBuf,
    /// Official weights (hub id or path); `None` with `from_scratch`.
    pub weights: Option<String>,
    /// Random initialisation, everything trains.
    pub from_scratch: bool,
    /// SAM2 model config: a preset (`sam2.1_hiera_t`) or a yaml/JSON file. Required from
    /// scratch; with weights, `None` uses the one the weights imply.
    pub model_config: Option<String>,
    /// Model input size S (a multiple of 32).
    pub image_size: usize,
    /// K, supports per query.
    pub support_size: usize,
    /// Optimiser updates; the learning-rate schedule spans them.
    pub steps: usize,
    /// Stop after this many minutes (checkpointing first), even before `steps`.
    pub max_minutes: Option<f64>,
    /// Micro-batches (query × class) per update.
    pub accumulation: usize,
    /// AdamW.
    pub optimizer: AdamWConfig,
    /// Linear warmup updates.
    pub warmup_steps: usize,
    /// Floor of the cosine decay, as a fraction of the peak learning rate.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Loss weights.
    pub loss: LossWeights,
    /// Augmentation of the queries.
    pub augment: AugmentConfig,
    /// What trains.
    pub trainable: TrainableConfig,
    /// PMA + decoder configuration.
    pub head: SgpHeadConfig,
    /// Switched-off parts.
    pub ablation: Ablation,
    /// Gradients through the supports' image features.
    pub support_grad: SupportGrad,
    /// Seed of everything (split, pool, order, augmentation, initialisation).
    pub seed: u64,
    /// Share of patients for validation.
    pub val_fraction: f64,
    /// Share of patients held out for testing (never used here).
    pub test_fraction: f64,
    /// Planes in the support pool (0: every training plane that holds a class).
    pub pool_size: usize,
    /// How a query's K supports are chosen.
    #[serde(default)]
    pub selection: TrainSelection,
    /// With [`TrainSelection::Similar`]: recompute the pool's embeddings with the current
    /// model every this many updates (0: only once, at the start).
    #[serde(default = "default_selection_refresh")]
    pub selection_refresh: usize,
    /// Slices per training query (1: 2D training). With more, a query of a volume is a
    /// chunk of up to this many consecutive slices of one case, run slice by slice
    /// through the memory bank as at inference ([`SgpModel::forward_chunk`]); its loss is
    /// the mean over the chunk's slices. 2D images stay single planes.
    #[serde(default = "default_chunk_slices")]
    pub chunk_slices: usize,
    /// Memory-bank policy of chunk training: `similarity` (default), `fifo` or `sam2`.
    #[serde(default = "default_bank")]
    pub bank: String,
    /// Absent-class queries per present-class query.
    pub empty_fraction: f64,
    /// Slicing axis of volumes.
    pub axis: usize,
    /// Validate every this many updates (0: only at the end).
    pub val_every: usize,
    /// At most this many validation queries (evenly spread).
    pub val_max_items: usize,
    /// Save `last` every this many updates (and always at the end).
    pub checkpoint_every: usize,
}

fn default_selection_refresh() -> usize {
    100
}

fn default_chunk_slices() -> usize {
    1
}

fn default_bank() -> String {
    "similarity".into()
}

/// How a query's K supports are chosen in training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainSelection {
    /// The paper's (and inference's) choice, the default: the K pool planes most similar
    /// to the query ([`sgp_memory::select_supports`] with `TopK`: cosine of mean-pooled
    /// level-2 embeddings, never the query's own patient), ordered least → most similar.
    /// The query's embedding comes from its own forward pass (the augmented image, at no
    /// extra cost); the pool's are recomputed with the current model (inference mode)
    /// every `selection_refresh` updates and saved in the checkpoint, so a resumed run
    /// selects exactly as the uninterrupted one.
    #[default]
    Similar,
    /// K pool planes drawn at random (seeded), in draw order: more variety, no refresh cost.
    Random,
}

impl TrainConfig {
    /// Defaults for everything but the dataset and the model source.
    pub fn new(dataset: &str, root: impl Into<PathBuf>, weights: Option<String>) -> Self {
        let from_scratch = weights.is_none();
        Self {
            dataset: dataset.to_string(),
            root: root.into(),
            weights,
            from_scratch,
            model_config: None,
            image_size: 512,
            support_size: 4,
            steps: 2000,
            max_minutes: None,
            accumulation: 4,
            optimizer: AdamWConfig::default(),
            warmup_steps: 50,
            min_lr_ratio: 0.05,
            max_grad_norm: Some(1.0),
            loss: LossWeights::default(),
            augment: AugmentConfig::default(),
            trainable: if from_scratch {
                TrainableConfig::from_scratch()
            } else {
                TrainableConfig::fine_tune()
            },
            head: SgpHeadConfig::default(),
            ablation: Ablation::default(),
            support_grad: SupportGrad::Detached,
            seed: 0,
            val_fraction: 0.2,
            test_fraction: 0.2,
            pool_size: 0,
            selection: TrainSelection::Similar,
            selection_refresh: default_selection_refresh(),
            chunk_slices: default_chunk_slices(),
            bank: default_bank(),
            empty_fraction: 0.25,
            axis: 2,
            val_every: 100,
            val_max_items: 32,
            checkpoint_every: 100,
        }
    }

    /// Checks what can be checked without reading anything.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.image_size == 0 || !self.image_size.is_multiple_of(32) {
            return bad(format!(
                "--image-size {} is not a multiple of 32 (SAM2's Hiera needs S divisible by 32)",
                self.image_size
            ));
        }
        if self.support_size == 0 {
            return bad("--support-size must be at least 1".into());
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.accumulation == 0 {
            return bad("gradient accumulation must be at least 1".into());
        }
        if self.chunk_slices == 0 {
            return bad("--chunk-slices must be at least 1".into());
        }
        if let Err(e) = self.bank.parse::<sgp_memory::BankKind>() {
            return bad(format!("--bank: {e}"));
        }
        if let Some(m) = self.max_minutes {
            if !(m.is_finite() && m > 0.0) {
                return bad(format!("--max-minutes {m} must be positive"));
            }
        }
        match (&self.weights, self.from_scratch) {
            (Some(_), true) => return bad("pass either --weights or --from-scratch, not both".into()),
            (None, false) => return bad("pass --weights W (official SAM2 weights) or --from-scratch".into()),
            (None, true) if self.model_config.is_none() => {
                return bad("--from-scratch needs --config (a preset such as sam2.1_hiera_t, or a config file)".into())
            }
            _ => {}
        }
        if !(0.0..=10.0).contains(&self.empty_fraction) {
            return bad(format!("empty_fraction {} must be in [0, 10]", self.empty_fraction));
        }
        self.dataset.parse::<DatasetKind>()?;
        Ok(())
    }

    /// The fields that must match for `--resume` (all but the time budget).
    fn resume_key(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("max_minutes");
        }
        v
    }
}

/// The checkpoint's extra tensor holding the pool's selection embeddings.
const SELECTION_TENSOR: &str = "selection_embeddings";

/// One plane at model size.
#[derive(Debug, Clone)]
pub struct Plane {
    /// `(3, S, S)` in [0, 1].
    pub image: Array3<f32>,
    /// `(S, S)` label map.
    pub labels: Array2<u16>,
    /// Case id.
    pub case: String,
    /// Patient id.
    pub patient: String,
    /// Plane index in its case.
    pub index: usize,
}

impl Plane {
    /// Whether class `c` has a pixel here.
    pub fn has(&self, c: u32) -> bool {
        self.labels.iter().any(|&v| v as u32 == c)
    }

    /// The normalised model input `[3, S, S]` of `image` (ImageNet statistics).
    pub fn model_input(image: &Array3<f32>, device: &Device) -> Result<Tensor> {
        let (c, h, w) = image.dim();
        let t = Tensor::from_vec(image.iter().copied().collect::<Vec<f32>>(), (1, c, h, w), device)?;
        let pre = sgp_sam2::Preprocess::new(h)?;
        Ok(pre.normalize(&t)?.squeeze(0)?)
    }

    /// `[S, S]` 0/1 mask of class `c` in `labels`.
    pub fn mask_of(labels: &Array2<u16>, c: u32, device: &Device) -> Result<Tensor> {
        let (h, w) = labels.dim();
        let v: Vec<f32> = labels.iter().map(|&l| if l as u32 == c { 1.0 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(v, (h, w), device)?)
    }
}

/// The training data of a run.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// Foreground classes of the dataset.
    pub classes: Vec<u32>,
    /// Class names.
    pub class_names: BTreeMap<u32, String>,
    /// Training planes.
    pub train: Vec<Plane>,
    /// Validation planes.
    pub val: Vec<Plane>,
    /// Indices into `train` of the support pool.
    pub pool: Vec<usize>,
    /// Training queries (plane index, class).
    pub queries: Vec<(usize, u32)>,
    /// Validation queries (plane index into `val`, class); class present.
    pub val_queries: Vec<(usize, u32)>,
}

fn resize_plane(plane: &Tensor, s: usize) -> Result<Array3<f32>> {
    let (c, h, w) = plane.dims3()?;
    let x = plane.to_dtype(DType::F32)?.unsqueeze(0)?.contiguous()?;
    let x = if (h, w) == (s, s) {
        x
    } else {
        sgp_kernels::resize::bilinear_antialias(&x, s, s).map_err(|e| TrainError::Shape(e.to_string()))?
    };
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    Array3::from_shape_vec((c, s, s), v).map_err(|e| TrainError::Shape(e.to_string()))
}

/// Whether `b` is the slice right after `a` in the same case.
fn next_slice(a: &Plane, b: &Plane) -> bool {
    a.case == b.case && b.index == a.index + 1
}

/// Indices of up to `t` consecutive slices of one case starting at plane `start`.
fn chunk_of(planes: &[Plane], start: usize, t: usize) -> Vec<usize> {
    let mut out = vec![start];
    while out.len() < t {
        let last = out[out.len() - 1];
        match planes.get(last + 1) {
            Some(p) if next_slice(&planes[last], p) => out.push(last + 1),
            _ => break,
        }
    }
    out
}

impl TrainData {
    /// The training planes of the query (chunk) starting at plane `start`.
    pub fn chunk(&self, start: usize, chunk_slices: usize) -> Vec<usize> {
        chunk_of(&self.train, start, chunk_slices.max(1))
    }

    /// Reads and splits the dataset, builds the pool and the query lists, and checks
    /// that every class can be trained with K supports (clear errors otherwise).
    pub fn load(cfg: &TrainConfig) -> Result<Self> {
        let _span = tracing::info_span!("train_data", dataset = %cfg.dataset).entered();
        let kind: DatasetKind = cfg.dataset.parse()?;
        if !cfg.root.exists() {
            return Err(TrainError::Config(format!(
                "the dataset folder {} does not exist (--root)",
                cfg.root.display()
            )));
        }
        let ds = sgp_data::load(kind, &cfg.root)?;
        if let Some(fatal) = ds.issues.iter().find(|i| i.fatal) {
            return Err(TrainError::Config(format!(
                "the {kind} dataset at {} has problems ({}: {}); run `cargo xtask data verify`",
                cfg.root.display(),
                fatal.path.display(),
                fatal.message
            )));
        }
        let labelled: Vec<sgp_data::Case> = ds.labelled().cloned().collect();
        if labelled.is_empty() {
            return Err(TrainError::Config(format!(
                "the {kind} dataset at {} has no labelled case",
                cfg.root.display()
            )));
        }
        let split = sgp_data::split_by_patient(
            &labelled,
            &sgp_data::SplitConfig {
                seed: cfg.seed,
                support_patients: 0,
                val_fraction: cfg.val_fraction,
                test_fraction: cfg.test_fraction,
            },
        )?;
        if split.train.is_empty() {
            return Err(TrainError::Config("the split leaves no training case".into()));
        }
        let classes: Vec<u32> = ds.labels.foreground().into_iter().map(u32::from).collect();
        let class_names = classes.iter().map(|&c| (c, ds.labels.name(c as u16))).collect();
        let s = cfg.image_size;
        let read = |ids: &[String]| -> Result<Vec<Plane>> {
            let mut planes = Vec::new();
            for id in ids {
                let Some(case) = labelled.iter().find(|c| &c.id == id) else {
                    continue;
                };
                let data = crate::predictor::CaseData::read(case, &ds.labels, cfg.axis)
                    .map_err(|e| TrainError::Config(format!("case {id}: {e}")))?;
                for k in 0..data.num_planes() {
                    let img = data
                        .plane(k)
                        .map_err(|e| TrainError::Config(format!("case {id}: {e}")))?;
                    let Some(lbl) = data
                        .label_plane(k)
                        .map_err(|e| TrainError::Config(format!("case {id}: {e}")))?
                    else {
                        continue;
                    };
                    let labels = sgp_data::preprocess::resize_nearest(lbl.view(), s, s)?;
                    planes.push(Plane {
                        image: resize_plane(&img, s)?,
                        labels,
                        case: case.id.clone(),
                        patient: case.patient.clone(),
                        index: k,
                    });
                }
            }
            Ok(planes)
        };
        let train = read(&split.train)?;
        let val = read(&split.val)?;

        let mut rng = Rng::new(cfg.seed ^ 0x5EED_0001);
        let mut holding: Vec<usize> = (0..train.len())
            .filter(|&i| classes.iter().any(|&c| train[i].has(c)))
            .collect();
        rng.shuffle(&mut holding);
        if cfg.pool_size > 0 {
            holding.truncate(cfg.pool_size);
        }
        holding.sort_unstable();
        let pool = holding;

        for &c in &classes {
            let name = ds.labels.name(c as u16);
            let with_c: Vec<usize> = pool.iter().copied().filter(|&i| train[i].has(c)).collect();
            if with_c.is_empty() {
                return Err(TrainError::Config(format!(
                    "class {c} ({name}) has no pixel in the training split's support pool: nothing to learn it from \
                     (check the labels, or use a larger pool / another split seed)"
                )));
            }
            // Every training patient holding c needs K supports of c from other patients.
            let patients: std::collections::BTreeSet<&str> =
                train.iter().filter(|p| p.has(c)).map(|p| p.patient.as_str()).collect();
            for p in patients {
                let n = with_c.iter().filter(|&&i| train[i].patient != p).count();
                if n < cfg.support_size {
                    return Err(TrainError::Config(format!(
                        "--support-size {} is larger than the support pool: class {c} ({name}) has only {n} pool \
                         planes outside patient {p}",
                        cfg.support_size
                    )));
                }
            }
        }

        let mut queries = Vec::new();
        let mut absent = Vec::new();
        // A query starts a chunk: every plane in 2D training, every `chunk_slices`-th plane
        // of each run of consecutive slices otherwise.
        let t = cfg.chunk_slices.max(1);
        let mut run_pos = 0usize;
        for (i, p) in train.iter().enumerate() {
            let continues = i > 0 && next_slice(&train[i - 1], p);
            run_pos = if continues { run_pos + 1 } else { 0 };
            if !run_pos.is_multiple_of(t) {
                continue;
            }
            let chunk = chunk_of(&train, i, t);
            for &c in &classes {
                if chunk.iter().any(|&j| train[j].has(c)) {
                    queries.push((i, c));
                } else {
                    absent.push((i, c));
                }
            }
        }
        rng.shuffle(&mut absent);
        let n_absent = ((queries.len() as f64) * cfg.empty_fraction).round() as usize;
        absent.truncate(n_absent);
        queries.extend(absent);
        queries.sort_unstable();

        let mut val_queries: Vec<(usize, u32)> = Vec::new();
        for (i, p) in val.iter().enumerate() {
            for &c in &classes {
                if p.has(c) {
                    val_queries.push((i, c));
                }
            }
        }
        if val_queries.len() > cfg.val_max_items && cfg.val_max_items > 0 {
            let n = cfg.val_max_items;
            let m = val_queries.len();
            val_queries = (0..n).map(|k| val_queries[k * (m - 1) / (n - 1).max(1)]).collect();
        }
        tracing::info!(
            train = train.len(),
            val = val.len(),
            pool = pool.len(),
            queries = queries.len(),
            "training data ready"
        );
        Ok(Self {
            classes,
            class_names,
            train,
            val,
            pool,
            queries,
            val_queries,
        })
    }

    /// K supports for class `c` for a query of `patient`, drawn with `rng`, ordered as
    /// drawn (no similarity order in training).
    pub fn draw_supports(&self, c: u32, patient: &str, k: usize, rng: &mut Rng) -> Result<Vec<usize>> {
        let mut cand: Vec<usize> = self
            .pool
            .iter()
            .copied()
            .filter(|&i| self.train[i].has(c) && self.train[i].patient != patient)
            .collect();
        if cand.len() < k {
            return Err(TrainError::Config(format!(
                "class {c}: only {} supports outside patient {patient}, need {k}",
                cand.len()
            )));
        }
        // Partial Fisher–Yates: the first k of a seeded shuffle.
        for i in 0..k {
            let j = i + rng.below(cand.len() - i);
            cand.swap(i, j);
        }
        cand.truncate(k);
        Ok(cand)
    }

    /// The K pool planes most similar to a query of `patient` with embedding `query`,
    /// for class `c`, ordered least → most similar. `pool_embeddings[j]` belongs to
    /// `pool[j]`.
    pub fn similar_supports(
        &self,
        c: u32,
        patient: &str,
        k: usize,
        query: &[f32],
        pool_embeddings: &[Vec<f32>],
    ) -> Result<Vec<usize>> {
        if pool_embeddings.len() != self.pool.len() {
            return Err(TrainError::Config(format!(
                "internal: {} pool embeddings for a pool of {}",
                pool_embeddings.len(),
                self.pool.len()
            )));
        }
        let classes: Vec<std::collections::BTreeSet<u32>> = self
            .pool
            .iter()
            .map(|&i| {
                if self.train[i].has(c) {
                    [c].into()
                } else {
                    Default::default()
                }
            })
            .collect();
        // Exclusion is by patient: the candidates' ids are their patients.
        let candidates: Vec<sgp_memory::Candidate> = self
            .pool
            .iter()
            .zip(pool_embeddings)
            .zip(&classes)
            .map(|((&i, e), cl)| sgp_memory::Candidate {
                embedding: e,
                case_id: &self.train[i].patient,
                classes: cl,
            })
            .collect();
        let q = sgp_memory::Query {
            embedding: query,
            case_id: Some(patient),
            class: c,
        };
        let picked = sgp_memory::select_supports(&candidates, &q, k, sgp_memory::Selection::TopK)
            .map_err(|e| TrainError::Config(format!("class {c}, patient {patient}: {e}")))?;
        if picked.len() < k {
            return Err(TrainError::Config(format!(
                "class {c}: only {} supports outside patient {patient}, need {k}",
                picked.len()
            )));
        }
        Ok(picked.into_iter().map(|j| self.pool[j]).collect())
    }

    /// The pool plane `i` as a support item for class `c`.
    pub fn support_item(&self, i: usize, c: u32, device: &Device) -> Result<SupportItem> {
        let p = &self.train[i];
        Ok(SupportItem {
            image: Plane::model_input(&p.image, device)?,
            masks: BTreeMap::from([(c, Plane::mask_of(&p.labels, c, device)?)]),
            case_id: p.case.clone(),
        })
    }
}

/// The loss of one query × class on model-ready tensors: `image` `[3, S, S]`
/// (normalised), `target` `[1, 1, S, S]` in {0, 1}, the class's supports (ordered least →
/// most similar). What one micro-batch of training computes before `backward`.
pub fn model_loss(
    model: &SgpModel,
    image: &Tensor,
    target: &Tensor,
    class: u32,
    supports: &[SupportItem],
    weights: &LossWeights,
) -> Result<crate::loss::LossOutput> {
    let fwd = model.forward(image, class, supports)?;
    forward_loss(&fwd, target, class, weights)
}

/// The mean of several slices' losses: the total tensor and every term.
fn mean_loss(mut losses: Vec<crate::loss::LossOutput>) -> Result<crate::loss::LossOutput> {
    if losses.len() == 1 {
        return Ok(losses.remove(0));
    }
    let n = losses.len() as f64;
    if losses.is_empty() {
        return Err(TrainError::Config("internal: a query chunk without slices".into()));
    }
    let totals: Vec<Tensor> = losses.iter().map(|l| l.total.clone()).collect();
    let total = (Tensor::stack(&totals, 0)?.sum_all()? / n)?;
    let mut b = LossBreakdown::default();
    for l in &losses {
        let x = &l.breakdown;
        b.total += x.total / n;
        b.dice += x.dice / n;
        b.bce += x.bce / n;
        b.kl += x.kl / n;
        b.object += x.object / n;
        for (c, (d, e)) in &x.per_class {
            let s = b.per_class.entry(*c).or_default();
            s.0 += d / n;
            s.1 += e / n;
        }
    }
    Ok(crate::loss::LossOutput { total, breakdown: b })
}

/// [`sgp_loss`] of one forward pass against `target` `[1, 1, S, S]`.
fn forward_loss(
    fwd: &crate::model::SgpForward,
    target: &Tensor,
    class: u32,
    weights: &LossWeights,
) -> Result<crate::loss::LossOutput> {
    sgp_loss(
        &LossInputs {
            logits: &fwd.final_logits,
            target,
            pseudo_logits: fwd.pseudo_logits.as_ref(),
            object_scores: fwd.object_scores.iter().collect(),
            classes: &[class],
        },
        weights,
    )
}

/// Options that do not change the result (not part of the config).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Continue the run in the output folder from its `last` checkpoint.
    pub resume: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop (after checkpointing) once this many updates are done — what a killed run
    /// looks like, for tests.
    pub stop_after: Option<usize>,
    /// Device.
    pub device: Device,
}

impl Default for RunOptions {
    /// CPU, no progress bar, a fresh run.
    fn default() -> Self {
        Self {
            resume: false,
            progress: false,
            stop_after: None,
            device: Device::Cpu,
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    /// Updates done.
    pub steps: usize,
    /// Loss terms of the last update (mean over its micro-batches).
    pub last_loss: LossBreakdown,
    /// Last validation: Dice per class and the mean.
    pub last_val: Option<(BTreeMap<u32, f64>, f64)>,
    /// Best validation mean Dice and its step.
    pub best: Option<(f64, usize)>,
    /// Query images per second over the run (this session).
    pub images_per_s: f64,
    /// Trainable scalars.
    pub trainable_params: usize,
    /// Seconds of this session.
    pub seconds: f64,
}

/// A run in progress: model, optimiser, data and state.
pub struct Trainer {
    /// The resolved configuration.
    pub config: TrainConfig,
    /// The model.
    pub model: SgpModel,
    /// The data.
    pub data: TrainData,
    /// AdamW.
    pub optimizer: AdamW,
    /// Step, RNG, data position, best.
    pub state: TrainState,
    out: PathBuf,
    device: Device,
    order: Vec<usize>,
    /// Selection embeddings of `data.pool` (same order), with [`TrainSelection::Similar`].
    pool_embeddings: Option<Vec<Vec<f32>>>,
    progress: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("out", &self.out)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The resolved SAM2 config and base weights of a run.
pub fn model_source(cfg: &TrainConfig, device: &Device) -> Result<(Sam2Config, BaseWeights)> {
    if cfg.from_scratch {
        let spec = cfg
            .model_config
            .as_deref()
            .ok_or_else(|| TrainError::Config("--from-scratch needs --config".into()))?;
        let p = Path::new(spec);
        let c = if p.is_file() {
            Sam2Config::from_file(p)?
        } else {
            Sam2Config::preset(spec)?
        };
        let c = c.with_real_use_settings().with_image_size(cfg.image_size)?;
        return Ok((c, BaseWeights::Random { seed: cfg.seed }));
    }
    let spec = cfg
        .weights
        .as_deref()
        .ok_or_else(|| TrainError::Config("pass --weights or --from-scratch".into()))?;
    let opts = crate::LoadOptions {
        config: cfg.model_config.clone(),
        image_size: Some(cfg.image_size),
        device: device.clone(),
        ..Default::default()
    };
    let pre = crate::load_pretrained(spec, &opts)?;
    if !pre.has_memory_path {
        return Err(TrainError::Config(format!(
            "{spec} is an image-only checkpoint (no memory encoder / attention): SGP needs the memory path"
        )));
    }
    let raw = sgp_sam2::load_state_dict(&pre.weights_path, device)?;
    let tensors = match pre.format {
        crate::WeightsFormat::Transformers => sgp_sam2::convert_state_dict(raw.into_iter().collect())?.tensors,
        _ => raw,
    };
    Ok((pre.config, crate::model::state_dict_base(tensors)))
}

fn write_json(path: &Path, v: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| TrainError::Config(e.to_string()))?;
    sgp_data::write_atomic(path, text.as_bytes())?;
    Ok(())
}

/// Keeps the lines of `metrics.jsonl` up to `step` (a resumed run rewrites what came
/// after its checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    sgp_data::write_atomic(path, out.as_bytes())?;
    Ok(())
}

impl Trainer {
    /// Sets up a run in `out`: checks the configuration and data (every error before any
    /// training), builds the model and optimiser, and with `resume` restores the last
    /// checkpoint.
    pub fn new(config: TrainConfig, out: &Path, opts: &RunOptions) -> Result<Self> {
        config.validate()?;
        let device = opts.device.clone();
        let last = out.join("last.safetensors");
        let config_path = out.join("config.json");
        if opts.resume {
            if !last.is_file() {
                return Err(TrainError::Config(format!(
                    "--resume: {} has no last.safetensors to resume from",
                    out.display()
                )));
            }
            let saved: TrainConfig = serde_json::from_str(
                &std::fs::read_to_string(&config_path).map_err(|e| TrainError::io(&config_path, e))?,
            )
            .map_err(|e| TrainError::Config(format!("{}: {e}", config_path.display())))?;
            if saved.resume_key() != config.resume_key() {
                return Err(TrainError::Config(format!(
                    "--resume: the arguments differ from the run's {} (only --max-minutes may change)",
                    config_path.display()
                )));
            }
        } else if last.exists() {
            return Err(TrainError::Config(format!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                out.display()
            )));
        }
        let data = TrainData::load(&config)?;
        let (sam2, base) = model_source(&config, &device)?;
        let model_cfg = SgpModelConfig {
            sam2,
            trainable: config.trainable.clone(),
            head: config.head.clone(),
            ablation: config.ablation,
            support_grad: config.support_grad,
            seed: config.seed,
        };
        let model = SgpModel::new(model_cfg, &base, &device)?;
        let schedule = Schedule {
            warmup_steps: config.warmup_steps,
            total_steps: config.steps,
            min_ratio: config.min_lr_ratio,
        };
        let mut optimizer = AdamW::new(
            model.trainable_vars(),
            config.optimizer,
            schedule,
            config.max_grad_norm,
            config.accumulation,
        )?;
        let mut state = TrainState {
            rng_state: config.seed ^ 0x7EA1_0000,
            ..Default::default()
        };
        let mut restored_embeddings = None;
        if opts.resume {
            let ck = checkpoint::load(&last, &device)?;
            ck.check_base(model.base_hash())?;
            if let Some(e) = ck.extra.get(SELECTION_TENSOR) {
                restored_embeddings = Some(e.to_dtype(DType::F32)?.to_vec2::<f32>()?);
            }
            model.load_params(&ck.params)?;
            optimizer.load_state(&ck.optim, ck.state.step)?;
            state = ck.state;
            truncate_metrics(&out.join("metrics.jsonl"), state.step)?;
            tracing::info!(step = state.step, "resumed");
        } else {
            std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
            write_json(&config_path, &config)?;
            let _ = std::fs::remove_file(out.join("metrics.jsonl"));
        }
        let mut t = Self {
            config,
            model,
            data,
            optimizer,
            state,
            out: out.to_path_buf(),
            device,
            order: Vec::new(),
            pool_embeddings: restored_embeddings,
            progress: opts.progress,
        };
        t.order = t.epoch_order(t.state.epoch);
        Ok(t)
    }

    fn epoch_order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.queries.len()).collect();
        Rng::new(self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x0DE7).shuffle(&mut order);
        order
    }

    fn next_query(&mut self) -> (usize, u32) {
        if self.state.position >= self.order.len() {
            self.state.epoch += 1;
            self.state.position = 0;
            self.order = self.epoch_order(self.state.epoch);
        }
        let q = self.data.queries[self.order[self.state.position]];
        self.state.position += 1;
        q
    }

    /// The loss of one query × class (image possibly augmented) with its supports.
    pub fn query_loss(
        &self,
        image: &Array3<f32>,
        labels: &Array2<u16>,
        class: u32,
        supports: &[usize],
    ) -> Result<crate::loss::LossOutput> {
        let dev = &self.device;
        let x = Plane::model_input(image, dev)?;
        let items: Vec<SupportItem> = supports
            .iter()
            .map(|&i| self.data.support_item(i, class, dev))
            .collect::<Result<_>>()?;
        let target = Plane::mask_of(labels, class, dev)?.unsqueeze(0)?.unsqueeze(0)?;
        model_loss(&self.model, &x, &target, class, &items, &self.config.loss)
    }

    /// Recomputes the pool's selection embeddings with the current model when
    /// [`TrainSelection::Similar`] needs it (none yet, or a refresh step).
    fn refresh_selection(&mut self) -> Result<()> {
        if self.config.selection != TrainSelection::Similar {
            return Ok(());
        }
        let step = self.state.step;
        let due = self.config.selection_refresh > 0
            && step.is_multiple_of(self.config.selection_refresh)
            && self.state.selection_step != Some(step);
        if self.pool_embeddings.is_some() && !due {
            return Ok(());
        }
        let _span = tracing::info_span!("selection_embeddings", step, pool = self.data.pool.len()).entered();
        let bar = if self.progress {
            indicatif::ProgressBar::new(self.data.pool.len() as u64).with_message("support pool embeddings")
        } else {
            indicatif::ProgressBar::hidden()
        };
        self.model.set_train(false);
        let mut out = Vec::with_capacity(self.data.pool.len());
        for &i in &self.data.pool {
            let x = Plane::model_input(&self.data.train[i].image, &self.device)?;
            let feats = self.model.query_features(&x);
            let e = feats.and_then(|f| SgpModel::selection_embedding(&f));
            if e.is_err() {
                self.model.set_train(true);
            }
            out.push(e?);
            bar.inc(1);
        }
        self.model.set_train(true);
        bar.finish_and_clear();
        self.pool_embeddings = Some(out);
        self.state.selection_step = Some(step);
        Ok(())
    }

    /// The loss of the query (chunk) starting at training plane `start`, for `class`,
    /// augmented with `params`, with supports chosen as the configuration says; and the
    /// number of query images it took.
    fn micro_batch_loss(
        &self,
        start: usize,
        class: u32,
        params: &AugmentParams,
        rng: &mut Rng,
    ) -> Result<(crate::loss::LossOutput, usize)> {
        let dev = &self.device;
        let k = self.config.support_size;
        let planes = self.data.chunk(start, self.config.chunk_slices);
        let patient = &self.data.train[start].patient;
        let mut images = Vec::with_capacity(planes.len());
        let mut targets = Vec::with_capacity(planes.len());
        for &i in &planes {
            let p = &self.data.train[i];
            let (img, lbl) = crate::augment::apply(&p.image, &p.labels, params);
            images.push(Plane::model_input(&img, dev)?);
            targets.push(Plane::mask_of(&lbl, class, dev)?.unsqueeze(0)?.unsqueeze(0)?);
        }
        let similar = self
            .pool_embeddings
            .as_ref()
            .filter(|_| self.config.selection == TrainSelection::Similar);
        let (first, supports) = match similar {
            Some(pool_embeddings) => {
                // The first slice's own features choose the supports (no extra encoder pass).
                let feats = self.model.query_features(&images[0])?;
                let emb = SgpModel::selection_embedding(&feats)?;
                let picked = self.data.similar_supports(class, patient, k, &emb, pool_embeddings)?;
                (Some(feats), picked)
            }
            None => (None, self.data.draw_supports(class, patient, k, rng)?),
        };
        let items: Vec<SupportItem> = supports
            .iter()
            .map(|&i| self.data.support_item(i, class, dev))
            .collect::<Result<_>>()?;
        let bank: sgp_memory::BankKind = self
            .config
            .bank
            .parse()
            .map_err(|e| TrainError::Config(format!("{e}")))?;
        let fwds = self.model.forward_chunk(&images, first, class, &items, bank)?;
        let losses: Vec<crate::loss::LossOutput> = fwds
            .iter()
            .zip(&targets)
            .map(|(f, t)| forward_loss(f, t, class, &self.config.loss))
            .collect::<Result<_>>()?;
        Ok((mean_loss(losses)?, planes.len()))
    }

    /// One optimiser update (`accumulation` micro-batches); returns the mean loss terms.
    pub fn step(&mut self) -> Result<(LossBreakdown, crate::optim::StepInfo)> {
        let _span = tracing::debug_span!("train_step", step = self.state.step).entered();
        self.model.set_train(true);
        self.refresh_selection()?;
        let mut rng = Rng::new(self.state.rng_state);
        let mut sum = LossBreakdown::default();
        let n = self.config.accumulation;
        let mut info = None;
        for _ in 0..n {
            let (pi, c) = self.next_query();
            let params = AugmentParams::draw(&self.config.augment, &mut rng);
            let (out, images) = self.micro_batch_loss(pi, c, &params, &mut rng)?;
            let grads = out.total.backward()?;
            let i = self.optimizer.accumulate(&grads)?;
            if i.updated {
                info = Some(i);
            }
            let b = &out.breakdown;
            sum.total += b.total / n as f64;
            sum.dice += b.dice / n as f64;
            sum.bce += b.bce / n as f64;
            sum.kl += b.kl / n as f64;
            sum.object += b.object / n as f64;
            for (k, (d, x)) in &b.per_class {
                let e = sum.per_class.entry(*k).or_default();
                e.0 += d / n as f64;
                e.1 += x / n as f64;
            }
            self.state.images_seen += images;
        }
        self.state.rng_state = rng.state;
        self.state.step = self.optimizer.step();
        let info = info.ok_or_else(|| TrainError::Config("internal: no update after a full accumulation".into()))?;
        Ok((sum, info))
    }

    /// Dice per class (and the mean over classes) of `final > 0` against the target on
    /// the validation queries, at model resolution. Supports are drawn with a fixed
    /// seed per query, so every validation sees the same ones.
    pub fn validate(&self) -> Result<(BTreeMap<u32, f64>, f64)> {
        let _span = tracing::info_span!("validate", step = self.state.step).entered();
        self.model.set_train(false);
        let mut per: BTreeMap<u32, (f64, usize)> = BTreeMap::new();
        for (k, &(vi, c)) in self.data.val_queries.iter().enumerate() {
            let plane = &self.data.val[vi];
            let x = Plane::model_input(&plane.image, &self.device)?;
            let feats = self.model.query_features(&x)?;
            let supports = match &self.pool_embeddings {
                Some(pe) if self.config.selection == TrainSelection::Similar => {
                    let emb = SgpModel::selection_embedding(&feats)?;
                    self.data
                        .similar_supports(c, &plane.patient, self.config.support_size, &emb, pe)?
                }
                _ => {
                    let mut rng = Rng::new(self.config.seed ^ 0xA11D ^ (k as u64) << 20);
                    self.data
                        .draw_supports(c, &plane.patient, self.config.support_size, &mut rng)?
                }
            };
            let items: Vec<SupportItem> = supports
                .iter()
                .map(|&i| self.data.support_item(i, c, &self.device))
                .collect::<Result<_>>()?;
            let fwd = self.model.forward_from_features(&x, &feats, c, &items)?;
            let pred: Vec<f32> = fwd
                .final_logits
                .detach()
                .gt(0f32)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let gt: Vec<f32> = plane
                .labels
                .iter()
                .map(|&l| if l as u32 == c { 1.0 } else { 0.0 })
                .collect();
            let inter: f64 = pred.iter().zip(&gt).map(|(a, b)| (a * b) as f64).sum();
            let denom: f64 = pred.iter().map(|&v| v as f64).sum::<f64>() + gt.iter().map(|&v| v as f64).sum::<f64>();
            let dice = if denom > 0.0 { 2.0 * inter / denom } else { 1.0 };
            let e = per.entry(c).or_default();
            e.0 += dice;
            e.1 += 1;
        }
        self.model.set_train(true);
        let per: BTreeMap<u32, f64> = per.into_iter().map(|(c, (s, n))| (c, s / n.max(1) as f64)).collect();
        let mean = if per.is_empty() {
            0.0
        } else {
            per.values().sum::<f64>() / per.len() as f64
        };
        Ok((per, mean))
    }

    /// Writes `last` (or `best`) atomically.
    pub fn save(&self, name: &str) -> Result<PathBuf> {
        let path = self.out.join(format!("{name}.safetensors"));
        let params: Vec<(String, Tensor)> = self
            .model
            .trainable_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        let (optim, _) = self.optimizer.state();
        let config = serde_json::to_value(&self.config).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut extra = BTreeMap::new();
        if let Some(e) = &self.pool_embeddings {
            let dim = e.first().map_or(0, |v| v.len());
            let flat: Vec<f32> = e.iter().flatten().copied().collect();
            extra.insert(
                SELECTION_TENSOR.to_string(),
                Tensor::from_vec(flat, (e.len(), dim), &Device::Cpu)?,
            );
        }
        checkpoint::save(
            &path,
            &CheckpointRef {
                base_hash: self.model.base_hash(),
                config: &config,
                state: &self.state,
                params: &params,
                optim: &optim,
                extra: &extra,
            },
        )?;
        Ok(path)
    }

    fn log(&self, v: serde_json::Value) -> Result<()> {
        let path = self.out.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        writeln!(f, "{v}").map_err(|e| TrainError::io(&path, e))?;
        Ok(())
    }

    /// Runs to `steps` (or the time budget, or `stop_after`), validating and
    /// checkpointing on the way.
    pub fn run(&mut self, opts: &RunOptions) -> Result<TrainSummary> {
        let _span = tracing::info_span!("train", out = %self.out.display()).entered();
        let start = Instant::now();
        let start_images = self.state.images_seen;
        let total = self.config.steps;
        let bar = if opts.progress {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} updates | {msg} | {elapsed_precise} ETA {eta_precise}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_position(self.state.step as u64);
            b.reset_eta();
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut last_loss = LossBreakdown::default();
        let mut last_val = None;
        let budget = self.config.max_minutes.map(|m| m * 60.0);
        while self.state.step < total {
            let t0 = Instant::now();
            let seen = self.state.images_seen;
            let (loss, info) = self.step()?;
            let dt = t0.elapsed().as_secs_f64();
            let ips = (self.state.images_seen - seen) as f64 / dt.max(1e-9);
            if !loss.total.is_finite() {
                return Err(TrainError::Config(format!(
                    "the loss became {} at step {}; lower the learning rate",
                    loss.total, self.state.step
                )));
            }
            let step = self.state.step;
            self.log(serde_json::json!({
                "step": step,
                "loss": loss.total, "dice_loss": loss.dice, "bce": loss.bce, "kl": loss.kl, "object": loss.object,
                "lr": info.lr, "grad_norm": info.grad_norm,
                "images_per_s": ips, "epoch": self.state.epoch,
            }))?;
            bar.set_position(step as u64);
            bar.set_message(format!("loss {:.4} | {ips:.2} img/s", loss.total));
            last_loss = loss;
            let done = step >= total;
            let out_of_time = budget.is_some_and(|b| start.elapsed().as_secs_f64() >= b);
            let stop = opts.stop_after.is_some_and(|s| step >= s);
            let validate =
                (self.config.val_every > 0 && step.is_multiple_of(self.config.val_every)) || done || out_of_time;
            if validate && !self.data.val_queries.is_empty() {
                let (per, mean) = self.validate()?;
                let names: BTreeMap<String, f64> = per.iter().map(|(c, d)| (c.to_string(), *d)).collect();
                self.log(serde_json::json!({"step": step, "val_dice": names, "val_mean_dice": mean}))?;
                bar.println(format!("step {step}: validation mean Dice {mean:.4}"));
                if self.state.best.is_none_or(|(b, _)| mean > b) {
                    self.state.best = Some((mean, step));
                    self.save("best")?;
                }
                last_val = Some((per, mean));
            }
            if done
                || out_of_time
                || stop
                || (self.config.checkpoint_every > 0 && step.is_multiple_of(self.config.checkpoint_every))
            {
                self.save("last")?;
            }
            if out_of_time || stop {
                break;
            }
        }
        bar.finish_and_clear();
        let seconds = start.elapsed().as_secs_f64();
        Ok(TrainSummary {
            steps: self.state.step,
            last_loss,
            last_val,
            best: self.state.best,
            images_per_s: (self.state.images_seen - start_images) as f64 / seconds.max(1e-9),
            trainable_params: self.model.num_trainable(),
            seconds,
        })
    }

    /// The run folder.
    pub fn out(&self) -> &Path {
        &self.out
    }
}

/// `cargo xtask train`: set up (all checks first), then run.
pub fn train(config: TrainConfig, out: &Path, opts: &RunOptions) -> Result<TrainSummary> {
    let mut t = Trainer::new(config, out, opts)?;
    t.run(opts)
}
