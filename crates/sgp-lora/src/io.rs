//! Saving and loading adapters as safetensors.
//!
//! Tensors are named `{layer path}.lora_A.{chunk}` / `{layer path}.lora_B.{chunk}`.
//! The header metadata (all strings) holds:
//! - `format`: `sgp-lora/1`;
//! - `rank`, `alpha`, `dropout`, `seed`;
//! - `targets`: JSON list of target specs (`"**.trunk.blocks.*.attn.qkv[0,2/3]"`);
//! - `layers`: JSON list of the resolved layers (path, in/out dims, chunks);
//! - `base_hash`: the fingerprint of the targeted base weights ([`crate::base_hash_of`]);
//! - `base_model_id`: a free-form name of the base model (may be empty).
//!
//! Loading re-resolves the targets on the given model and refuses a file whose layers,
//! shapes or base hash differ.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::Tensor;
use sgp_sam2::AdaptableModel;

use crate::adapters::{var_name, AOrB, Lora};
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::target::{ResolvedLayer, Target};

/// The `format` metadata value; a file with another value is refused.
pub const FORMAT: &str = "sgp-lora/1";

/// What an adapter file says about itself, without its tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFileInfo {
    /// Rank, alpha, dropout, seed and targets the adapters were trained with.
    pub config: LoraConfig,
    /// The layers the targets resolved to on the training model.
    pub layers: Vec<ResolvedLayer>,
    /// Fingerprint of the targeted base weights ([`crate::base_hash_of`]).
    pub base_hash: String,
    /// Free-form name of the base model (may be empty).
    pub base_model_id: String,
}

