//! Where the SAM2 parameters of a trainable [`crate::model::SgpModel`] come from, and
//! which of them train.
//!
//! SAM2 is built through a `VarBuilder` whose backend ([`ParamBackend`]) hands out, for
//! every parameter the model asks for, either the base tensor itself (frozen: a plain
//! tensor, so autograd computes no gradient for it and nothing can change it) or a
//! [`Var`] initialised from it (trainable). Freezing by *not* making a `Var` matters on
//! CPU: the linear, attention and layer-norm kernels (`sgp_kernels`) compute gradients
//! only for tracked inputs, so the frozen Hiera trunk costs no weight-gradient matmuls
//! in the backward pass (candle's own conv backward, used by the neck, still computes
//! its frozen kernels' gradients).
//!
//! The base tensors are an official state dict (checked strictly: missing, unexpected
//! and mis-shaped keys are all reported) or, in from-scratch mode, a seeded random
//! initialisation by parameter name (PyTorch's defaults: `U(±1/√fan_in)` for weights,
//! 1 / 0 for norm weights / biases, `N(0, 0.02)`-like for embeddings and tokens).
//!
//! Every base tensor is hashed (SHA-256 over sorted names, shapes and f32 bytes): the
//! hash identifies the base a checkpoint was trained on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use sgp_sam2::StrictWeights;
use sha2::{Digest, Sha256};

use crate::augment::Rng;
use crate::train_error::{Result, TrainError};

/// Which groups of SAM2 parameters train (LoRA, PMA and the decoder are configured
/// elsewhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sam2Trainable {
    /// The whole image encoder (Hiera trunk and FPN neck) — only in from-scratch mode
    /// by default; with official weights the trunk stays frozen and LoRA adapts it.
    pub image_encoder: bool,
    /// Memory attention, memory encoder, temporal encodings, object-pointer projections
    /// and the no-memory / no-object embeddings.
    pub memory: bool,
    /// `sam_prompt_encoder.*`.
    pub prompt_encoder: bool,
    /// `sam_mask_decoder.*` (including `conv_s0` / `conv_s1`).
    pub mask_decoder: bool,
}

impl Sam2Trainable {
    /// The paper's set on official weights: everything but the image encoder.
    pub fn fine_tune() -> Self {
        Self {
            image_encoder: false,
            memory: true,
            prompt_encoder: true,
            mask_decoder: true,
        }
    }

    /// Everything (from-scratch mode).
    pub fn all() -> Self {
        Self {
            image_encoder: true,
            memory: true,
            prompt_encoder: true,
            mask_decoder: true,
        }
    }

    /// Whether the SAM2 parameter `name` (checkpoint key) trains.
    pub fn trains(&self, name: &str) -> bool {
        if name.ends_with(".positional_encoding_gaussian_matrix") {
            // A registered buffer in SAM2 (`PositionEmbeddingRandom`), not a parameter;
            // the prompt encoder also caches the dense positional encoding made from it.
            false
        } else if name.starts_with("image_encoder.") {
            self.image_encoder
        } else if name.starts_with("sam_prompt_encoder.") {
            self.prompt_encoder
        } else if name.starts_with("sam_mask_decoder.") {
            self.mask_decoder
        } else {
            // memory_attention, memory_encoder, maskmem_tpos_enc, no_mem_*, no_obj_*,
            // obj_ptr_proj, obj_ptr_tpos_proj, mask_downsample.
            self.memory
        }
    }
}

/// The base tensors.
#[derive(Debug, Clone)]
pub enum BaseWeights {
    /// An official state dict (original key names).
    StateDict(Arc<HashMap<String, Tensor>>),
    /// Seeded random initialisation (from-scratch mode).
    Random {
        /// Seed of the initialisation.
        seed: u64,
    },
}

#[derive(Debug, Default)]
struct Record {
    vars: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
}

/// The `VarBuilder` backend described in the module docs.
pub struct ParamBackend {
    base: BaseSource,
    trainable: Sam2Trainable,
    record: Arc<Mutex<Record>>,
}

