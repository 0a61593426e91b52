//! [`SgpModel`]: the trainable SAM2-SGP, composed of sgp-sam2 (SAM2 + memory path),
//! sgp-lora (adapters on the frozen Hiera), sgp-memory (support memories, PMG) and
//! sgp-pma (PMA + hierarchical decoder). Nothing here re-implements those crates: it
//! decides what trains, wires the forward pass for training, and names the parameters.
//!
//! # Forward pass (2D, one query × one class per call)
//! FE (Hiera + LoRA, FPN) on the query → support memories for the class (each support a
//! SAM2 conditioning frame prompted with its ground-truth mask) → PMG (memory attention +
//! prompt-free decoding: pseudo-mask `y0`) → [`SgpHead`] (box from `y0`, PMA, stage-1
//! SAM2 decoder with the box, stage-2 pixel decoder) → final logits `ŷ`.
//!
//! # Ablations ([`Ablation`], the paper's Table V, same semantics as the predictor)
//! * `no_pmg`: no support memory — the query is decoded on SAM2's no-memory path and the
//!   head refines that unprompted pseudo-mask;
//! * `no_pma`: no head — the pseudo-mask is the output (and there is no KL term);
//! * `no_3dm`: only matters for volumes (2D training is unaffected).
//!
//! # Trainable sets ([`TrainableConfig`])
//! LoRA (rank, alpha, targets; default q and v of every Hiera block), SAM2's memory
//! modules, prompt encoder and mask decoder ([`Sam2Trainable`]), PMA and the decoder. The
//! Hiera trunk's base weights are plain tensors, never `Var`s: they cannot change, and
//! the backward pass computes no gradient for them. From-scratch mode (no official
//! weights) initialises SAM2 randomly and trains every parameter.
//!
//! # Support gradients ([`SupportGrad`])
//! Default [`SupportGrad::Detached`]: the supports' *image features* carry no gradient
//! (LoRA runs in eval mode for them and the features are detached), while the memory
//! encoder that turns them into memories still trains. A CPU step then costs one image
//! encoder backward instead of K + 1, and the adapters still learn from the query, which
//! goes through the same encoder. [`SupportGrad::Full`] back-propagates through the
//! supports' encoder too, as the paper's FE does.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use sgp_lora::{Lora, LoraConfig};
use sgp_memory::{Pmg, PmgOutput, SupportItem, SupportMemory};
use sgp_pma::{HeadDims, PmgParts, SgpHead, SgpHeadConfig};
use sgp_sam2::{FramePrompt, PreparedFeatures, Sam2Config, Sam2Model, TrackRequest};

pub use crate::model_params::{BaseWeights, Sam2Trainable};
pub use crate::predictor::Ablation;
use crate::train_error::{Result, TrainError};

/// Whether the supports' image features carry gradients (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SupportGrad {
    /// Support features detached (memory encoding still trains). The default: K times
    /// cheaper on CPU.
    #[default]
    Detached,
    /// Gradients through the supports' image encoder as well.
    Full,
}

/// What trains.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainableConfig {
    /// LoRA adapters on the image encoder (`None`: no adapters).
    pub lora: Option<LoraConfig>,
    /// SAM2 parameter groups.
    pub sam2: Sam2Trainable,
    /// PMA's parameters.
    pub pma: bool,
    /// The hierarchical decoder's parameters.
    pub decoder: bool,
}

impl TrainableConfig {
    /// The paper's set on official weights: LoRA (rank 16, q/v), memory modules, prompt
    /// encoder, mask decoder, PMA and the decoder; the image encoder frozen.
    pub fn fine_tune() -> Self {
        Self {
            lora: Some(LoraConfig::default()),
            sam2: Sam2Trainable::fine_tune(),
            pma: true,
            decoder: true,
        }
    }

    /// From scratch: every parameter trains, no adapters (they would add nothing to a
    /// trunk that trains itself).
    pub fn from_scratch() -> Self {
        Self {
            lora: None,
            sam2: Sam2Trainable::all(),
            pma: true,
            decoder: true,
        }
    }
}

