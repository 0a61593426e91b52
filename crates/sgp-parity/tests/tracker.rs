//! `sgp_sam2::Tracker` expresses supports (mask-prompted conditioning entries that are
//! not video frames) with exactly the semantics of the SGP parity kinds: computed here
//! through the Tracker alone and compared with the official reference under the pass rule.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use sgp_parity::{compare, Case};
use sgp_sam2::{PreparedFeatures, Sam2Model, Tracker};

fn case(rel: &str) -> Case {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/parity/sgp")
        .join(rel);
    Case::load(&dir, rel.to_string(), &Device::Cpu).expect("committed SGP case")
}

fn features(model: &Sam2Model, images: &Tensor, i: usize) -> PreparedFeatures {
    let bo = model.forward_image(&images.narrow(0, i, 1).unwrap()).unwrap();
    model.prepare_backbone_features(&bo).unwrap()
}

fn check(case: &Case, name: &str, ours: &Tensor) {
    let r = compare(name, ours, &case.expected()[name], case.rtol(), 0).unwrap();
    println!(
        "{} {name}: rel_err {:.3e} (worst item {:.3e})",
        case.name(),
        r.rel_err,
        r.worst_item_err
    );
    assert!(r.passed, "{name}: {r:?}");
}

/// Adds supports 0..K to a fresh tracker of `num_frames` entries.
fn with_supports<'m>(model: &'m Sam2Model, case: &Case, num_frames: usize) -> Tracker<'m> {
    let images = case.input("support_images").unwrap();
    let masks = case.input("support_masks").unwrap();
    let mut tracker = Tracker::new(model, num_frames);
    for k in 0..images.dim(0).unwrap() {
        let mask = masks.narrow(0, k, 1).unwrap();
        tracker.add_support(k, &features(model, images, k), &mask).unwrap();
    }
    tracker
}

#[test]
fn tracker_supports_match_support_pseudo_mask() {
    let case = case("sam2.1_reduced/s64/support_pseudo_mask_k3_q2");
    let model = case.load_model(&Device::Cpu).unwrap();
    let k = case.input("support_images").unwrap().dim(0).unwrap();
    let query = case.input("query").unwrap();
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); 5];
    for q in 0..query.dim(0).unwrap() {
        // Each query gets a fresh memory holding only the supports.
        let tracker = with_supports(&model, &case, k + 1);
        let o = tracker.query(k, &features(&model, query, q)).unwrap();
        assert!(o.frame.maskmem_features.is_none(), "a query encodes no memory");
        for (i, t) in [
            o.pix_feat_with_mem.unwrap(),
            o.frame.pred_masks,
            o.pred_masks_high_res,
            o.frame.object_score_logits,
            o.frame.obj_ptr,
        ]
        .into_iter()
        .enumerate()
        {
            outs[i].push(t);
        }
    }
    for (name, v) in [
        "pix_feat_with_mem",
        "pred_masks",
        "pred_masks_high_res",
        "object_score_logits",
        "obj_ptr",
    ]
    .iter()
    .zip(&outs)
    {
        check(&case, name, &Tensor::cat(v, 0).unwrap());
    }
}

#[test]
fn tracker_supports_match_support_track() {
    let case = case("sam2.1_reduced/s64/support_track_k2_t17");
    let model = case.load_model(&Device::Cpu).unwrap();
    let k = case.input("support_images").unwrap().dim(0).unwrap();
    let frames = case.input("frames").unwrap();
    let t = frames.dim(0).unwrap();
    let mut tracker = with_supports(&model, &case, k + t);
    let mut outs: Vec<Vec<Tensor>> = vec![Vec::new(); 4];
    for i in 0..t {
        let o = tracker.track(k + i, &features(&model, frames, i)).unwrap();
        outs[0].push(o.frame.pred_masks);
        outs[1].push(o.frame.obj_ptr);
        outs[2].push(o.frame.object_score_logits);
        outs[3].push(o.frame.maskmem_features.unwrap());
    }
    assert_eq!(tracker.bank().cond_frame_outputs.len(), k);
    assert_eq!(tracker.bank().non_cond_frame_outputs.len(), t);
    for (name, v) in ["pred_masks", "obj_ptr", "object_score_logits", "maskmem_features"]
        .iter()
        .zip(&outs)
    {
        check(&case, name, &Tensor::cat(v, 0).unwrap());
    }
}

#[test]
fn tracker_rejects_entries_outside_the_clip_and_empty_prompts() {
    let case = case("sam2.1_reduced/s64/support_pseudo_mask_k3_q2");
    let model = case.load_model(&Device::Cpu).unwrap();
    let images = case.input("support_images").unwrap();
    let feats = features(&model, images, 0);
    let mask = case.input("support_masks").unwrap().narrow(0, 0, 1).unwrap();
    let mut tracker = Tracker::new(&model, 2);
    assert!(tracker.add_support(2, &feats, &mask).is_err());
    assert!(tracker.add_conditioning(0, &feats, &Default::default()).is_err());
    // A query before any conditioning entry has no memory to read.
    assert!(tracker.query(1, &feats).is_err());
    tracker.add_support(0, &feats, &mask).unwrap();
    assert!(tracker.query(1, &feats).is_ok());
}
