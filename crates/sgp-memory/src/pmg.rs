//! PMG, the pseudo-mask generator: a query conditioned on its support memories.
//!
//! Supports are SAM2 conditioning frames at frame indices `0..K` (in the order given; the
//! selection puts the most similar last, nearest the query) and the query is frame `K` of
//! a `K + 1`-frame clip. The query's lowest-level features go through SAM2's memory
//! attention on SAM2's own memory selection, then the SAM heads decode them with no
//! prompt. This is the `support_pseudo_mask` parity kind, batched: every batch item (a
//! query, or a query × class) has its own supports, stacked along the batch dimension.
//!
//! Everything here is differentiable when the model's weights are tracked: it is
//! sgp-sam2's forward code, which switches to gradient-carrying ops on tracked inputs.

use candle_core::Tensor;
use sgp_sam2::{FrameOutput, MemoryBank, MemorySelection};
use sgp_sam2::{PreparedFeatures, Sam2Model};

use crate::support::{seq_to_map, SupportMemory};
use crate::{Error, Result};

/// What PMG gives for a batch of queries.
#[derive(Debug, Clone)]
pub struct PmgOutput {
    /// `[B, C, E, E]` memory-conditioned query features (`F_q'`).
    pub pix_feat_with_mem: Tensor,
    /// `[B, 1, S/4, S/4]` pseudo-mask logits.
    pub pred_masks: Tensor,
    /// `[B, 1, S, S]` pseudo-mask logits.
    pub pred_masks_high_res: Tensor,
    /// `[B, 1]` object score logits (> 0: object present).
    pub object_score_logits: Tensor,
    /// `[B, C]` object pointer.
    pub obj_ptr: Tensor,
    /// The query's projected high-res levels `[B, C/8, S/4, S/4]`, `[B, C/4, S/8, S/8]`.
    pub high_res_feats: Option<(Tensor, Tensor)>,
}

impl PmgOutput {
    /// Concatenates outputs of consecutive batch chunks.
    pub fn cat(parts: &[PmgOutput]) -> Result<Self> {
        if parts.len() == 1 {
            return Ok(parts[0].clone());
        }
        let cat = |f: &dyn Fn(&PmgOutput) -> Tensor| -> Result<Tensor> {
            let v: Vec<Tensor> = parts.iter().map(f).collect();
            Ok(Tensor::cat(&v, 0)?)
        };
        let high_res_feats = if parts.iter().all(|p| p.high_res_feats.is_some()) {
            let a: Vec<Tensor> = parts
                .iter()
                .filter_map(|p| p.high_res_feats.as_ref().map(|h| h.0.clone()))
                .collect();
            let b: Vec<Tensor> = parts
                .iter()
                .filter_map(|p| p.high_res_feats.as_ref().map(|h| h.1.clone()))
                .collect();
            Some((Tensor::cat(&a, 0)?, Tensor::cat(&b, 0)?))
        } else {
            None
        };
        Ok(Self {
            pix_feat_with_mem: cat(&|p| p.pix_feat_with_mem.clone())?,
            pred_masks: cat(&|p| p.pred_masks.clone())?,
            pred_masks_high_res: cat(&|p| p.pred_masks_high_res.clone())?,
            object_score_logits: cat(&|p| p.object_score_logits.clone())?,
            obj_ptr: cat(&|p| p.obj_ptr.clone())?,
            high_res_feats,
        })
    }

    /// Batch item `i` (keeping the batch dimension).
    pub fn item(&self, i: usize) -> Result<Self> {
        let n = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, i, 1)?) };
        Ok(Self {
            pix_feat_with_mem: n(&self.pix_feat_with_mem)?,
            pred_masks: n(&self.pred_masks)?,
            pred_masks_high_res: n(&self.pred_masks_high_res)?,
            object_score_logits: n(&self.object_score_logits)?,
            obj_ptr: n(&self.obj_ptr)?,
            high_res_feats: match &self.high_res_feats {
                Some((a, b)) => Some((n(a)?, n(b)?)),
                None => None,
            },
        })
    }
}

/// Stacks per-item supports into SAM2 conditioning frames `0..K`: frame k holds support k
/// of every batch item. Every item needs the same number of supports.
pub fn conditioning_bank(supports: &[Vec<&SupportMemory>]) -> Result<MemoryBank> {
    let first = supports
        .first()
        .ok_or_else(|| Error::Input("no batch item to stack supports for".into()))?;
    let k = first.len();
    if k == 0 {
        return Err(Error::Input("PMG needs at least one support".into()));
    }
    if let Some(bad) = supports.iter().find(|s| s.len() != k) {
        return Err(Error::Input(format!(
            "every batch item needs the same number of supports ({k} and {})",
            bad.len()
        )));
    }
    let mut bank = MemoryBank::new();
    for slot in 0..k {
        let items: Vec<&SupportMemory> = supports.iter().map(|s| s[slot]).collect();
        bank.cond_frame_outputs.insert(slot, stack_memories(&items)?);
    }
    Ok(bank)
}