/// The model's configuration (everything that decides its parameters and forward pass).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgpModelConfig {
    /// SAM2's configuration (as resolved: preset or file, image size).
    pub sam2: Sam2Config,
    /// What trains.
    pub trainable: TrainableConfig,
    /// PMA + decoder configuration.
    pub head: SgpHeadConfig,
    /// Switched-off parts.
    pub ablation: Ablation,
    /// Support gradients.
    pub support_grad: SupportGrad,
    /// Seed of the new modules' (and, from scratch, SAM2's) initialisation.
    pub seed: u64,
}

/// What one forward pass gives the loss.
#[derive(Debug, Clone)]
pub struct SgpForward {
    /// Final logits `[B, 1, S, S]`.
    pub final_logits: Tensor,
    /// PMG's pseudo-mask logits `[B, 1, S, S]`; `None` when they are the output (no PMA).
    pub pseudo_logits: Option<Tensor>,
    /// Object-score logits `[B, 1]`: PMG's, then the head's.
    pub object_scores: Vec<Tensor>,
}

/// The trainable SAM2-SGP model.
pub struct SgpModel {
    config: SgpModelConfig,
    sam: Sam2Model,
    lora: Option<Lora>,
    sam_vars: BTreeMap<String, Var>,
    frozen: BTreeMap<String, Tensor>,
    head: Option<(SgpHead, VarMap)>,
    base_hash: String,
}

impl std::fmt::Debug for SgpModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SgpModel")
            .field("config", &self.config)
            .field("trainable_tensors", &self.trainable_vars().len())
            .field("base_hash", &self.base_hash)
            .finish_non_exhaustive()
    }
}

