//! Memory-based tracking: `SAM2Base.track_step` and the pieces it is made of
//! (`_prepare_memory_conditioned_features`, `_encode_new_memory`, `_use_mask_as_output`).
//!
//! Memory selection is split from memory use: [`Sam2Model::select_memories`] is SAM2's own
//! choice of which earlier frames a frame attends to, and
//! [`Sam2Model::track_step_with_selection`] runs a frame on any [`MemorySelection`]. The
//! propagation code uses that seam for pluggable memory-bank policies; [`Sam2Model::track_step`]
//! is the official function end to end (the `track` parity kind).
//!
//! [`Tracker`] owns a [`MemoryBank`] and the whole memory path (selection, memory-conditioned
//! features, decoding, memory encoding). Conditioning entries that are not video frames,
//! such as SGP's supports (an image with its mask at entry index k), go in through
//! [`Tracker::add_support`] with exactly `track_step`'s semantics.

use std::collections::BTreeMap;

use candle_core::{DType, Module, Tensor, D};

use crate::model::{PreparedFeatures, Sam2Model};
use crate::rope::sine_pe_1d;
use crate::sam_heads::{DecoderIntermediates, PointInputs, SamHeadsOutput};
use crate::{Error, Result};

/// What is kept of a processed frame: all later frames need (`compact_current_out` of the
/// official video predictor). High-resolution masks are not kept.
#[derive(Debug, Clone)]
pub struct FrameOutput {
    /// `[B, mem_dim, E, E]`; None when the memory encoder was not run.
    pub maskmem_features: Option<Tensor>,
    /// `[B, mem_dim, E, E]`.
    pub maskmem_pos_enc: Option<Tensor>,
    /// `[B, 1, S/4, S/4]` mask logits (NO_OBJ_SCORE where the object is judged absent).
    pub pred_masks: Tensor,
    /// `[B, C]`.
    pub obj_ptr: Tensor,
    /// `[B, 1]`.
    pub object_score_logits: Tensor,
}

/// The result of one tracking step.
#[derive(Debug, Clone)]
pub struct TrackStepOutput {
    /// What later frames need (store it in the bank).
    pub frame: FrameOutput,
    /// `[B, 1, S, S]` mask logits (what the memory encoder saw).
    pub pred_masks_high_res: Tensor,
    /// `[B, C, E, E]` the features the SAM heads decoded: memory-conditioned for a
    /// tracked frame (`pix_feat_with_mem`), with `no_mem_embed` for an initial one. None
    /// on the mask-as-output path, which decodes nothing.
    pub pix_feat_with_mem: Option<Tensor>,
    /// The frame's projected high-res levels `[B, C/8, S/4, S/4]`, `[B, C/4, S/8, S/8]`
    /// (None when the model does not use them).
    pub high_res_features: Option<(Tensor, Tensor)>,
    /// The mask decoder's intermediates (None on the mask-as-output path).
    pub intermediates: Option<DecoderIntermediates>,
}

/// What one tracking step is: which frame, of how many, and what to compute. Replaces
/// `track_step`'s positional bools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackRequest {
    /// The frame's index (supports: their entry index).
    pub frame_idx: usize,
    /// The clip length (object-pointer temporal encodings are normalised by it).
    pub num_frames: usize,
    /// An initial conditioning frame: decoded without memory (`is_init_cond_frame`).
    pub init_cond: bool,
    /// Tracking toward lower frame indices (`track_in_reverse`).
    pub reverse: bool,
    /// Encode the frame's memory (`run_mem_encoder`).
    pub encode_memory: bool,
}

impl TrackRequest {
    /// A tracked (non-initial) frame, forward in time, with memory encoding.
    pub fn tracked(frame_idx: usize, num_frames: usize) -> Self {
        Self {
            frame_idx,
            num_frames,
            init_cond: false,
            reverse: false,
            encode_memory: true,
        }
    }

    /// An initial conditioning (prompted) frame, with memory encoding.
    pub fn initial(frame_idx: usize, num_frames: usize) -> Self {
        Self {
            init_cond: true,
            ..Self::tracked(frame_idx, num_frames)
        }
    }

    /// The same request, tracking toward lower frame indices.
    pub fn reversed(self) -> Self {
        Self { reverse: true, ..self }
    }

