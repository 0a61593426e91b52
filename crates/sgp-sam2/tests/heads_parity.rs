//! `SamHeads::forward` against `SAM2Base._forward_sam_heads` on tiny random weights
//! (hidden dim 32, image size 64), independent of the image encoder. References come from
//! `tests/heads_data/gen_heads_refs.py`: two head configurations (SAM2.1's, and one that
//! takes the other branches: no high-res path, linear heads, soft no-object pointer,
//! dynamic multimask via stability) × prompt kinds (points, box, box+padding, mask at S
//! and S/4, no prompt; multimask on/off).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sgp_sam2::{PointInputs, SamHeads, SamHeadsConfig};

const RTOL: f64 = 1e-4;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/heads_data")
}

fn config(name: &str) -> SamHeadsConfig {
    let base = SamHeadsConfig {
        hidden_dim: 32,
        image_size: 64,
        ..Default::default()
    };
    match name {
        "sam21" => SamHeadsConfig {
            use_high_res_features_in_sam: true,
            multimask_output_in_sam: true,
            iou_prediction_use_sigmoid: true,
            use_obj_ptrs_in_encoder: true,
            pred_obj_scores: true,
            pred_obj_scores_mlp: true,
            fixed_no_obj_ptr: true,
            use_multimask_token_for_obj_ptr: true,
            use_mlp_for_obj_ptr_proj: true,
            ..base
        },
        "alt" => SamHeadsConfig {
            use_obj_ptrs_in_encoder: true,
            pred_obj_scores: true,
            soft_no_obj_ptr: true,
            dynamic_multimask_via_stability: true,
            ..base
        },
        other => panic!("unknown config {other}"),
    }
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let d = (ours - reference)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let r = reference.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d.sqrt() / r.sqrt().max(1e-12)
}

fn run_config(name: &str) {
    let dev = Device::Cpu;
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("cases.json")).unwrap()).unwrap();
    let weights = data_dir().join(format!("{name}_weights.safetensors"));
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &dev).unwrap() };
    let heads = SamHeads::new(&config(name), vb).unwrap();
    let cases = manifest["cases"].as_object().unwrap();
    let mut n = 0;
    for (case, meta) in cases.iter().filter(|(_, m)| m["config"] == name) {
        let io: HashMap<String, Tensor> =
            candle_core::safetensors::load(data_dir().join(format!("{case}.safetensors")), &dev).unwrap();
        let points = io.get("in.point_coords").map(|c| PointInputs {
            coords: c.clone(),
            labels: io["in.point_labels"].clone(),
        });
        let hi = io.get("in.high_res_0").map(|h0| (h0, &io["in.high_res_1"]));
        let multimask = meta["multimask_output"].as_bool().unwrap();
        let out = heads
            .forward(
                &io["in.backbone_features"],
                points.as_ref(),
                io.get("in.mask_inputs"),
                hi,
                heads.multimask(multimask),
            )
            .unwrap();
        let ours = [
            ("low_res_multimasks", &out.low_res_multimasks),
            ("high_res_multimasks", &out.high_res_multimasks),
            ("ious", &out.ious),
            ("low_res_masks", &out.low_res_masks),
            ("high_res_masks", &out.high_res_masks),
            ("obj_ptr", &out.obj_ptr),
            ("object_score_logits", &out.object_score_logits),
        ];
        for (tname, t) in ours {
            let r = &io[&format!("out.{tname}")];
            assert_eq!(t.dims(), r.dims(), "{case}/{tname}: shape");
            for b in 0..r.dim(0).unwrap() {
                let e = rel_err(&t.get(b).unwrap(), &r.get(b).unwrap());
                assert!(e <= RTOL, "{case}/{tname}[{b}]: relative error {e:.3e} > {RTOL}");
            }
        }
        n += 1;
    }
    assert!(n >= 8, "expected at least 8 cases for {name}, found {n}");
}

#[test]
fn sam21_heads_match_pytorch() {
    run_config("sam21");
}

#[test]
fn alternative_head_branches_match_pytorch() {
    run_config("alt");
}
