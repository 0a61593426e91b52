//! Gradients reach γ, every PMA and decoder parameter and the LoRA adapters, and match
//! finite differences. No op on the path drops its gradient silently: every parameter's
//! gradient is checked to be non-zero *and* equal to central differences.
//!
//! - f64, PMA alone (reference attention, exact in f64): step 1e-5, tolerance 1e-6.
//! - f64, stage-2 decoder alone (incl. its inputs from stage 1): step 1e-5, tolerance 1e-4
//!   (observed 3e-5: candle's GELU backward uses the 6-digit constant 0.398942, and the
//!   worst entries are small sums with cancellation).
//! - f32, the whole head on the reduced SAM2.1 model with the fused kernel: step 1e-2,
//!   tolerance 3e-2 relative with a floor of 1e-2·max|g| (f32 rounding), plus the fused
//!   kernel's gradients against the reference attention's, to 1e-4.
//! - f32, LoRA adapters on the Hiera trunk through features → PMA → decoder: every adapter
//!   tensor gets a non-zero gradient, and directional derivatives (along the gradient,
//!   and along mixes of it with random directions) match central differences (step 1e-3
//!   for LoRA, 1e-2 for the PMG outputs) to 2e-2 (per-entry differences through the whole trunk drown in f32 rounding).
//!   The same check covers the gradient into the PMG outputs (`F'`, high-res features).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{fd_check, image, norm, pmg_parts, reduced_model, set_var, vars, Rng};
use sgp_pma::{
    AttentionBackend, DecoderConfig, HeadDims, HierarchicalDecoder, PmaConfig, PseudoMaskAttention, SgpHead,
    SgpHeadConfig, Stage2Inputs,
};

/// A fixed random linear functional of `t`, so every output element carries gradient.
fn probe(t: &Tensor, seed: u64) -> Tensor {
    let w = Rng::new(seed).tensor(t.dims(), 1.0, t.dtype());
    let n = t.elem_count() as f64;
    ((t * w).unwrap().sum_all().unwrap() / n.sqrt()).unwrap()
}

#[test]
fn pma_gradients_match_finite_differences_in_f64() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = PmaConfig {
        num_heads: 4,
        backend: AttentionBackend::Reference,
        ..PmaConfig::default()
    };
    let pma = PseudoMaskAttention::new(&cfg, 32, vb.pp("pma")).unwrap();
    common::reseed(&varmap, 11);
    set_var(&varmap, "pma.gamma", &Tensor::new(&[0.7f64], &Device::Cpu).unwrap());
    // Non-trivial norm affine so its gradient is generic.
    set_var(
        &varmap,
        "pma.norm.weight",
        &(Rng::new(1).tensor(&[32], 0.2, DType::F64) + 1.0).unwrap(),
    );
    let f = Rng::new(2).tensor(&[2, 32, 4, 4], 1.0, DType::F64);
    let m = common::disc_logits(16, &[(5.0, 6.0), (10.0, 9.0)], &[4.0, 5.0])
        .to_dtype(DType::F64)
        .unwrap();
    let loss = || probe(&pma.forward(&f, &m).unwrap().features, 3);
    let vs = vars(&varmap);
    assert_eq!(
        vs.len(),
        10,
        "norm (2), q/k/v/out (7, no key bias) and γ: {:?}",
        vs.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    let worst = fd_check(&vs, &loss, 1e-5, 6, 1e-8);
    assert!(worst < 1e-6, "PMA f64 gradient check: worst relative error {worst:.2e}");
}

