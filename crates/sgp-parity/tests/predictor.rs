//! `Sam2Model::encode_image` + `predict` against the official `SAM2ImagePredictor`
//! (reference from crates/sgp-sam2/tests/predictor_data/gen_predictor_fixture.py on a
//! reduced model), under the parity pass rule.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sgp_parity::compare;
use sgp_sam2::{load_state_dict, Multimask, PromptInput, Sam2Config, Sam2Model};

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sgp-sam2/tests/predictor_data")
}

fn check(name: &str, ours: &Tensor, reference: &Tensor) {
    let r = compare(name, ours, reference, 1e-4, 0).unwrap();
    println!(
        "{name}: rel_err {:.3e} (worst item {:.3e})",
        r.rel_err, r.worst_item_err
    );
    assert!(r.passed, "{name}: {r:?}");
}

#[test]
fn predictor_matches_official_image_predictor() {
    let dev = Device::Cpu;
    let cfg = Sam2Config::from_file(&data().join("config.json")).unwrap();
    let model = Sam2Model::load(&cfg, &data().join("weights.safetensors"), &dev).unwrap();
    let io = load_state_dict(&data().join("io.safetensors"), &dev).unwrap();

    let emb = model.encode_image(&io["in.image"]).unwrap();
    assert_eq!(emb.orig_hw, (90, 120));
    let b: Vec<f32> = io["in.box"].to_vec1().unwrap();
    let pts: Vec<Vec<f32>> = io["in.point_coords"].to_vec2().unwrap();
    let lbl: Vec<f32> = io["in.point_labels"].to_vec1().unwrap();
    let points: Vec<[f32; 2]> = pts.iter().map(|p| [p[0], p[1]]).collect();
    let labels: Vec<i32> = lbl.iter().map(|&l| l as i32).collect();

    let first = model
        .predict(
            &emb,
            &PromptInput {
                points: Some((points.clone(), labels.clone())),
                boxes: Some([b[0], b[1], b[2], b[3]]),
                mask_input: None,
            },
            model.multimask(true),
        )
        .unwrap();
    check("first.mask_logits", &first.mask_logits, &io["out.first.mask_logits"]);
    check("first.iou_scores", &first.iou_scores, &io["out.first.iou_scores"]);
    check(
        "first.low_res_logits",
        &first.low_res_logits,
        &io["out.first.low_res_logits"],
    );
    let thresholded = first.mask_logits.gt(0f32).unwrap().to_dtype(DType::F32).unwrap();
    let masks = first.masks.to_dtype(DType::F32).unwrap();
    assert_eq!(
        (thresholded - masks)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );

    let best = io["in.best"].to_vec1::<f32>().unwrap()[0] as usize;
    let prev = first.low_res_logits.narrow(0, best, 1).unwrap();
    let second = model
        .predict(
            &emb,
            &PromptInput {
                points: Some((points[..1].to_vec(), labels[..1].to_vec())),
                boxes: None,
                mask_input: Some(prev),
            },
            model.multimask(false),
        )
        .unwrap();
    check("second.mask_logits", &second.mask_logits, &io["out.second.mask_logits"]);
    check("second.iou_scores", &second.iou_scores, &io["out.second.iou_scores"]);
    check(
        "second.low_res_logits",
        &second.low_res_logits,
        &io["out.second.low_res_logits"],
    );
}

#[test]
fn predict_rejects_bad_prompts() {
    let dev = Device::Cpu;
    let cfg = Sam2Config::from_file(&data().join("config.json")).unwrap();
    let model = Sam2Model::load(&cfg, &data().join("weights.safetensors"), &dev).unwrap();
    assert!(model
        .encode_image(&Tensor::zeros((1, 8, 8), DType::F32, &dev).unwrap())
        .is_err());
    assert!(model
        .encode_image(&Tensor::zeros((3, 0, 8), DType::F32, &dev).unwrap())
        .is_err());
    let emb = model
        .encode_image(&Tensor::ones((3, 20, 30), DType::F32, &dev).unwrap())
        .unwrap();
    let p = |points, mask_input| PromptInput {
        points,
        boxes: None,
        mask_input,
    };
    assert!(model
        .predict(&emb, &p(Some((vec![[1.0, 2.0]], vec![1, 0])), None), Multimask::Multi)
        .is_err());
    assert!(model
        .predict(&emb, &p(Some((vec![[f32::NAN, 2.0]], vec![1])), None), Multimask::Multi)
        .is_err());
    // No prompt at all is valid (the official predictor embeds "no mask", no points).
    let none = model.predict(&emb, &PromptInput::default(), Multimask::Multi).unwrap();
    assert_eq!(none.mask_logits.dims(), &[3, 20, 30]);
    assert_eq!(none.masks.dims(), &[3, 20, 30]);
    assert_eq!(none.low_res_logits.dims(), &[3, 16, 16]);
    assert_eq!(none.iou_scores.dims(), &[3]);
    let wrong_mask = Tensor::zeros((1, 7, 7), DType::F32, &dev).unwrap();
    assert!(model
        .predict(&emb, &p(None, Some(wrong_mask)), Multimask::Multi)
        .is_err());
}
