//! Discovering cases, running them through the kind registry, reporting and saving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::case::{Case, DEFAULT_RTOL};
use crate::compare::{compare, TensorReport};
use crate::kinds::Registry;
use crate::{Error, Result};

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// The case name (folder relative to the run directory).
    pub name: String,
    /// Every expected output met the pass rule (false when the case could not run).
    pub passed: bool,
    /// The case's tolerance.
    pub rtol: f64,
    /// One report per expected output.
    pub tensors: Vec<TensorReport>,
    /// Set when the case could not run (then `passed` is false).
    pub error: Option<String>,
}

/// The result of a run.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Every case, in name order.
    pub cases: Vec<CaseReport>,
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed or could not run.
    pub failed: usize,
}

/// Deepest folder level searched (guards against symbolic-link loops).
const MAX_DEPTH: usize = 16;

/// Finds every case folder (one holding `case.json`) under `dir`, sorted by name.
pub fn discover_cases(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !dir.is_dir() {
        return Err(Error::Dir(format!("{} is not a directory", dir.display())));
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

/// Writes `outputs` to `path` as `out.<name>` f32 tensors, atomically (temp file in the
/// same folder, then rename), so an interrupted run never leaves a truncated file.
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
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Computes every output the case's kind defines, named as in `out.<name>`.
pub fn compute_outputs(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let registry = Registry::builtin();
    let spec = registry
        .get(case.kind())
        .ok_or_else(|| Error::UnknownKind(case.kind().to_string()))?;
    let _span = tracing::info_span!("parity_case", case = %case.name(), kind = %case.kind()).entered();
    (spec.compute)(case, device)
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
    let registry = Registry::builtin();
    let Some(spec) = registry.get(case.kind()) else {
        return failed(Error::UnknownKind(case.kind().to_string()));
    };
    let outputs = {
        let _span = tracing::info_span!("parity_case", case = %name, kind = %case.kind()).entered();
        match (spec.compute)(&case, device) {
            Ok(o) => o,
            Err(e) => return failed(e),
        }
    };
    if let Some(root) = save {
        if let Err(e) = save_outputs(&root.join(name).join("outputs.safetensors"), &outputs) {
            return failed(e);
        }
    }
    let computed: HashMap<&str, &Tensor> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut tensors = Vec::new();
    for (n, reference) in case.expected() {
        let report = match computed.get(n.as_str()) {
            None => TensorReport::failed(n, format!("kind {} does not define this output", case.kind())),
            Some(ours) => match compare(n, ours, reference, case.rtol(), spec.item_dim(n)) {
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
        rtol: case.rtol(),
        tensors,
        error: None,
    }
}

/// Runs every case under `dir` on the CPU, printing one line per compared tensor and a
/// final `N passed, M failed` line to stdout.
pub fn run_dir(dir: &Path, save: Option<&Path>) -> Result<Summary> {
    run_dir_with(dir, save, &Device::Cpu, &mut |line| println!("{line}"))
}

/// [`run_dir`] with a chosen device and line sink.
pub fn run_dir_with(dir: &Path, save: Option<&Path>, device: &Device, log: &mut dyn FnMut(&str)) -> Result<Summary> {
    let cases = discover_cases(dir)?;
    if cases.is_empty() {
        return Err(Error::Dir(format!(
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
                "{status} {name} {}: rel_err {:.3e} (worst item {:.3e}, rtol {:.0e}), max_abs {:.3e} (ref max {:.3e}){note}",
                t.name, t.rel_err, t.worst_item_err, report.rtol, t.max_abs_err, t.ref_max_abs
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
