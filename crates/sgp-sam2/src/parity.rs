//! The parity runner: proves that our SAM2 computes the same function as the official
//! PyTorch code, case by case (format: `shared/specs/sam2-parity-fixtures.md`).
//!
//! A case is a folder with `case.json`, `config.json`, weights and `io.safetensors`.
//! For each case the runner computes every output its kind defines, compares those the
//! case holds as `out.<name>`, and optionally saves all of them.
//!
//! Extension points:
//! - new kinds: one arm in [`compute_outputs`], calling a function in the kind's module;
//! - new weight formats: one arm in [`load_case_model`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::Sam2Config;
use crate::model::Sam2Model;
use crate::sam_heads::PointInputs;
use crate::weights::StrictWeights;
use crate::{Error, Result};

/// Relative tolerance when case.json gives none.
pub const DEFAULT_RTOL: f64 = 1e-4;

/// One parity case, loaded.
#[derive(Debug)]
pub struct Case {
    /// Folder path relative to the run directory.
    pub name: String,
    pub dir: PathBuf,
    /// The whole `case.json`.
    pub meta: serde_json::Value,
    pub kind: String,
    pub rtol: f64,
    /// `in.<name>` tensors, keyed by `<name>`.
    pub inputs: HashMap<String, Tensor>,
    /// `out.<name>` tensors, keyed by `<name>`.
    pub expected: BTreeMap<String, Tensor>,
}

impl Case {
    /// Reads a case folder.
    pub fn load(dir: &Path, name: String, device: &Device) -> Result<Self> {
        let meta_path = dir.join("case.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|source| Error::Io {
            path: meta_path.clone(),
            source,
        })?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Parity(format!("{}: {e}", meta_path.display())))?;
        let kind = meta
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| Error::Parity(format!("{}: no \"kind\"", meta_path.display())))?
            .to_string();
        let rtol = meta.get("rtol").and_then(|r| r.as_f64()).unwrap_or(DEFAULT_RTOL);
        let io_path = dir.join("io.safetensors");
        let io = crate::weights::load_state_dict(&io_path, device)?;
        let mut inputs = HashMap::new();
        let mut expected = BTreeMap::new();
        for (k, t) in io {
            let t = t.to_dtype(DType::F32)?;
            if let Some(n) = k.strip_prefix("in.") {
                inputs.insert(n.to_string(), t);
            } else if let Some(n) = k.strip_prefix("out.") {
                expected.insert(n.to_string(), t);
            }
        }
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            meta,
            kind,
            rtol,
            inputs,
            expected,
        })
    }

    /// A required input.
    pub fn input(&self, name: &str) -> Result<&Tensor> {
        self.inputs
            .get(name)
            .ok_or_else(|| Error::Parity(format!("case {}: missing input in.{name}", self.name)))
    }

    /// An optional input.
    pub fn opt_input(&self, name: &str) -> Option<&Tensor> {
        self.inputs.get(name)
    }

    pub fn bool_option(&self, key: &str) -> Result<Option<bool>> {
        match self.meta.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Error::Parity(format!("case {}: {key} must be a boolean", self.name))),
        }
    }

    pub fn usize_option(&self, key: &str) -> Result<Option<usize>> {
        match self.meta.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| Error::Parity(format!("case {}: {key} must be a non-negative integer", self.name))),
        }
    }

    /// `weights_format` from case.json (`original` by default).
    pub fn weights_format(&self) -> &str {
        self.meta
            .get("weights_format")
            .and_then(|v| v.as_str())
            .unwrap_or("original")
    }
}

/// Builds the case's model according to its `weights_format`.
pub fn load_case_model(case: &Case, device: &Device) -> Result<Sam2Model> {
    match case.weights_format() {
        "original" | "pt" => {
            let config = Sam2Config::from_file(&case.dir.join("config.json"))?;
            let file = if case.weights_format() == "pt" {
                "weights.pt"
            } else {
                "weights.safetensors"
            };
            let weights = StrictWeights::from_file(&case.dir.join(file), device)?;
            Sam2Model::from_weights(&config, &weights, device)
        }
        "transformers" => {
            let loaded = crate::transformers_format::load_transformers(
                &case.dir.join("config.json"),
                &case.dir.join("model.safetensors"),
                None,
                device,
            )?;
            Ok(loaded.model)
        }
        other => Err(Error::Parity(format!("unsupported weights_format {other:?}"))),
    }
}

