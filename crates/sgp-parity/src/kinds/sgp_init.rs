//! The `sgp_init` kind (`docs/parity-format.md`): the SGP output before any
//! PMA/decoder training. PMG is sgp-memory's [`Pmg`] on the mask-prompted supports (as in
//! `support_pseudo_mask`); the box, PMA (γ = 0) and the hierarchical decoder (R = 0) are
//! a freshly initialised [`sgp_pma::SgpHead`], so the case checks the code users run.

use candle_core::{Device, Tensor};
use sgp_memory::support::image_features;
use sgp_memory::Pmg;
use sgp_pma::{HeadDims, PmgParts, SgpHead, SgpHeadConfig};

use super::support::{encode_supports, memories};
use super::{named, KindSpec, Registry};
use crate::{Case, Error, Result};

/// Adds the `sgp_init` kind.
pub(super) fn register(r: &mut Registry) {
    r.add(KindSpec {
        name: "sgp_init",
        compute: sgp_init,
        item_dims: &[],
    });
}

/// PMG for all queries as one batch, then the untrained head.
fn sgp_init(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let enc = encode_supports(case, &model)?;
    let query = case.input("query")?;
    let feats = image_features(&model, query).map_err(Error::other)?;
    let pmg = Pmg::new(&model)
        .pseudo_mask(&feats, &memories(&enc)?)
        .map_err(Error::other)?;
    // Any seed: with γ = 0 and R = 0 the output does not depend on the other weights.
    let (head, _) = SgpHead::init(&SgpHeadConfig::default(), HeadDims::of(&model), device, 0).map_err(Error::other)?;
    let head = head.detached().map_err(Error::other)?;
    let parts = PmgParts {
        pix_feat_with_mem: pmg.pix_feat_with_mem.clone(),
        pred_masks: pmg.pred_masks.clone(),
        pred_masks_high_res: pmg.pred_masks_high_res.clone(),
        object_score_logits: pmg.object_score_logits.clone(),
        high_res_feats: pmg.high_res_feats.clone(),
    };
    let out = head.forward(&model, &parts, query).map_err(Error::other)?;
    let boxes: Vec<f32> = out.boxes.iter().flat_map(|b| b.unwrap_or([-1.0; 4])).collect();
    let n = out.boxes.len();
    Ok(named([
        ("box", Tensor::from_vec(boxes, (n, 4), device)?),
        ("final_logits", out.final_logits),
        ("pix_feat_with_mem", pmg.pix_feat_with_mem),
        ("pred_masks", pmg.pred_masks),
        ("pred_masks_high_res", pmg.pred_masks_high_res),
        ("object_score_logits", pmg.object_score_logits),
        ("obj_ptr", pmg.obj_ptr),
    ]))
}