    /// The same request without memory encoding (a query that is never stored).
    pub fn without_memory_encoding(self) -> Self {
        Self {
            encode_memory: false,
            ..self
        }
    }
}

/// The official `output_dict`: conditioning (prompted) frames and the other processed
/// frames, by frame index.
#[derive(Debug, Clone, Default)]
pub struct MemoryBank {
    /// Prompted frames (always eligible as memory).
    pub cond_frame_outputs: BTreeMap<usize, FrameOutput>,
    /// Every other processed frame.
    pub non_cond_frame_outputs: BTreeMap<usize, FrameOutput>,
}

impl MemoryBank {
    /// An empty bank.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames held (both kinds).
    pub fn len(&self) -> usize {
        self.cond_frame_outputs.len() + self.non_cond_frame_outputs.len()
    }

    /// No frame held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The memories a frame attends to, with their temporal positions.
#[derive(Debug, Clone, Default)]
pub struct MemorySelection<'a> {
    /// `(t_pos, frame)`: `t_pos` 0 is a conditioning frame; `1..num_maskmem` counts from
    /// the oldest to the most recent earlier frame (slot `num_maskmem - t_pos - 1` of
    /// `maskmem_tpos_enc`).
    pub spatial: Vec<(usize, &'a FrameOutput)>,
    /// `(temporal distance, frame)` of object pointers; the distance is already signed or
    /// absolute as the config asks.
    pub pointers: Vec<(i64, &'a FrameOutput)>,
}

/// The prompt of one frame.
#[derive(Debug, Clone, Default)]
pub struct FramePrompt {
    /// Points `[B, P, 2]` in pixels of the S×S frame, labels `[B, P]` (a box is two points
    /// with labels 2 and 3).
    pub points: Option<PointInputs>,
    /// `[B, 1, H, W]` mask (binary for the mask-as-output path; logits otherwise).
    pub mask: Option<Tensor>,
}

impl FramePrompt {
    /// A mask prompt `[B, 1, H, W]`.
    pub fn mask(mask: Tensor) -> Self {
        Self {
            points: None,
            mask: Some(mask),
        }
    }

    /// Neither points nor a mask.
    pub fn is_empty(&self) -> bool {
        self.points.is_none() && self.mask.is_none()
    }
}

/// `select_closest_cond_frames`: up to `max` conditioning frames closest in time.
/// Returns (selected, unselected) frame indices.
pub fn select_closest_cond_frames(frame_idx: usize, cond: &[usize], max: i64) -> (Vec<usize>, Vec<usize>) {
    if max < 0 || cond.len() <= max as usize {
        return (cond.to_vec(), Vec::new());
    }
    let mut selected: Vec<usize> = Vec::new();
    if let Some(&before) = cond.iter().filter(|&&t| t < frame_idx).max() {
        selected.push(before);
    }
    if let Some(&after) = cond.iter().filter(|&&t| t >= frame_idx).min() {
        selected.push(after);
    }
    let remain = (max as usize).saturating_sub(selected.len());
    let mut rest: Vec<usize> = cond.iter().copied().filter(|t| !selected.contains(t)).collect();
    // Stable sort by distance, like Python's `sorted` over the dict's insertion order.
    rest.sort_by_key(|&t| (t as i64 - frame_idx as i64).abs());
    selected.extend(rest.into_iter().take(remain));
    let unselected = cond.iter().copied().filter(|t| !selected.contains(t)).collect();
    (selected, unselected)
}

/// `[HW, B, C]` → `[B, C, H, W]`.
fn seq_to_map(x: &Tensor, (h, w): (usize, usize)) -> candle_core::Result<Tensor> {
    let (_, b, c) = x.dims3()?;
    crate::ops::contiguous(&x.permute((1, 2, 0))?)?.reshape((b, c, h, w))
}

/// `[B, C, H, W]` → `[HW, B, C]`.
fn map_to_seq(x: &Tensor) -> candle_core::Result<Tensor> {
    x.flatten_from(2)?.permute((2, 0, 1))
}

fn kernel_err(e: sgp_kernels::Error) -> Error {
    match e {
        sgp_kernels::Error::Candle(c) => Error::Candle(c),
        other => Error::Input(other.to_string()),
    }
}

impl Sam2Model {
    /// The `(t_pos, frame index)` slots SAM2 fills with earlier non-conditioning frames
    /// (`memory_temporal_stride_for_eval` applies; the last slot is always the adjacent frame).
    pub fn previous_memory_slots(&self, frame_idx: usize, track_in_reverse: bool) -> Vec<(usize, i64)> {
        let n = self.config.num_maskmem;
        let stride = self.config.memory_temporal_stride_for_eval.max(1) as i64;
        let f = frame_idx as i64;
        (1..n)
            .map(|t_pos| {
                let t_rel = (n - t_pos) as i64;
                let prev = if t_rel == 1 {
                    if track_in_reverse {
                        f + 1
                    } else {
                        f - 1
                    }
                } else if !track_in_reverse {
                    (f - 2).div_euclid(stride) * stride - (t_rel - 2) * stride
                } else {
                    // -(-(f + 2) // stride) * stride: ceil to a multiple of the stride.
                    -((-(f + 2)).div_euclid(stride)) * stride + (t_rel - 2) * stride
                };
                (t_pos, prev)
            })
            .collect()
    }

    /// The farthest frame distance SAM2's selection can reach back (spatial memories and
    /// object pointers): older non-conditioning frames are never attended to again.
    pub fn memory_reach(&self, num_frames: usize) -> usize {
        let n = self.config.num_maskmem as i64;
        let stride = self.config.memory_temporal_stride_for_eval.max(1) as i64;
        let spatial = if n >= 2 { (n - 1) * stride + 1 } else { 1 };
        let ptrs = if self.config.use_obj_ptrs_in_encoder {
            self.config.max_obj_ptrs_in_encoder.min(num_frames) as i64
        } else {
            0
        };
        spatial.max(ptrs).max(1) as usize
    }

    /// SAM2's own memory selection (`_prepare_memory_conditioned_features`, step 1) for a
    /// non-initial frame.
    pub fn select_memories<'a>(
        &self,
        frame_idx: usize,
        bank: &'a MemoryBank,
        num_frames: usize,
        track_in_reverse: bool,
    ) -> Result<MemorySelection<'a>> {
        if bank.cond_frame_outputs.is_empty() {
            return Err(Error::Input(format!(
                "frame {frame_idx} is not a conditioning frame but no conditioning frame was processed"
            )));
        }
        let cond_idx: Vec<usize> = bank.cond_frame_outputs.keys().copied().collect();
        let (selected, unselected) =
            select_closest_cond_frames(frame_idx, &cond_idx, self.config.max_cond_frames_in_attn);
        let lookup_prev = |t: i64| -> Option<&'a FrameOutput> {
            if t < 0 {
                return None;
            }
            let t = t as usize;
            bank.non_cond_frame_outputs.get(&t).or_else(|| {
                if unselected.contains(&t) {
                    bank.cond_frame_outputs.get(&t)
                } else {
                    None
                }
            })
        };
        let mut spatial: Vec<(usize, &FrameOutput)> = selected
            .iter()
            .filter_map(|t| bank.cond_frame_outputs.get(t))
            .map(|o| (0, o))
            .collect();
        for (t_pos, prev) in self.previous_memory_slots(frame_idx, track_in_reverse) {
            if let Some(o) = lookup_prev(prev) {
                spatial.push((t_pos, o));
            }
        }

