//! Prompted segmentation of a volume by propagating SAM2's memory through its slices,
//! the semantics of `SAM2VideoPredictor` (`add_new_points_or_box` / `add_new_mask`, then
//! `propagate_in_video`) for one object.
//!
//! * Slices are `[3, H, W]` RGB in [0, 1] (any H, W, the same for every slice). Each is
//!   resized to S×S with antialiased bilinear and normalised with the ImageNet statistics,
//!   like [`Sam2Model::encode_image`]. Prompts are in slice pixels.
//! * Prompted slices are conditioning frames: they are decoded without memory, and their
//!   memory is encoded from the (hole-filled) low-res mask upsampled to S, binarised when
//!   the config says so (`is_mask_from_pts` is true for every user prompt, as upstream).
//! * The other slices run [`Sam2Model::track_step_with_selection`] on the memories a
//!   [`MemoryBankPolicy`] chooses; [`Sam2Policy`] is SAM2's own choice.
//! * Output: per-slice mask logits at S/4 (`pred_masks` of the video predictor, holes up to
//!   `fill_hole_area` filled). [`upscale_logits`] brings them to the slice size with
//!   bilinear interpolation, as `_get_orig_video_res_output` does.
//! * Memory stays bounded: after each slice the policy evicts frames it will not use again,
//!   so the bank holds the prompted slices plus a window (≤ 2 × [`Sam2Model::memory_reach`]).
//!
//! One difference from upstream: the video predictor stores memories in bfloat16; we keep
//! f32.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::model::{PreparedFeatures, Sam2Model};
use crate::preprocess::kernel_err;
use crate::sam_heads::PointInputs;
use crate::track::{FrameOutput, FramePrompt, MemoryBank, MemorySelection, TrackRequest};
use crate::{Error, Result};

/// Which slices to propagate to from the prompted slice(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the first prompted slice to the last slice.
    Forward,
    /// From the last prompted slice down to slice 0.
    Backward,
    /// Forward from the first prompted slice, then backward from it (upstream's two
    /// `propagate_in_video` calls). Every slice gets a prediction.
    BothWays,
}

impl std::str::FromStr for Direction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "forward" | "fwd" => Ok(Self::Forward),
            "backward" | "bwd" | "reverse" => Ok(Self::Backward),
            "both" | "bothways" | "both-ways" | "both_ways" => Ok(Self::BothWays),
            other => Err(Error::Input(format!(
                "unknown direction {other:?} (forward, backward, both)"
            ))),
        }
    }
}

/// A prompt on one slice, in that slice's pixel coordinates.
#[derive(Debug, Clone)]
pub enum SlicePrompt {
    /// `[H, W]` mask; values ≥ 0.5 (after resizing to S×S) are the object.
    Mask(Tensor),
    /// `[x0, y0, x1, y1]`.
    Box([f32; 4]),
    /// `(x, y)` points with labels (1 positive, 0 negative).
    Points(Vec<[f32; 2]>, Vec<i32>),
}

/// The slices of a volume, produced on demand so the whole volume never has to exist as
/// model inputs at once.
pub trait SliceSource {
    /// Number of slices.
    fn num_slices(&self) -> usize;
    /// Slice `idx` as `[3, H, W]` RGB in [0, 1].
    fn slice(&self, idx: usize) -> Result<Tensor>;
}

impl SliceSource for [Tensor] {
    fn num_slices(&self) -> usize {
        self.len()
    }
    fn slice(&self, idx: usize) -> Result<Tensor> {
        self.get(idx)
            .cloned()
            .ok_or_else(|| Error::Input(format!("slice {idx} out of range")))
    }
}

impl SliceSource for Vec<Tensor> {
    fn num_slices(&self) -> usize {
        self.len()
    }
    fn slice(&self, idx: usize) -> Result<Tensor> {
        self.as_slice().slice(idx)
    }
}

