//! The SAM2 kinds (`docs/parity-format.md`): `image_encoder`, `sam_heads`,
//! `memory_encoder`, `memory_attention`, `track`.

use candle_core::{DType, Device, Tensor};
use sgp_sam2::{FramePrompt, PointInputs, Tracker};

use super::{named, stack_track_outputs, KindSpec, Registry};
use crate::{Case, Result};

/// Adds the SAM2 kinds.
pub(super) fn register(r: &mut Registry) {
    r.add(KindSpec {
        name: "image_encoder",
        compute: image_encoder,
        item_dims: &[],
    });
    r.add(KindSpec {
        name: "sam_heads",
        compute: sam_heads,
        item_dims: &[],
    });
    r.add(KindSpec {
        name: "memory_encoder",
        compute: memory_encoder,
        item_dims: &[],
    });
    r.add(KindSpec {
        name: "memory_attention",
        compute: memory_attention,
        // `[E*E, B, C]`: the batch is dim 1.
        item_dims: &[("pix_feat_with_mem", 1)],
    });
    r.add(KindSpec {
        name: "track",
        compute: track,
        item_dims: &[],
    });
}

/// Point prompts `in.point_coords` + `in.point_labels`, when the case has them.
fn points(case: &Case) -> Result<Option<PointInputs>> {
    case.input_pair("point_coords", "point_labels")?
        .map(|(c, l)| -> Result<PointInputs> {
            Ok(PointInputs {
                coords: c.clone(),
                labels: l.to_dtype(DType::F32)?,
            })
        })
        .transpose()
}

/// `model.forward_image(image)`.
fn image_encoder(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let bo = model.forward_image(case.input("image")?)?;
    let mut out = Vec::new();
    for (i, t) in bo.backbone_fpn.iter().enumerate() {
        out.push((format!("backbone_fpn.{i}"), t.clone()));
    }
    for (i, t) in bo.vision_pos_enc.iter().enumerate() {
        out.push((format!("vision_pos_enc.{i}"), t.clone()));
    }
    Ok(out)
}

/// `_forward_sam_heads` on the image-predictor features.
fn sam_heads(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let multimask = case
        .bool_option("multimask_output")?
        .ok_or_else(|| case.error("sam_heads needs multimask_output"))?;
    let (pix, high_res) = model.image_features(case.input("image")?)?;
    let points = points(case)?;
    let hi = high_res.as_ref().map(|(a, b)| (a, b));
    let o = model.sam_heads().forward(
        &pix,
        points.as_ref(),
        case.opt_input("mask_inputs"),
        hi,
        model.multimask(multimask),
    )?;
    let all = named([
        ("low_res_multimasks", o.low_res_multimasks),
        ("high_res_multimasks", o.high_res_multimasks),
        ("ious", o.ious),
        ("low_res_masks", o.low_res_masks),
        ("high_res_masks", o.high_res_masks),
        ("obj_ptr", o.obj_ptr),
        ("object_score_logits", o.object_score_logits),
    ]);
    if case.weights_format() == "transformers" {
        // The transformers forward defines only these three (format spec).
        const DEFINED: [&str; 3] = ["low_res_multimasks", "ious", "object_score_logits"];
        return Ok(all.into_iter().filter(|(n, _)| DEFINED.contains(&n.as_str())).collect());
    }
    Ok(all)
}

/// `_encode_new_memory` on `pix_feat`, `pred_masks_high_res`, `object_score_logits`.
fn memory_encoder(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let is_mask_from_pts = case.bool_option("is_mask_from_pts")?.unwrap_or(false);
    let (f, p) = model.encode_new_memory(
        case.input("pix_feat")?,
        case.input("pred_masks_high_res")?,
        case.input("object_score_logits")?,
        is_mask_from_pts,
    )?;
    Ok(named([("maskmem_features", f), ("maskmem_pos_enc", p)]))
}

/// The memory attention on `curr`, `curr_pos`, `memory`, `memory_pos`.
fn memory_attention(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let n = case.usize_option("num_obj_ptr_tokens")?.unwrap_or(0);
    let out = model.memory_attention().forward(
        case.input("curr")?,
        case.input("curr_pos")?,
        case.input("memory")?,
        case.input("memory_pos")?,
        n,
    )?;
    Ok(named([("pix_feat_with_mem", out)]))
}

/// `track_step` over `frames` with a prompt on frame 0.
fn track(case: &Case, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let model = case.load_model(device)?;
    let frames = case.input("frames")?;
    let t = frames.dim(0)?;
    let prompt0 = FramePrompt {
        points: points(case)?,
        mask: case.opt_input("mask_inputs").cloned(),
    };
    let mut tracker = Tracker::new(&model, t);
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let bo = model.forward_image(&frames.narrow(0, i, 1)?)?;
        let feats = model.prepare_backbone_features(&bo)?;
        outs.push(if i == 0 {
            tracker.add_conditioning(i, &feats, &prompt0)?
        } else {
            tracker.track(i, &feats)?
        });
    }
    stack_track_outputs(&outs)
}
