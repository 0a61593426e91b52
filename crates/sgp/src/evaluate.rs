//! `cargo xtask eval` as a library call: a dataset as downloaded, split by patient as
//! training split it, every evaluated case segmented from supports of the other side, and
//! the metrics through `sgp-eval`.
//!
//! # What is written in `out`
//!
//! * `predictions/<case>.nii.gz` (the image's NIfTI header and affine; DICOM geometry for
//!   DICOM inputs) or `predictions/<case>.png` (integer labels), atomically;
//!   `predictions_coded/<case>.png` too when the dataset codes its masks otherwise
//!   (0/255 binary, grey levels), in the dataset's own coding;
//! * `labels/<case>.*`: the ground truth as decoded (integer labels), so that
//!   `cargo xtask eval-folder --pred out/predictions --gt out/labels` reproduces the
//!   summary from the files alone;
//! * `cases/<case>.json`: the case's metrics (what a resumed run reloads);
//! * `metrics.csv`, `summary.json`, `summary.md` (`sgp_eval::Report`: per-class Dice, IoU,
//!   HD95, NSD), `table.md` (Dice per class and mean, in %, the paper's table shape: Table IV
//!   for ACDC is RV, MYO, LV, mean), `overlays/<case>.png` for the first few cases,
//!   `eval.json` (the settings and the split).
//!
//! # Splits
//!
//! [`EvalSplit::Test`] / [`EvalSplit::Val`]: the seeded patient-level split of
//! [`sgp_data::split_by_patient`] with the same seed and fractions as training (read from
//! the run's `config.json`, or the training defaults); supports come from the training side.
//! [`EvalSplit::All`]: leave-one-patient-out over every labelled case (the training-free
//! setting): each case's supports are all other patients' cases.
//!
//! # Resume
//!
//! A case whose prediction file exists is not segmented again: its metrics are recomputed
//! from that file (and `cases/<case>.json` rewritten), so a resumed summary is exactly what
//! `eval-folder` gives on the same files. `eval.json` must match the settings of the run
//! being resumed, so mixed results cannot happen.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sgp_data::{Dataset, DatasetKind, LabelCoding, SplitConfig};
use sgp_eval::{CaseMetrics, LabelMetrics, MetricOptions, Report, Unmatched};
use sgp_memory::{CacheOptions, SupportCache, WeightsId};
use sgp_sam2::Sam2Model;

use crate::predictor::{CaseData, PredictorOptions};
use crate::predictor_files::{predictor_for_head, HeadChoice};
use crate::{Error, Result};

/// Which cases are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EvalSplit {
    /// The held-out test patients.
    Test,
    /// The validation patients.
    Val,
    /// Every labelled case, leave-one-patient-out.
    All,
}

impl std::str::FromStr for EvalSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "test" => Ok(Self::Test),
            "val" => Ok(Self::Val),
            "all" => Ok(Self::All),
            o => Err(Error::Input(format!("--split {o}: expected test, val or all"))),
        }
    }
}

/// The split training used: seed and fractions (from a run's `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SplitSettings {
    /// Seed.
    pub seed: u64,
    /// Share of patients for validation.
    pub val_fraction: f64,
    /// Share of patients for testing.
    pub test_fraction: f64,
}

impl Default for SplitSettings {
    /// Training's defaults (`TrainConfig::new`).
    fn default() -> Self {
        Self {
            seed: 0,
            val_fraction: 0.2,
            test_fraction: 0.2,
        }
    }
}

/// One evaluation.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    /// Dataset layout.
    pub dataset: DatasetKind,
    /// Dataset folder as downloaded.
    pub root: PathBuf,
    /// Cases evaluated.
    pub split: EvalSplit,
    /// The split's seed and fractions.
    pub split_settings: SplitSettings,
    /// Output folder.
    pub out: PathBuf,
    /// Predictor settings (K, bank, direction, classes, ablation).
    pub options: PredictorOptions,
    /// Metric options (NSD tolerance).
    pub metrics: MetricOptions,
    /// Overlays for this many cases (the first ones).
    pub overlays: usize,
    /// Support cache folder; None: memory only.
    pub cache_dir: Option<PathBuf>,
    /// At most this many support cases (the first of the support side; None: all).
    pub max_support_cases: Option<usize>,
    /// At most this many evaluated cases (the first ones; None: all).
    pub max_cases: Option<usize>,
    /// Accept the unlabelled images of releases that ship some (ACDC `testing/` of 2017,
    /// REFUGE's test images; `data verify --allow-unlabelled`): they are left out.
    pub allow_unlabelled: bool,
}