/// One frame output holding several supports' memories along the batch dimension.
pub fn stack_memories(items: &[&SupportMemory]) -> Result<FrameOutput> {
    if items.len() == 1 {
        return Ok(items[0].frame());
    }
    let cat = |f: &dyn Fn(&SupportMemory) -> &Tensor| -> Result<Tensor> {
        let v: Vec<Tensor> = items.iter().map(|m| f(m).clone()).collect();
        Ok(Tensor::cat(&v, 0)?)
    };
    Ok(FrameOutput {
        maskmem_features: Some(cat(&|m| &m.maskmem_features)?),
        maskmem_pos_enc: Some(cat(&|m| &m.maskmem_pos_enc)?),
        pred_masks: cat(&|m| &m.pred_masks)?,
        obj_ptr: cat(&|m| &m.obj_ptr)?,
        object_score_logits: cat(&|m| &m.object_score_logits)?,
    })
}

/// The pseudo-mask generator on one SAM2 model.
#[derive(Debug, Clone, Copy)]
pub struct Pmg<'m> {
    model: &'m Sam2Model,
    max_batch: usize,
}

impl<'m> Pmg<'m> {
    /// PMG on `model`, with no limit on the batch size.
    pub fn new(model: &'m Sam2Model) -> Self {
        Self {
            model,
            max_batch: usize::MAX,
        }
    }

    /// Runs batches larger than `n` in chunks of `n` (bounds the peak memory of the
    /// memory attention; the result is the same).
    pub fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// The model.
    pub fn model(&self) -> &'m Sam2Model {
        self.model
    }

    /// Pseudo-masks of a batch of queries `[HW, B, C]` that all share the same supports.
    pub fn pseudo_mask(&self, query: &PreparedFeatures, supports: &[&SupportMemory]) -> Result<PmgOutput> {
        let b = query_batch(query)?;
        let per_item = vec![supports.to_vec(); b];
        self.pseudo_mask_per_item(query, &per_item)
    }

    /// Pseudo-masks where batch item `i` of `query` has its own supports `supports[i]`
    /// (same count for all items): several queries, or one query and several classes.
    pub fn pseudo_mask_per_item(
        &self,
        query: &PreparedFeatures,
        supports: &[Vec<&SupportMemory>],
    ) -> Result<PmgOutput> {
        let _span = tracing::debug_span!("pmg", batch = supports.len()).entered();
        let b = query_batch(query)?;
        if supports.len() != b {
            return Err(Error::Input(format!(
                "{} support lists for a query batch of {b}",
                supports.len()
            )));
        }
        if b > self.max_batch {
            let mut parts = Vec::new();
            let mut start = 0;
            while start < b {
                let len = self.max_batch.min(b - start);
                let q = narrow_features(query, start, len)?;
                parts.push(self.pseudo_mask_per_item(&q, &supports[start..start + len])?);
                start += len;
            }
            return PmgOutput::cat(&parts);
        }
        let bank = conditioning_bank(supports)?;
        let k = bank.cond_frame_outputs.len();
        let selection = self.model.select_memories(k, &bank, k + 1, false)?;
        self.decode(query, &selection, k + 1)
    }

    /// Memory-conditioned features and prompt-free decoding of `query` on an explicit
    /// memory selection (what the 3D bank policies produce). `num_frames` is the clip
    /// length SAM2's object-pointer position encoding is normalised by.
    pub fn decode(
        &self,
        query: &PreparedFeatures,
        selection: &MemorySelection,
        num_frames: usize,
    ) -> Result<PmgOutput> {
        let levels = query.vision_feats.len();
        if levels == 0 || query.vision_pos_embeds.len() != levels || query.feat_sizes.len() != levels {
            return Err(Error::Input("query features are inconsistent".into()));
        }
        let high_res = match levels {
            1 => None,
            3 => Some((
                seq_to_map(&query.vision_feats[0], query.feat_sizes[0])?,
                seq_to_map(&query.vision_feats[1], query.feat_sizes[1])?,
            )),
            n => return Err(Error::Input(format!("expected 1 or 3 feature levels, got {n}"))),
        };
        let pix = self
            .model
            .memory_conditioned_features(query, Some(selection), num_frames)?;
        let multimask = self.model.multimask(self.model.sam_heads().cfg.use_multimask(false, 0));
        let out =
            self.model
                .sam_heads()
                .forward(&pix, None, None, high_res.as_ref().map(|(a, b)| (a, b)), multimask)?;
        Ok(PmgOutput {
            pix_feat_with_mem: pix,
            pred_masks: out.low_res_masks,
            pred_masks_high_res: out.high_res_masks,
            object_score_logits: out.object_score_logits,
            obj_ptr: out.obj_ptr,
            high_res_feats: high_res,
        })
    }
}

fn query_batch(query: &PreparedFeatures) -> Result<usize> {
    let t = query
        .vision_feats
        .last()
        .ok_or_else(|| Error::Input("query features hold no level".into()))?;
    Ok(t.dim(1)?)
}

/// Batch items `start..start+len` of prepared features.
pub fn narrow_features(f: &PreparedFeatures, start: usize, len: usize) -> Result<PreparedFeatures> {
    let n = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, start, len)?) };
    Ok(PreparedFeatures {
        vision_feats: f.vision_feats.iter().map(n).collect::<Result<_>>()?,
        vision_pos_embeds: f.vision_pos_embeds.iter().map(n).collect::<Result<_>>()?,
        feat_sizes: f.feat_sizes.clone(),
    })
}