/// A 3D volume seen as 2D slices along one axis, with intensities already mapped to
/// [0, 1]; grey slices are replicated to RGB.
///
/// Slice geometry: removing axis `axis` from `(d0, d1, d2)` leaves axes `a < b`; a slice
/// image has **columns along `a` and rows along `b`** (for axis 2: x → columns, y → rows),
/// so prompt coordinates `(x, y)` are voxel indices along `a` and `b`.
#[derive(Debug, Clone)]
pub struct VolumeSlices {
    /// Logical row-major (C-order) values of the `(d0, d1, d2)` grid.
    data: Vec<f32>,
    shape: [usize; 3],
    axis: usize,
}

impl VolumeSlices {
    /// A volume of `shape` (row-major `data`), sliced along `axis` (0, 1 or 2).
    pub fn new(data: Vec<f32>, shape: [usize; 3], axis: usize) -> Result<Self> {
        if axis > 2 {
            return Err(Error::Input(format!("slice axis must be 0, 1 or 2, got {axis}")));
        }
        if shape.iter().product::<usize>() != data.len() || shape.contains(&0) {
            return Err(Error::Input(format!(
                "volume shape {shape:?} does not match {} values",
                data.len()
            )));
        }
        Ok(Self { data, shape, axis })
    }

    /// `(rows, cols)` of a slice.
    pub fn slice_hw(&self) -> (usize, usize) {
        let (a, b) = other_axes(self.axis);
        (self.shape[b], self.shape[a])
    }

    /// Linear index of voxel (row, col) of slice `idx`.
    pub fn voxel_index(&self, idx: usize, row: usize, col: usize) -> usize {
        voxel_index(self.shape, self.axis, idx, row, col)
    }
}

fn other_axes(axis: usize) -> (usize, usize) {
    match axis {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    }
}

/// Row-major linear index of pixel (row, col) of slice `idx` along `axis` (see
/// [`VolumeSlices`] for the slice geometry).
pub fn voxel_index(shape: [usize; 3], axis: usize, idx: usize, row: usize, col: usize) -> usize {
    let (a, b) = other_axes(axis);
    let mut ijk = [0usize; 3];
    ijk[axis] = idx;
    ijk[a] = col;
    ijk[b] = row;
    (ijk[0] * shape[1] + ijk[1]) * shape[2] + ijk[2]
}

impl SliceSource for VolumeSlices {
    fn num_slices(&self) -> usize {
        self.shape[self.axis]
    }

    fn slice(&self, idx: usize) -> Result<Tensor> {
        if idx >= self.num_slices() {
            return Err(Error::Input(format!(
                "slice {idx} out of range ({} slices)",
                self.num_slices()
            )));
        }
        let (h, w) = self.slice_hw();
        let mut grey = Vec::with_capacity(h * w);
        for r in 0..h {
            for c in 0..w {
                grey.push(self.data[self.voxel_index(idx, r, c)]);
            }
        }
        let t = Tensor::from_vec(grey, (1, h, w), &candle_core::Device::Cpu)?;
        Ok(Tensor::cat(&[&t, &t, &t], 0)?)
    }
}

/// The prediction for one slice.
#[derive(Debug, Clone)]
pub struct SliceResult {
    /// Slice index in the volume.
    pub index: usize,
    /// `[S/4, S/4]` mask logits.
    pub low_res_logits: Tensor,
    /// The object score logit (> 0: object present).
    pub object_score: f32,
    /// Whether this slice was prompted.
    pub prompted: bool,
}

/// What a memory policy knows about the slice being processed.
#[derive(Debug, Clone)]
pub struct PolicyContext<'a> {
    /// Frame index of the slice being processed.
    pub frame_idx: usize,
    /// Frames in the sequence.
    pub num_frames: usize,
    /// Travelling toward lower slice indices.
    pub reverse: bool,
    /// `[C]` mean-pooled image embedding of the current slice (before memory).
    pub pooled: &'a Tensor,
}

