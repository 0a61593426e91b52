//! PMA acts: the gate, the dependence on the pseudo-mask, hard mode with p ≡ 1 and the
//! fully-masked fallback.

mod common;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use common::{disc_logits, max_abs_diff, norm, set_var, Rng};
use sgp_pma::{AttentionBackend, MaskMode, PmaConfig, PseudoMaskAttention};

const C: usize = 32;
const E: usize = 4;

fn block(cfg: &PmaConfig) -> (PseudoMaskAttention, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let pma = PseudoMaskAttention::new(cfg, C, vb.pp("pma")).unwrap();
    (pma, varmap)
}

fn cfg(mode: MaskMode) -> PmaConfig {
    PmaConfig {
        num_heads: 4,
        mode,
        ..PmaConfig::default()
    }
}

fn features(seed: u64) -> Tensor {
    Rng::new(seed).tensor(&[2, C, E, E], 1.0, DType::F32)
}

/// Plain multi-head self-attention with the block's own projections, from candle ops.
fn plain_attention(pma: &PseudoMaskAttention, f: &Tensor) -> Tensor {
    let (b, l, heads) = (f.dim(0).unwrap(), E * E, pma.config().num_heads);
    let d = C / heads;
    let (xn, xq) = pma.token_inputs(f).unwrap();
    let [qp, kp, vp, op] = pma.projections();
    let split = |t: Tensor| {
        t.reshape((b, l, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let q = split(qp.forward(&xq).unwrap());
    let k = split(kp.forward(&xq).unwrap());
    let v = split(vp.forward(&xn).unwrap());
    let logits = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let a = candle_nn::ops::softmax(&logits, D::Minus1).unwrap().matmul(&v).unwrap();
    op.forward(&a.transpose(1, 2).unwrap().reshape((b, l, C)).unwrap())
        .unwrap()
}

#[test]
fn gate_zero_is_identity_and_nonzero_gate_changes_the_output_by_mask() {
    let (pma, varmap) = block(&cfg(MaskMode::Soft));
    let f = features(1);
    // Two different pseudo-masks per item (S/4 = 16 px logits).
    let m1 = disc_logits(16, &[(5.0, 5.0), (10.0, 8.0)], &[3.0, 4.0]);
    let m2 = disc_logits(16, &[(11.0, 11.0), (4.0, 12.0)], &[3.0, 3.0]);

    let out0 = pma.forward(&f, &m1).unwrap();
    assert_eq!(
        max_abs_diff(&out0.features, &f),
        0.0,
        "γ = 0 must leave F' exactly unchanged"
    );
    assert!(norm(&out0.z) > 0.0, "Z must be non-zero so that γ can learn");

    set_var(&varmap, "pma.gamma", &Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
    let a = pma.forward(&f, &m1).unwrap().features;
    let b = pma.forward(&f, &m2).unwrap().features;
    let change = max_abs_diff(&a, &f);
    let between = max_abs_diff(&a, &b);
    assert!(change > 1e-2, "γ ≠ 0 changes F'' (max change {change})");
    assert!(
        between > 1e-2,
        "different pseudo-masks give different F'' (max diff {between})"
    );
    // The change is not a global rescaling: per-token, it follows p.
    let za = (&a - &f).unwrap();
    let zb = (&b - &f).unwrap();
    let rel = norm(&(&za - &zb).unwrap()) / norm(&za);
    assert!(rel > 0.1, "Z depends on the mask, relative difference {rel}");
    // In soft mode the key bias alone (before ⊙p) also depends on the mask.
    let p1 = pma.key_map(&m1, E).unwrap();
    let p2 = pma.key_map(&m2, E).unwrap();
    let att1 = pma.attend(&f, &p1).unwrap();
    let att2 = pma.attend(&f, &p2).unwrap();
    assert!(max_abs_diff(&att1, &att2) > 1e-3, "the key bias changes the attention");
}

#[test]
fn hard_mode_with_p_one_equals_plain_attention() {
    for backend in [AttentionBackend::Fused, AttentionBackend::Reference] {
        let (pma, _) = block(&PmaConfig {
            backend,
            ..cfg(MaskMode::Hard)
        });
        let f = features(2);
        let ones = Tensor::ones((2, E * E), DType::F32, &Device::Cpu).unwrap();
        let ours = pma.attend(&f, &ones).unwrap();
        let plain = plain_attention(&pma, &f);
        let err = max_abs_diff(&ours, &plain);
        assert!(
            err < 1e-5,
            "{backend:?}: hard mode with p ≡ 1 differs from plain attention by {err}"
        );
        // And Z = Attn ⊙ 1 through the whole block (logits saturating to p = 1).
        let all_fg = Tensor::full(30f32, (2, 1, 16, 16), &Device::Cpu).unwrap();
        let out = pma.forward(&f, &all_fg).unwrap();
        let z_tokens = out.z.flatten_from(2).unwrap().transpose(1, 2).unwrap();
        assert!(max_abs_diff(&z_tokens, &plain) < 1e-5);
    }
}

#[test]
fn fully_masked_rows_fall_back_to_plain_attention() {
    let f = features(3);
    let zeros = Tensor::zeros((2, E * E), DType::F32, &Device::Cpu).unwrap();
    for mode in [MaskMode::Hard, MaskMode::Soft] {
        let (pma, varmap) = block(&cfg(mode));
        // Hard: every key has p < 0.5, so each row attends to all keys (kernel fallback);
        // soft: every key gets the same bias ln ε, which softmax cancels.
        let ours = pma.attend(&f, &zeros).unwrap();
        assert!(common::values(&ours).iter().all(|v| v.is_finite()), "{mode:?}: NaN/Inf");
        let err = max_abs_diff(&ours, &plain_attention(&pma, &f));
        assert!(
            err < 1e-5,
            "{mode:?}: fully masked rows differ from plain attention by {err}"
        );
        // A partly masked map does change the result in both modes.
        let mut half = vec![0f32; 2 * E * E];
        for (i, v) in half.iter_mut().enumerate() {
            *v = if i % 3 == 0 { 1.0 } else { 0.0 };
        }
        let half = Tensor::from_vec(half, (2, E * E), &Device::Cpu).unwrap();
        assert!(max_abs_diff(&pma.attend(&f, &half).unwrap(), &ours) > 1e-4);
        // The ⊙p product then silences Z where the pseudo-mask is empty.
        set_var(&varmap, "pma.gamma", &Tensor::new(&[1f32], &Device::Cpu).unwrap());
        let empty = Tensor::full(-30f32, (2, 1, 16, 16), &Device::Cpu).unwrap();
        let out = pma.forward(&f, &empty).unwrap();
        assert!(norm(&out.z) < 1e-6 * norm(&f));
    }
}

#[test]
fn bad_configs_and_inputs_are_errors() {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let bad_heads = PmaConfig {
        num_heads: 5,
        ..PmaConfig::default()
    };
    assert!(PseudoMaskAttention::new(&bad_heads, C, vb.clone()).is_err());
    let bad_eps = PmaConfig {
        eps: 0.0,
        num_heads: 4,
        ..PmaConfig::default()
    };
    assert!(PseudoMaskAttention::new(&bad_eps, C, vb).is_err());
    let (pma, _) = block(&cfg(MaskMode::Soft));
    let f = features(4);
    let wrong_batch = Tensor::zeros((3, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(pma.forward(&f, &wrong_batch).is_err());
    let wrong_width = Tensor::zeros((2, C + 1, E, E), DType::F32, &Device::Cpu).unwrap();
    let m = Tensor::zeros((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(pma.forward(&wrong_width, &m).is_err());
}
