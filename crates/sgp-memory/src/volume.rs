//! Propagation through a volume from supports alone (3DM): no user prompt anywhere.
//!
//! [`SupportTracker`] is one pass: the supports are conditioning frames `0..K`, the
//! slices it is fed become frames `K, K+1, ...` in processing order, and each slice's
//! memory joins the bank as a non-conditioning frame, managed by a [`MemoryBankPolicy`].
//! Per slice a caller-supplied *refine* step turns the PMG output into the final logits,
//! and those logits feed the slice's memory (identity refine = the pseudo-mask = the
//! `support_track` parity kind with [`crate::Sam2Bank`]). That is how SGP's PMA/decoder
//! plugs in without this crate depending on it.
//!
//! [`SupportPropagator`] runs passes over a whole volume: forward, backward, or both ways
//! from the most confident slice (highest object score of the support-only pseudo-mask),
//! averaging the two passes' probabilities where both exist. Classes are batched: image
//! features are computed once per slice and repeated over the classes.
//!
//! Memory is bounded: stored memories are detached and the policy evicts what it will not
//! use again, so the bank's size does not grow with the number of slices
//! ([`BankStats`] measures it).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use sgp_sam2::{Direction, MemoryBankPolicy, PolicyContext};
use sgp_sam2::{FrameOutput, MemoryBank};
use sgp_sam2::{PreparedFeatures, Sam2Model};

use crate::bank::BankKind;
use crate::pmg::{conditioning_bank, Pmg, PmgOutput};
use crate::support::{image_features, pooled_of, repeat_features, top_level_map, SupportMemory};
use crate::{Error, Result};

/// Where a slice sits in a propagation, for the refine step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SliceContext {
    /// Slice index in the volume.
    pub index: usize,
    /// Pass number (0 or 1).
    pub pass: usize,
    /// Whether this pass travels toward lower slice indices.
    pub reverse: bool,
    /// Steps already taken in this pass (0 for its first slice).
    pub step: usize,
}

/// The refine step: PMG output → final high-res logits `[B, 1, S, S]`, which also feed
/// the slice's memory.
pub type Refine<'a> = dyn FnMut(&PmgOutput, &SliceContext) -> Result<Tensor> + 'a;

/// The identity refine step: the pseudo-mask itself.
pub fn identity_refine(pmg: &PmgOutput, _ctx: &SliceContext) -> Result<Tensor> {
    Ok(pmg.pred_masks_high_res.clone())
}

/// Size of the memory bank: what "peak memory flat in the number of slices" is measured
/// on (entries and tensor bytes, not time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BankStats {
    /// Most frames (supports + slices) held at once.
    pub peak_entries: usize,
    /// Most tensor bytes held at once.
    pub peak_bytes: usize,
}

impl BankStats {
    fn merge(&mut self, o: BankStats) {
        self.peak_entries = self.peak_entries.max(o.peak_entries);
        self.peak_bytes = self.peak_bytes.max(o.peak_bytes);
    }
}

/// One processed slice of a pass.
#[derive(Debug, Clone)]
pub struct TrackedSlice {
    /// PMG on the supports and the bank.
    pub pmg: PmgOutput,
    /// `[B, 1, S, S]` the refine step's logits.
    pub final_logits: Tensor,
    /// What was stored for this slice (memory from the final logits).
    pub frame: FrameOutput,
}

/// One pass of support-set tracking.
pub struct SupportTracker<'m> {
    model: &'m Sam2Model,
    policy: Box<dyn MemoryBankPolicy + 'm>,
    bank: MemoryBank,
    k: usize,
    batch: usize,
    num_frames: usize,
    step: usize,
    stats: BankStats,
}