/// Where the memory bank policy plugs in: which stored frames a slice attends to, and
/// which frames to forget. SAM2's own behaviour is [`Sam2Policy`]; FIFO and similarity
/// eviction (SGP) implement the same trait.
pub trait MemoryBankPolicy {
    /// The memories the current (non-prompted) slice attends to.
    fn select<'b>(
        &mut self,
        model: &Sam2Model,
        ctx: &PolicyContext,
        bank: &'b MemoryBank,
    ) -> Result<MemorySelection<'b>>;

    /// Called after a slice's output was stored in `bank` (with its pooled embedding and
    /// object score), so a policy can keep its own statistics.
    fn observe(&mut self, _frame_idx: usize, _pooled: &Tensor, _object_score: f32, _is_cond: bool) {}

    /// Drops stored frames the policy will not use again. `later_starts` lists the slices
    /// later passes start from, with their direction (`true` = reverse): frames those
    /// passes will read must stay.
    fn evict(&mut self, model: &Sam2Model, ctx: &PolicyContext, bank: &mut MemoryBank, later_starts: &[(usize, bool)]);
}

/// SAM2's own selection (`_prepare_memory_conditioned_features`) with the eviction that
/// keeps exactly what that selection can still reach.
#[derive(Debug, Clone, Default)]
pub struct Sam2Policy;

impl MemoryBankPolicy for Sam2Policy {
    fn select<'b>(
        &mut self,
        model: &Sam2Model,
        ctx: &PolicyContext,
        bank: &'b MemoryBank,
    ) -> Result<MemorySelection<'b>> {
        model.select_memories(ctx.frame_idx, bank, ctx.num_frames, ctx.reverse)
    }

    fn evict(&mut self, model: &Sam2Model, ctx: &PolicyContext, bank: &mut MemoryBank, later_starts: &[(usize, bool)]) {
        let reach = model.memory_reach(ctx.num_frames) as i64;
        let f = ctx.frame_idx as i64;
        let sign = if ctx.reverse { -1 } else { 1 };
        bank.non_cond_frame_outputs.retain(|&t, _| {
            let t = t as i64;
            // Distance behind the current slice in the direction of travel: later slices
            // of this pass only look at frames less than `reach` behind them.
            let behind = (f - t) * sign;
            if behind < reach {
                return true;
            }
            // A later pass starting at `s` reads frames within `reach` on its trailing side.
            later_starts.iter().any(|&(s, rev)| {
                let s = s as i64;
                let d = if rev { t - s } else { s - t };
                (0..=reach).contains(&d)
            })
        });
    }
}

/// Propagates prompts through the slices of a volume.
pub struct VolumePropagator<'m, P: MemoryBankPolicy> {
    model: &'m Sam2Model,
    policy: P,
    /// Peak number of frames held in the memory bank during the last run.
    pub peak_bank_len: usize,
}

impl<'m> VolumePropagator<'m, Sam2Policy> {
    /// With SAM2's own memory policy.
    pub fn new(model: &'m Sam2Model) -> Self {
        Self::with_policy(model, Sam2Policy)
    }
}

impl<'m, P: MemoryBankPolicy> VolumePropagator<'m, P> {
    /// A propagator that selects memories with `policy`.
    pub fn with_policy(model: &'m Sam2Model, policy: P) -> Self {
        Self {
            model,
            policy,
            peak_bank_len: 0,
        }
    }

    /// The memory-bank policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// Image features of one slice, through the model's [`crate::Preprocess`].
    pub fn slice_features(&self, slice: &Tensor) -> Result<PreparedFeatures> {
        let x = self.model.preprocess().image(slice, self.model.device())?;
        let bo = self.model.forward_image(&x)?;
        self.model.prepare_backbone_features(&bo)
    }