/// The dataset as `req` asks for it.
fn load_dataset(req: &EvalRequest) -> Result<Dataset> {
    let options = sgp_data::ScanOptions {
        allow_unlabelled: req.allow_unlabelled,
    };
    Ok(sgp_data::load_with(req.dataset, &req.root, &options)?)
}

/// Progress of an evaluation, for a bar with ETA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalProgress {
    /// Support items encoded so far, of the total.
    Supports(usize, usize),
    /// Cases finished so far (resumed ones included), of the total.
    Cases(usize, usize),
}

/// What an evaluation produced.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    /// The aggregated report (also in `summary.json`).
    pub report: Report,
    /// Case ids evaluated, in order.
    pub cases: Vec<String>,
    /// Cases whose prediction came from an earlier run's file (not segmented again).
    pub resumed: usize,
    /// Cases segmented by this call.
    pub predicted: usize,
    /// The Dice table (`table.md`).
    pub table: String,
    /// Support items in the pool.
    pub support_items: usize,
}

/// The evaluated case ids and the support case ids of each (by patient).
fn plan(ds: &Dataset, req: &EvalRequest) -> Result<(Vec<String>, Vec<String>)> {
    let labelled: Vec<sgp_data::Case> = ds.labelled().cloned().collect();
    if labelled.is_empty() {
        return Err(Error::Input(format!("{}: no labelled case", req.root.display())));
    }
    let all: Vec<String> = labelled.iter().map(|c| c.id.clone()).collect();
    let (mut eval, mut support) = match req.split {
        EvalSplit::All => (all.clone(), all),
        EvalSplit::Test | EvalSplit::Val => {
            let s = sgp_data::split_by_patient(
                &labelled,
                &SplitConfig {
                    seed: req.split_settings.seed,
                    support_patients: 0,
                    val_fraction: req.split_settings.val_fraction,
                    test_fraction: req.split_settings.test_fraction,
                },
            )?;
            let eval = if req.split == EvalSplit::Test { s.test } else { s.val };
            (eval, s.train)
        }
    };
    if eval.is_empty() {
        return Err(Error::Input(format!(
            "the {:?} split of {} is empty (too few patients for the fractions; try --split all)",
            req.split,
            req.root.display()
        )));
    }
    if let Some(n) = req.max_cases {
        eval.truncate(n.max(1));
    }
    if let Some(n) = req.max_support_cases {
        // Keep the evaluated cases' supports available in leave-one-out: cut the others.
        support.truncate(n.max(1));
    }
    Ok((eval, support))
}

fn case_ext(case: &sgp_data::Case) -> &'static str {
    match case.images.first().and_then(|p| sgp_data::file_kind(p)) {
        Some(sgp_data::FileKind::Raster) => "png",
        _ => "nii.gz",
    }
}

/// Encodes integer labels in the dataset's mask coding (for `predictions_coded/`).
fn encode_coding(labels: &ndarray::ArrayD<u16>, coding: &LabelCoding) -> Option<ndarray::ArrayD<u16>> {
    match coding {
        LabelCoding::Integer => None,
        LabelCoding::Binary { .. } => Some(labels.mapv(|v| if v > 0 { 255 } else { 0 })),
        LabelCoding::GreyLevels { levels, .. } => {
            Some(labels.mapv(|v| levels.iter().find(|(_, l)| *l == v).map(|(g, _)| *g).unwrap_or(0)))
        }
    }
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    sgp_data::write_atomic(path, text.as_bytes())?;
    Ok(())
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|source| Error::Io {
        path: p.to_path_buf(),
        source,
    })
}

