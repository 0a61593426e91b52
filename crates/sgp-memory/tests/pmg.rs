//! PMG equals the official composition (supports as mask-prompted conditioning frames at
//! 0..K, the query at frame K of a K+1-frame clip, through sgp-sam2's `track_step`, which
//! the `track` parity kind pins to the official code), batched over queries and classes;
//! and gradients flow through it to the memory attention, the memory encoder and the SAM
//! heads.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use sgp_memory::support::{image_features, repeat_features};
use sgp_memory::{encode_support, Pmg, SupportMemory};
use sgp_sam2::Sam2Config;
use sgp_sam2::Sam2Model;
use sgp_sam2::{FramePrompt, MemoryBank, TrackRequest};

/// The reference: SAM2's own `track_step` over the supports, then the query.
fn reference(model: &Sam2Model, supports: &[(Tensor, Tensor)], query: &Tensor) -> Vec<Tensor> {
    let k = supports.len();
    let mut bank = MemoryBank::new();
    for (i, (img, mask)) in supports.iter().enumerate() {
        let f = image_features(model, &img.unsqueeze(0).unwrap()).unwrap();
        let p = FramePrompt {
            points: None,
            mask: Some(
                mask.reshape((1, 1, mask.dim(0).unwrap(), mask.dim(1).unwrap()))
                    .unwrap(),
            ),
        };
        let out = model
            .track_step(&TrackRequest::initial(i, k + 1), &f, &p, &bank)
            .unwrap();
        bank.cond_frame_outputs.insert(i, out.frame);
    }
    let f = image_features(model, &query.unsqueeze(0).unwrap()).unwrap();
    let sel = model.select_memories(k, &bank, k + 1, false).unwrap();
    let pix = model.memory_conditioned_features(&f, Some(&sel), k + 1).unwrap();
    let out = model
        .track_step(
            &TrackRequest::tracked(k, k + 1).without_memory_encoding(),
            &f,
            &FramePrompt::default(),
            &bank,
        )
        .unwrap();
    vec![
        pix,
        out.frame.pred_masks,
        out.pred_masks_high_res,
        out.frame.object_score_logits,
        out.frame.obj_ptr,
    ]
}

#[test]
fn pmg_matches_track_step_composition_batched_over_queries_and_classes() {
    let model = reduced_model();
    let s = model.config().image_size;
    let items: Vec<_> = (0..3).map(|i| item(i, s, &format!("case{i}"), true)).collect();
    let enc: Vec<_> = items.iter().map(|it| encode_support(&model, it).unwrap()).collect();
    let queries = [image(10, s), image(11, s)];

    // Batch of 4 = 2 queries × 2 classes; class 2 takes the supports in reverse order.
    let mut per_item: Vec<Vec<&SupportMemory>> = Vec::new();
    let mut refs = Vec::new();
    let mut feats = Vec::new();
    for q in &queries {
        for class in [1u32, 2] {
            let order: Vec<usize> = if class == 1 { vec![0, 1, 2] } else { vec![2, 1, 0] };
            per_item.push(order.iter().map(|&i| enc[i].memory(class).unwrap()).collect());
            let sup: Vec<(Tensor, Tensor)> = order
                .iter()
                .map(|&i| (items[i].image.clone(), items[i].masks[&class].clone()))
                .collect();
            refs.push(reference(&model, &sup, q));
            feats.push(image_features(&model, &q.unsqueeze(0).unwrap()).unwrap());
        }
    }
    let cat = |level: usize, pos: bool| -> Tensor {
        let v: Vec<Tensor> = feats
            .iter()
            .map(|f| {
                if pos {
                    f.vision_pos_embeds[level].clone()
                } else {
                    f.vision_feats[level].clone()
                }
            })
            .collect();
        Tensor::cat(&v, 1).unwrap()
    };
    let levels = feats[0].vision_feats.len();
    let batched = sgp_sam2::PreparedFeatures {
        vision_feats: (0..levels).map(|l| cat(l, false)).collect(),
        vision_pos_embeds: (0..levels).map(|l| cat(l, true)).collect(),
        feat_sizes: feats[0].feat_sizes.clone(),
    };
    for max_batch in [usize::MAX, 3] {
        let out = Pmg::new(&model)
            .with_max_batch(max_batch)
            .pseudo_mask_per_item(&batched, &per_item)
            .unwrap();
        assert_eq!(out.pred_masks_high_res.dims(), [4, 1, s, s]);
        assert_eq!(out.pred_masks.dims(), [4, 1, s / 4, s / 4]);
        let ours = [
            &out.pix_feat_with_mem,
            &out.pred_masks,
            &out.pred_masks_high_res,
            &out.object_score_logits,
            &out.obj_ptr,
        ];
        for (b, r) in refs.iter().enumerate() {
            for (name, (o, r)) in ["pix", "low", "high", "score", "ptr"].iter().zip(ours.iter().zip(r)) {
                let e = rel_err(&o.narrow(0, b, 1).unwrap(), r);
                assert!(e < 1e-5, "item {b} {name}: rel err {e}");
            }
        }
    }

    // Shared supports over a query batch equal the per-item form.
    let q = repeat_features(&feats[0], 2).unwrap();
    let shared = Pmg::new(&model).pseudo_mask(&q, &per_item[0]).unwrap();
    assert!(rel_err(&shared.pred_masks_high_res.narrow(0, 1, 1).unwrap(), &refs[0][2]) < 1e-5);

    // Errors, not panics.
    assert!(Pmg::new(&model).pseudo_mask(&q, &[]).is_err());
    assert!(Pmg::new(&model).pseudo_mask_per_item(&q, &per_item).is_err());
}