    /// Converts a slice prompt to the model's S×S frame ([`crate::Preprocess`]).
    pub fn frame_prompt(&self, prompt: &SlicePrompt, (h, w): (usize, usize)) -> Result<FramePrompt> {
        let pre = self.model.preprocess();
        let dev = self.model.device();
        let points = |pts: &[[f32; 2]], labels: &[f32]| -> Result<PointInputs> {
            let flat: Vec<f32> = pts.iter().flat_map(|&p| pre.point(p, (h, w))).collect();
            Ok(PointInputs {
                coords: Tensor::from_vec(flat, (1, pts.len(), 2), dev)?,
                labels: Tensor::from_vec(labels.to_vec(), (1, labels.len()), dev)?,
            })
        };
        Ok(match prompt {
            SlicePrompt::Box(b) => {
                if !(b[2] > b[0] && b[3] > b[1]) || b.iter().any(|v| !v.is_finite()) {
                    return Err(Error::Input(format!("box {b:?} must satisfy x0 < x1 and y0 < y1")));
                }
                FramePrompt {
                    points: Some(points(&[[b[0], b[1]], [b[2], b[3]]], &[2.0, 3.0])?),
                    mask: None,
                }
            }
            SlicePrompt::Points(p, l) => {
                if p.is_empty() || p.len() != l.len() {
                    return Err(Error::Input(format!("{} points with {} labels", p.len(), l.len())));
                }
                let labels: Vec<f32> = l.iter().map(|&v| v as f32).collect();
                FramePrompt {
                    points: Some(points(p, &labels)?),
                    mask: None,
                }
            }
            SlicePrompt::Mask(m) => {
                let (mh, mw) = m
                    .dims2()
                    .map_err(|_| Error::Input(format!("a mask prompt must be [H,W], got {:?}", m.dims())))?;
                if (mh, mw) != (h, w) {
                    return Err(Error::Input(format!("mask prompt is {mh}×{mw} but slices are {h}×{w}")));
                }
                FramePrompt::mask(pre.mask(m, dev)?)
            }
        })
    }

