//! The whole head on the reduced SAM2.1 model: untrained = the `sgp_init` pipeline, mixed
//! batches, weights files.

mod common;

use candle_core::{Device, Tensor};
use common::{image, max_abs_diff, pmg_parts, reduced_model, set_var, Rng};
use sgp_pma::{box_from_pseudo_mask, HeadDims, PmaError, SgpHead, SgpHeadConfig};
use sgp_sam2::PointInputs;

fn test_cfg() -> SgpHeadConfig {
    let mut cfg = SgpHeadConfig::default();
    cfg.pma.num_heads = 4; // hidden_dim 32 in the reduced model
    cfg
}

#[test]
fn untrained_head_is_exactly_the_sgp_init_pipeline() {
    let model = reduced_model();
    let dims = HeadDims::of(&model);
    let (trainable, _) = SgpHead::init(&test_cfg(), dims, &Device::Cpu, 7).unwrap();
    // Inference copy: no autograd, so SAM2 takes the same fast kernels as the reference.
    let head = trainable.detached().unwrap();
    let img = image(&model, 3, 1);
    // Items 0 and 2 have objects, item 1 an empty pseudo-mask.
    let pmg = pmg_parts(&model, &img, &[4.0, 0.0, 3.0]);
    let out = head.forward(&model, &pmg, &img).unwrap();
    // The trainable head (tracked parameters, differentiable kernels) agrees to rounding.
    let tracked = trainable.forward(&model, &pmg, &img).unwrap();
    let rel = common::norm(&(&tracked.final_logits - &out.final_logits).unwrap()) / common::norm(&out.final_logits);
    assert!(rel < 1e-6, "trainable vs inference head: {rel:.2e}");
    assert!(out.boxes[0].is_some() && out.boxes[1].is_none() && out.boxes[2].is_some());
    assert_eq!(out.final_logits.dims(), &[3, 1, 64, 64]);
    assert_eq!(out.stage1_low_res.dims(), &[3, 1, 16, 16]);
    assert_eq!(out.object_score_logits.dims(), &[3, 1]);

    // The reference: SAM2's heads on F' with the boxes, single-mask output (as
    // `sgp_init`), on the same sub-batch (items 0 and 2) so that rounding is identical.
    let heads = model.sam_heads();
    let idx = Tensor::new(&[0u32, 2], &Device::Cpu).unwrap();
    let pick = |t: &Tensor| t.index_select(&idx, 0).unwrap();
    let mut coords = Vec::new();
    for i in [0usize, 2] {
        coords.extend(out.boxes[i].unwrap());
    }
    let pts = PointInputs {
        coords: Tensor::from_vec(coords, (2, 2, 2), &Device::Cpu).unwrap(),
        labels: Tensor::new(&[[2f32, 3.0], [2.0, 3.0]], &Device::Cpu).unwrap(),
    };
    let hr = pmg.high_res_feats.as_ref().unwrap();
    let (a, b) = (pick(&hr.0), pick(&hr.1));
    let reference = heads
        .forward(
            &pick(&pmg.pix_feat_with_mem),
            Some(&pts),
            None,
            Some((&a, &b)),
            heads.multimask(false),
        )
        .unwrap();
    assert_eq!(
        max_abs_diff(&pick(&out.final_logits), &reference.high_res_masks),
        0.0,
        "final logits"
    );
    assert_eq!(
        max_abs_diff(&pick(&out.stage1_low_res), &reference.low_res_masks),
        0.0,
        "stage 1"
    );
    assert_eq!(
        max_abs_diff(&pick(&out.object_score_logits), &reference.object_score_logits),
        0.0,
        "object scores"
    );
    // No box: the pseudo-mask is the output.
    let pm = pmg.pred_masks_high_res.narrow(0, 1, 1).unwrap();
    assert_eq!(max_abs_diff(&out.final_logits.narrow(0, 1, 1).unwrap(), &pm), 0.0);
    // The boxes are those of the pseudo-masks.
    assert_eq!(out.boxes, box_from_pseudo_mask(&pmg.pred_masks_high_res).unwrap());
}