/// The classes evaluated: `--classes`, else the dataset's declared foreground; for layouts
/// that declare none (generic folders), every label present in the support cases.
fn eval_classes(ds: &Dataset, req: &EvalRequest, support_ids: &[String]) -> Result<Vec<u16>> {
    if let Some(c) = &req.options.classes {
        return c
            .iter()
            .map(|&v| u16::try_from(v).map_err(|_| Error::Input(format!("class {v} is too large"))))
            .collect();
    }
    if !ds.labels.open {
        return Ok(ds.labels.foreground());
    }
    let mut present = BTreeSet::new();
    for id in support_ids {
        if let Some(case) = ds.case(id) {
            let labels = case.read_labels(&ds.labels)?;
            present.extend(labels.data.iter().copied().filter(|&v| v != 0));
        }
    }
    Ok(present.into_iter().collect())
}

/// The settings a resumed run must share (`eval.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct EvalSettings {
    dataset: String,
    root: PathBuf,
    split: EvalSplit,
    split_settings: SplitSettings,
    weights: String,
    head: String,
    support_size: usize,
    selection: String,
    bank: String,
    bank_size: Option<usize>,
    direction: String,
    axis: usize,
    support_slices: usize,
    classes: Vec<u16>,
    ablation: crate::predictor::Ablation,
    nsd_tolerance_mm: f64,
    max_support_cases: Option<usize>,
    cases: Vec<String>,
    support_cases: Vec<String>,
}