    /// Runs the propagation and hands every predicted slice to `sink` as soon as it is
    /// ready. Slices outside the propagation range (e.g. before the prompt when going
    /// forward) are not emitted.
    pub fn propagate<S: SliceSource + ?Sized>(
        &mut self,
        slices: &S,
        prompts: &[(usize, SlicePrompt)],
        direction: Direction,
        sink: &mut dyn FnMut(SliceResult) -> Result<()>,
    ) -> Result<()> {
        let n = slices.num_slices();
        if n == 0 {
            return Err(Error::Input("the volume has no slices".into()));
        }
        if prompts.is_empty() {
            return Err(Error::Input("at least one prompted slice is needed".into()));
        }
        let mut prompted: Vec<usize> = prompts.iter().map(|(i, _)| *i).collect();
        prompted.sort_unstable();
        if let Some(&bad) = prompted.iter().find(|&&i| i >= n) {
            return Err(Error::Input(format!(
                "prompted slice {bad} out of range (volume has {n} slices)"
            )));
        }
        if prompted.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::Input(
                "two prompts on the same slice; merge them into one".into(),
            ));
        }
        let first = prompted[0];
        let last = prompted[prompted.len() - 1];
        // Passes: (start, reverse).
        let passes: Vec<(usize, bool)> = match direction {
            Direction::Forward => vec![(first, false)],
            Direction::Backward => vec![(last, true)],
            Direction::BothWays => vec![(first, false), (first, true)],
        };
        self.peak_bank_len = 0;
        let mut bank = MemoryBank::new();
        let mut hw = None;

        // 1. Prompted slices: conditioning frames without memory.
        let mut prompted_results: HashMap<usize, SliceResult> = HashMap::new();
        for (idx, prompt) in prompts {
            let _span = tracing::info_span!("prompted_slice", idx).entered();
            let slice = slices.slice(*idx)?;
            let shape = slice_hw(&slice)?;
            check_same_size(&mut hw, shape)?;
            let feats = self.slice_features(&slice)?;
            let fp = self.frame_prompt(prompt, shape)?;
            // Memory is encoded below, from the hole-filled mask.
            let req = TrackRequest::initial(*idx, n).without_memory_encoding();
            let out = self.model.track_step_with_selection(&req, &feats, &fp, None)?;
            let mut frame = out.frame;
            frame.pred_masks = self.fill_holes(&frame.pred_masks)?;
            // Upstream encodes a prompted frame's memory from its (filled) low-res mask.
            let s = self.model.config.image_size;
            let hi = resize_bilinear(&frame.pred_masks, s, s)?;
            let last_level = feats.vision_feats.len() - 1;
            let pix = seq_to_map(&feats.vision_feats[last_level], feats.feat_sizes[last_level])?;
            let (mf, mp) = self
                .model
                .encode_new_memory(&pix, &hi, &frame.object_score_logits, true)?;
            frame.maskmem_features = Some(mf);
            frame.maskmem_pos_enc = Some(mp);
            let pooled = pooled_tokens(&feats)?;
            let score = scalar(&frame.object_score_logits)?;
            self.policy.observe(*idx, &pooled, score, true);
            prompted_results.insert(
                *idx,
                SliceResult {
                    index: *idx,
                    low_res_logits: frame.pred_masks.squeeze(0)?.squeeze(0)?,
                    object_score: score,
                    prompted: true,
                },
            );
            bank.cond_frame_outputs.insert(*idx, detached(frame));
        }

        // 2. The passes.
        let mut emitted = vec![false; n];
        for (pi, &(start, reverse)) in passes.iter().enumerate() {
            let later: Vec<(usize, bool)> = passes[pi + 1..].to_vec();
            let order: Box<dyn Iterator<Item = usize>> = if reverse {
                Box::new((0..=start).rev())
            } else {
                Box::new(start..n)
            };
            for idx in order {
                if let Some(r) = prompted_results.get(&idx) {
                    if !emitted[idx] {
                        emitted[idx] = true;
                        sink(r.clone())?;
                    }
                    continue;
                }
                let _span = tracing::info_span!("slice", idx, reverse).entered();
                let slice = slices.slice(idx)?;
                check_same_size(&mut hw, slice_hw(&slice)?)?;
                let feats = self.slice_features(&slice)?;
                let pooled = pooled_tokens(&feats)?;
                let ctx = PolicyContext {
                    frame_idx: idx,
                    num_frames: n,
                    reverse,
                    pooled: &pooled,
                };
                let out = {
                    let selection = self.policy.select(self.model, &ctx, &bank)?;
                    let req = TrackRequest {
                        reverse,
                        ..TrackRequest::tracked(idx, n)
                    };
                    self.model
                        .track_step_with_selection(&req, &feats, &FramePrompt::default(), Some(&selection))?
                };
                let mut frame = out.frame;
                frame.pred_masks = self.fill_holes(&frame.pred_masks)?;
                let score = scalar(&frame.object_score_logits)?;
                let result = SliceResult {
                    index: idx,
                    low_res_logits: frame.pred_masks.squeeze(0)?.squeeze(0)?,
                    object_score: score,
                    prompted: false,
                };
                bank.non_cond_frame_outputs.insert(idx, detached(frame));
                self.policy.observe(idx, &pooled, score, false);
                self.peak_bank_len = self.peak_bank_len.max(bank.len());
                self.policy.evict(self.model, &ctx, &mut bank, &later);
                if !emitted[idx] {
                    emitted[idx] = true;
                    sink(result)?;
                }
            }
        }
        Ok(())
    }

    /// Collects [`Self::propagate`]'s results: `[S/4, S/4]` logits per slice, None for
    /// slices outside the propagation range.
    pub fn propagate_collect<S: SliceSource + ?Sized>(
        &mut self,
        slices: &S,
        prompts: &[(usize, SlicePrompt)],
        direction: Direction,
    ) -> Result<Vec<Option<SliceResult>>> {
        let mut out: Vec<Option<SliceResult>> = vec![None; slices.num_slices()];
        self.propagate(slices, prompts, direction, &mut |r| {
            let i = r.index;
            out[i] = Some(r);
            Ok(())
        })?;
        Ok(out)
    }

    /// Segments a whole volume: propagates, brings each slice's logits to the slice size
    /// ([`upscale_logits`]) and thresholds them at 0. Returns a 0/1 mask over the volume
    /// grid in logical row-major order (slices without a prediction stay 0).
    /// `on_slice(done, total)` reports progress.
    pub fn segment_volume(
        &mut self,
        volume: &VolumeSlices,
        prompts: &[(usize, SlicePrompt)],
        direction: Direction,
        on_slice: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<u8>> {
        let (h, w) = volume.slice_hw();
        let total = match direction {
            Direction::BothWays => volume.num_slices(),
            Direction::Forward => {
                volume.num_slices() - prompts.iter().map(|p| p.0).min().unwrap_or(0).min(volume.num_slices())
            }
            Direction::Backward => prompts
                .iter()
                .map(|p| p.0)
                .max()
                .map(|m| m + 1)
                .unwrap_or(0)
                .min(volume.num_slices()),
        };
        let mut labels = vec![0u8; volume.data.len()];
        let mut done = 0;
        self.propagate(volume, prompts, direction, &mut |r| {
            let up = upscale_logits(&r.low_res_logits, h, w)?;
            let fg: Vec<u8> = up.gt(0f32)?.flatten_all()?.to_vec1()?;
            for row in 0..h {
                for col in 0..w {
                    labels[volume.voxel_index(r.index, row, col)] = fg[row * w + col];
                }
            }
            done += 1;
            on_slice(done, total);
            Ok(())
        })?;
        Ok(labels)
    }

    fn fill_holes(&self, pred_masks: &Tensor) -> Result<Tensor> {
        let area = self.model.config.fill_hole_area;
        if area == 0 {
            return Ok(pred_masks.clone());
        }
        fill_holes_in_mask_scores(pred_masks, area)
    }
}

