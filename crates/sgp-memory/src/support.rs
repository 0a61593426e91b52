//! Support items and their encodings: what a labelled example contributes to a query.
//!
//! A support is a SAM2 *conditioning frame prompted with its ground-truth mask*
//! (`track_step(is_init_cond_frame=True, mask_inputs=mask)`). With the official configs
//! that is the `use_mask_input_as_output_without_sam` path: logits `mask·20 − 10`, the
//! object pointer from the SAM heads on the downsampled mask, memory from the raw image
//! features. We call sgp-sam2's own `track_step_with_selection` for it, so the support
//! path cannot drift from the tracking path the `track` parity kind checks.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use sgp_sam2::{pooled_embedding, FrameOutput, FramePrompt};
use sgp_sam2::{PreparedFeatures, Sam2Model};

use crate::{Error, Result};

/// One labelled example: a model-input image with one binary mask per class.
#[derive(Debug, Clone)]
pub struct SupportItem {
    /// `[3, S, S]` model input (already resized and normalised, like a query).
    pub image: Tensor,
    /// Class id → `[S, S]` 0/1 mask (values ≥ 0.5 are the class). Classes absent from
    /// the image are simply not listed.
    pub masks: BTreeMap<u32, Tensor>,
    /// Case / patient id: a query never gets a support of its own case (leave-one-out).
    pub case_id: String,
}

/// The memory one support contributes for one class: a conditioning frame of SAM2.
#[derive(Debug, Clone)]
pub struct SupportMemory {
    /// `[1, mem_dim, E, E]` memory features.
    pub maskmem_features: Tensor,
    /// `[1, mem_dim, E, E]` their position encoding.
    pub maskmem_pos_enc: Tensor,
    /// `[1, C]` object pointer.
    pub obj_ptr: Tensor,
    /// `[1, 1]` object score logit (±10 on the mask-as-output path).
    pub object_score_logits: Tensor,
    /// `[1, 1, S/4, S/4]` low-res mask logits (kept so the memory is a complete frame).
    pub pred_masks: Tensor,
}

impl SupportMemory {
    /// The memory as a SAM2 frame output, ready to sit in a `MemoryBank`.
    pub fn frame(&self) -> FrameOutput {
        FrameOutput {
            maskmem_features: Some(self.maskmem_features.clone()),
            maskmem_pos_enc: Some(self.maskmem_pos_enc.clone()),
            pred_masks: self.pred_masks.clone(),
            obj_ptr: self.obj_ptr.clone(),
            object_score_logits: self.object_score_logits.clone(),
        }
    }

    /// Bytes held by the tensors (for cache bounds and memory accounting).
    pub fn bytes(&self) -> usize {
        [
            &self.maskmem_features,
            &self.maskmem_pos_enc,
            &self.obj_ptr,
            &self.object_score_logits,
            &self.pred_masks,
        ]
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
    }
}

/// The image features of a support (maps, not sequences: their sine position encodings
/// depend on no weight and are much larger, so they are not kept).
#[derive(Debug, Clone)]
pub struct SupportFeatures {
    /// `[1, C, E, E]` lowest-resolution level, without `no_mem_embed`.
    pub image_embed: Tensor,
    /// The projected high-res levels `[1, C/8, S/4, S/4]`, `[1, C/4, S/8, S/8]`, when the
    /// decoder uses them.
    pub high_res: Option<(Tensor, Tensor)>,
}

/// Everything computed once per support image.
#[derive(Debug, Clone)]
pub struct EncodedSupport {
    /// The image features.
    pub features: SupportFeatures,
    /// `[C]` mean-pooled level-2 embedding (not normalised), what selection compares.
    pub pooled: Tensor,
    /// Class id → that class's memory.
    pub memories: BTreeMap<u32, SupportMemory>,
}

impl EncodedSupport {
    /// The memory of one class, if this support holds it.
    pub fn memory(&self, class: u32) -> Option<&SupportMemory> {
        self.memories.get(&class)
    }
}

/// Checks an item against the model's input size.
pub fn validate_item(item: &SupportItem, image_size: usize) -> Result<()> {
    let s = image_size;
    if item.image.dims() != [3, s, s] {
        return Err(Error::Input(format!(
            "support image of case {:?} must be [3,{s},{s}], got {:?}",
            item.case_id,
            item.image.dims()
        )));
    }
    if item.masks.is_empty() {
        return Err(Error::Input(format!("support of case {:?} has no mask", item.case_id)));
    }
    for (c, m) in &item.masks {
        if m.dims() != [s, s] {
            return Err(Error::Input(format!(
                "mask of class {c} of case {:?} must be [{s},{s}], got {:?}",
                item.case_id,
                m.dims()
            )));
        }
    }
    Ok(())
}