/// Runs an evaluation (see the module docs). `progress` is called as supports are encoded
/// and cases finish.
pub fn evaluate_dataset(
    model: &Sam2Model,
    weights: &WeightsId,
    head: &HeadChoice,
    req: &EvalRequest,
    progress: &mut dyn FnMut(EvalProgress),
) -> Result<EvalOutcome> {
    let _span = tracing::info_span!("evaluate", dataset = %req.dataset, root = %req.root.display()).entered();
    let ds = load_dataset(req)?;
    if let Some(bad) = ds.issues.iter().find(|i| i.fatal) {
        return Err(Error::Input(format!(
            "the {} dataset at {} has problems ({}: {}); run `cargo xtask data verify`",
            req.dataset,
            req.root.display(),
            bad.path.display(),
            bad.message
        )));
    }
    let (eval_ids, support_ids) = plan(&ds, req)?;
    let classes = eval_classes(&ds, req, &support_ids)?;
    if classes.is_empty() {
        return Err(Error::Input(
            "the dataset declares no foreground class; give --classes".into(),
        ));
    }
    let mut options = req.options.clone();
    options.classes = Some(classes.iter().map(|&c| u32::from(c)).collect());

    let settings = EvalSettings {
        dataset: req.dataset.to_string(),
        root: req.root.clone(),
        split: req.split,
        split_settings: req.split_settings,
        weights: format!("{weights:?}"),
        head: format!("{head:?}"),
        support_size: options.support_size,
        selection: format!("{:?}", options.selection),
        bank: format!("{:?}", options.bank),
        bank_size: options.bank_size,
        direction: format!("{:?}", options.direction),
        axis: options.axis,
        support_slices: options.support_slices,
        classes: classes.clone(),
        ablation: options.ablation,
        nsd_tolerance_mm: req.metrics.nsd_tolerance_mm,
        max_support_cases: req.max_support_cases,
        cases: eval_ids.clone(),
        support_cases: support_ids.clone(),
    };
    mkdir(&req.out)?;
    let settings_path = req.out.join("eval.json");
    if settings_path.is_file() {
        let text = std::fs::read_to_string(&settings_path).map_err(|source| Error::Io {
            path: settings_path.clone(),
            source,
        })?;
        let old: EvalSettings = serde_json::from_str(&text)
            .map_err(|e| Error::Input(format!("{}: {e} (delete it to start afresh)", settings_path.display())))?;
        if old != settings {
            return Err(Error::Input(format!(
                "{} holds an evaluation with other settings ({}); choose another --out or delete it",
                req.out.display(),
                settings_path.display()
            )));
        }
    } else {
        write_json(&settings_path, &settings)?;
    }
    let dirs = ["predictions", "labels", "cases"].map(|d| req.out.join(d));
    for d in &dirs {
        mkdir(d)?;
    }
    let coded = !matches!(ds.labels.coding, LabelCoding::Integer);

    let predictor = predictor_for_head(model, head, options.clone())?;
    let cache = match &req.cache_dir {
        Some(dir) => SupportCache::new(CacheOptions {
            dir: Some(dir.clone()),
            ..CacheOptions::default()
        })?,
        None => SupportCache::in_memory(4096),
    };
    let mut pool = predictor.pool(cache, weights.clone());
    let by_id = |id: &str| ds.case(id).ok_or_else(|| Error::Input(format!("case {id} vanished")));

    // Cases still to do decide whether supports are needed at all.
    let done = |id: &str, ext: &str| dirs[0].join(format!("{id}.{ext}")).is_file();
    let todo: Vec<&String> = eval_ids
        .iter()
        .filter(|id| ds.case(id).is_some_and(|c| !done(id, case_ext(c))))
        .collect();
    if !todo.is_empty() {
        for id in &support_ids {
            let case = by_id(id)?;
            let data = CaseData::read(case, &ds.labels, options.axis)?;
            predictor.add_support_case(&mut pool, &data)?;
        }
        if pool.is_empty() {
            return Err(Error::Input("no support case holds a wanted class".into()));
        }
        let n = pool.len();
        pool.encode_all(&mut |d, t| progress(EvalProgress::Supports(d, t)))?;
        tracing::info!(items = n, "supports encoded");
    }

    let total = eval_ids.len();
    let mut results = Vec::with_capacity(total);
    let mut resumed = 0;
    let mut predicted = 0;
    for (i, id) in eval_ids.iter().enumerate() {
        let case = by_id(id)?;
        let ext = case_ext(case);
        let pred_path = dirs[0].join(format!("{id}.{ext}"));
        let gt_path = dirs[1].join(format!("{id}.{ext}"));
        let metrics_path = dirs[2].join(format!("{id}.json"));
        let _span = tracing::info_span!("eval_case", case = %id).entered();
        let data = CaseData::read(case, &ds.labels, options.axis)?;
        let gt = data
            .labels
            .clone()
            .ok_or_else(|| Error::Input(format!("case {id} has no labels")))?;
        let pred = if pred_path.is_file() {
            resumed += 1;
            sgp_data::read_labels(&pred_path)?.data
        } else {
            predicted += 1;
            let p = predictor.predict_case(&data, &mut pool, &mut |_, _| {})?;
            crate::pipeline::write_labels(&pred_path, &p.labels, &data.image)?;
            if coded && ext == "png" {
                if let Some(enc) = encode_coding(&p.labels, &ds.labels.coding) {
                    let dir = req.out.join("predictions_coded");
                    mkdir(&dir)?;
                    crate::pipeline::write_labels(&dir.join(format!("{id}.png")), &enc, &data.image)?;
                }
            }
            if i < req.overlays {
                overlay(&req.out, id, &data, &gt, &p.labels)?;
            }
            p.labels
        };
        if !gt_path.is_file() {
            crate::pipeline::write_labels(&gt_path, &gt.data, &data.image)?;
        }
        let metrics = case_metrics(id, &pred, &gt, &classes, &req.metrics)?;
        write_json(&metrics_path, &metrics)?;
        results.push(metrics);
        progress(EvalProgress::Cases(i + 1, total));
    }
    results.sort_by(|a, b| a.case.cmp(&b.case));
    let report = Report::new(results, &classes, req.metrics.nsd_tolerance_mm, Unmatched::default());
    sgp_data::write_atomic(&req.out.join("metrics.csv"), report.to_csv().as_bytes())?;
    sgp_data::write_atomic(&req.out.join("summary.json"), report.to_json()?.as_bytes())?;
    sgp_data::write_atomic(&req.out.join("summary.md"), report.to_markdown().as_bytes())?;
    let title = format!(
        "SAM2-SGP ({}, K={}, {})",
        if matches!(head, HeadChoice::TrainingFree) {
            "training-free"
        } else {
            "trained"
        },
        options.support_size,
        options.ablation.name()
    );
    let table = dice_table(&ds, &classes, &[(title, &report)]);
    sgp_data::write_atomic(&req.out.join("table.md"), table.as_bytes())?;
    Ok(EvalOutcome {
        report,
        cases: eval_ids,
        resumed,
        predicted,
        table,
        support_items: pool.len(),
    })
}

