//! Memory-bank policies for support-set propagation through a volume (3DM), behind
//! sgp-sam2's [`MemoryBankPolicy`] trait.
//!
//! The bank holds the K support memories as conditioning frames `0..K` and the memories
//! of already processed slices as non-conditioning frames `K, K+1, ...` (in processing
//! order, whatever the direction through the volume). A policy decides which of them a
//! slice attends to and which to forget:
//!
//! * [`Sam2Bank`]: SAM2's own selection and the eviction that keeps exactly what it can
//!   still reach (the `support_track` parity kind).
//! * [`FifoBank`]: the last `capacity` slices.
//! * [`SimilarityBank`] (default): when the bank overflows, the entry whose pooled image
//!   embedding is least cosine-similar to the current slice goes (ties: the oldest).
//!
//! FIFO and similarity banks attend to every support and every slice they hold. A slice
//! `d` frames back takes SAM2's temporal encoding slot `num_maskmem − d` (slot 1 for
//! anything older than SAM2's window), and its object pointer joins when it lies within
//! SAM2's pointer window; the supports' pointers always join, as SAM2's conditioning
//! frames do.

use std::collections::BTreeMap;

use candle_core::Tensor;
use sgp_sam2::Sam2Model;
use sgp_sam2::{select_closest_cond_frames, FrameOutput, MemoryBank, MemorySelection};
use sgp_sam2::{MemoryBankPolicy, PolicyContext, Sam2Policy};

use crate::select::cosine;
use crate::{Error, Result};

/// Which bank policy a propagation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BankKind {
    /// SAM2's own memory selection.
    Sam2,
    /// First in, first out.
    Fifo,
    /// Similarity eviction (default).
    #[default]
    Similarity,
}

impl std::str::FromStr for BankKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sam2" => Ok(Self::Sam2),
            "fifo" => Ok(Self::Fifo),
            "similarity" | "sim" => Ok(Self::Similarity),
            other => Err(Error::Input(format!("unknown bank {other:?} (similarity, fifo, sam2)"))),
        }
    }
}

impl BankKind {
    /// A fresh policy of this kind; `capacity` is the number of slice memories kept by
    /// FIFO and similarity banks (SAM2's bank is bounded by its own window).
    pub fn policy(self, capacity: usize) -> Result<Box<dyn MemoryBankPolicy>> {
        Ok(match self {
            Self::Sam2 => Box::new(Sam2Bank::default()),
            Self::Fifo => Box::new(FifoBank::new(capacity)?),
            Self::Similarity => Box::new(SimilarityBank::new(capacity)?),
        })
    }
}

/// SAM2's own selection (`_prepare_memory_conditioned_features`).
#[derive(Debug, Clone, Default)]
pub struct Sam2Bank(Sam2Policy);

impl MemoryBankPolicy for Sam2Bank {
    fn select<'b>(
        &mut self,
        model: &Sam2Model,
        ctx: &PolicyContext,
        bank: &'b MemoryBank,
    ) -> sgp_sam2::Result<MemorySelection<'b>> {
        self.0.select(model, ctx, bank)
    }

    fn evict(&mut self, model: &Sam2Model, ctx: &PolicyContext, bank: &mut MemoryBank, later_starts: &[(usize, bool)]) {
        self.0.evict(model, ctx, bank, later_starts)
    }
}

/// The selection shared by FIFO and similarity banks: the supports (SAM2's closest
/// conditioning frames) plus every slice memory held.
fn select_all<'b>(
    model: &Sam2Model,
    ctx: &PolicyContext,
    bank: &'b MemoryBank,
) -> sgp_sam2::Result<MemorySelection<'b>> {
    let cfg = model.config();
    let f = ctx.frame_idx as i64;
    let cond: Vec<usize> = bank.cond_frame_outputs.keys().copied().collect();
    if cond.is_empty() {
        return Err(sgp_sam2::Error::Input("the memory bank holds no support".into()));
    }
    let (selected, _) = select_closest_cond_frames(ctx.frame_idx, &cond, cfg.max_cond_frames_in_attn);
    let n = cfg.num_maskmem as i64;
    let mut spatial: Vec<(usize, &FrameOutput)> = selected
        .iter()
        .filter_map(|t| bank.cond_frame_outputs.get(t))
        .map(|o| (0, o))
        .collect();
    let distance = |t: usize| -> i64 { (f - t as i64).abs().max(1) };
    if n > 1 {
        // Oldest first, as SAM2 orders its previous-frame slots.
        for (&t, o) in &bank.non_cond_frame_outputs {
            if t == ctx.frame_idx {
                continue;
            }
            let t_pos = (n - distance(t)).clamp(1, n - 1) as usize;
            spatial.push((t_pos, o));
        }
    }
    let mut pointers = Vec::new();
    if cfg.use_obj_ptrs_in_encoder {
        let max_ptrs = ctx.num_frames.min(cfg.max_obj_ptrs_in_encoder) as i64;
        for &t in &selected {
            let past = t <= ctx.frame_idx;
            if cfg.only_obj_ptrs_in_the_past_for_eval && !past {
                continue;
            }
            if let Some(o) = bank.cond_frame_outputs.get(&t) {
                let d = if cfg.use_signed_tpos_enc_to_obj_ptrs {
                    f - t as i64
                } else {
                    (f - t as i64).abs()
                };
                pointers.push((d, o));
            }
        }
        // Nearest first, within SAM2's pointer window.
        for (&t, o) in bank.non_cond_frame_outputs.iter().rev() {
            let d = distance(t);
            if t != ctx.frame_idx && d < max_ptrs {
                pointers.push((d, o));
            }
        }
    }
    Ok(MemorySelection { spatial, pointers })
}