#[test]
fn trained_parts_change_the_output_only_where_there_is_a_box() {
    let model = reduced_model();
    let dims = HeadDims::of(&model);
    let (head, varmap) = SgpHead::init(&test_cfg(), dims, &Device::Cpu, 3).unwrap();
    let img = image(&model, 2, 2);
    let pmg = pmg_parts(&model, &img, &[0.0, 4.0]);
    let before = head.forward(&model, &pmg, &img).unwrap();
    set_var(&varmap, "pma.gamma", &Tensor::new(&[0.8f32], &Device::Cpu).unwrap());
    let w = Rng::new(5).tensor(&[1, 16], 0.3, candle_core::DType::F32);
    set_var(&varmap, "decoder.out.weight", &w);
    let after = head.forward(&model, &pmg, &img).unwrap();
    let d0 = max_abs_diff(
        &before.final_logits.narrow(0, 0, 1).unwrap(),
        &after.final_logits.narrow(0, 0, 1).unwrap(),
    );
    let d1 = max_abs_diff(
        &before.final_logits.narrow(0, 1, 1).unwrap(),
        &after.final_logits.narrow(0, 1, 1).unwrap(),
    );
    assert_eq!(d0, 0.0, "no box: the pseudo-mask passes through");
    assert!(d1 > 1e-3, "γ and R act where there is a box ({d1})");
    // γ alone moves stage 1 (through F'').
    let s1 = max_abs_diff(
        &before.stage1_low_res.narrow(0, 1, 1).unwrap(),
        &after.stage1_low_res.narrow(0, 1, 1).unwrap(),
    );
    assert!(s1 > 1e-4, "PMA changes stage 1 ({s1})");
}

#[test]
fn weights_round_trip_and_mismatches_are_listed_together() {
    let model = reduced_model();
    let dims = HeadDims::of(&model);
    let cfg = test_cfg();
    let (head, varmap) = SgpHead::init(&cfg, dims, &Device::Cpu, 9).unwrap();
    set_var(&varmap, "pma.gamma", &Tensor::new(&[0.25f32], &Device::Cpu).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("head.safetensors");
    head.save(&path).unwrap();
    let (loaded, _) = SgpHead::load(&path, dims, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), &cfg);
    assert_eq!(loaded.parameters().len(), head.parameters().len());
    for ((na, ta), (nb, tb)) in head.parameters().iter().zip(loaded.parameters()) {
        assert_eq!(na, nb);
        assert_eq!(max_abs_diff(ta, tb), 0.0, "{na}");
    }
    // Names explain themselves.
    let names: Vec<&str> = head.parameters().iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"pma.gamma") && names.contains(&"decoder.out.weight"));
    assert!(names.iter().all(|n| n.starts_with("pma.") || n.starts_with("decoder.")));
    let (pma_n, dec_n) = head.num_parameters();
    assert!(pma_n > 0 && dec_n > 0);

    // Another model's dims are refused.
    let other = HeadDims {
        hidden_dim: 256,
        ..dims
    };
    assert!(matches!(
        SgpHead::load(&path, other, &Device::Cpu),
        Err(PmaError::ModelMismatch { .. })
    ));

    // A file with one tensor missing, one mis-shaped and one extra: one error, three lines.
    let mut ts: std::collections::HashMap<String, Tensor> =
        head.parameters().iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    ts.remove("pma.q_proj.bias");
    ts.insert(
        "decoder.out.weight".into(),
        Tensor::zeros((2, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    ts.insert(
        "decoder.extra".into(),
        Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(&ts, &bad).unwrap();
    let Err(err) = SgpHead::load_with_config(&bad, &cfg, dims, &Device::Cpu) else {
        panic!("a mismatched file must not load");
    };
    let msg = err.to_string();
    match &err {
        PmaError::WeightsMismatch { problems, .. } => assert_eq!(problems.len(), 3, "{msg}"),
        other => panic!("expected WeightsMismatch, got {other}"),
    }
    for needle in [
        "missing `pma.q_proj.bias`",
        "`decoder.out.weight` has shape [2, 16]",
        "unexpected `decoder.extra`",
    ] {
        assert!(msg.contains(needle), "{needle} not in: {msg}");
    }
    // No metadata: not a head file.
    assert!(matches!(
        SgpHead::load(&bad, dims, &Device::Cpu),
        Err(PmaError::BadFile { .. })
    ));
    // Missing file: an I/O error naming it.
    assert!(matches!(
        SgpHead::load(dir.path().join("nope.safetensors"), dims, &Device::Cpu),
        Err(PmaError::Io { .. })
    ));
}

#[test]
fn wrong_inputs_are_errors() {
    let model = reduced_model();
    let dims = HeadDims::of(&model);
    let (head, _) = SgpHead::init(&test_cfg(), dims, &Device::Cpu, 1).unwrap();
    let img = image(&model, 2, 4);
    let pmg = pmg_parts(&model, &img, &[3.0, 3.0]);
    let small = image(&model, 1, 4);
    assert!(head.forward(&model, &pmg, &small).is_err());
    let mut no_hr = pmg.clone();
    no_hr.high_res_feats = None;
    assert!(head.forward(&model, &no_hr, &img).is_err());
    let mut bad = pmg.clone();
    bad.pred_masks = bad.pred_masks.narrow(0, 0, 1).unwrap();
    assert!(head.forward(&model, &bad, &img).is_err());
}