enum BaseSource {
    Strict(VarBuilder<'static>),
    Random(u64),
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("parameter record lock poisoned".into())
}

/// FNV-1a of the name mixed with the seed: each parameter's random stream.
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A seeded random value for parameter `name` of shape `dims` (see the module docs).
pub fn random_param(seed: u64, name: &str, dims: &[usize], dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
    let n: usize = dims.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let mut rng = Rng::new(name_seed(seed, name));
    let values: Vec<f32> = if leaf == "positional_encoding_gaussian_matrix" {
        // `scale · randn` with scale 1 in SAM2: unit variance.
        let bound = 3f64.sqrt();
        (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
    } else if dims.len() == 1 && leaf == "weight" {
        vec![1.0; n]
    } else if leaf == "bias" {
        vec![0.0; n]
    } else if leaf == "weight" && dims.len() >= 2 {
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
    } else {
        // Embeddings, tokens, temporal encodings: small (uniform with std 0.02).
        let bound = 0.02 * 3f64.sqrt();
        (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
    };
    Tensor::from_vec(values, dims, dev)?.to_dtype(dtype)
}

impl SimpleBackend for ParamBackend {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut rec = self.record.lock().map_err(|_| poisoned())?;
        if let Some(v) = rec.vars.get(name) {
            return Ok(v.as_tensor().clone());
        }
        if let Some(t) = rec.frozen.get(name) {
            return Ok(t.clone());
        }
        let t = match &self.base {
            BaseSource::Strict(vb) => vb.get_with_hints_dtype(s, name, h, dtype)?,
            BaseSource::Random(seed) => random_param(*seed, name, s.dims(), dtype, dev)?,
        };
        if self.trainable.trains(name) {
            let v = Var::from_tensor(&t)?;
            rec.vars.insert(name.to_string(), v.clone());
            Ok(v.as_tensor().clone())
        } else {
            rec.frozen.insert(name.to_string(), t.clone());
            Ok(t)
        }
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("SAM2 parameter `{name}` requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.base {
            BaseSource::Strict(vb) => vb.contains_tensor(name),
            BaseSource::Random(_) => true,
        }
    }
}

/// SAM2's parameters after building: the trainable ones as `Var`s, the frozen ones as
/// tensors, and the base hash.
#[derive(Debug, Clone)]
pub struct Sam2Params {
    /// Trainable parameters by checkpoint key.
    pub vars: BTreeMap<String, Var>,
    /// Frozen parameters by checkpoint key.
    pub frozen: BTreeMap<String, Tensor>,
    /// Hash of every base tensor (trainable ones at their initial value).
    pub base_hash: String,
}

/// Builds SAM2 through a [`ParamBackend`]: `build` receives the `VarBuilder` (e.g.
/// `|vb| Sam2Model::new(&config, vb)`).
pub fn build_sam2<T>(
    base: &BaseWeights,
    trainable: Sam2Trainable,
    device: &Device,
    build: impl FnOnce(VarBuilder<'static>) -> sgp_sam2::Result<T>,
) -> Result<(T, Sam2Params)> {
    let (strict, source) = match base {
        BaseWeights::StateDict(sd) => {
            let strict = StrictWeights::new((**sd).clone());
            let vb = strict.var_builder(DType::F32, device);
            (Some(strict), BaseSource::Strict(vb))
        }
        BaseWeights::Random { seed } => (None, BaseSource::Random(*seed)),
    };
    let record = Arc::new(Mutex::new(Record::default()));
    let backend = ParamBackend {
        base: source,
        trainable,
        record: record.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let built = build(vb);
    if let Some(s) = &strict {
        // Report key problems first: they explain a build failure better.
        s.finish()?;
    }
    let built = built?;
    let rec = std::mem::take(
        &mut *record
            .lock()
            .map_err(|_| TrainError::Config("parameter record lock poisoned".into()))?,
    );
    let mut all: Vec<(&String, &Tensor)> = rec.frozen.iter().collect();
    all.extend(rec.vars.iter().map(|(n, v)| (n, v.as_tensor())));
    all.sort_by(|a, b| a.0.cmp(b.0));
    let base_hash = match base {
        BaseWeights::Random { seed } => format!("random-init:seed={seed}:{}", hash_tensors(all)?),
        BaseWeights::StateDict(_) => hash_tensors(all)?,
    };
    Ok((
        built,
        Sam2Params {
            vars: rec.vars,
            frozen: rec.frozen,
            base_hash,
        },
    ))
}

/// `sha256:` over names, shapes and f32 bytes, in the given order.
pub fn hash_tensors<'a>(tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"sgp base weights v1\0");
    for (name, t) in tensors {
        h.update(name.as_bytes());
        h.update([0u8]);
        for &d in t.dims() {
            h.update((d as u64).to_le_bytes());
        }
        let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let mut bytes = Vec::with_capacity(v.len() * 4);
        for x in v {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        h.update(&bytes);
    }
    Ok(format!(
        "sha256:{}",
        h.finalize().iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Raw f32 bytes of a tensor (for byte-identity checks).
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_groups_by_key() {
        let t = Sam2Trainable::fine_tune();
        assert!(!t.trains("image_encoder.trunk.blocks.0.attn.qkv.weight"));
        assert!(t.trains("sam_mask_decoder.conv_s0.weight"));
        assert!(t.trains("memory_attention.layers.0.self_attn.q_proj.weight"));
        assert!(t.trains("maskmem_tpos_enc"));
        let none = Sam2Trainable {
            image_encoder: false,
            memory: false,
            prompt_encoder: false,
            mask_decoder: false,
        };
        assert!(!none.trains("sam_prompt_encoder.point_embeddings.0.weight"));
        assert!(Sam2Trainable::all().trains("image_encoder.neck.convs.0.conv.weight"));
        assert!(!Sam2Trainable::all().trains("sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"));
    }

    #[test]
    fn random_init_is_seeded_and_shaped_like_pytorch() {
        let dev = Device::Cpu;
        let a = random_param(1, "x.weight", &[8, 4, 3, 3], DType::F32, &dev).unwrap();
        let b = random_param(1, "x.weight", &[8, 4, 3, 3], DType::F32, &dev).unwrap();
        let c = random_param(2, "x.weight", &[8, 4, 3, 3], DType::F32, &dev).unwrap();
        assert_eq!(tensor_bytes(&a).unwrap(), tensor_bytes(&b).unwrap());
        assert_ne!(tensor_bytes(&a).unwrap(), tensor_bytes(&c).unwrap());
        let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / 6.0;
        assert!(v.iter().all(|x| x.abs() <= bound));
        assert!(v.iter().any(|x| x.abs() > bound * 0.8));
        let norm: Vec<f32> = random_param(1, "n.weight", &[5], DType::F32, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(norm, vec![1.0; 5]);
        let bias: Vec<f32> = random_param(1, "n.bias", &[5], DType::F32, &dev)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(bias, vec![0.0; 5]);
    }
}