impl<'m> SupportTracker<'m> {
    /// A pass with `supports[i]` the supports of batch item `i` (class), all of the same
    /// count K, over `num_slices` slices (SAM2's clip length is `K + num_slices`).
    pub fn new(
        model: &'m Sam2Model,
        supports: &[Vec<&SupportMemory>],
        policy: Box<dyn MemoryBankPolicy + 'm>,
        num_slices: usize,
    ) -> Result<Self> {
        let bank = conditioning_bank(supports)?;
        let k = bank.cond_frame_outputs.len();
        Ok(Self {
            model,
            policy,
            bank,
            k,
            batch: supports.len(),
            num_frames: k + num_slices,
            step: 0,
            stats: BankStats::default(),
        })
    }

    /// The bank as it stands.
    pub fn bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// Peak bank size so far.
    pub fn stats(&self) -> BankStats {
        self.stats
    }

    /// Processes the next slice from its batch-1 (or batch-B) features.
    pub fn step(&mut self, feats: &PreparedFeatures, ctx: SliceContext, refine: &mut Refine) -> Result<TrackedSlice> {
        let _span = tracing::debug_span!("support_track_step", slice = ctx.index, step = self.step).entered();
        let frame_idx = self.k + self.step;
        let raw1 = top_level_map(feats)?;
        let pooled = crate::support::pooled_of(&narrow_batch1(feats)?)?;
        let feats_b = repeat_features(feats, self.batch)?;
        let pctx = PolicyContext {
            frame_idx,
            num_frames: self.num_frames,
            reverse: false,
            pooled: &pooled,
        };
        let pmg = {
            let selection = self.policy.select(self.model, &pctx, &self.bank)?;
            Pmg::new(self.model).decode(&feats_b, &selection, self.num_frames)?
        };
        let final_logits = refine(&pmg, &SliceContext { step: self.step, ..ctx })?;
        if final_logits.dims() != pmg.pred_masks_high_res.dims() {
            return Err(Error::Input(format!(
                "the refine step returned {:?}, expected {:?}",
                final_logits.dims(),
                pmg.pred_masks_high_res.dims()
            )));
        }
        let raw = if raw1.dim(0)? == self.batch {
            raw1
        } else {
            Tensor::cat(&vec![raw1; self.batch], 0)?
        };
        let (mf, mp) = self
            .model
            .encode_new_memory(&raw, &final_logits, &pmg.object_score_logits, false)?;
        let frame = FrameOutput {
            maskmem_features: Some(mf),
            maskmem_pos_enc: Some(mp),
            pred_masks: pmg.pred_masks.clone(),
            obj_ptr: pmg.obj_ptr.clone(),
            object_score_logits: pmg.object_score_logits.clone(),
        };
        let score = max_value(&pmg.object_score_logits)?;
        self.bank.non_cond_frame_outputs.insert(frame_idx, detached(&frame));
        self.policy.observe(frame_idx, &pooled, score, false);
        self.stats.merge(BankStats {
            peak_entries: self.bank.len(),
            peak_bytes: bank_bytes(&self.bank),
        });
        self.policy.evict(self.model, &pctx, &mut self.bank, &[]);
        self.step += 1;
        Ok(TrackedSlice {
            pmg,
            final_logits,
            frame,
        })
    }
}

fn narrow_batch1(f: &PreparedFeatures) -> Result<PreparedFeatures> {
    crate::pmg::narrow_features(f, 0, 1)
}

/// Stored memories carry no autograd graph: each slice's graph would otherwise reach back
/// through every earlier slice and keep all of them alive.
fn detached(f: &FrameOutput) -> FrameOutput {
    FrameOutput {
        maskmem_features: f.maskmem_features.as_ref().map(|t| t.detach()),
        maskmem_pos_enc: f.maskmem_pos_enc.as_ref().map(|t| t.detach()),
        pred_masks: f.pred_masks.detach(),
        obj_ptr: f.obj_ptr.detach(),
        object_score_logits: f.object_score_logits.detach(),
    }
}