#[test]
fn decoder_gradients_match_finite_differences_in_f64() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let dims = HeadDims {
        hidden_dim: 32,
        num_mask_tokens: 4,
        use_high_res_features: true,
    };
    let cfg = DecoderConfig {
        dim_s4: 16,
        dim_s2: 8,
        dim_s1: 8,
        stem_dim: 8,
    };
    let dec = HierarchicalDecoder::new(&cfg, dims, vb.pp("decoder")).unwrap();
    common::reseed(&varmap, 12);
    set_var(
        &varmap,
        "decoder.out.weight",
        &Rng::new(4).tensor(&[1, 8], 0.5, DType::F64),
    );
    set_var(
        &varmap,
        "decoder.norm.weight",
        &(Rng::new(5).tensor(&[16], 0.2, DType::F64) + 1.0).unwrap(),
    );
    let mut rng = Rng::new(6);
    let mut input = |dims: &[usize], name: &str| -> (String, Var) {
        (
            name.to_string(),
            Var::from_tensor(&rng.tensor(dims, 1.0, DType::F64)).unwrap(),
        )
    };
    // Stage 1's outputs are inputs here: their gradients flow back into SAM2's decoder.
    let tokens = input(&[2, 4, 32], "in.mask_tokens");
    let up = input(&[2, 4, 16, 16], "in.upscaled_embedding");
    let s1 = input(&[2, 1, 16, 16], "in.stage1_logits");
    let f4 = input(&[2, 4, 16, 16], "in.feat_s4");
    let f8 = input(&[2, 8, 8, 8], "in.feat_s8");
    let img = Rng::new(7).tensor(&[2, 3, 64, 64], 1.0, DType::F64);
    let loss = || {
        let r = dec
            .forward(&Stage2Inputs {
                mask_tokens: tokens.1.as_tensor(),
                upscaled_embedding: up.1.as_tensor(),
                stage1_logits: s1.1.as_tensor(),
                high_res_features: Some((f4.1.as_tensor(), f8.1.as_tensor())),
                image: &img,
            })
            .unwrap();
        probe(&r, 8)
    };
    let mut vs = vars(&varmap);
    assert_eq!(vs.len(), 25, "{:?}", vs.iter().map(|v| &v.0).collect::<Vec<_>>());
    vs.extend([tokens.clone(), up.clone(), s1.clone(), f4.clone(), f8.clone()]);
    let worst = fd_check(&vs, &loss, 1e-5, 5, 1e-8);
    assert!(
        worst < 1e-4,
        "decoder f64 gradient check: worst relative error {worst:.2e}"
    );
}

fn active_head(model: &sgp_sam2::Sam2Model, backend: AttentionBackend) -> (SgpHead, VarMap) {
    let mut cfg = SgpHeadConfig::default();
    cfg.pma.num_heads = 4;
    cfg.pma.backend = backend;
    let (head, varmap) = SgpHead::init(&cfg, HeadDims::of(model), &Device::Cpu, 21).unwrap();
    // Leave the zero-start point: with γ = 0 and R = 0 the attention and the decoder's
    // inner layers receive no gradient by construction.
    set_var(&varmap, "pma.gamma", &Tensor::new(&[0.6f32], &Device::Cpu).unwrap());
    set_var(
        &varmap,
        "decoder.out.weight",
        &Rng::new(22).tensor(&[1, 16], 0.3, DType::F32),
    );
    (head, varmap)
}

