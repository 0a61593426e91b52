//! A set of LoRA adapters attached to a model: create, train, merge, unmerge, detach.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use sgp_sam2::{AdaptableLinear, AdaptableModel, LinearAdapter};
use sha2::{Digest, Sha256};

use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::layer::{kaiming_uniform_a_sqrt5, LoraChunk, LoraLinear, SplitMix64};
use crate::target::{resolve, ResolvedLayer};

/// Name of the A (or B) variable of `chunk` of layer `path` in the [`VarMap`] and in
/// saved files, e.g. `image_encoder.trunk.blocks.3.attn.qkv.lora_A.2` (the v chunk).
pub fn var_name(path: &str, chunk: usize, which: AOrB) -> String {
    let ab = match which {
        AOrB::A => "lora_A",
        AOrB::B => "lora_B",
    };
    format!("{path}.{ab}.{chunk}")
}

/// Which of an adapter's two factors a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AOrB {
    /// The down-projection `A [r, in]`.
    A,
    /// The up-projection `B [out, r]`.
    B,
}

#[derive(Debug)]
struct Attached {
    adapter: Arc<LoraLinear>,
    /// The base weight from before merging; restored as is by `unmerge`, so no
    /// floating-point error accumulates over merge/unmerge cycles.
    original_weight: Option<Tensor>,
}

/// LoRA adapters attached to a model. Only the adapters' A and B are trainable; they
/// live in [`Lora::varmap`], the base weights are never put there.
pub struct Lora {
    config: LoraConfig,
    varmap: VarMap,
    layers: Vec<Attached>,
    train: Arc<AtomicBool>,
    base_hash: String,
    merged: bool,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lora")
            .field("config", &self.config)
            .field("layers", &self.layers)
            .field("train", &self.is_train())
            .field("base_hash", &self.base_hash)
            .field("merged", &self.merged)
            .finish_non_exhaustive()
    }
}

impl Lora {
    /// Attaches fresh adapters (A Kaiming-uniform, B zero, so the model's function is
    /// unchanged) to every layer matched by `config.targets`. Starts in eval mode.
    pub fn attach<M: AdaptableModel + ?Sized>(model: &mut M, config: LoraConfig) -> Result<Self> {
        let _span = tracing::info_span!("lora_attach", rank = config.rank).entered();
        config.validate()?;
        let mut rng = SplitMix64::new(config.seed);
        let rank = config.rank;
        Self::build(
            model,
            config,
            |_, _| Ok(()),
            |layer, chunk, weight| {
                let rows = layer.rows(chunk);
                let a = kaiming_uniform_a_sqrt5(&mut rng, rank, layer.in_dim, weight.dtype(), weight.device())?;
                let b = Tensor::zeros((rows.len(), rank), weight.dtype(), weight.device())?;
                Ok((a, b))
            },
        )
    }

    /// Resolves the targets on `model`, makes the variables with `make_ab`, and attaches.
    /// `verify` sees the resolved layers and the base hash before anything is attached.
    pub(crate) fn build<M, V, F>(model: &mut M, config: LoraConfig, verify: V, mut make_ab: F) -> Result<Self>
    where
        M: AdaptableModel + ?Sized,
        V: FnOnce(&[ResolvedLayer], &str) -> Result<()>,
        F: FnMut(&ResolvedLayer, usize, &Tensor) -> Result<(Tensor, Tensor)>,
    {
        config.validate()?;
        let mut linears = model.adaptable_linears_mut();
        let resolved = resolve_on(&linears, &config)?;
        let by_path: HashMap<String, usize> = linears.iter().enumerate().map(|(i, (p, _))| (p.clone(), i)).collect();
        let base_hash = base_hash_of(&linears, &resolved)?;
        verify(&resolved, &base_hash)?;
        for layer in &resolved {
            let linear = &linears[by_path[&layer.path]].1;
            if linear.adapter().is_some() {
                return Err(LoraError::AlreadyAdapted {
                    path: layer.path.clone(),
                });
            }
        }

        let varmap = VarMap::new();
        let train = Arc::new(AtomicBool::new(false));
        let scale = config.scale();
        // Make every adapter first, so that a failure leaves the model untouched.
        let mut attached = Vec::with_capacity(resolved.len());
        for layer in resolved {
            let linear = &linears[by_path[&layer.path]].1;
            let mut chunks = Vec::with_capacity(layer.selected.len());
            for &chunk in &layer.selected {
                let (a, b) = make_ab(&layer, chunk, linear.weight())?;
                let a = Var::from_tensor(&a)?;
                let b = Var::from_tensor(&b)?;
                let mut data = varmap.data().lock().map_err(|_| poisoned())?;
                data.insert(var_name(&layer.path, chunk, AOrB::A), a.clone());
                data.insert(var_name(&layer.path, chunk, AOrB::B), b.clone());
                chunks.push(LoraChunk { chunk, a, b });
            }
            let adapter = Arc::new(LoraLinear::new(
                layer,
                chunks,
                config.rank,
                scale,
                config.dropout,
                train.clone(),
            ));
            attached.push(Attached {
                adapter,
                original_weight: None,
            });
        }
        for a in &attached {
            let linear = &mut linears[by_path[&a.adapter.layer().path]].1;
            linear.set_adapter(Some(a.adapter.clone() as Arc<dyn LinearAdapter>));
        }
        tracing::info!(layers = attached.len(), base_hash = %base_hash, "LoRA attached");
        Ok(Self {
            config,
            varmap,
            layers: attached,
            train,
            base_hash,
            merged: false,
        })
    }