/// Repeats batch-1 prepared features `b` times along the batch (features are computed
/// once per image and shared by all classes).
pub fn repeat_features(feats: &PreparedFeatures, b: usize) -> Result<PreparedFeatures> {
    let rep = |t: &Tensor| -> Result<Tensor> {
        let n = t.dim(1)?;
        if n == b {
            return Ok(t.clone());
        }
        if n != 1 {
            return Err(Error::Input(format!("cannot repeat features of batch {n} to {b}")));
        }
        Ok(Tensor::cat(&vec![t.clone(); b], 1)?)
    };
    Ok(PreparedFeatures {
        vision_feats: feats.vision_feats.iter().map(rep).collect::<Result<_>>()?,
        vision_pos_embeds: feats.vision_pos_embeds.iter().map(rep).collect::<Result<_>>()?,
        feat_sizes: feats.feat_sizes.clone(),
    })
}

/// `[HW, B, C]` → `[B, C, H, W]`.
pub(crate) fn seq_to_map(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, b, c) = x.dims3()?;
    Ok(x.permute((1, 2, 0))?.reshape((b, c, h, w))?)
}

/// The lowest-level features of prepared features as a map `[B, C, E, E]`.
pub fn top_level_map(feats: &PreparedFeatures) -> Result<Tensor> {
    let last = feats
        .vision_feats
        .len()
        .checked_sub(1)
        .ok_or_else(|| Error::Input("prepared features hold no level".into()))?;
    seq_to_map(&feats.vision_feats[last], feats.feat_sizes[last])
}

/// The image features of a batch of model inputs `[B, 3, S, S]`.
pub fn image_features(model: &Sam2Model, images: &Tensor) -> Result<PreparedFeatures> {
    let bo = model.forward_image(images)?;
    Ok(model.prepare_backbone_features(&bo)?)
}

/// `[C]` mean-pooled level-2 embedding of batch-1 features.
pub fn pooled_of(feats: &PreparedFeatures) -> Result<Tensor> {
    Ok(pooled_embedding(&top_level_map(feats)?)?.get(0)?)
}

/// Encodes one support: image features once, then every class's mask-prompted
/// conditioning frame in one batch. This is the expensive step the cache avoids.
pub fn encode_support(model: &Sam2Model, item: &SupportItem) -> Result<EncodedSupport> {
    let _span = tracing::debug_span!("encode_support", case = %item.case_id).entered();
    let s = model.config().image_size;
    validate_item(item, s)?;
    let dev = model.device();
    let x = item.image.to_device(dev)?.to_dtype(DType::F32)?.unsqueeze(0)?;
    let feats = image_features(model, &x)?;
    let classes: Vec<u32> = item.masks.keys().copied().collect();
    let b = classes.len();
    let masks: Vec<Tensor> = item
        .masks
        .values()
        .map(|m| -> Result<Tensor> {
            Ok(m.to_device(dev)?
                .to_dtype(DType::F32)?
                .ge(0.5f32)?
                .to_dtype(DType::F32)?)
        })
        .collect::<Result<_>>()?;
    let masks = Tensor::stack(&masks, 0)?.unsqueeze(1)?; // [B, 1, S, S]
    let feats_b = repeat_features(&feats, b)?;
    let prompt = FramePrompt {
        points: None,
        mask: Some(masks),
    };
    // An initial conditioning frame: no memory is read, so the frame count is irrelevant.
    let out = model.track_step_with_selection(&sgp_sam2::TrackRequest::initial(0, 1), &feats_b, &prompt, None)?;
    let frame = out.frame;
    let (Some(mf), Some(mp)) = (frame.maskmem_features, frame.maskmem_pos_enc) else {
        return Err(Error::Input(
            "the model has no memory (num_maskmem = 0): supports cannot be encoded".into(),
        ));
    };
    let mut memories = BTreeMap::new();
    for (i, c) in classes.iter().enumerate() {
        memories.insert(
            *c,
            SupportMemory {
                maskmem_features: mf.narrow(0, i, 1)?.contiguous()?,
                maskmem_pos_enc: mp.narrow(0, i, 1)?.contiguous()?,
                obj_ptr: frame.obj_ptr.narrow(0, i, 1)?.contiguous()?,
                object_score_logits: frame.object_score_logits.narrow(0, i, 1)?.contiguous()?,
                pred_masks: frame.pred_masks.narrow(0, i, 1)?.contiguous()?,
            },
        );
    }
    let levels = feats.vision_feats.len();
    let high_res = if levels >= 3 {
        Some((
            seq_to_map(&feats.vision_feats[0], feats.feat_sizes[0])?,
            seq_to_map(&feats.vision_feats[1], feats.feat_sizes[1])?,
        ))
    } else {
        None
    };
    let image_embed = top_level_map(&feats)?;
    let pooled = pooled_embedding(&image_embed)?.get(0)?;
    Ok(EncodedSupport {
        features: SupportFeatures { image_embed, high_res },
        pooled,
        memories,
    })
}
