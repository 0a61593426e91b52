//! Shape and prompt-rule checks of the SAM heads on random weights, with no model and no
//! reference files: output shapes for multimask on/off, the padding rules of the prompt
//! encoder, the dynamic-multimask fallback, and clear errors for bad inputs.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use sgp_kernels::testing::max_abs_diff;
use sgp_sam2::{MaskDecoder, MaskDecoderConfig, Multimask};
use sgp_sam2::{PointInputs, SamHeads, SamHeadsConfig};

/// Sets every variable to N(0, 0.1²), seeded by its name (the map's order is not stable).
fn randomize(vm: &VarMap, seed: u64) {
    for (name, var) in vm.data().lock().unwrap().iter() {
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        var.set(&seeded_randn(seed ^ h, 0.1, var.shape())).unwrap();
    }
}

/// Deterministic N(0, std²) samples (candle's CPU generator cannot be seeded), so a
/// numerical check sees the same inputs on every run.
fn seeded_randn<S: Into<candle_core::Shape>>(seed: u64, std: f32, shape: S) -> Tensor {
    let shape = shape.into();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data: Vec<f32> = (0..shape.elem_count())
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32 * std
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

const C: usize = 32;
const S: usize = 64;
const E: usize = S / 16;

/// Builds `make(vb)` on a VarMap, then fills every variable with N(0, 0.1²) (biases and
/// norms included) so no path sees zeros.
fn random_weights<T>(make: impl FnOnce(VarBuilder) -> T) -> T {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = make(vb);
    randomize(&vm, 1);
    m
}

fn sam21_like() -> SamHeadsConfig {
    SamHeadsConfig {
        hidden_dim: C,
        image_size: S,
        use_high_res_features_in_sam: true,
        pred_obj_scores: true,
        pred_obj_scores_mlp: true,
        use_obj_ptrs_in_encoder: true,
        use_mlp_for_obj_ptr_proj: true,
        fixed_no_obj_ptr: true,
        use_multimask_token_for_obj_ptr: true,
        iou_prediction_use_sigmoid: true,
        ..Default::default()
    }
}

fn inputs(b: usize) -> (Tensor, Tensor, Tensor) {
    (
        seeded_randn(2, 1.0, (b, C, E, E)),
        seeded_randn(3, 1.0, (b, C / 8, 4 * E, 4 * E)),
        seeded_randn(4, 1.0, (b, C / 4, 2 * E, 2 * E)),
    )
}

#[test]
fn output_shapes_follow_multimask_flag() {
    let heads = random_weights(|vb| SamHeads::new(&sam21_like(), vb).unwrap());
    let b = 3;
    let (feat, s0, s1) = inputs(b);
    let pts = PointInputs {
        coords: Tensor::rand(0f32, S as f32, (b, 2, 2), &Device::Cpu).unwrap(),
        labels: Tensor::new(&[[1f32, 0.], [1., 1.], [2., 3.]], &Device::Cpu).unwrap(),
    };
    for (multimask, m) in [(Multimask::Multi, 3), (Multimask::Single, 1)] {
        let out = heads
            .forward(&feat, Some(&pts), None, Some((&s0, &s1)), multimask)
            .unwrap();
        assert_eq!(out.low_res_multimasks.dims(), [b, m, S / 4, S / 4]);
        assert_eq!(out.high_res_multimasks.dims(), [b, m, S, S]);
        assert_eq!(out.ious.dims(), [b, m]);
        assert_eq!(out.low_res_masks.dims(), [b, 1, S / 4, S / 4]);
        assert_eq!(out.high_res_masks.dims(), [b, 1, S, S]);
        assert_eq!(out.obj_ptr.dims(), [b, C]);
        assert_eq!(out.object_score_logits.dims(), [b, 1]);
        // The chosen mask is the multimask output with the highest IoU.
        let best: Vec<u32> = out.ious.argmax(1).unwrap().to_vec1().unwrap();
        for (i, k) in best.into_iter().enumerate() {
            let chosen = out.low_res_multimasks.get(i).unwrap().get(k as usize).unwrap();
            assert_eq!(
                max_abs_diff(&chosen, &out.low_res_masks.get(i).unwrap().get(0).unwrap()).unwrap(),
                0.0
            );
        }
    }
}

#[test]
fn prompt_encoder_pads_with_one_not_a_point() {
    let heads = random_weights(|vb| SamHeads::new(&sam21_like(), vb).unwrap());
    let pe = &heads.prompt_encoder;
    let dev = Device::Cpu;
    let coords = Tensor::new(&[[[10f32, 20.], [30., 5.]]], &dev).unwrap();
    let labels = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
    let (sparse, dense) = pe.forward(Some((&coords, &labels)), None, None).unwrap();
    assert_eq!(sparse.dims(), [1, 3, C], "two points + one padding point");
    assert_eq!(dense.dims(), [1, C, E, E]);
    let pad = sparse.get(0).unwrap().get(2).unwrap();
    assert_eq!(max_abs_diff(&pad, &pe.not_a_point_embed.get(0).unwrap()).unwrap(), 0.0);
    // With a box tensor, points are not padded.
    let boxes = Tensor::new(&[[1f32, 2., 40., 50.]], &dev).unwrap();
    let (sparse, _) = pe.forward(Some((&coords, &labels)), Some(&boxes), None).unwrap();
    assert_eq!(sparse.dims(), [1, 4, C]);
}

#[test]
fn padding_points_ignore_their_coordinates_and_no_prompt_is_one_padding_point() {
    let heads = random_weights(|vb| SamHeads::new(&sam21_like(), vb).unwrap());
    let dev = Device::Cpu;
    let (feat, s0, s1) = inputs(2);
    let none = heads
        .forward(&feat, None, None, Some((&s0, &s1)), Multimask::Single)
        .unwrap();
    let explicit = PointInputs {
        coords: Tensor::new(&[[[13f32, 57.]], [[0., 0.]]], &dev).unwrap(),
        labels: Tensor::new(&[[-1f32], [-1.]], &dev).unwrap(),
    };
    let padded = heads
        .forward(&feat, Some(&explicit), None, Some((&s0, &s1)), Multimask::Single)
        .unwrap();
    assert_eq!(max_abs_diff(&none.low_res_masks, &padded.low_res_masks).unwrap(), 0.0);
    assert_eq!(max_abs_diff(&none.obj_ptr, &padded.obj_ptr).unwrap(), 0.0);
    assert_eq!(max_abs_diff(&none.ious, &padded.ious).unwrap(), 0.0);
    // A real point changes the result (IoUs are never masked by the object score).
    let real = PointInputs {
        coords: explicit.coords.clone(),
        labels: Tensor::new(&[[1f32], [1.]], &dev).unwrap(),
    };
    let with_point = heads
        .forward(&feat, Some(&real), None, Some((&s0, &s1)), Multimask::Single)
        .unwrap();
    assert!(max_abs_diff(&none.ious, &with_point.ious).unwrap() > 0.0);
}

#[test]
fn mask_prompt_is_resized_to_quarter_size() {
    let heads = random_weights(|vb| SamHeads::new(&sam21_like(), vb).unwrap());
    let (feat, s0, s1) = inputs(1);
    for side in [S, S / 4, 40] {
        let m = seeded_randn(5, 1.0, (1, 1, side, side));
        let out = heads
            .forward(&feat, None, Some(&m), Some((&s0, &s1)), Multimask::Multi)
            .unwrap();
        assert_eq!(out.low_res_multimasks.dims(), [1, 3, S / 4, S / 4]);
    }
}

#[test]
fn dynamic_multimask_falls_back_only_when_unstable() {
    let cfg = MaskDecoderConfig {
        transformer_dim: C,
        dynamic_multimask_via_stability: true,
        ..Default::default()
    };
    let dec = random_weights(|vb| MaskDecoder::new(&cfg, vb).unwrap());
    let dev = Device::Cpu;
    // Item 0: the single mask is far from 0 everywhere (stable). Item 1: all logits in
    // (-δ, δ), so area(>δ) = 0 and stability 0 (unstable).
    let mut v = Vec::new();
    for b in 0..2 {
        for k in 0..4 {
            for p in 0..16 {
                v.push(match (b, k) {
                    (0, 0) => {
                        if p < 8 {
                            5.0
                        } else {
                            -5.0
                        }
                    }
                    (1, 0) => 0.01,
                    _ => (k * 100 + p) as f32,
                });
            }
        }
    }
    let masks = Tensor::from_vec(v, (2, 4, 4, 4), &dev).unwrap();
    let ious = Tensor::new(&[[0.1f32, 0.2, 0.9, 0.3], [0.1, 0.2, 0.3, 0.9]], &dev).unwrap();
    let stab: Vec<Vec<f32>> = dec
        .stability_scores(&masks.narrow(1, 0, 1).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(stab, vec![vec![1.0], vec![0.0]]);
    let (m, i) = dec.dynamic_multimask_via_stability(&masks, &ious).unwrap();
    assert_eq!(i.to_vec2::<f32>().unwrap(), vec![vec![0.1], vec![0.9]]);
    assert_eq!(
        max_abs_diff(&m.get(0).unwrap(), &masks.get(0).unwrap().narrow(0, 0, 1).unwrap()).unwrap(),
        0.0
    );
    assert_eq!(
        max_abs_diff(&m.get(1).unwrap(), &masks.get(1).unwrap().narrow(0, 3, 1).unwrap()).unwrap(),
        0.0
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let heads = random_weights(|vb| SamHeads::new(&sam21_like(), vb).unwrap());
    let dev = Device::Cpu;
    let (feat, s0, s1) = inputs(1);
    let wrong_feat = Tensor::zeros((1, C, E + 1, E), DType::F32, &dev).unwrap();
    assert!(heads
        .forward(&wrong_feat, None, None, Some((&s0, &s1)), Multimask::Single)
        .is_err());
    assert!(
        heads.forward(&feat, None, None, None, Multimask::Single).is_err(),
        "high-res features required"
    );
    let bad_pts = PointInputs {
        coords: Tensor::zeros((1, 2, 3), DType::F32, &dev).unwrap(),
        labels: Tensor::zeros((1, 2), DType::F32, &dev).unwrap(),
    };
    assert!(heads
        .forward(&feat, Some(&bad_pts), None, Some((&s0, &s1)), Multimask::Single)
        .is_err());
    let bad_mask = Tensor::zeros((1, 2, S, S), DType::F32, &dev).unwrap();
    assert!(heads
        .forward(&feat, None, Some(&bad_mask), Some((&s0, &s1)), Multimask::Single)
        .is_err());
}

/// Training paths (decoder fine-tuning, adapters) need gradients through the heads: the
/// analytic gradient of a loss on the masks and IoUs must reach the decoder's parameters
/// and agree with central finite differences.
#[test]
fn gradients_reach_decoder_parameters_and_match_finite_differences() {
    let cfg = SamHeadsConfig {
        hidden_dim: C,
        image_size: S,
        ..Default::default()
    };
    let vm = VarMap::new();
    let heads = SamHeads::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    randomize(&vm, 6);
    let dev = Device::Cpu;
    let feat = seeded_randn(7, 1.0, (1, C, E, E));
    let pts = PointInputs {
        coords: Tensor::new(&[[[20f32, 30.]]], &dev).unwrap(),
        labels: Tensor::new(&[[1f32]], &dev).unwrap(),
    };
    let target = seeded_randn(8, 1.0, (1, 1, S / 4, S / 4));
    let loss = || {
        let o = heads.forward(&feat, Some(&pts), None, None, Multimask::Single).unwrap();
        let m = (o.low_res_masks * &target).unwrap().mean_all().unwrap();
        (m + o.ious.sum_all().unwrap()).unwrap()
    };
    let grads = loss().backward().unwrap();
    let data = vm.data().lock().unwrap();
    for name in [
        "sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "sam_mask_decoder.transformer.layers.1.norm4.weight",
        "sam_mask_decoder.output_upscaling.0.weight",
        "sam_mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
        "sam_mask_decoder.iou_prediction_head.layers.0.weight",
        "sam_prompt_encoder.point_embeddings.1.weight",
    ] {
        let var = data.get(name).unwrap_or_else(|| panic!("no var {name}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        // Finite difference along the gradient's own largest entry.
        let flat_g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let (idx, &gi) = flat_g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        assert!(gi.abs() > 0.0, "{name}: zero gradient");
        let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-3f32;
        let at = |delta: f32| {
            let mut w = orig.clone();
            w[idx] += delta;
            var.set(&Tensor::from_vec(w, var.shape(), &dev).unwrap()).unwrap();
            loss().to_scalar::<f32>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        let rel = (fd - gi).abs() / gi.abs().max(1e-3);
        assert!(rel < 5e-2, "{name}[{idx}]: analytic {gi} vs finite difference {fd}");
    }
}
