//! Multi-class output: one run for all classes, one label map.
//!
//! Each class has its own supports; a query's image features are computed once and the
//! classes go through PMG as one batch. The label map is the argmax over the class
//! probabilities, and background (0) wherever every class is below 0.5.

use candle_core::{DType, Tensor};
use sgp_sam2::Sam2Model;

use crate::pmg::{Pmg, PmgOutput};
use crate::support::{image_features, repeat_features};
use crate::volume::ClassSupports;
use crate::{Error, Result};

/// Probability a class needs somewhere to be labelled there.
pub const FOREGROUND_THRESHOLD: f32 = 0.5;

/// The label map of per-class probabilities `[N, 1, H, W]` or `[N, H, W]`: `classes[i]`
/// where class i has the highest probability (ties: the earlier class) and it is at least
/// 0.5, else 0. Returns `H·W` labels in row-major order.
pub fn label_map(probabilities: &Tensor, classes: &[u32]) -> Result<Vec<u32>> {
    let dims = probabilities.dims().to_vec();
    let (n, hw) = match dims.as_slice() {
        [n, 1, h, w] | [n, h, w] => (*n, h * w),
        other => {
            return Err(Error::Input(format!(
                "probabilities must be [N,1,H,W] or [N,H,W], got {other:?}"
            )))
        }
    };
    if n != classes.len() {
        return Err(Error::Input(format!(
            "{n} probability maps for {} classes",
            classes.len()
        )));
    }
    if classes.contains(&0) {
        return Err(Error::Input("class id 0 is the background".into()));
    }
    let p: Vec<f32> = probabilities.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = vec![0u32; hw];
    for (px, o) in out.iter_mut().enumerate() {
        let mut best = (f32::NEG_INFINITY, 0usize);
        for c in 0..n {
            let v = p[c * hw + px];
            if v > best.0 {
                best = (v, c);
            }
        }
        if best.0 >= FOREGROUND_THRESHOLD {
            *o = classes[best.1];
        }
    }
    Ok(out)
}

/// The result of segmenting one 2D query for several classes.
#[derive(Debug, Clone)]
pub struct MultiClassPrediction {
    /// The classes, in batch order.
    pub classes: Vec<u32>,
    /// PMG for every class (batch = classes).
    pub pmg: PmgOutput,
    /// `[N, 1, S, S]` per-class probabilities of the final logits.
    pub probabilities: Tensor,
    /// `S·S` labels (see [`label_map`]).
    pub labels: Vec<u32>,
}

/// Segments one `[3, S, S]` model-input query for every class of `supports`: features
/// once, classes batched through PMG, then `refine` (PMG output → final logits
/// `[N, 1, S, S]`; pass the identity for the pseudo-mask).
pub fn segment_query(
    model: &Sam2Model,
    query: &Tensor,
    supports: &ClassSupports,
    refine: &mut dyn FnMut(&PmgOutput) -> Result<Tensor>,
) -> Result<MultiClassPrediction> {
    let _span = tracing::debug_span!("segment_query", classes = supports.classes().len()).entered();
    let s = model.config().image_size;
    if query.dims() != [3, s, s] {
        return Err(Error::Input(format!(
            "the query must be a [3,{s},{s}] model input, got {:?}",
            query.dims()
        )));
    }
    let x = query.to_device(model.device())?.to_dtype(DType::F32)?.unsqueeze(0)?;
    let per_item = supports.per_item();
    let feats = repeat_features(&image_features(model, &x)?, per_item.len())?;
    let pmg = Pmg::new(model).pseudo_mask_per_item(&feats, &per_item)?;
    let logits = refine(&pmg)?;
    if logits.dims() != pmg.pred_masks_high_res.dims() {
        return Err(Error::Input(format!(
            "the refine step returned {:?}, expected {:?}",
            logits.dims(),
            pmg.pred_masks_high_res.dims()
        )));
    }
    let probabilities = (logits.neg()?.exp()? + 1.0)?.recip()?;
    let labels = label_map(&probabilities, supports.classes())?;
    Ok(MultiClassPrediction {
        classes: supports.classes().to_vec(),
        pmg,
        probabilities,
        labels,
    })
}