    /// The configuration the adapters were created (or loaded) with.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The trainable variables (A and B of every adapter); give `varmap().all_vars()`
    /// to the optimiser.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every A and B variable (the same as `varmap().all_vars()`).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.varmap.all_vars()
    }

    /// Number of trainable scalars.
    pub fn num_trainable_params(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The adapted layers, sorted by path.
    pub fn layers(&self) -> Vec<&ResolvedLayer> {
        self.layers.iter().map(|l| l.adapter.layer()).collect()
    }

    /// The attached adapters, sorted by layer path.
    pub fn adapters(&self) -> impl Iterator<Item = &Arc<LoraLinear>> {
        self.layers.iter().map(|l| &l.adapter)
    }

    /// Training mode: adapter dropout acts and autograd tracks A and B. Eval mode (the
    /// default after `attach`/`load`): no dropout, and A and B enter detached, so the
    /// forward pass is an untracked inference pass (fast kernels, bit-identical to the
    /// base model while B = 0). Call `set_train(true)` before computing a loss to train.
    pub fn set_train(&self, train: bool) {
        self.train.store(train, Ordering::Relaxed);
    }

    /// Whether training mode is on ([`Lora::set_train`]).
    pub fn is_train(&self) -> bool {
        self.train.load(Ordering::Relaxed)
    }

    /// Fingerprint of the base model's targeted layers (see [`base_hash_of`]).
    pub fn base_hash(&self) -> &str {
        &self.base_hash
    }

    /// Whether [`Lora::merge`] folded the adapters into the base weights.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Folds every adapter into its base weight (`W + alpha/r·B A`) and takes the adapter
    /// off the layer, so inference costs nothing extra. The original weights are kept
    /// for [`Lora::unmerge`].
    pub fn merge<M: AdaptableModel + ?Sized>(&mut self, model: &mut M) -> Result<()> {
        let _span = tracing::info_span!("lora_merge").entered();
        if self.merged {
            return Err(LoraError::AlreadyMerged);
        }
        let mut linears = model.adaptable_linears_mut();
        let indices = self.find_own(&linears, true)?;
        for (attached, &i) in self.layers.iter_mut().zip(&indices) {
            let linear = &mut linears[i].1;
            let original = linear.weight().clone();
            let delta = attached.adapter.delta_weight()?.detach().to_dtype(original.dtype())?;
            linear.set_weight((&original + delta)?.detach())?;
            linear.set_adapter(None);
            attached.original_weight = Some(original);
        }
        self.merged = true;
        Ok(())
    }

    /// Restores the exact original base weights and re-attaches the adapters.
    pub fn unmerge<M: AdaptableModel + ?Sized>(&mut self, model: &mut M) -> Result<()> {
        let _span = tracing::info_span!("lora_unmerge").entered();
        if !self.merged {
            return Err(LoraError::NotMerged);
        }
        let mut linears = model.adaptable_linears_mut();
        let indices = self.find_own(&linears, false)?;
        for (attached, &i) in self.layers.iter_mut().zip(&indices) {
            let linear = &mut linears[i].1;
            let original = attached.original_weight.take().ok_or(LoraError::NotMerged)?;
            linear.set_weight(original)?;
            linear.set_adapter(Some(attached.adapter.clone() as Arc<dyn LinearAdapter>));
        }
        self.merged = false;
        Ok(())
    }

    /// Removes the adapters from `model` (unmerging first if merged), leaving the
    /// base model exactly as before `attach`.
    pub fn detach<M: AdaptableModel + ?Sized>(mut self, model: &mut M) -> Result<()> {
        if self.merged {
            self.unmerge(model)?;
        }
        let mut linears = model.adaptable_linears_mut();
        let indices = self.find_own(&linears, true)?;
        for &i in &indices {
            linears[i].1.set_adapter(None);
        }
        Ok(())
    }

    /// Indices into `linears` of this LoRA's layers. With `expect_ours`, each must still
    /// carry our adapter (not someone else's); without, it must not (merged state).
    fn find_own(&self, linears: &[(String, &mut AdaptableLinear)], expect_ours: bool) -> Result<Vec<usize>> {
        let by_path: HashMap<&str, usize> = linears.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i)).collect();
        let mut indices = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let path = &l.adapter.layer().path;
            let not_attached = || LoraError::NotAttached { path: path.clone() };
            let &i = by_path.get(path.as_str()).ok_or_else(not_attached)?;
            let carries_ours = linears[i]
                .1
                .adapter()
                .is_some_and(|a| std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(&l.adapter)));
            if carries_ours != expect_ours {
                return Err(not_attached());
            }
            indices.push(i);
        }
        Ok(indices)
    }
}

