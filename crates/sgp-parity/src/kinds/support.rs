//! The SGP support kinds (`docs/parity-format.md`), computed through
//! sgp-memory's public API, so the parity cases check the code users run:
//! - `support_pseudo_mask`: [`sgp_memory::Pmg`] on mask-prompted supports (frames 0..K),
//!   all queries as one batch;
//! - `support_track`: [`sgp_memory::SupportTracker`] with SAM2's own bank and the
//!   identity refine step over the query slices.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use sgp_memory::support::image_features;
use sgp_memory::{
    encode_support, identity_refine, BankKind, EncodedSupport, Pmg, SliceContext, SupportItem, SupportMemory,
    SupportTracker,
};
use sgp_sam2::Sam2Model;

use super::{named, KindSpec, Registry};
use crate::{Case, Error, Result};

/// Adds the support kinds.
pub(super) fn register(r: &mut Registry) {
    r.add(KindSpec {
        name: "support_pseudo_mask",
        compute: support_pseudo_mask,
        item_dims: &[],
    });
    r.add(KindSpec {
        name: "support_track",
        compute: support_track,
        item_dims: &[],
    });
}

/// Encodes `in.support_images` [K,3,S,S] with `in.support_masks` [K,1,S,S] (class 1).
pub(super) fn encode_supports(case: &Case, model: &Sam2Model) -> Result<Vec<EncodedSupport>> {
    let images = case.input("support_images")?;
    let masks = case.input("support_masks")?;
    let k = images.dim(0)?;
    if masks.dims().len() != 4 || masks.dim(0)? != k || masks.dim(1)? != 1 {
        return Err(case.error(format!("support_masks must be [{k},1,S,S], got {:?}", masks.dims())));
    }
    (0..k)
        .map(|i| -> Result<EncodedSupport> {
            let item = SupportItem {
                image: images.get(i)?,
                masks: BTreeMap::from([(1u32, masks.get(i)?.get(0)?)]),
                case_id: format!("support{i}"),
            };
            encode_support(model, &item).map_err(Error::other)
        })
        .collect()
}

pub(super) fn memories(enc: &[EncodedSupport]) -> Result<Vec<&SupportMemory>> {
    enc.iter()
        .map(|e| {
            e.memory(1)
                .ok_or_else(|| Error::Output("a support lost its class".into()))
        })
        .collect()
}

/// PMG for every query at frame K of a K+1-frame clip.
fn support_pseudo_mask(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let enc = encode_supports(case, &model)?;
    let feats = image_features(&model, case.input("query")?).map_err(Error::other)?;
    let out = Pmg::new(&model)
        .pseudo_mask(&feats, &memories(&enc)?)
        .map_err(Error::other)?;
    Ok(named([
        ("pix_feat_with_mem", out.pix_feat_with_mem),
        ("pred_masks", out.pred_masks),
        ("pred_masks_high_res", out.pred_masks_high_res),
        ("object_score_logits", out.object_score_logits),
        ("obj_ptr", out.obj_ptr),
    ]))
}

/// Supports at frames 0..K, then the slices at K+t, SAM2's bank (`"bank"` may name
/// another policy, `"bank_size"` its size; only `sam2` has a reference).
fn support_track(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let bank: BankKind = case
        .str_option("bank")?
        .unwrap_or("sam2")
        .parse()
        .map_err(|e: sgp_memory::Error| case.error(e.to_string()))?;
    let enc = encode_supports(case, &model)?;
    let mems = vec![memories(&enc)?];
    let frames = case.input("frames")?;
    let t = frames.dim(0)?;
    let size = case.usize_option("bank_size")?.unwrap_or(enc.len());
    let policy = bank.policy(size).map_err(Error::other)?;
    let mut tracker = SupportTracker::new(&model, &mems, policy, t).map_err(Error::other)?;
    let mut refine = identity_refine;
    let mut cols: [Vec<Tensor>; 4] = Default::default();
    for i in 0..t {
        let feats = image_features(&model, &frames.narrow(0, i, 1)?).map_err(Error::other)?;
        let ctx = SliceContext {
            index: i,
            pass: 0,
            reverse: false,
            step: i,
        };
        let out = tracker.step(&feats, ctx, &mut refine).map_err(Error::other)?;
        let f = out.frame;
        cols[0].push(f.pred_masks);
        cols[1].push(f.obj_ptr);
        cols[2].push(f.object_score_logits);
        cols[3].push(
            f.maskmem_features
                .ok_or_else(|| Error::Output("a slice has no memory features".into()))?,
        );
    }
    let [p, o, s, m] = cols;
    Ok(named([
        ("pred_masks", Tensor::cat(&p, 0)?),
        ("obj_ptr", Tensor::cat(&o, 0)?),
        ("object_score_logits", Tensor::cat(&s, 0)?),
        ("maskmem_features", Tensor::cat(&m, 0)?),
    ]))
}