/// Metrics of one case, on the ground truth's grid (trailing singleton axes dropped the way
/// `eval-folder` drops them, so both give the same numbers).
fn case_metrics(
    id: &str,
    pred: &ndarray::ArrayD<u16>,
    gt: &sgp_data::Volume<u16>,
    classes: &[u16],
    options: &MetricOptions,
) -> Result<CaseMetrics> {
    if pred.shape() != gt.data.shape() {
        return Err(Error::Input(format!(
            "case {id}: prediction {:?} vs labels {:?}",
            pred.shape(),
            gt.data.shape()
        )));
    }
    let (g, spacing) = squeeze(gt.data.clone(), &gt.spacing);
    let (p, _) = squeeze(pred.clone(), &gt.spacing);
    let metrics: Vec<LabelMetrics> = sgp_eval::evaluate_labels(p.view(), g.view(), &spacing, classes, options)?;
    Ok(CaseMetrics {
        case: id.to_string(),
        metrics,
    })
}

/// Drops singleton axes beyond the second (as `sgp_eval::folder` does).
fn squeeze<T>(mut data: ndarray::ArrayD<T>, spacing: &[f64]) -> (ndarray::ArrayD<T>, Vec<f64>) {
    let mut spacing: Vec<f64> = spacing.to_vec();
    spacing.resize(data.ndim(), 1.0);
    let mut k = data.ndim();
    while k > 0 && data.ndim() > 2 {
        k -= 1;
        if data.shape()[k] == 1 {
            data = data.index_axis_move(ndarray::Axis(k), 0);
            spacing.remove(k);
        }
    }
    (data, spacing)
}

fn overlay(
    out: &Path,
    id: &str,
    data: &CaseData,
    gt: &sgp_data::Volume<u16>,
    pred: &ndarray::ArrayD<u16>,
) -> Result<()> {
    let dir = out.join("overlays");
    mkdir(&dir)?;
    let (g, _) = squeeze(gt.data.clone(), &gt.spacing);
    let (p, _) = squeeze(pred.clone(), &gt.spacing);
    let (im, _) = squeeze(data.image.data.clone(), &gt.spacing);
    let orientation = if data.raster {
        sgp_eval::Orientation::RowCol
    } else {
        sgp_eval::Orientation::NiftiXyz
    };
    let image = (im.shape() == g.shape()).then(|| im.view());
    let pic = sgp_eval::render_overlay(g.view(), p.view(), image, orientation, &Default::default())?;
    let path = dir.join(format!("{id}.png"));
    let mut bytes = std::io::Cursor::new(Vec::new());
    pic.write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
    sgp_data::write_atomic(&path, bytes.get_ref())?;
    Ok(())
}