fn check_capacity(capacity: usize) -> Result<usize> {
    if capacity == 0 {
        return Err(Error::Input("a memory bank needs room for at least one slice".into()));
    }
    Ok(capacity)
}

/// Keeps the `capacity` most recent slice memories.
#[derive(Debug, Clone)]
pub struct FifoBank {
    capacity: usize,
}

impl FifoBank {
    /// A FIFO bank of `capacity ≥ 1` slices.
    pub fn new(capacity: usize) -> Result<Self> {
        Ok(Self {
            capacity: check_capacity(capacity)?,
        })
    }

    /// The frame index to evict from `frames` (oldest first), if the bank overflows.
    pub fn victim(&self, frames: &[usize]) -> Option<usize> {
        (frames.len() > self.capacity)
            .then(|| frames.iter().copied().min())
            .flatten()
    }
}

impl MemoryBankPolicy for FifoBank {
    fn select<'b>(
        &mut self,
        model: &Sam2Model,
        ctx: &PolicyContext,
        bank: &'b MemoryBank,
    ) -> sgp_sam2::Result<MemorySelection<'b>> {
        select_all(model, ctx, bank)
    }

    fn evict(&mut self, _model: &Sam2Model, _ctx: &PolicyContext, bank: &mut MemoryBank, _later: &[(usize, bool)]) {
        loop {
            let frames: Vec<usize> = bank.non_cond_frame_outputs.keys().copied().collect();
            match self.victim(&frames) {
                Some(t) => {
                    bank.non_cond_frame_outputs.remove(&t);
                }
                None => break,
            }
        }
    }
}

/// Keeps `capacity` slice memories; on overflow it forgets the one least similar to the
/// current slice (cosine of pooled image embeddings; ties: the oldest).
#[derive(Debug, Clone)]
pub struct SimilarityBank {
    capacity: usize,
    pooled: BTreeMap<usize, Vec<f32>>,
}

impl SimilarityBank {
    /// A similarity bank of `capacity ≥ 1` slices.
    pub fn new(capacity: usize) -> Result<Self> {
        Ok(Self {
            capacity: check_capacity(capacity)?,
            pooled: BTreeMap::new(),
        })
    }

    /// Records the pooled embedding of a frame (what [`MemoryBankPolicy::observe`] does).
    pub fn remember(&mut self, frame_idx: usize, pooled: Vec<f32>) {
        self.pooled.insert(frame_idx, pooled);
    }

    /// The frame to evict from `frames` when the bank overflows, given the current slice
    /// (never evicted) and its pooled embedding. A frame whose embedding is unknown counts
    /// as least similar.
    pub fn victim(&self, frames: &[usize], current: usize, current_pooled: &[f32]) -> Option<usize> {
        if frames.len() <= self.capacity {
            return None;
        }
        let mut best: Option<(f64, usize)> = None;
        for &t in frames {
            if t == current {
                continue;
            }
            let sim = match self.pooled.get(&t) {
                Some(p) if p.len() == current_pooled.len() => cosine(p, current_pooled),
                _ => f64::NEG_INFINITY,
            };
            // Least similar; among equals the oldest (smallest frame index).
            let better = match best {
                None => true,
                Some((bs, bt)) => sim < bs || (sim == bs && t < bt),
            };
            if better {
                best = Some((sim, t));
            }
        }
        best.map(|(_, t)| t)
    }
}

impl MemoryBankPolicy for SimilarityBank {
    fn select<'b>(
        &mut self,
        model: &Sam2Model,
        ctx: &PolicyContext,
        bank: &'b MemoryBank,
    ) -> sgp_sam2::Result<MemorySelection<'b>> {
        select_all(model, ctx, bank)
    }

    fn observe(&mut self, frame_idx: usize, pooled: &Tensor, _object_score: f32, is_cond: bool) {
        if is_cond {
            return;
        }
        // An embedding that cannot be read is left out: the frame then counts as least
        // similar and goes first, which is safe.
        if let Ok(v) = pooled.flatten_all().and_then(|t| t.to_vec1::<f32>()) {
            self.remember(frame_idx, v);
        }
    }

    fn evict(&mut self, _model: &Sam2Model, ctx: &PolicyContext, bank: &mut MemoryBank, _later: &[(usize, bool)]) {
        let current: Vec<f32> = ctx
            .pooled
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap_or_default();
        loop {
            let frames: Vec<usize> = bank.non_cond_frame_outputs.keys().copied().collect();
            match self.victim(&frames, ctx.frame_idx, &current) {
                Some(t) => {
                    bank.non_cond_frame_outputs.remove(&t);
                    self.pooled.remove(&t);
                }
                None => break,
            }
        }
    }
}