        let mut pointers = Vec::new();
        if self.config.use_obj_ptrs_in_encoder {
            let max_ptrs = num_frames.min(self.config.max_obj_ptrs_in_encoder);
            let sign: i64 = if track_in_reverse { -1 } else { 1 };
            let f = frame_idx as i64;
            for &t in &selected {
                let past = if track_in_reverse {
                    t >= frame_idx
                } else {
                    t <= frame_idx
                };
                if self.config.only_obj_ptrs_in_the_past_for_eval && !past {
                    continue;
                }
                if let Some(o) = bank.cond_frame_outputs.get(&t) {
                    let d = if self.config.use_signed_tpos_enc_to_obj_ptrs {
                        (f - t as i64) * sign
                    } else {
                        (f - t as i64).abs()
                    };
                    pointers.push((d, o));
                }
            }
            for t_diff in 1..max_ptrs as i64 {
                let t = if track_in_reverse { f + t_diff } else { f - t_diff };
                if t < 0 || t >= num_frames as i64 {
                    break;
                }
                if let Some(o) = lookup_prev(t) {
                    pointers.push((t_diff, o));
                }
            }
        }
        Ok(MemorySelection { spatial, pointers })
    }

    /// `_prepare_memory_conditioned_features` on a given selection: the lowest-level image
    /// features `[B, C, E, E]` conditioned on the selected memories. `selection` None
    /// means an initial conditioning frame (no memory).
    pub fn memory_conditioned_features(
        &self,
        feats: &PreparedFeatures,
        selection: Option<&MemorySelection>,
        num_frames: usize,
    ) -> Result<Tensor> {
        let last = feats
            .vision_feats
            .len()
            .checked_sub(1)
            .ok_or_else(|| Error::Input("no feature levels".into()))?;
        let curr = &feats.vision_feats[last];
        let curr_pos = &feats.vision_pos_embeds[last];
        let size = feats.feat_sizes[last];
        let (_, b, c) = curr.dims3()?;
        if self.config.num_maskmem == 0 {
            return Ok(seq_to_map(curr, size)?);
        }
        let mem_dim = self.mem_dim;
        let dev = curr.device();
        let (memory, memory_pos, num_obj_ptr_tokens) = match selection {
            None => {
                if self.config.directly_add_no_mem_embed {
                    return Ok(seq_to_map(&curr.broadcast_add(&self.no_mem_embed)?, size)?);
                }
                // A dummy token, so the memory attention never sees an empty memory.
                (
                    self.no_mem_embed.broadcast_as((1, b, mem_dim))?.contiguous()?,
                    self.no_mem_pos_enc.broadcast_as((1, b, mem_dim))?.contiguous()?,
                    0,
                )
            }
            Some(sel) => {
                let mut mem = Vec::new();
                let mut pos = Vec::new();
                let n = self.config.num_maskmem;
                for &(t_pos, o) in &sel.spatial {
                    let (Some(f), Some(p)) = (&o.maskmem_features, &o.maskmem_pos_enc) else {
                        return Err(Error::Input("a selected memory frame has no memory features".into()));
                    };
                    if t_pos >= n {
                        return Err(Error::Input(format!(
                            "memory slot {t_pos} out of range (num_maskmem {n})"
                        )));
                    }
                    mem.push(map_to_seq(&f.to_device(dev)?)?);
                    let tpos = self.maskmem_tpos_enc.get(n - t_pos - 1)?.reshape((1, 1, mem_dim))?;
                    pos.push(map_to_seq(&p.to_device(dev)?)?.broadcast_add(&tpos)?);
                }
                let mut num_ptr_tokens = 0;
                if self.config.use_obj_ptrs_in_encoder && !sel.pointers.is_empty() {
                    let ptrs: Vec<Tensor> = sel
                        .pointers
                        .iter()
                        .map(|(_, o)| o.obj_ptr.to_device(dev))
                        .collect::<candle_core::Result<_>>()?;
                    let obj_ptrs = Tensor::stack(&ptrs, 0)?; // [P, B, C]
                    let p = ptrs.len();
                    let obj_pos = if self.config.add_tpos_enc_to_obj_ptrs {
                        let max_ptrs = num_frames.min(self.config.max_obj_ptrs_in_encoder);
                        let t_diff_max = (max_ptrs.saturating_sub(1)).max(1) as f32;
                        let tpos_dim = if self.obj_ptr_tpos_proj.is_some() { c } else { mem_dim };
                        let rel: Vec<f32> = sel.pointers.iter().map(|(d, _)| *d as f32 / t_diff_max).collect();
                        let pe = sine_pe_1d(&rel, tpos_dim, 10000.0, dev)?;
                        let pe = match &self.obj_ptr_tpos_proj {
                            Some(proj) => proj.forward(&pe)?,
                            None => pe,
                        };
                        pe.unsqueeze(1)?.broadcast_as((p, b, mem_dim))?.contiguous()?
                    } else {
                        Tensor::zeros((p, b, mem_dim), DType::F32, dev)?
                    };
                    let (obj_ptrs, obj_pos) = if mem_dim < c {
                        // Split each pointer into C/mem_dim tokens.
                        let k = c / mem_dim;
                        let t = obj_ptrs.reshape((p, b, k, mem_dim))?.permute((0, 2, 1, 3))?.reshape((
                            p * k,
                            b,
                            mem_dim,
                        ))?;
                        let pp =
                            obj_pos
                                .unsqueeze(1)?
                                .broadcast_as((p, k, b, mem_dim))?
                                .reshape((p * k, b, mem_dim))?;
                        (t, pp)
                    } else {
                        (obj_ptrs, obj_pos)
                    };
                    num_ptr_tokens = obj_ptrs.dim(0)?;
                    mem.push(obj_ptrs);
                    pos.push(obj_pos);
                }
                if mem.is_empty() {
                    return Err(Error::Input("memory selection is empty".into()));
                }
                (Tensor::cat(&mem, 0)?, Tensor::cat(&pos, 0)?, num_ptr_tokens)
            }
        };
        let out = self
            .memory_attention
            .forward(curr, curr_pos, &memory, &memory_pos, num_obj_ptr_tokens)?;
        Ok(seq_to_map(&out, size)?)
    }

    /// `_encode_new_memory`: the memory of a frame from its lowest-level features
    /// `[B, C, E, E]` and high-res mask logits `[B, 1, S, S]`. Returns (features, pos enc).
    pub fn encode_new_memory(
        &self,
        pix_feat: &Tensor,
        pred_masks_high_res: &Tensor,
        object_score_logits: &Tensor,
        is_mask_from_pts: bool,
    ) -> Result<(Tensor, Tensor)> {
        let b = pix_feat.dim(0)?;
        let masks = if self.config.non_overlap_masks_for_mem_enc {
            apply_non_overlapping_constraints(pred_masks_high_res)?
        } else {
            pred_masks_high_res.clone()
        };
        let mut mask_for_mem = if self.config.binarize_mask_from_pts_for_mem_enc && is_mask_from_pts {
            masks.gt(0f32)?.to_dtype(DType::F32)?
        } else {
            candle_nn::ops::sigmoid(&masks)?
        };
        if self.config.sigmoid_scale_for_mem_enc != 1.0 {
            mask_for_mem = (mask_for_mem * self.config.sigmoid_scale_for_mem_enc)?;
        }
        if self.config.sigmoid_bias_for_mem_enc != 0.0 {
            mask_for_mem = (mask_for_mem + self.config.sigmoid_bias_for_mem_enc)?;
        }
        let out = self.memory_encoder.forward(pix_feat, &mask_for_mem, true)?;
        let mut feats = out.vision_features;
        if let Some(no_obj) = &self.no_obj_embed_spatial {
            let absent = (1.0 - object_score_logits.gt(0f32)?.to_dtype(DType::F32)?)?.reshape((b, 1, 1, 1))?;
            let emb = no_obj.reshape((1, self.mem_dim, 1, 1))?;
            feats = feats.broadcast_add(&absent.broadcast_mul(&emb)?)?;
        }
        Ok((feats, out.vision_pos_enc))
    }

    /// `_use_mask_as_output`: a binary mask prompt taken as the frame's output (logits
    /// ±10), with an object pointer from the SAM heads on the downsampled mask.
    pub fn use_mask_as_output(
        &self,
        backbone_features: &Tensor,
        high_res_features: Option<(&Tensor, &Tensor)>,
        mask_inputs: &Tensor,
    ) -> Result<SamHeadsOutput> {
        let (out_scale, out_bias) = (20.0f64, -10.0f64);
        let m = mask_inputs.to_dtype(DType::F32)?;
        let (b, _, h, w) = m.dims4()?;
        let high_res_masks = ((&m * out_scale)? + out_bias)?;
        let low_res_masks =
            sgp_kernels::resize::bilinear_antialias(&high_res_masks, h / 4, w / 4).map_err(kernel_err)?;
        let ious = Tensor::ones((b, 1), DType::F32, m.device())?;
        let mut obj_ptr = if !self.config.use_obj_ptrs_in_encoder {
            Tensor::zeros((b, self.hidden_dim), DType::F32, m.device())?
        } else {
            let ds = self
                .mask_downsample
                .as_ref()
                .ok_or_else(|| Error::Config("use_obj_ptrs_in_encoder without mask_downsample".into()))?;
            let small = ds.forward(&m)?;
            self.sam_heads
                .forward(
                    backbone_features,
                    None,
                    Some(&small),
                    high_res_features,
                    self.sam_heads.multimask(false),
                )?
                .obj_ptr
        };
        let appearing = m.flatten_from(1)?.gt(0f32)?.max_keepdim(1)?.to_dtype(DType::F32)?; // [B, 1]
        let object_score_logits = ((&appearing * out_scale)? + out_bias)?;
        if self.config.pred_obj_scores {
            if self.config.fixed_no_obj_ptr {
                obj_ptr = obj_ptr.broadcast_mul(&appearing)?;
            }
            if let Some(no_obj_ptr) = &self.sam_heads.no_obj_ptr {
                obj_ptr = (obj_ptr + (1.0 - &appearing)?.broadcast_mul(no_obj_ptr)?)?;
            }
        }
        Ok(SamHeadsOutput {
            low_res_multimasks: low_res_masks.clone(),
            high_res_multimasks: high_res_masks.clone(),
            ious,
            low_res_masks,
            high_res_masks,
            obj_ptr,
            object_score_logits,
        })
    }

    /// `SAM2Base.track_step` (eval mode) with SAM2's own memory selection from `bank`.
    /// The caller stores the returned frame in `bank` (as a conditioning frame when it was
    /// prompted); [`Tracker`] does that bookkeeping.
    pub fn track_step(
        &self,
        req: &TrackRequest,
        feats: &PreparedFeatures,
        prompt: &FramePrompt,
        bank: &MemoryBank,
    ) -> Result<TrackStepOutput> {
        let selection = if req.init_cond || self.uses_mask_as_output(prompt) {
            None
        } else {
            Some(self.select_memories(req.frame_idx, bank, req.num_frames, req.reverse)?)
        };
        self.track_step_with_selection(req, feats, prompt, selection.as_ref())
    }

    /// Whether a prompt takes the mask-as-output path (no memory, no SAM decoding).
    pub fn uses_mask_as_output(&self, prompt: &FramePrompt) -> bool {
        prompt.mask.is_some() && self.config.use_mask_input_as_output_without_sam
    }

    /// `track_step` on an explicit memory selection (None: no memory, an initial
    /// conditioning frame). See [`Self::select_memories`] for SAM2's own selection.
    /// `req.frame_idx` and `req.reverse` only matter to the selection, which is given here.
    pub fn track_step_with_selection(
        &self,
        req: &TrackRequest,
        feats: &PreparedFeatures,
        prompt: &FramePrompt,
        selection: Option<&MemorySelection>,
    ) -> Result<TrackStepOutput> {
        let _span = tracing::debug_span!("track_step", frame = req.frame_idx).entered();
        let is_init_cond_frame = req.init_cond;
        let levels = feats.vision_feats.len();
        if levels == 0 || feats.vision_pos_embeds.len() != levels || feats.feat_sizes.len() != levels {
            return Err(Error::Input("prepared features are inconsistent".into()));
        }
        let high_res: Option<(Tensor, Tensor)> = if levels > 1 {
            if levels < 3 {
                return Err(Error::Input(format!("expected 1 or 3 feature levels, got {levels}")));
            }
            Some((
                seq_to_map(&feats.vision_feats[0], feats.feat_sizes[0])?,
                seq_to_map(&feats.vision_feats[1], feats.feat_sizes[1])?,
            ))
        } else {
            None
        };
        let high_res_ref = high_res.as_ref().map(|(a, b)| (a, b));
        let last = levels - 1;
        let (sam, pix_feat_with_mem, intermediates) =
            match (&prompt.mask, self.config.use_mask_input_as_output_without_sam) {
                (Some(mask), true) => {
                    // Features without no_mem_embed: the mask path bypasses the memory entirely.
                    let pix = seq_to_map(&feats.vision_feats[last], feats.feat_sizes[last])?;
                    (self.use_mask_as_output(&pix, high_res_ref, mask)?, None, None)
                }
                _ => {
                    if !is_init_cond_frame && selection.is_none() && self.config.num_maskmem > 0 {
                        return Err(Error::Input("a non-initial frame needs a memory selection".into()));
                    }
                    let pix = self.memory_conditioned_features(
                        feats,
                        if is_init_cond_frame { None } else { selection },
                        req.num_frames,
                    )?;
                    let num_pts = prompt
                        .points
                        .as_ref()
                        .map(|p| p.labels.dim(1))
                        .transpose()?
                        .unwrap_or(0);
                    let multimask = self
                        .sam_heads
                        .multimask(self.sam_heads.cfg.use_multimask(is_init_cond_frame, num_pts));
                    let (out, inter) = self.sam_heads.forward_with_intermediates(
                        &pix,
                        prompt.points.as_ref(),
                        prompt.mask.as_ref(),
                        high_res_ref,
                        multimask,
                    )?;
                    (out, Some(pix), Some(inter))
                }
            };
        let (maskmem_features, maskmem_pos_enc) = if req.encode_memory && self.config.num_maskmem > 0 {
            let pix = seq_to_map(&feats.vision_feats[last], feats.feat_sizes[last])?;
            let (f, p) = self.encode_new_memory(
                &pix,
                &sam.high_res_masks,
                &sam.object_score_logits,
                prompt.points.is_some(),
            )?;
            (Some(f), Some(p))
        } else {
            (None, None)
        };
        Ok(TrackStepOutput {
            frame: FrameOutput {
                maskmem_features,
                maskmem_pos_enc,
                pred_masks: sam.low_res_masks,
                obj_ptr: sam.obj_ptr,
                object_score_logits: sam.object_score_logits,
            },
            pred_masks_high_res: sam.high_res_masks,
            pix_feat_with_mem,
            high_res_features: high_res,
            intermediates,
        })
    }
}