/// Dice (%) per class and their mean, one row per method: the shape of the paper's tables
/// (Table IV for ACDC: RV, MYO, LV, mean). Cases where a class is absent from both masks do
/// not count for it (`sgp_eval`'s convention).
pub fn dice_table(ds: &Dataset, classes: &[u16], rows: &[(String, &Report)]) -> String {
    let names: Vec<String> = classes.iter().map(|&c| table_name(ds, c)).collect();
    let mut s = format!(
        "| method | {} | mean |\n|---|{}---|\n",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for (method, report) in rows {
        let cells: Vec<String> = classes
            .iter()
            .map(|c| {
                report
                    .per_class
                    .iter()
                    .find(|p| p.label == *c)
                    .and_then(|p| p.dice.mean)
                    .map(|d| format!("{:.2}", 100.0 * d))
                    .unwrap_or_else(|| "–".into())
            })
            .collect();
        let mean = report
            .mean_over_classes
            .dice
            .map(|d| format!("{:.2}", 100.0 * d))
            .unwrap_or_else(|| "–".into());
        s.push_str(&format!("| {method} | {} | {mean} |\n", cells.join(" | ")));
    }
    s
}

/// The paper's short names for ACDC's structures; the dataset's own names elsewhere.
fn table_name(ds: &Dataset, c: u16) -> String {
    let name = ds.labels.name(c);
    if ds.kind == DatasetKind::Acdc {
        let l = name.to_ascii_lowercase();
        if l.contains("right") || l == "rv" {
            return "RV".into();
        }
        if l.contains("myo") {
            return "MYO".into();
        }
        if l.contains("left") || l == "lv" {
            return "LV".into();
        }
    }
    name
}

/// The paper's support-size sweep (Table VI).
pub const PAPER_K_SWEEP: [usize; 5] = [1, 2, 4, 8, 16];

/// The variants of `--ablation`: the full model, no PMG, no PMA, no 3DM (volumes only),
/// and the support-size sweep `k_sweep` ([`PAPER_K_SWEEP`] for the paper's Tables V and VI).
pub fn ablation_variants(base: &PredictorOptions, volumes: bool, k_sweep: &[usize]) -> Vec<(String, PredictorOptions)> {
    let mut v = Vec::new();
    let with = |f: &dyn Fn(&mut PredictorOptions)| {
        let mut o = base.clone();
        f(&mut o);
        o
    };
    v.push(("full".to_string(), base.clone()));
    v.push(("no-pmg".into(), with(&|o| o.ablation.no_pmg = true)));
    v.push(("no-pma".into(), with(&|o| o.ablation.no_pma = true)));
    if volumes {
        v.push(("no-3dm".into(), with(&|o| o.ablation.no_3dm = true)));
    }
    for &k in k_sweep {
        v.push((format!("K={k}"), with(&|o| o.support_size = k)));
    }
    v
}

/// Whether a labelled case of `ds` is a volume (three axes longer than one, as the
/// predictor's 3D path needs), judged from the NIfTI headers: a 2D NIfTI or an `x × y × 1`
/// file is an image, like a PNG, and gets no `no-3dm` row.
fn has_volumes(ds: &Dataset) -> Result<bool> {
    for case in ds.labelled() {
        let Some(p) = case.images.first() else { continue };
        if !matches!(sgp_data::file_kind(p), Some(sgp_data::FileKind::Nifti { .. })) {
            continue;
        }
        let dim = sgp_data::read_nifti_header(p)?.stored_dim();
        if dim.iter().take(3).filter(|&&d| d > 1).count() == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs every [`ablation_variants`] into `out/ablation/<variant>/` (each resumable; a K of
/// the sweep equal to the base K reuses `full`'s folder) and writes `out/ablation.md`, one
/// Dice table with a row per variant. Returns the table.
pub fn evaluate_ablation(
    model: &Sam2Model,
    weights: &WeightsId,
    head: &HeadChoice,
    req: &EvalRequest,
    k_sweep: &[usize],
    progress: &mut dyn FnMut(&str, EvalProgress),
) -> Result<String> {
    let ds = load_dataset(req)?;
    let volumes = has_volumes(&ds)?;
    let mut reports = Vec::new();
    let variants = ablation_variants(&req.options, volumes, k_sweep);
    for (name, options) in &variants {
        let dir = if *options == req.options {
            "full".to_string()
        } else {
            name.replace('=', "")
        };
        let sub = EvalRequest {
            out: req.out.join("ablation").join(dir),
            options: options.clone(),
            overlays: 0,
            ..req.clone()
        };
        let r = evaluate_dataset(model, weights, head, &sub, &mut |p| progress(name, p))?;
        reports.push((name.clone(), r.report));
    }
    let (_, support_ids) = plan(&ds, req)?;
    let classes = eval_classes(&ds, req, &support_ids)?;
    let rows: Vec<(String, &Report)> = reports.iter().map(|(n, r)| (n.clone(), r)).collect();
    let table = dice_table(&ds, &classes, &rows);
    mkdir(&req.out)?;
    sgp_data::write_atomic(&req.out.join("ablation.md"), table.as_bytes())?;
    Ok(table)
}