/// Stored memories never carry an autograd graph: with tracked weights, each frame's graph
/// would otherwise reach back through every earlier frame and keep all of them alive.
fn detached(f: FrameOutput) -> FrameOutput {
    FrameOutput {
        maskmem_features: f.maskmem_features.map(|t| t.detach()),
        maskmem_pos_enc: f.maskmem_pos_enc.map(|t| t.detach()),
        pred_masks: f.pred_masks.detach(),
        obj_ptr: f.obj_ptr.detach(),
        object_score_logits: f.object_score_logits.detach(),
    }
}

fn slice_hw(slice: &Tensor) -> Result<(usize, usize)> {
    let d = slice.dims();
    if d.len() != 3 {
        return Err(Error::Input(format!("a slice must be [3,H,W], got {d:?}")));
    }
    Ok((d[1], d[2]))
}

fn check_same_size(hw: &mut Option<(usize, usize)>, shape: (usize, usize)) -> Result<()> {
    match hw {
        None => {
            *hw = Some(shape);
            Ok(())
        }
        Some(prev) if *prev == shape => Ok(()),
        Some(prev) => Err(Error::Input(format!("slices differ in size: {prev:?} and {shape:?}"))),
    }
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.flatten_all()?.get(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

fn seq_to_map(x: &Tensor, (h, w): (usize, usize)) -> Result<Tensor> {
    let (_, b, c) = x.dims3()?;
    Ok(crate::ops::contiguous(&x.permute((1, 2, 0))?)?.reshape((b, c, h, w))?)
}

/// `[C]` mean of the lowest-level image tokens (batch 1).
fn pooled_tokens(feats: &PreparedFeatures) -> Result<Tensor> {
    let last = feats.vision_feats.len() - 1;
    Ok(feats.vision_feats[last].mean(0)?.squeeze(0)?)
}

fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    sgp_kernels::resize::bilinear(x, h, w, false).map_err(kernel_err)
}

/// Mask logits `[S/4, S/4]` (or `[1,1,h,w]`) → `[H, W]` at the slice size, bilinear
/// (align_corners=False), as the video predictor's `_get_orig_video_res_output`
/// ([`crate::Preprocess::logits_to_original`]).
pub fn upscale_logits(logits: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let x = match logits.rank() {
        2 => logits.clone(),
        4 => logits.squeeze(0)?.squeeze(0)?,
        r => return Err(Error::Input(format!("logits must be [h,w] or [1,1,h,w], got rank {r}"))),
    };
    if x.rank() != 2 {
        return Err(Error::Input(format!(
            "logits must be [h,w] or [1,1,h,w], got {:?}",
            logits.dims()
        )));
    }
    crate::preprocess::logits_to_size(&x, (h, w))
}

/// `fill_holes_in_mask_scores`: background regions (score ≤ 0, 8-connected) of at most
/// `max_area` pixels become foreground with score 0.1. Input `[B, 1, H, W]`.
pub fn fill_holes_in_mask_scores(mask: &Tensor, max_area: usize) -> Result<Tensor> {
    let (b, c, h, w) = mask.dims4()?;
    let dev = mask.device().clone();
    let mut data: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let plane = h * w;
    let mut label = vec![0u32; plane];
    let mut stack = Vec::new();
    let mut members = Vec::new();
    for p in 0..b * c {
        let m = &mut data[p * plane..(p + 1) * plane];
        label.iter_mut().for_each(|l| *l = 0);
        let mut next = 1u32;
        for start in 0..plane {
            if label[start] != 0 || m[start] > 0.0 {
                continue;
            }
            members.clear();
            stack.push(start);
            label[start] = next;
            while let Some(i) = stack.pop() {
                members.push(i);
                let (y, x) = ((i / w) as i64, (i % w) as i64);
                for dy in -1..=1i64 {
                    for dx in -1..=1i64 {
                        let (ny, nx) = (y + dy, x + dx);
                        if (dy, dx) == (0, 0) || ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                            continue;
                        }
                        let j = ny as usize * w + nx as usize;
                        if label[j] == 0 && m[j] <= 0.0 {
                            label[j] = next;
                            stack.push(j);
                        }
                    }
                }
            }
            if members.len() <= max_area {
                for &i in &members {
                    m[i] = 0.1;
                }
            }
            next += 1;
        }
    }
    Ok(Tensor::from_vec(data, (b, c, h, w), &dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fill_holes_fills_only_small_background_regions() -> Result<()> {
        // 6×6 foreground with a 1-pixel hole and a 4-pixel hole; outside background is large.
        let mut v = vec![-1f32; 10 * 10];
        for y in 2..8 {
            for x in 2..8 {
                v[y * 10 + x] = 1.0;
            }
        }
        v[3 * 10 + 3] = -2.0;
        for (y, x) in [(5, 5), (5, 6), (6, 5), (6, 6)] {
            v[y * 10 + x] = -2.0;
        }
        let t = Tensor::from_vec(v, (1, 1, 10, 10), &Device::Cpu)?;
        let out: Vec<f32> = fill_holes_in_mask_scores(&t, 2)?.flatten_all()?.to_vec1()?;
        assert_eq!(out[3 * 10 + 3], 0.1, "1-pixel hole filled");
        assert_eq!(out[5 * 10 + 5], -2.0, "4-pixel hole kept at max_area 2");
        assert_eq!(out[0], -1.0, "outer background kept");
        let out: Vec<f32> = fill_holes_in_mask_scores(&t, 4)?.flatten_all()?.to_vec1()?;
        assert_eq!(out[6 * 10 + 6], 0.1);
        Ok(())
    }

    #[test]
    fn direction_parses() {
        assert_eq!("both".parse::<Direction>().unwrap(), Direction::BothWays);
        assert_eq!("Forward".parse::<Direction>().unwrap(), Direction::Forward);
        assert!("sideways".parse::<Direction>().is_err());
    }
}