/// The memory path of one object over one clip: a [`MemoryBank`] and the model that
/// fills and reads it.
///
/// Entries are indexed like video frames (their index sets the temporal distance SAM2's
/// selection and pointer encodings use), but they need not be frames: a support, an
/// image with its mask, is a conditioning entry at index k ([`Self::add_support`]), which
/// is what the SGP parity kinds pin down. Adding an entry at an index that is already
/// held replaces it, as re-prompting a frame does upstream.
///
/// ```no_run
/// # fn demo(model: &sgp_sam2::Sam2Model, support: &sgp_sam2::PreparedFeatures,
/// #         mask: &candle_core::Tensor, query: &sgp_sam2::PreparedFeatures) -> sgp_sam2::Result<()> {
/// use sgp_sam2::Tracker;
/// // One support at entry 0, the query is entry 1 of a 2-entry clip.
/// let mut tracker = Tracker::new(model, 2);
/// tracker.add_support(0, support, mask)?;
/// let out = tracker.query(1, query)?;          // support_pseudo_mask semantics
/// let pseudo_mask = &out.pred_masks_high_res;  // [1, 1, S, S] logits
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Tracker<'m> {
    model: &'m Sam2Model,
    bank: MemoryBank,
    num_frames: usize,
    reverse: bool,
}