/// Loads the reduced weights into a VarMap, so that every parameter is tracked.
fn tracked_model() -> (Sam2Model, VarMap) {
    let dir = fixture_dir();
    let cfg = Sam2Config::from_file(&dir.join("config.json")).unwrap();
    let dev = Device::Cpu;
    let st = sgp_sam2::load_state_dict(&dir.join("weights.safetensors"), &dev).unwrap();
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (k, t) in st {
            data.insert(k, Var::from_tensor(&t.to_dtype(DType::F32).unwrap()).unwrap());
        }
    }
    let model = Sam2Model::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
    (model, varmap)
}

#[test]
fn pmg_gradients_reach_parameters_and_match_finite_differences() {
    let (model, varmap) = tracked_model();
    let s = model.config().image_size;
    let items: Vec<_> = (0..2).map(|i| item(i, s, "c", false)).collect();
    let query = image(7, s);
    let weight = Tensor::from_vec(
        (0..s * s).map(|i| ((i as f32) * 0.37).sin()).collect::<Vec<f32>>(),
        (1, 1, s, s),
        &Device::Cpu,
    )
    .unwrap();
    let loss_of = |model: &Sam2Model| -> Tensor {
        let enc: Vec<_> = items.iter().map(|it| encode_support(model, it).unwrap()).collect();
        let sup: Vec<&SupportMemory> = enc.iter().map(|e| e.memory(1).unwrap()).collect();
        let f = image_features(model, &query.unsqueeze(0).unwrap()).unwrap();
        let out = Pmg::new(model).pseudo_mask(&f, &sup).unwrap();
        (out.pred_masks_high_res
            .broadcast_mul(&weight)
            .unwrap()
            .mean_all()
            .unwrap()
            + out.obj_ptr.sqr().unwrap().mean_all().unwrap())
        .unwrap()
    };
    let loss = loss_of(&model);
    let grads = loss.backward().unwrap();
    let vars: HashMap<String, Var> = varmap.data().lock().unwrap().clone();
    let grad_norm = |name: &str| -> f32 {
        let v = vars.get(name).unwrap_or_else(|| panic!("no var {name}"));
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
    };
    // Memory attention (query side), memory encoder (support memories), decoder.
    for name in [
        "memory_attention.layers.0.cross_attn_image.v_proj.weight",
        "memory_attention.layers.1.self_attn.q_proj.weight",
        "memory_encoder.out_proj.weight",
        "sam_mask_decoder.output_upscaling.0.weight",
        "obj_ptr_proj.layers.0.weight",
    ] {
        let n = grad_norm(name);
        assert!(n.is_finite() && n > 0.0, "{name}: gradient norm {n}");
    }

    // Directional finite difference along the gradient of one memory-attention weight.
    let name = "memory_attention.layers.0.cross_attn_image.v_proj.weight";
    let var = vars[name].clone();
    let g = grads.get(var.as_tensor()).unwrap().clone();
    let gn = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
    let dir = (&g / gn as f64).unwrap();
    let base = var.as_tensor().copy().unwrap();
    let eps = 1e-2;
    let eval = |sign: f64| -> f32 {
        var.set(&(&base + (&dir * (sign * eps)).unwrap()).unwrap()).unwrap();
        loss_of(&model).to_scalar::<f32>().unwrap()
    };
    let fd = (eval(1.0) - eval(-1.0)) / (2.0 * eps as f32);
    var.set(&base).unwrap();
    let rel = (fd - gn).abs() / gn.max(1e-8);
    assert!(rel < 0.05, "finite difference {fd} vs gradient norm {gn} (rel {rel})");
}
