//! Loading checkpoints with official key names, and checking them strictly.
//!
//! A checkpoint that does not fit the model should fail with ONE error that lists every
//! problem (missing, unexpected and mis-shaped keys), not with the first missing key a
//! module happens to request. [`StrictWeights`] therefore hands the model a `VarBuilder`
//! that never fails: it records each request, returns a zero placeholder for anything
//! wrong, and [`StrictWeights::finish`] reports all problems once construction is done.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;

use crate::{Error, Result};

/// On-disk formats we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFileFormat {
    /// `.safetensors`: 8-byte little-endian header length, then a JSON header.
    Safetensors,
    /// A zip-based `torch.save` file (official `.pt` checkpoints).
    TorchZip,
}

/// Detects the format from the file's first bytes (extensions lie).
pub fn detect_format(path: &Path) -> Result<WeightsFileFormat> {
    let mut f = std::fs::File::open(path).map_err(|source| io_err(path, source))?;
    let mut head = [0u8; 9];
    let mut n = 0;
    while n < head.len() {
        let k = f.read(&mut head[n..]).map_err(|source| io_err(path, source))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return Ok(WeightsFileFormat::TorchZip);
    }
    if n == 9 && head[8] == b'{' {
        return Ok(WeightsFileFormat::Safetensors);
    }
    if n >= 2 && head[0] == 0x80 {
        return Err(format_err(
            path,
            "legacy (non-zip) torch pickle; re-save it with torch.save(..., _use_new_zipfile_serialization=True)",
        ));
    }
    Err(format_err(
        path,
        "neither a safetensors file nor a zip-based torch checkpoint",
    ))
}

/// Loads a state dict (official key names) from `.safetensors` or an official `.pt`
/// checkpoint (`{"model": state_dict}`; a bare state dict is accepted too).
pub fn load_state_dict(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let _span = tracing::info_span!("load_state_dict", path = %path.display()).entered();
    match detect_format(path)? {
        WeightsFileFormat::Safetensors => {
            let bytes = std::fs::read(path).map_err(|source| io_err(path, source))?;
            // Validate the header and offsets first: this reports truncation as an error.
            let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format_err(path, &e.to_string()))?;
            let mut out = HashMap::with_capacity(st.len());
            for (name, view) in st.tensors() {
                let t = safetensor_view_to_tensor(&view, device)
                    .map_err(|e| format_err(path, &format!("tensor {name}: {e}")))?;
                out.insert(name, t);
            }
            Ok(out)
        }
        WeightsFileFormat::TorchZip => {
            // The pickle reader is complex third-party code; a corrupt file must not take
            // the process down, so a panic inside it becomes a format error.
            let p = path.to_path_buf();
            let read = |key: Option<&'static str>| {
                let p = p.clone();
                std::panic::catch_unwind(move || candle_core::pickle::read_all_with_key(&p, key))
                    .unwrap_or_else(|_| Err(candle_core::Error::Msg("reader panicked".into())))
            };
            let tensors = match read(Some("model")) {
                Ok(t) if !t.is_empty() => t,
                first => match read(None) {
                    Ok(t) if !t.is_empty() => t,
                    Ok(_) => return Err(format_err(path, "no tensors found (expected {\"model\": state_dict})")),
                    Err(e) => {
                        let why = match first {
                            Err(e1) => format!("{e1}; as a bare state dict: {e}"),
                            Ok(_) => e.to_string(),
                        };
                        return Err(format_err(path, &why));
                    }
                },
            };
            let mut out = HashMap::with_capacity(tensors.len());
            for (name, t) in tensors {
                let t = t.to_device(device).map_err(|e| format_err(path, &e.to_string()))?;
                out.insert(name, t);
            }
            Ok(out)
        }
    }
}