impl<'m> Tracker<'m> {
    /// An empty memory for a clip of `num_frames` entries (supports and frames together).
    pub fn new(model: &'m Sam2Model, num_frames: usize) -> Self {
        Self::with_bank(model, num_frames, MemoryBank::new())
    }

    /// Continues from an existing bank (e.g. cached support memories).
    pub fn with_bank(model: &'m Sam2Model, num_frames: usize, bank: MemoryBank) -> Self {
        Self {
            model,
            bank,
            num_frames,
            reverse: false,
        }
    }

    /// Tracks toward lower indices from now on (`track_in_reverse`).
    pub fn set_reverse(&mut self, reverse: bool) {
        self.reverse = reverse;
    }

    /// The model.
    pub fn model(&self) -> &'m Sam2Model {
        self.model
    }

    /// The clip length.
    pub fn num_frames(&self) -> usize {
        self.num_frames
    }

    /// The memories held.
    pub fn bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// The memories, for policies that evict or insert entries themselves.
    pub fn bank_mut(&mut self) -> &mut MemoryBank {
        &mut self.bank
    }

    /// Gives the bank back.
    pub fn into_bank(self) -> MemoryBank {
        self.bank
    }

    fn check_index(&self, idx: usize) -> Result<()> {
        if idx >= self.num_frames {
            return Err(Error::Input(format!(
                "entry index {idx} out of range (the clip has {} entries)",
                self.num_frames
            )));
        }
        Ok(())
    }

    fn request(&self, idx: usize, init_cond: bool, encode_memory: bool) -> TrackRequest {
        TrackRequest {
            frame_idx: idx,
            num_frames: self.num_frames,
            init_cond,
            reverse: self.reverse,
            encode_memory,
        }
    }

    /// A support: the conditioning entry at `idx` prompted with its mask `[B, 1, S, S]`
    /// (0/1), i.e. `track_step(frame_idx=idx, is_init_cond_frame=True, mask_inputs=mask,
    /// run_mem_encoder=True)`, stored as a conditioning entry.
    pub fn add_support(&mut self, idx: usize, feats: &PreparedFeatures, mask: &Tensor) -> Result<TrackStepOutput> {
        self.add_conditioning(idx, feats, &FramePrompt::mask(mask.clone()))
    }

    /// A prompted initial conditioning frame at `idx` (points and/or a mask), decoded
    /// without memory, its memory encoded and stored as a conditioning entry.
    pub fn add_conditioning(
        &mut self,
        idx: usize,
        feats: &PreparedFeatures,
        prompt: &FramePrompt,
    ) -> Result<TrackStepOutput> {
        self.check_index(idx)?;
        if prompt.is_empty() {
            return Err(Error::Input(format!("conditioning entry {idx} has no prompt")));
        }
        let out = self
            .model
            .track_step(&self.request(idx, true, true), feats, prompt, &self.bank)?;
        self.bank.cond_frame_outputs.insert(idx, out.frame.clone());
        Ok(out)
    }

    /// Stores an already computed conditioning entry (e.g. a cached support memory).
    pub fn insert_conditioning(&mut self, idx: usize, frame: FrameOutput) -> Result<()> {
        self.check_index(idx)?;
        self.bank.cond_frame_outputs.insert(idx, frame);
        Ok(())
    }

    /// A tracked entry at `idx`: no prompt, SAM2's memory selection, memory encoded and
    /// stored as a non-conditioning entry (a propagated frame or slice).
    pub fn track(&mut self, idx: usize, feats: &PreparedFeatures) -> Result<TrackStepOutput> {
        self.check_index(idx)?;
        let out = self.model.track_step(
            &self.request(idx, false, true),
            feats,
            &FramePrompt::default(),
            &self.bank,
        )?;
        self.bank.non_cond_frame_outputs.insert(idx, out.frame.clone());
        Ok(out)
    }

    /// A query at `idx`: no prompt, SAM2's memory selection, no memory encoding, nothing
    /// stored (the `support_pseudo_mask` step; `pix_feat_with_mem` is set).
    pub fn query(&self, idx: usize, feats: &PreparedFeatures) -> Result<TrackStepOutput> {
        self.check_index(idx)?;
        self.model.track_step(
            &self.request(idx, false, false),
            feats,
            &FramePrompt::default(),
            &self.bank,
        )
    }

    /// SAM2's memory selection for entry `idx` from the bank.
    pub fn selection(&self, idx: usize) -> Result<MemorySelection<'_>> {
        self.model
            .select_memories(idx, &self.bank, self.num_frames, self.reverse)
    }
}

/// `_apply_non_overlapping_constraints`: where another object scores higher, clamp the
/// logits to at most -10.
pub fn apply_non_overlapping_constraints(pred_masks: &Tensor) -> Result<Tensor> {
    let b = pred_masks.dim(0)?;
    if b == 1 {
        return Ok(pred_masks.clone());
    }
    let max_idx = pred_masks.argmax_keepdim(0)?; // [1, 1, H, W] u32
    let ids = Tensor::arange(0u32, b as u32, pred_masks.device())?.reshape((b, 1, 1, 1))?;
    let keep = max_idx.broadcast_eq(&ids)?;
    let clamped = pred_masks.clamp(f32::MIN, -10f32)?;
    Ok(keep.where_cond(pred_masks, &clamped)?)
}

/// Mean-pooled image embedding `[B, C]` of `[B, C, H, W]` features: what similarity-based
/// memory policies compare.
pub fn pooled_embedding(pix_feat: &Tensor) -> Result<Tensor> {
    Ok(pix_feat.flatten_from(2)?.mean(D::Minus1)?)
}