impl SgpModel {
    /// Builds the model on `base` (an official state dict, or random for from-scratch).
    pub fn new(config: SgpModelConfig, base: &BaseWeights, device: &Device) -> Result<Self> {
        let _span = tracing::info_span!("sgp_model_build").entered();
        let sam_cfg = config.sam2.clone();
        let (mut sam, params) =
            crate::model_params::build_sam2(base, config.trainable.sam2, device, |vb| Sam2Model::new(&sam_cfg, vb))?;
        let lora = match &config.trainable.lora {
            Some(lc) => {
                let lora = Lora::attach(&mut sam, lc.clone())?;
                lora.set_train(true);
                Some(lora)
            }
            None => None,
        };
        let head = if config.ablation.no_pma {
            None
        } else {
            let dims = HeadDims::of(&sam);
            Some(SgpHead::init(&config.head, dims, device, config.seed).map_err(head_err)?)
        };
        Ok(Self {
            config,
            sam,
            lora,
            sam_vars: params.vars,
            frozen: params.frozen,
            head,
            base_hash: params.base_hash,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SgpModelConfig {
        &self.config
    }

    /// The SAM2 model (with LoRA attached).
    pub fn sam(&self) -> &Sam2Model {
        &self.sam
    }

    /// The head, when there is one (not under `no_pma`).
    pub fn head(&self) -> Option<&SgpHead> {
        self.head.as_ref().map(|(h, _)| h)
    }

    /// The LoRA adapters, if any.
    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    /// Hash of the base weights (official or seeded random) the model was built on.
    pub fn base_hash(&self) -> &str {
        &self.base_hash
    }

    /// The frozen SAM2 parameters by checkpoint key (the Hiera trunk's base weights
    /// among them).
    pub fn frozen(&self) -> &BTreeMap<String, Tensor> {
        &self.frozen
    }

    /// Training mode: LoRA tracks gradients (and applies its dropout). Eval mode is for
    /// validation: adapters enter detached.
    pub fn set_train(&self, train: bool) {
        if let Some(l) = &self.lora {
            l.set_train(train);
        }
    }

    /// Every variable that may train, by checkpoint name: `sam2.{key}`, `lora.{name}`,
    /// `head.{name}`. Trainable-set switches are applied (a frozen head part is left
    /// out).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out: Vec<(String, Var)> = self
            .sam_vars
            .iter()
            .map(|(n, v)| (format!("sam2.{n}"), v.clone()))
            .collect();
        if let Some(l) = &self.lora {
            if let Ok(data) = l.varmap().data().lock() {
                let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (format!("lora.{n}"), v.clone())).collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                out.extend(v);
            }
        }
        if let Some((_, vm)) = &self.head {
            if let Ok(data) = vm.data().lock() {
                let t = &self.config.trainable;
                let mut v: Vec<(String, Var)> = data
                    .iter()
                    .filter(|(n, _)| (t.pma && n.starts_with("pma.")) || (t.decoder && n.starts_with("decoder.")))
                    .map(|(n, v)| (format!("head.{n}"), v.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                out.extend(v);
            }
        }
        out
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Sets trainable variables from `params` (names as [`SgpModel::trainable_vars`]);
    /// every variable must be there with its shape.
    pub fn load_params(&self, params: &BTreeMap<String, Tensor>) -> Result<()> {
        let vars = self.trainable_vars();
        let mut problems = Vec::new();
        for (name, var) in &vars {
            match params.get(name) {
                None => problems.push(format!("missing `{name}`")),
                Some(t) if t.dims() != var.dims() => {
                    problems.push(format!("`{name}` is {:?}, the model's is {:?}", t.dims(), var.dims()))
                }
                Some(_) => {}
            }
        }
        let known: std::collections::BTreeSet<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        problems.extend(
            params
                .keys()
                .filter(|k| !known.contains(k.as_str()))
                .map(|k| format!("unexpected `{k}`")),
        );
        if !problems.is_empty() {
            return Err(TrainError::Config(format!(
                "the checkpoint's parameters do not fit this model: {}",
                problems.join(", ")
            )));
        }
        for (name, var) in &vars {
            if let Some(t) = params.get(name) {
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
        Ok(())
    }

    /// The memory of one support for `class` (its ground-truth mask as the prompt).
    pub fn support_memory(&self, support: &SupportItem, class: u32) -> Result<SupportMemory> {
        let mask = support
            .masks
            .get(&class)
            .ok_or_else(|| TrainError::Memory(format!("support {:?} has no mask of class {class}", support.case_id)))?;
        match self.config.support_grad {
            SupportGrad::Full => {
                let item = SupportItem {
                    image: support.image.clone(),
                    masks: BTreeMap::from([(class, mask.clone())]),
                    case_id: support.case_id.clone(),
                };
                let enc = sgp_memory::encode_support(&self.sam, &item).map_err(mem_err)?;
                enc.memories
                    .get(&class)
                    .cloned()
                    .ok_or_else(|| TrainError::Memory("encode_support returned no memory".into()))
            }
            SupportGrad::Detached => self.support_memory_detached(&support.image, mask),
        }
    }

    /// sgp-memory's `encode_support` steps for one class (features, then SAM2's
    /// mask-prompted initial conditioning frame), with the image features detached
    /// between the two so only the memory encoding is differentiated.
    fn support_memory_detached(&self, image: &Tensor, mask: &Tensor) -> Result<SupportMemory> {
        let dev = self.sam.device();
        let x = image.to_device(dev)?.to_dtype(DType::F32)?.unsqueeze(0)?;
        let was_train = self.lora.as_ref().is_some_and(|l| l.is_train());
        self.set_train(false);
        let feats = sgp_memory::support::image_features(&self.sam, &x);
        self.set_train(was_train);
        let feats = detach_features(&feats.map_err(mem_err)?);
        let m = mask
            .to_device(dev)?
            .to_dtype(DType::F32)?
            .ge(0.5f32)?
            .to_dtype(DType::F32)?;
        let prompt = FramePrompt {
            points: None,
            mask: Some(m.unsqueeze(0)?.unsqueeze(0)?),
        };
        let out = self
            .sam
            .track_step_with_selection(&TrackRequest::initial(0, 1), &feats, &prompt, None)?;
        let frame = out.frame;
        let (Some(mf), Some(mp)) = (frame.maskmem_features, frame.maskmem_pos_enc) else {
            return Err(TrainError::Memory(
                "the model has no memory (num_maskmem = 0): supports cannot be encoded".into(),
            ));
        };
        Ok(SupportMemory {
            maskmem_features: mf,
            maskmem_pos_enc: mp,
            obj_ptr: frame.obj_ptr,
            object_score_logits: frame.object_score_logits,
            pred_masks: frame.pred_masks,
        })
    }

    /// Query features `[HW, 1, C]` levels of a normalised image `[3, S, S]`.
    pub fn query_features(&self, image: &Tensor) -> Result<PreparedFeatures> {
        let x = image.to_device(self.sam.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
        sgp_memory::support::image_features(&self.sam, &x).map_err(mem_err)
    }

    /// The selection embedding of query features: SAM2's mean-pooled level-2 embedding
    /// (`[C]`, detached), what support selection compares by cosine.
    pub fn selection_embedding(feats: &PreparedFeatures) -> Result<Vec<f32>> {
        let e = sgp_memory::support::pooled_of(feats).map_err(mem_err)?;
        Ok(e.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    /// The memories of the supports for `class` (at least one).
    fn support_memories(&self, supports: &[SupportItem], class: u32) -> Result<Vec<SupportMemory>> {
        if supports.is_empty() {
            return Err(TrainError::Memory("PMG needs at least one support".into()));
        }
        supports.iter().map(|s| self.support_memory(s, class)).collect()
    }

    /// PMG for one query and class: support-conditioned, or SAM2's no-memory path under
    /// `no_pmg`.
    pub fn pmg(&self, feats: &PreparedFeatures, class: u32, supports: &[SupportItem]) -> Result<PmgOutput> {
        if self.config.ablation.no_pmg {
            return crate::predictor::unconditioned_pmg(&self.sam, feats)
                .map_err(|e| TrainError::Memory(e.to_string()));
        }
        let mems = self.support_memories(supports, class)?;
        let refs: Vec<&SupportMemory> = mems.iter().collect();
        Pmg::new(&self.sam).pseudo_mask(feats, &refs).map_err(mem_err)
    }

    /// The full forward pass for one query image `[3, S, S]` (normalised), one class and
    /// its supports (ordered least → most similar, as selection gives them).
    pub fn forward(&self, image: &Tensor, class: u32, supports: &[SupportItem]) -> Result<SgpForward> {
        let feats = self.query_features(image)?;
        self.forward_from_features(image, &feats, class, supports)
    }

    /// [`SgpModel::forward`] on query features already computed by
    /// [`SgpModel::query_features`] (selection looks at them before the supports exist).
    pub fn forward_from_features(
        &self,
        image: &Tensor,
        feats: &PreparedFeatures,
        class: u32,
        supports: &[SupportItem],
    ) -> Result<SgpForward> {
        let _span = tracing::debug_span!("sgp_forward", class, supports = supports.len()).entered();
        let pmg = self.pmg(feats, class, supports)?;
        match &self.head {
            None => Ok(SgpForward {
                final_logits: pmg.pred_masks_high_res.clone(),
                pseudo_logits: None,
                object_scores: vec![pmg.object_score_logits.clone()],
            }),
            Some((head, _)) => {
                let x = image.to_device(self.sam.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
                let out = head.forward(&self.sam, &pmg_parts(&pmg), &x).map_err(head_err)?;
                Ok(SgpForward {
                    final_logits: out.final_logits,
                    pseudo_logits: Some(pmg.pred_masks_high_res.clone()),
                    object_scores: vec![pmg.object_score_logits.clone(), out.object_score_logits],
                })
            }
        }
    }

    /// The 3D forward pass over a chunk of consecutive slices (each `[3, S, S]`,
    /// normalised) for one class, as the 3D predictor runs a volume: slice t is decoded
    /// from the supports' memories and a bank of the chunk's earlier slices' memories
    /// (SAM2's memory encoder on each slice's final logits, temporal encoding by slice
    /// distance; `bank` chooses what the bank keeps, its capacity is K). Returns one
    /// [`SgpForward`] per slice. `first_features` may carry slice 0's features when they
    /// were computed already (selection). Stored memories are detached (truncated
    /// back-propagation through the chunk: each slice's loss trains the model through its
    /// own pass, and the bank only conditions it). Under `no_pmg` or `no_3dm`, or for a
    /// single slice, the slices are independent 2D passes.
    pub fn forward_chunk(
        &self,
        slices: &[Tensor],
        first_features: Option<PreparedFeatures>,
        class: u32,
        supports: &[SupportItem],
        bank: sgp_memory::BankKind,
    ) -> Result<Vec<SgpForward>> {
        let _span = tracing::debug_span!("sgp_forward_chunk", class, slices = slices.len()).entered();
        let mut first_features = first_features;
        let mut features = |t: usize, x: &Tensor| -> Result<PreparedFeatures> {
            match (t, first_features.take()) {
                (0, Some(f)) => Ok(f),
                _ => self.query_features(x),
            }
        };
        if self.config.ablation.no_pmg || self.config.ablation.no_3dm || slices.len() < 2 {
            return slices
                .iter()
                .enumerate()
                .map(|(t, x)| {
                    let f = features(t, x)?;
                    self.forward_from_features(x, &f, class, supports)
                })
                .collect();
        }
        let mems = self.support_memories(supports, class)?;
        let refs: Vec<&SupportMemory> = mems.iter().collect();
        let policy = bank.policy(supports.len()).map_err(mem_err)?;
        let mut tracker =
            sgp_memory::volume::SupportTracker::new(&self.sam, &[refs], policy, slices.len()).map_err(mem_err)?;
        let mut out = Vec::with_capacity(slices.len());
        for (t, x) in slices.iter().enumerate() {
            let feats = features(t, x)?;
            let x4 = x.to_device(self.sam.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
            let mut head_score = None;
            let mut refine = |pmg: &PmgOutput, _ctx: &sgp_memory::volume::SliceContext| -> sgp_memory::Result<Tensor> {
                match &self.head {
                    None => Ok(pmg.pred_masks_high_res.clone()),
                    Some((head, _)) => {
                        let o = head
                            .forward(&self.sam, &pmg_parts(pmg), &x4)
                            .map_err(|e| sgp_memory::Error::Input(e.to_string()))?;
                        head_score = Some(o.object_score_logits);
                        Ok(o.final_logits)
                    }
                }
            };
            let ctx = sgp_memory::volume::SliceContext {
                index: t,
                pass: 0,
                reverse: false,
                step: t,
            };
            let tracked = tracker.step(&feats, ctx, &mut refine).map_err(mem_err)?;
            let mut object_scores = vec![tracked.pmg.object_score_logits.clone()];
            object_scores.extend(head_score);
            out.push(SgpForward {
                pseudo_logits: self.head.as_ref().map(|_| tracked.pmg.pred_masks_high_res.clone()),
                final_logits: tracked.final_logits,
                object_scores,
            });
        }
        Ok(out)
    }

    /// The shared ownership handle of the head's variables (for saving a head file).
    pub fn head_varmap(&self) -> Option<&VarMap> {
        self.head.as_ref().map(|(_, v)| v)
    }
}

/// The PMG tensors the head takes.
pub fn pmg_parts(p: &PmgOutput) -> PmgParts {
    PmgParts {
        pix_feat_with_mem: p.pix_feat_with_mem.clone(),
        pred_masks: p.pred_masks.clone(),
        pred_masks_high_res: p.pred_masks_high_res.clone(),
        object_score_logits: p.object_score_logits.clone(),
        high_res_feats: p.high_res_feats.clone(),
    }
}

fn detach_features(f: &PreparedFeatures) -> PreparedFeatures {
    PreparedFeatures {
        vision_feats: f.vision_feats.iter().map(|t| t.detach()).collect(),
        vision_pos_embeds: f.vision_pos_embeds.iter().map(|t| t.detach()).collect(),
        feat_sizes: f.feat_sizes.clone(),
    }
}

fn mem_err(e: sgp_memory::Error) -> TrainError {
    TrainError::Memory(e.to_string())
}

fn head_err(e: sgp_pma::PmaError) -> TrainError {
    TrainError::Head(e.to_string())
}

/// A shared, read-only state dict (official names).
pub fn state_dict_base(tensors: std::collections::HashMap<String, Tensor>) -> BaseWeights {
    BaseWeights::StateDict(Arc::new(tensors))
}