fn safetensor_view_to_tensor(
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> candle_core::Result<Tensor> {
    use safetensors::Dtype as S;
    let dtype = match view.dtype() {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F64 => DType::F64,
        S::U8 => DType::U8,
        S::U32 => DType::U32,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        d => candle_core::bail!("unsupported dtype {d:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
}

fn io_err(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, reason: &str) -> Error {
    Error::WeightsFormat {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[derive(Debug, Default)]
struct Record {
    /// Every key the model asked for, with the shape it asked for.
    requested: BTreeMap<String, Vec<usize>>,
    missing: Vec<String>,
    mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys whose dtype cannot stand for a float parameter.
    bad_dtype: Vec<(String, DType)>,
}

#[derive(Debug)]
struct StrictBackend {
    tensors: HashMap<String, Tensor>,
    record: Arc<Mutex<Record>>,
}

impl candle_nn::var_builder::SimpleBackend for StrictBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let want = s.dims().to_vec();
        let mut rec = self
            .record
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        let first_request = rec.requested.insert(name.to_string(), want.clone()).is_none();
        let placeholder = || Tensor::zeros(want.as_slice(), dtype, dev);
        let Some(t) = self.tensors.get(name) else {
            if first_request {
                rec.missing.push(name.to_string());
            }
            return placeholder();
        };
        if t.dims() != want.as_slice() {
            if first_request {
                rec.mismatched.push((name.to_string(), want.clone(), t.dims().to_vec()));
            }
            return placeholder();
        }
        if !t.dtype().is_float() && dtype.is_float() {
            if first_request {
                rec.bad_dtype.push((name.to_string(), t.dtype()));
            }
            return placeholder();
        }
        // Half-precision or f64 checkpoints are converted to the model's dtype.
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut rec = self
            .record
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
        match self.tensors.get(name) {
            Some(t) => {
                rec.requested.insert(name.to_string(), t.dims().to_vec());
                t.to_dtype(dtype)?.to_device(dev)
            }
            None => {
                // Without a shape there is no placeholder to give: this one fails now.
                rec.missing.push(name.to_string());
                candle_core::bail!("missing weight {name}")
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A state dict wrapped for strict, all-problems-at-once loading.
#[derive(Debug, Clone)]
pub struct StrictWeights {
    tensors: HashMap<String, Tensor>,
    record: Arc<Mutex<Record>>,
    source: Option<PathBuf>,
}

impl StrictWeights {
    /// Wraps an in-memory state dict (e.g. a test's, or a converted one).
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            record: Arc::default(),
            source: None,
        }
    }

    /// Reads `path` (see [`load_state_dict`]).
    pub fn from_file(path: &Path, device: &Device) -> Result<Self> {
        let mut w = Self::new(load_state_dict(path, device)?);
        w.source = Some(path.to_path_buf());
        Ok(w)
    }

    /// The checkpoint's keys.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// A `VarBuilder` that records every request; build the model with it, then call
    /// [`StrictWeights::finish`].
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = StrictBackend {
            tensors: self.tensors.clone(),
            record: self.record.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Every key requested so far, with the requested shape.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.record.lock().map(|r| r.requested.clone()).unwrap_or_default()
    }

    /// Reports all problems met while building: missing keys, mis-shaped keys, and
    /// checkpoint keys no module asked for. Only keys that start with one of `scope`
    /// count as unexpected (`None`: all keys), so a caller that builds part of a model
    /// can still check that part strictly.
    pub fn finish_scoped(&self, scope: Option<&[&str]>) -> Result<()> {
        let rec = self
            .record
            .lock()
            .map_err(|_| Error::Config("weights record poisoned".into()))?;
        let mut unexpected: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !rec.requested.contains_key(*k))
            .filter(|k| scope.is_none_or(|s| s.iter().any(|p| k.starts_with(p))))
            .cloned()
            .collect();
        unexpected.sort();
        let mut missing = rec.missing.clone();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() || !unexpected.is_empty() || !rec.mismatched.is_empty() {
            return Err(Error::WeightKeys {
                missing,
                unexpected,
                mismatched: rec.mismatched.clone(),
            });
        }
        if !rec.bad_dtype.is_empty() {
            let list: Vec<String> = rec.bad_dtype.iter().map(|(k, d)| format!("{k} ({d:?})")).collect();
            return Err(Error::WeightsFormat {
                path: self.source.clone().unwrap_or_default(),
                reason: format!("non-float tensors for float parameters: {}", list.join(", ")),
            });
        }
        Ok(())
    }

    /// [`StrictWeights::finish_scoped`] over the whole checkpoint.
    pub fn finish(&self) -> Result<()> {
        self.finish_scoped(None)
    }
}

/// Writes `bytes` to a temp file next to `path`, syncs it and renames it over `path`, so a
/// reader never sees a half-written file. The one atomic write of the model-level crates
/// (sgp-lora adapters, sgp-pma heads); callers wrap the error in their own enum.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