#[test]
fn whole_head_gradients_reach_every_parameter_and_match_finite_differences() {
    let model = reduced_model();
    // Image seed 34 gives both items a positive object score on the fixture weights.
    let img = image(&model, 2, 34);
    let pmg = pmg_parts(&model, &img, &[4.0, 5.0]);
    let pmg = sgp_pma::PmgParts {
        pix_feat_with_mem: pmg.pix_feat_with_mem.detach(),
        ..pmg
    };
    let (head, varmap) = active_head(&model, AttentionBackend::Fused);
    let out = head.forward(&model, &pmg, &img).unwrap();
    // Stage 1 must see an object (a score <= 0 replaces its masks by the constant -1024)
    // and stay away from that switch, a step function.
    let scores = common::values(&out.object_score_logits);
    assert!(
        scores.iter().all(|&s| s > 0.05),
        "object scores must be clearly positive: {scores:?}"
    );
    let loss = || probe(&head.forward(&model, &pmg, &img).unwrap().final_logits, 41);
    let vs = vars(&varmap);
    assert_eq!(vs.len(), head.parameters().len());
    let grads = loss().backward().unwrap();
    let gmax = vs
        .iter()
        .map(|(_, v)| {
            common::values(grads.get(v.as_tensor()).unwrap())
                .iter()
                .fold(0f64, |m, x| m.max(x.abs()))
        })
        .fold(0f64, f64::max);
    let worst = fd_check(&vs, &loss, 1e-2, 3, 1e-2 * gmax);
    assert!(
        worst < 3e-2,
        "whole-head f32 gradient check: worst relative error {worst:.2e}"
    );

    // Gradients also flow back into PMG's outputs (F' and the high-res levels).
    let fv = Var::from_tensor(&pmg.pix_feat_with_mem).unwrap();
    let hr = pmg.high_res_feats.clone().unwrap();
    let (h0, h1) = (Var::from_tensor(&hr.0).unwrap(), Var::from_tensor(&hr.1).unwrap());
    let input_loss = || {
        let p = sgp_pma::PmgParts {
            pix_feat_with_mem: fv.as_tensor().clone(),
            high_res_feats: Some((h0.as_tensor().clone(), h1.as_tensor().clone())),
            ..pmg.clone()
        };
        probe(&head.forward(&model, &p, &img).unwrap().final_logits, 41)
    };
    let inputs = vec![
        ("F'".to_string(), fv.clone()),
        ("feat_s4".into(), h0.clone()),
        ("feat_s8".into(), h1.clone()),
    ];
    for (seed, random) in [(1u64, 0.0), (2, 0.5)] {
        let (gv, fd) = common::fd_directional(&inputs, &input_loss, 1e-2, seed, random);
        let err = (gv - fd).abs() / gv.abs().max(fd.abs());
        assert!(
            err < 2e-2,
            "gradient into the PMG outputs: autograd {gv} vs finite difference {fd} ({err:.2e})"
        );
    }

    // The fused kernel's backward agrees with the reference attention's.
    let cfg_ref = {
        let mut c = head.config().clone();
        c.pma.backend = AttentionBackend::Reference;
        c
    };
    let head_ref = SgpHead::new(
        &cfg_ref,
        head.dims(),
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let grads_ref = probe(&head_ref.forward(&model, &pmg, &img).unwrap().final_logits, 41)
        .backward()
        .unwrap();
    for (name, v) in &vs {
        let a = grads.get(v.as_tensor()).unwrap();
        let b = grads_ref.get(v.as_tensor()).unwrap();
        let rel = norm(&(a - b).unwrap()) / norm(b).max(1e-6 * gmax);
        assert!(rel < 1e-4, "{name}: fused vs reference gradient differ by {rel:.2e}");
    }
}

#[test]
fn gradients_reach_lora_adapters_through_features_pma_and_decoder() {
    let mut model = reduced_model();
    let lora = sgp_lora::Lora::attach(&mut model, sgp_lora::LoraConfig::new(2, 4.0).with_seed(3)).unwrap();
    lora.set_train(true);
    // B starts at zero (so A's gradient is zero there); give it values.
    let mut rng = Rng::new(51);
    for a in lora.adapters() {
        for c in a.chunks() {
            c.b.set(&rng.tensor(c.b.dims(), 0.05, c.b.dtype())).unwrap();
        }
    }
    let img = image(&model, 1, 34);
    let (head, _) = active_head(&model, AttentionBackend::Fused);
    let out = head.forward(&model, &pmg_parts(&model, &img, &[4.0]), &img).unwrap();
    let score = common::values(&out.object_score_logits)[0];
    assert!(score > 0.05, "object score must be clearly positive: {score}");
    let loss = || {
        let pmg = pmg_parts(&model, &img, &[4.0]);
        probe(&head.forward(&model, &pmg, &img).unwrap().final_logits, 53)
    };
    let mut lvars: Vec<(String, Var)> = lora
        .varmap()
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    lvars.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!lvars.is_empty());
    // Every adapter tensor gets a non-zero gradient (asserted inside), and the
    // directional derivatives match.
    for (seed, random) in [(61u64, 0.0), (62, 0.5), (63, 1.0)] {
        // Step 1e-3: larger steps cross the kinks of SAM2's ReLU MLPs and Hiera's
        // max-pooling along the gradient direction (3% at 1e-2, 1.4% at 3e-3, 1.1% at 1e-3).
        let (gv, fd) = common::fd_directional(&lvars, &loss, 1e-3, seed, random);
        let err = (gv - fd).abs() / gv.abs().max(fd.abs());
        assert!(
            err < 2e-2,
            "LoRA directional derivative: autograd {gv} vs finite difference {fd} ({err:.2e})"
        );
    }
}