fn frame_bytes(f: &FrameOutput) -> usize {
    let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    f.maskmem_features.as_ref().map(b).unwrap_or(0)
        + f.maskmem_pos_enc.as_ref().map(b).unwrap_or(0)
        + b(&f.pred_masks)
        + b(&f.obj_ptr)
        + b(&f.object_score_logits)
}

/// Tensor bytes held by a bank.
pub fn bank_bytes(bank: &MemoryBank) -> usize {
    bank.cond_frame_outputs
        .values()
        .chain(bank.non_cond_frame_outputs.values())
        .map(frame_bytes)
        .sum()
}

fn max_value(t: &Tensor) -> Result<f32> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.into_iter().fold(f32::NEG_INFINITY, f32::max))
}

/// The slices of a volume as model inputs, produced on demand so the whole volume never
/// exists as model inputs at once.
pub trait QuerySlices {
    /// Number of slices.
    fn num_slices(&self) -> usize;
    /// Slice `idx` as a `[3, S, S]` model input (resized and normalised like the supports).
    fn slice(&self, idx: usize) -> Result<Tensor>;
}

impl QuerySlices for [Tensor] {
    fn num_slices(&self) -> usize {
        self.len()
    }
    fn slice(&self, idx: usize) -> Result<Tensor> {
        self.get(idx)
            .cloned()
            .ok_or_else(|| Error::Input(format!("slice {idx} out of range ({} slices)", self.len())))
    }
}

impl QuerySlices for Vec<Tensor> {
    fn num_slices(&self) -> usize {
        self.len()
    }
    fn slice(&self, idx: usize) -> Result<Tensor> {
        self.as_slice().slice(idx)
    }
}

/// Per-class supports of a propagation: class ids and, for each, its K memories (the same
/// K for every class, so classes batch), ordered least → most similar.
#[derive(Debug, Clone)]
pub struct ClassSupports {
    classes: Vec<u32>,
    memories: Vec<Vec<SupportMemory>>,
}

impl ClassSupports {
    /// From `class → memories`. Classes with more supports than the smallest class are
    /// cut to its count (the least similar go; a warning says so), so all classes batch.
    pub fn new(per_class: BTreeMap<u32, Vec<SupportMemory>>) -> Result<Self> {
        if per_class.is_empty() {
            return Err(Error::Input("no class to segment".into()));
        }
        let k = per_class.values().map(Vec::len).min().unwrap_or(0);
        if k == 0 {
            let empty: Vec<u32> = per_class
                .iter()
                .filter(|(_, v)| v.is_empty())
                .map(|(c, _)| *c)
                .collect();
            return Err(Error::Input(format!("classes {empty:?} have no support")));
        }
        let mut classes = Vec::new();
        let mut memories = Vec::new();
        for (c, mut v) in per_class {
            if v.len() > k {
                tracing::warn!(
                    class = c,
                    have = v.len(),
                    keep = k,
                    "classes have different support counts; keeping the {k} most similar of each so they batch"
                );
                v.drain(..v.len() - k);
            }
            classes.push(c);
            memories.push(v);
        }
        Ok(Self { classes, memories })
    }

    /// The class ids, in batch order.
    pub fn classes(&self) -> &[u32] {
        &self.classes
    }

    /// The support count K.
    pub fn k(&self) -> usize {
        self.memories.first().map(Vec::len).unwrap_or(0)
    }

    /// Per batch item (class), references to its memories.
    pub fn per_item(&self) -> Vec<Vec<&SupportMemory>> {
        self.memories.iter().map(|v| v.iter().collect()).collect()
    }
}

/// How to propagate.
#[derive(Debug, Clone, Copy)]
pub struct PropagationOptions {
    /// The bank policy.
    pub bank: BankKind,
    /// Slice memories kept by FIFO / similarity banks; None: K.
    pub bank_size: Option<usize>,
    /// Which way(s) through the volume.
    pub direction: Direction,
}