fn poisoned() -> LoraError {
    LoraError::Candle(candle_core::Error::Msg("the LoRA VarMap lock is poisoned".into()))
}

/// Resolves the config's targets on the model's adaptable layers.
pub(crate) fn resolve_on(
    linears: &[(String, &mut AdaptableLinear)],
    config: &LoraConfig,
) -> Result<Vec<ResolvedLayer>> {
    resolve(
        linears.iter().map(|(p, l)| (p.as_str(), l.in_dim(), l.out_dim())),
        &config.targets,
    )
}

/// SHA-256 over the targeted layers, sorted by path: each path, its weight's (and
/// bias's) dtype, shape and bytes. It identifies the base model an adapter was trained
/// on; two different checkpoints of the same architecture hash differently.
pub fn base_hash_of(linears: &[(String, &mut AdaptableLinear)], resolved: &[ResolvedLayer]) -> Result<String> {
    let by_path: HashMap<&str, &AdaptableLinear> = linears.iter().map(|(p, l)| (p.as_str(), &**l)).collect();
    let mut hasher = Sha256::new();
    hasher.update(b"sgp-lora base v1\0");
    for layer in resolved {
        let linear = by_path.get(layer.path.as_str()).ok_or_else(|| LoraError::NotAttached {
            path: layer.path.clone(),
        })?;
        hasher.update(layer.path.as_bytes());
        hasher.update([0u8]);
        hash_tensor(&mut hasher, linear.weight())?;
        match linear.bias() {
            Some(b) => {
                hasher.update(b"bias");
                hash_tensor(&mut hasher, b)?;
            }
            None => hasher.update(b"nobias"),
        }
    }
    let digest = hasher.finalize();
    Ok(format!(
        "sha256:{}",
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

fn hash_tensor(hasher: &mut Sha256, t: &Tensor) -> Result<()> {
    hasher.update(t.dtype().as_str().as_bytes());
    hasher.update((t.rank() as u64).to_le_bytes());
    for &d in t.dims() {
        hasher.update((d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::F64 => {
            for v in flat.to_vec1::<f64>()? {
                hasher.update(v.to_le_bytes());
            }
        }
        // f32 holds f16/bf16 exactly; the dtype name above keeps them apart.
        _ => {
            let values = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let mut bytes = Vec::with_capacity(values.len() * 4);
            for v in values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            hasher.update(&bytes);
        }
    }
    Ok(())
}