/// Computes every output the case's kind defines, named as in `out.<name>`.
pub fn compute_outputs(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let _span = tracing::info_span!("parity_case", case = %case.name, kind = %case.kind).entered();
    match case.kind.as_str() {
        "image_encoder" => image_encoder_outputs(&load_case_model(case, device)?, case),
        "sam_heads" => {
            let outputs = sam_heads_outputs(&load_case_model(case, device)?, case)?;
            if case.weights_format() == "transformers" {
                // The transformers forward defines only these three (format spec).
                const DEFINED: [&str; 3] = ["low_res_multimasks", "ious", "object_score_logits"];
                return Ok(outputs
                    .into_iter()
                    .filter(|(n, _)| DEFINED.contains(&n.as_str()))
                    .collect());
            }
            Ok(outputs)
        }
        // Memory-path kinds: functions in `track::parity_kinds`.
        "memory_encoder" | "memory_attention" | "track" => {
            use crate::track::parity_kinds;
            let model = load_case_model(case, device)?;
            let f = match case.kind.as_str() {
                "memory_encoder" => parity_kinds::memory_encoder,
                "memory_attention" => parity_kinds::memory_attention,
                _ => parity_kinds::track,
            };
            Ok(f(&model, &case.inputs, &case.meta)?.into_iter().collect())
        }
        other => Err(Error::Parity(format!("unknown kind {other:?}"))),
    }
}

/// Kind `image_encoder`: `model.forward_image(image)`.
pub fn image_encoder_outputs(model: &Sam2Model, case: &Case) -> Result<Vec<(String, Tensor)>> {
    let bo = model.forward_image(case.input("image")?)?;
    let mut out = Vec::new();
    for (i, t) in bo.backbone_fpn.iter().enumerate() {
        out.push((format!("backbone_fpn.{i}"), t.clone()));
    }
    for (i, t) in bo.vision_pos_enc.iter().enumerate() {
        out.push((format!("vision_pos_enc.{i}"), t.clone()));
    }
    Ok(out)
}

/// Kind `sam_heads`: `_forward_sam_heads` on the image-predictor features.
pub fn sam_heads_outputs(model: &Sam2Model, case: &Case) -> Result<Vec<(String, Tensor)>> {
    let multimask = case
        .bool_option("multimask_output")?
        .ok_or_else(|| Error::Parity(format!("case {}: sam_heads needs multimask_output", case.name)))?;
    let (pix, high_res) = model.image_features(case.input("image")?)?;
    let points = match (case.opt_input("point_coords"), case.opt_input("point_labels")) {
        (Some(c), Some(l)) => Some(PointInputs {
            coords: c.clone(),
            labels: l.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(Error::Parity(format!(
                "case {}: point_coords and point_labels go together",
                case.name
            )))
        }
    };
    let hi = high_res.as_ref().map(|(a, b)| (a, b));
    let o = model
        .sam_heads
        .forward(&pix, points.as_ref(), case.opt_input("mask_inputs"), hi, multimask)?;
    Ok(vec![
        ("low_res_multimasks".into(), o.low_res_multimasks),
        ("high_res_multimasks".into(), o.high_res_multimasks),
        ("ious".into(), o.ious),
        ("low_res_masks".into(), o.low_res_masks),
        ("high_res_masks".into(), o.high_res_masks),
        ("obj_ptr".into(), o.obj_ptr),
        ("object_score_logits".into(), o.object_score_logits),
    ])
}

/// The comparison of one output with its reference.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    /// Overall relative L2 error (NaN when not computable).
    pub rel_err: f64,
    /// The worst relative error over the items of the batch/frame dimension.
    pub worst_item_err: f64,
    pub passed: bool,
    /// Why it failed, when not (only) the error bound.
    pub note: Option<String>,
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    pub passed: bool,
    /// The case's tolerance.
    pub rtol: f64,
    pub tensors: Vec<TensorReport>,
    /// Set when the case could not run (then `passed` is false).
    pub error: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub cases: Vec<CaseReport>,
    pub passed: usize,
    pub failed: usize,
}

fn rel_l2(ours: &[f64], reference: &[f64]) -> f64 {
    let mut num = 0f64;
    let mut den = 0f64;
    for (a, b) in ours.iter().zip(reference) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    num.sqrt() / den.sqrt().max(1e-12)
}

/// Applies the pass rule: exact shape, all finite, relative L2 ≤ rtol overall and for
/// each index of `item_dim`.
pub fn compare(name: &str, ours: &Tensor, reference: &Tensor, rtol: f64, item_dim: usize) -> Result<TensorReport> {
    let fail = |note: String| TensorReport {
        name: name.to_string(),
        rel_err: f64::NAN,
        worst_item_err: f64::NAN,
        passed: false,
        note: Some(note),
    };
    if ours.dims() != reference.dims() {
        return Ok(fail(format!(
            "shape {:?}, expected {:?}",
            ours.dims(),
            reference.dims()
        )));
    }
    let a: Vec<f64> = ours.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = reference.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if a.iter().any(|v| !v.is_finite()) {
        return Ok(fail("output has NaN/Inf".into()));
    }
    let rel_err = rel_l2(&a, &b);
    let dims = ours.dims();
    let mut worst = rel_err;
    if item_dim < dims.len() && !a.is_empty() {
        let outer: usize = dims[..item_dim].iter().product();
        let n = dims[item_dim];
        let inner: usize = dims[item_dim + 1..].iter().product();
        worst = 0.0;
        for i in 0..n {
            let mut xa = Vec::with_capacity(outer * inner);
            let mut xb = Vec::with_capacity(outer * inner);
            for o in 0..outer {
                let start = (o * n + i) * inner;
                xa.extend_from_slice(&a[start..start + inner]);
                xb.extend_from_slice(&b[start..start + inner]);
            }
            worst = worst.max(rel_l2(&xa, &xb));
        }
    }
    let passed = rel_err <= rtol && worst <= rtol;
    Ok(TensorReport {
        name: name.to_string(),
        rel_err,
        worst_item_err: worst,
        passed,
        note: None,
    })
}