impl Default for PropagationOptions {
    fn default() -> Self {
        Self {
            bank: BankKind::Similarity,
            bank_size: None,
            direction: Direction::BothWays,
        }
    }
}

/// The prediction for one slice of a volume.
#[derive(Debug, Clone)]
pub struct SlicePrediction {
    /// Slice index.
    pub index: usize,
    /// `[B, 1, S, S]` per-class probabilities (sigmoid of the final logits; the mean of
    /// both passes where two ran).
    pub probabilities: Tensor,
    /// Per-class object score logits (the mean of the passes that ran).
    pub object_scores: Vec<f32>,
    /// How many passes produced it.
    pub passes: usize,
}

/// Segments volumes from supports alone.
pub struct SupportPropagator<'m> {
    model: &'m Sam2Model,
    options: PropagationOptions,
    stats: BankStats,
    encoder_calls: usize,
}

impl<'m> SupportPropagator<'m> {
    /// A propagator on `model`.
    pub fn new(model: &'m Sam2Model, options: PropagationOptions) -> Self {
        Self {
            model,
            options,
            stats: BankStats::default(),
            encoder_calls: 0,
        }
    }

    /// Peak bank size over the last run (all passes).
    pub fn stats(&self) -> BankStats {
        self.stats
    }

    /// Image-encoder calls of the last run (one per slice and pass, plus one per slice for
    /// the both-ways confidence scan).
    pub fn encoder_calls(&self) -> usize {
        self.encoder_calls
    }