impl Lora {
    /// Writes the adapters atomically (a temp file in the same folder, then a rename).
    /// `base_model_id` names the base model for humans (e.g. `sam2.1_hiera_small`).
    pub fn save(&self, path: impl AsRef<Path>, base_model_id: &str) -> Result<()> {
        let path = path.as_ref();
        let _span = tracing::info_span!("lora_save", path = %path.display()).entered();
        let config = self.config();
        let layers: Vec<ResolvedLayer> = self.layers().into_iter().cloned().collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("rank".to_string(), config.rank.to_string());
        meta.insert("alpha".to_string(), format!("{:?}", config.alpha));
        meta.insert("dropout".to_string(), format!("{:?}", config.dropout));
        meta.insert("seed".to_string(), config.seed.to_string());
        meta.insert("targets".to_string(), to_json(&config.targets)?);
        meta.insert("layers".to_string(), to_json(&layers)?);
        meta.insert("base_hash".to_string(), self.base_hash().to_string());
        meta.insert("base_model_id".to_string(), base_model_id.to_string());

        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for adapter in self.adapters() {
            let layer_path = &adapter.layer().path;
            for c in adapter.chunks() {
                tensors.push((var_name(layer_path, c.chunk, AOrB::A), c.a.as_tensor().contiguous()?));
                tensors.push((var_name(layer_path, c.chunk, AOrB::B), c.b.as_tensor().contiguous()?));
            }
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?;
        write_atomically(path, &bytes)
    }

    /// Loads adapters saved by [`Lora::save`] and attaches them to `model` (eval mode).
    ///
    /// Errors: [`LoraError::TargetMismatch`] when the file's targets resolve to other
    /// layers on this model, [`LoraError::ShapeMismatch`] when a layer or tensor has
    /// another shape, [`LoraError::BaseMismatch`] when the targeted base weights differ
    /// from those the adapters were trained on.
    pub fn load<M: AdaptableModel + ?Sized>(path: impl AsRef<Path>, model: &mut M) -> Result<Self> {
        let path = path.as_ref();
        let _span = tracing::info_span!("lora_load", path = %path.display()).entered();
        let bytes = std::fs::read(path).map_err(|source| LoraError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let info = read_info_from_bytes(&bytes)?;
        let file = safetensors::SafeTensors::deserialize(&bytes)?;

        let mut expected_names = HashSet::new();
        for layer in &info.layers {
            for &chunk in &layer.selected {
                expected_names.insert(var_name(&layer.path, chunk, AOrB::A));
                expected_names.insert(var_name(&layer.path, chunk, AOrB::B));
            }
        }
        for name in file.names() {
            if !expected_names.contains(name) {
                return Err(LoraError::UnexpectedTensor(name.to_string()));
            }
        }

        let rank = info.config.rank;
        Lora::build(
            model,
            info.config.clone(),
            |resolved, base_hash| {
                check_layers(&info.layers, resolved)?;
                if base_hash != info.base_hash {
                    return Err(LoraError::BaseMismatch {
                        expected: info.base_hash.clone(),
                        found: base_hash.into(),
                    });
                }
                Ok(())
            },
            |layer, chunk, weight| {
                let get = |which: AOrB, expected: [usize; 2]| -> Result<Tensor> {
                    let name = var_name(&layer.path, chunk, which);
                    let view = file.tensor(&name).map_err(|_| LoraError::MissingTensor(name.clone()))?;
                    if view.shape() != expected {
                        return Err(LoraError::ShapeMismatch {
                            name,
                            expected: expected.to_vec(),
                            found: view.shape().to_vec(),
                        });
                    }
                    let t = candle_core::safetensors::Load::load(&view, weight.device())?;
                    Ok(t.to_dtype(weight.dtype())?)
                };
                let a = get(AOrB::A, [rank, layer.in_dim])?;
                let b = get(AOrB::B, [layer.rows(chunk).len(), rank])?;
                Ok((a, b))
            },
        )
    }
}

/// The file's layers must be exactly the layers its targets select on this model.
fn check_layers(in_file: &[ResolvedLayer], in_model: &[ResolvedLayer]) -> Result<()> {
    let paths = |ls: &[ResolvedLayer]| ls.iter().map(|l| l.path.clone()).collect::<Vec<_>>();
    if paths(in_file) != paths(in_model) {
        return Err(LoraError::TargetMismatch {
            in_file: paths(in_file),
            in_model: paths(in_model),
        });
    }
    for (f, m) in in_file.iter().zip(in_model) {
        if (f.in_dim, f.out_dim) != (m.in_dim, m.out_dim) {
            return Err(LoraError::ShapeMismatch {
                name: format!("{}.weight", f.path),
                expected: vec![m.out_dim, m.in_dim],
                found: vec![f.out_dim, f.in_dim],
            });
        }
        if (f.chunks, &f.selected) != (m.chunks, &m.selected) {
            return Err(LoraError::BadMetadata(format!(
                "layer `{}`: the stored chunk selection does not follow from the stored targets",
                f.path
            )));
        }
    }
    Ok(())
}

/// Reads an adapter file's metadata only.
pub fn read_info(path: impl AsRef<Path>) -> Result<AdapterFileInfo> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_info_from_bytes(&bytes)
}

fn read_info_from_bytes(bytes: &[u8]) -> Result<AdapterFileInfo> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)?;
    let meta = metadata
        .metadata()
        .as_ref()
        .ok_or_else(|| LoraError::BadMetadata("the file has no metadata; is it an sgp-lora adapter file?".into()))?;
    let field = |key: &str| -> Result<&String> {
        meta.get(key)
            .ok_or_else(|| LoraError::BadMetadata(format!("missing key `{key}`")))
    };
    let parse_err = |key: &str, e: &dyn std::fmt::Display| LoraError::BadMetadata(format!("key `{key}`: {e}"));
    let format = field("format")?;
    if format != FORMAT {
        return Err(LoraError::BadMetadata(format!(
            "format `{format}`, expected `{FORMAT}`"
        )));
    }
    let rank = field("rank")?.parse::<usize>().map_err(|e| parse_err("rank", &e))?;
    let alpha = field("alpha")?.parse::<f64>().map_err(|e| parse_err("alpha", &e))?;
    let dropout = field("dropout")?.parse::<f32>().map_err(|e| parse_err("dropout", &e))?;
    let seed = field("seed")?.parse::<u64>().map_err(|e| parse_err("seed", &e))?;
    let targets: Vec<Target> = serde_json::from_str(field("targets")?).map_err(|e| parse_err("targets", &e))?;
    let layers: Vec<ResolvedLayer> = serde_json::from_str(field("layers")?).map_err(|e| parse_err("layers", &e))?;
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
        seed,
    };
    config.validate()?;
    for l in &layers {
        if l.chunks == 0 || l.out_dim % l.chunks != 0 || l.selected.iter().any(|&c| c >= l.chunks) {
            return Err(LoraError::BadMetadata(format!(
                "layer `{}` has an inconsistent chunk split",
                l.path
            )));
        }
    }
    Ok(AdapterFileInfo {
        config,
        layers,
        base_hash: field("base_hash")?.clone(),
        base_model_id: field("base_model_id")?.clone(),
    })
}

/// [`sgp_sam2::write_atomic`], with the error in this crate's enum.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    sgp_sam2::write_atomic(path, bytes).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| LoraError::BadMetadata(e.to_string()))
}