/// The batch/frame dimension of an output for the per-item bound.
fn item_dim_of(name: &str) -> usize {
    if name == "pix_feat_with_mem" {
        1
    } else {
        0
    }
}

/// Deepest folder level searched (guards against symbolic-link loops).
const MAX_DEPTH: usize = 16;

/// Finds every case folder (one holding `case.json`) under `dir`, sorted by name.
pub fn discover_cases(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Err(Error::Parity(format!("{} is not a directory", dir.display())));
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join("case.json").is_file() {
            let name = d
                .strip_prefix(dir)
                .map(|p| p.to_string_lossy().replace('\\', "/"))
                .unwrap_or_default();
            let name = if name.is_empty() { ".".to_string() } else { name };
            found.push((name, d));
            continue;
        }
        let entries = std::fs::read_dir(&d).map_err(|source| Error::Io {
            path: d.clone(),
            source,
        })?;
        for e in entries {
            let e = e.map_err(|source| Error::Io {
                path: d.clone(),
                source,
            })?;
            // `is_dir` follows symbolic links, so a folder of links to cases works.
            let path = e.path();
            if path.is_dir() && path.strip_prefix(dir).map(|p| p.components().count()).unwrap_or(0) < MAX_DEPTH {
                stack.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Writes `outputs` to `path` atomically (temp file in the same folder, then rename).
pub fn save_outputs(path: &Path, outputs: &[(String, Tensor)]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let map: HashMap<String, Tensor> = outputs
        .iter()
        .map(|(n, t)| Ok((format!("out.{n}"), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs one case; every error becomes a failed report.
pub fn run_case(name: &str, case_dir: &Path, save: Option<&Path>, device: &Device) -> CaseReport {
    let failed = |e: Error| CaseReport {
        name: name.to_string(),
        passed: false,
        rtol: DEFAULT_RTOL,
        tensors: vec![],
        error: Some(e.to_string()),
    };
    let case = match Case::load(case_dir, name.to_string(), device) {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    let outputs = match compute_outputs(&case, device) {
        Ok(o) => o,
        Err(e) => return failed(e),
    };
    if let Some(root) = save {
        if let Err(e) = save_outputs(&root.join(name).join("outputs.safetensors"), &outputs) {
            return failed(e);
        }
    }
    let computed: HashMap<&str, &Tensor> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tensors = Vec::new();
    for (n, reference) in &case.expected {
        let report = match computed.get(n.as_str()) {
            None => TensorReport {
                name: n.clone(),
                rel_err: f64::NAN,
                worst_item_err: f64::NAN,
                passed: false,
                note: Some(format!("kind {} does not define this output", case.kind)),
            },
            Some(ours) => match compare(n, ours, reference, case.rtol, item_dim_of(n)) {
                Ok(r) => r,
                Err(e) => return failed(e),
            },
        };
        tensors.push(report);
    }
    let passed = tensors.iter().all(|t| t.passed);
    CaseReport {
        name: name.to_string(),
        passed,
        rtol: case.rtol,
        tensors,
        error: None,
    }
}

/// Runs every case under `dir`, printing one line per compared tensor and a final
/// `N passed, M failed` line to stdout.
pub fn run_dir(dir: &Path, save: Option<&Path>) -> Result<Summary> {
    run_dir_with(dir, save, &Device::Cpu, &mut |line| println!("{line}"))
}

/// [`run_dir`] with a chosen device and line sink.
pub fn run_dir_with(dir: &Path, save: Option<&Path>, device: &Device, log: &mut dyn FnMut(&str)) -> Result<Summary> {
    let cases = discover_cases(dir)?;
    if cases.is_empty() {
        return Err(Error::Parity(format!(
            "no parity case (folder with case.json) under {}",
            dir.display()
        )));
    }
    let mut summary = Summary::default();
    for (name, path) in cases {
        let report = run_case(&name, &path, save, device);
        for t in &report.tensors {
            let status = if t.passed { "ok  " } else { "FAIL" };
            let note = t.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
            log(&format!(
                "{status} {name} {}: rel_err {:.3e} (worst item {:.3e}, rtol {:.0e}){note}",
                t.name, t.rel_err, t.worst_item_err, report.rtol
            ));
        }
        if let Some(e) = &report.error {
            log(&format!("FAIL {name}: {e}"));
        } else if report.tensors.is_empty() {
            log(&format!("ok   {name}: ran (no expected outputs)"));
        }
        if report.passed {
            summary.passed += 1;
        } else {
            summary.failed += 1;
        }
        summary.cases.push(report);
    }
    log(&format!("{} passed, {} failed", summary.passed, summary.failed));
    Ok(summary)
}