    fn features(&mut self, slices: &dyn QuerySlices, idx: usize) -> Result<PreparedFeatures> {
        let s = self.model.config().image_size;
        let x = slices.slice(idx)?;
        if x.dims() != [3, s, s] {
            return Err(Error::Input(format!(
                "slice {idx} must be a [3,{s},{s}] model input, got {:?}",
                x.dims()
            )));
        }
        self.encoder_calls += 1;
        let x = x.to_device(self.model.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
        image_features(self.model, &x)
    }

    /// The slice whose support-only pseudo-mask is most confident (highest object score,
    /// the maximum over classes; ties: the lower index).
    pub fn most_confident_slice(&mut self, slices: &dyn QuerySlices, supports: &ClassSupports) -> Result<usize> {
        let _span = tracing::info_span!("confidence_scan").entered();
        let per_item = supports.per_item();
        let pmg = Pmg::new(self.model);
        let mut best = (f32::NEG_INFINITY, 0usize);
        for idx in 0..slices.num_slices() {
            let feats = repeat_features(&self.features(slices, idx)?, per_item.len())?;
            let out = pmg.pseudo_mask_per_item(&feats, &per_item)?;
            let score = max_value(&out.object_score_logits)?;
            if score > best.0 {
                best = (score, idx);
            }
        }
        Ok(best.1)
    }

    /// Propagates through `slices`, calling `refine` on each slice's PMG output and
    /// handing each slice's prediction to `sink` as soon as it is final. Every slice is
    /// emitted exactly once. `on_slice(done, total)` reports progress over slice steps.
    pub fn run(
        &mut self,
        slices: &dyn QuerySlices,
        supports: &ClassSupports,
        refine: &mut Refine,
        sink: &mut dyn FnMut(SlicePrediction) -> Result<()>,
        on_slice: &mut dyn FnMut(usize, usize),
    ) -> Result<()> {
        let n = slices.num_slices();
        if n == 0 {
            return Err(Error::Input("the volume has no slices".into()));
        }
        self.stats = BankStats::default();
        self.encoder_calls = 0;
        let capacity = self.options.bank_size.unwrap_or(supports.k()).max(1);
        let passes: Vec<(usize, bool)> = match self.options.direction {
            Direction::Forward => vec![(0, false)],
            Direction::Backward => vec![(n - 1, true)],
            Direction::BothWays => {
                let start = if n == 1 {
                    0
                } else {
                    self.most_confident_slice(slices, supports)?
                };
                vec![(start, false), (start, true)]
            }
        };
        let total: usize = passes.iter().map(|&(s, rev)| if rev { s + 1 } else { n - s }).sum();
        let mut done = 0;
        // Slices two passes produce: the first pass's prediction waits for the second's.
        let overlap: Vec<usize> = if passes.len() == 2 {
            vec![passes[0].0]
        } else {
            Vec::new()
        };
        let mut held: BTreeMap<usize, SlicePrediction> = BTreeMap::new();
        let per_item = supports.per_item();
        for (pass, &(start, reverse)) in passes.iter().enumerate() {
            let order: Vec<usize> = if reverse {
                (0..=start).rev().collect()
            } else {
                (start..n).collect()
            };
            let policy = self.options.bank.policy(capacity)?;
            let mut tracker = SupportTracker::new(self.model, &per_item, policy, order.len())?;
            for (step, &idx) in order.iter().enumerate() {
                let _span = tracing::info_span!("slice", idx, pass).entered();
                let feats = self.features(slices, idx)?;
                let ctx = SliceContext {
                    index: idx,
                    pass,
                    reverse,
                    step,
                };
                let out = tracker.step(&feats, ctx, refine)?;
                let probabilities = candle_core::Tensor::detach(&sigmoid(&out.final_logits)?);
                let object_scores: Vec<f32> = out
                    .pmg
                    .object_score_logits
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let pred = SlicePrediction {
                    index: idx,
                    probabilities,
                    object_scores,
                    passes: 1,
                };
                done += 1;
                on_slice(done, total);
                if overlap.contains(&idx) {
                    match held.remove(&idx) {
                        None => {
                            held.insert(idx, pred);
                        }
                        Some(first) => sink(average(first, pred)?)?,
                    }
                } else {
                    sink(pred)?;
                }
            }
            self.stats.merge(tracker.stats());
        }
        // A held slice whose second pass never came (cannot happen with two passes from
        // the same start, but never drop a prediction).
        for (_, p) in held {
            sink(p)?;
        }
        Ok(())
    }

    /// [`Self::run`] collecting every slice's prediction, in slice order.
    pub fn run_collect(
        &mut self,
        slices: &dyn QuerySlices,
        supports: &ClassSupports,
        refine: &mut Refine,
    ) -> Result<Vec<SlicePrediction>> {
        let mut out: Vec<Option<SlicePrediction>> = vec![None; slices.num_slices()];
        self.run(
            slices,
            supports,
            refine,
            &mut |p| {
                let i = p.index;
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(p);
                }
                Ok(())
            },
            &mut |_, _| {},
        )?;
        out.into_iter()
            .enumerate()
            .map(|(i, p)| p.ok_or_else(|| Error::Input(format!("slice {i} got no prediction"))))
            .collect()
    }
}

fn sigmoid(t: &Tensor) -> Result<Tensor> {
    // 1 / (1 + e^-x), composed from basic ops (exact enough; no custom kernel needed).
    Ok((t.neg()?.exp()? + 1.0)?.recip()?)
}

fn average(a: SlicePrediction, b: SlicePrediction) -> Result<SlicePrediction> {
    let probabilities = ((&a.probabilities + &b.probabilities)? * 0.5)?;
    let object_scores = a
        .object_scores
        .iter()
        .zip(&b.object_scores)
        .map(|(x, y)| 0.5 * (x + y))
        .collect();
    Ok(SlicePrediction {
        index: a.index,
        probabilities,
        object_scores,
        passes: a.passes + b.passes,
    })
}

/// Pooled embedding of one model-input slice (for choosing a volume's supports).
pub fn slice_embedding(model: &Sam2Model, slice: &Tensor) -> Result<Tensor> {
    let x = slice.to_device(model.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
    pooled_of(&image_features(model, &x)?)
}
