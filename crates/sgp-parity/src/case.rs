//! One parity case folder (`case.json`, `config.json`, weights, `io.safetensors`), loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sgp_sam2::{Sam2Config, Sam2Model, StrictWeights};

use crate::{Error, Result};

/// Relative tolerance when case.json gives none.
pub const DEFAULT_RTOL: f64 = 1e-4;

/// One parity case, loaded: its options and its `in.*` / `out.*` tensors (as f32).
#[derive(Debug)]
pub struct Case {
    name: String,
    dir: PathBuf,
    meta: serde_json::Value,
    kind: String,
    rtol: f64,
    inputs: HashMap<String, Tensor>,
    expected: BTreeMap<String, Tensor>,
}

impl Case {
    /// Reads a case folder; `name` is how reports call it (its path relative to the run
    /// directory).
    pub fn load(dir: &Path, name: String, device: &Device) -> Result<Self> {
        let meta_path = dir.join("case.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|source| Error::Io {
            path: meta_path.clone(),
            source,
        })?;
        let meta: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: meta_path.clone(),
            source,
        })?;
        let kind = meta
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or_else(|| Error::Case {
                case: name.clone(),
                reason: "case.json has no string \"kind\"".into(),
            })?
            .to_string();
        let rtol = match meta.get("rtol") {
            None | Some(serde_json::Value::Null) => DEFAULT_RTOL,
            Some(v) => v
                .as_f64()
                .filter(|r| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| Error::Case {
                    case: name.clone(),
                    reason: format!("rtol must be a non-negative number, got {v}"),
                })?,
        };
        let io = sgp_sam2::load_state_dict(&dir.join("io.safetensors"), device)?;
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

    /// The case's name (folder path relative to the run directory).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The case folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The whole `case.json`, for kind options without an accessor.
    pub fn meta(&self) -> &serde_json::Value {
        &self.meta
    }

    /// The case's kind (`case.json` `"kind"`).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The case's relative tolerance.
    pub fn rtol(&self) -> f64 {
        self.rtol
    }

    /// The expected outputs (`out.<name>`, keyed by `<name>`).
    pub fn expected(&self) -> &BTreeMap<String, Tensor> {
        &self.expected
    }

    /// An error about this case, for kinds to report malformed inputs.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Case {
            case: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// A required input `in.<name>`.
    pub fn input(&self, name: &str) -> Result<&Tensor> {
        self.inputs
            .get(name)
            .ok_or_else(|| self.error(format!("missing input in.{name}")))
    }

    /// An optional input `in.<name>`.
    pub fn opt_input(&self, name: &str) -> Option<&Tensor> {
        self.inputs.get(name)
    }

    /// Optional inputs that come together or not at all (e.g. point coords and labels).
    pub fn input_pair(&self, a: &str, b: &str) -> Result<Option<(&Tensor, &Tensor)>> {
        match (self.opt_input(a), self.opt_input(b)) {
            (Some(x), Some(y)) => Ok(Some((x, y))),
            (None, None) => Ok(None),
            _ => Err(self.error(format!("in.{a} and in.{b} go together"))),
        }
    }

    /// A boolean option of case.json (None when absent or null).
    pub fn bool_option(&self, key: &str) -> Result<Option<bool>> {
        match self.meta.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.error(format!("{key} must be a boolean"))),
        }
    }

    /// A non-negative integer option of case.json (None when absent or null).
    pub fn usize_option(&self, key: &str) -> Result<Option<usize>> {
        match self.meta.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.error(format!("{key} must be a non-negative integer"))),
        }
    }

    /// A string option of case.json (None when absent or null).
    pub fn str_option(&self, key: &str) -> Result<Option<&str>> {
        match self.meta.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(format!("{key} must be a string"))),
        }
    }

    /// `weights_format` from case.json (`original` by default).
    pub fn weights_format(&self) -> &str {
        self.meta
            .get("weights_format")
            .and_then(|v| v.as_str())
            .unwrap_or("original")
    }

    /// Builds the case's model according to its `weights_format` (`original`, `pt`,
    /// `transformers`).
    pub fn load_model(&self, device: &Device) -> Result<Sam2Model> {
        match self.weights_format() {
            "original" | "pt" => {
                let config = Sam2Config::from_file(&self.dir.join("config.json"))?;
                let file = if self.weights_format() == "pt" {
                    "weights.pt"
                } else {
                    "weights.safetensors"
                };
                let weights = StrictWeights::from_file(&self.dir.join(file), device)?;
                Ok(Sam2Model::from_weights(&config, &weights, device)?)
            }
            "transformers" => {
                let loaded = sgp_sam2::load_transformers(
                    &self.dir.join("config.json"),
                    &self.dir.join("model.safetensors"),
                    None,
                    device,
                )?;
                Ok(loaded.model)
            }
            other => Err(Error::UnsupportedFormat(other.to_string())),
        }
    }
}
