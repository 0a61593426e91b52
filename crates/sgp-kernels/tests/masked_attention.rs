//! The fused masked attention against the naive candle composition (forward and autograd)
//! and against finite differences. Sizes are small but cross the kernels' tile edges
//! (64/128 query rows, 64/256 keys) and include odd lengths and Lq != Lk.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sgp_kernels::masked_attention::{
    masked_attention, naive_masked_attention, MaskMode, MaskedAttentionOptions, QueryScaling,
};

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn randn(rng: &mut StdRng, shape: &[usize], amp: f32) -> R<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * amp).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// A probability map with exact 0s and 1s mixed with uniform values (kept away from the
/// hard threshold 0.5 and from soft eps ties so gradients are well defined).
fn prob_map(rng: &mut StdRng, shape: &[usize]) -> R<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u: f32 = rng.random();
            if u < 0.15 {
                0.0
            } else if u < 0.3 {
                1.0
            } else {
                let x: f32 = rng.random();
                if (x - 0.5).abs() < 0.01 {
                    0.7
                } else {
                    x
                }
            }
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> R<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    assert!(a.iter().all(|x| x.is_finite()), "non-finite values");
    Ok(if den == 0.0 { num } else { num / den })
}

#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    per_query: bool,
    mode: MaskMode,
    scaling: u8, // 0 off, 1 from key map, 2 explicit map
}

const SIZES: &[(usize, usize, usize, usize, usize)] = &[
    (1, 1, 1, 1, 1),
    (1, 1, 5, 7, 3),
    (2, 3, 17, 33, 8),
    (2, 2, 150, 300, 8), // several tiles in every pass
    (1, 2, 129, 129, 16),
];

fn modes() -> Vec<MaskMode> {
    vec![
        MaskMode::default(),
        MaskMode::Soft { eps: 1e-12 },
        MaskMode::Soft { eps: 0.5 },
        MaskMode::Hard,
    ]
}

fn cases() -> Vec<Case> {
    let mut out = vec![];
    for &(b, h, lq, lk, d) in SIZES {
        for mode in modes() {
            for per_query in [false, true] {
                for scaling in [0u8, 1, 2] {
                    if scaling == 1 && (per_query || lq != lk) {
                        continue;
                    }
                    out.push(Case {
                        b,
                        h,
                        lq,
                        lk,
                        d,
                        per_query,
                        mode,
                        scaling,
                    });
                }
            }
        }
    }
    out
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    p: Tensor,
    qmap: Tensor,
}

fn inputs(rng: &mut StdRng, c: &Case) -> R<Inputs> {
    let pshape: Vec<usize> = if c.per_query {
        vec![c.b, c.lq, c.lk]
    } else {
        vec![c.b, c.lk]
    };
    Ok(Inputs {
        q: randn(rng, &[c.b, c.h, c.lq, c.d], 2.0)?,
        k: randn(rng, &[c.b, c.h, c.lk, c.d], 2.0)?,
        v: randn(rng, &[c.b, c.h, c.lk, c.d], 1.0)?,
        p: prob_map(rng, &pshape)?,
        qmap: prob_map(rng, &[c.b, c.lq])?,
    })
}

fn opts<'a>(c: &Case, qmap: &'a Tensor) -> MaskedAttentionOptions<'a> {
    MaskedAttentionOptions {
        mode: c.mode,
        softmax_scale: None,
        query_scaling: match c.scaling {
            0 => QueryScaling::Off,
            1 => QueryScaling::FromKeyMap,
            _ => QueryScaling::Map(qmap),
        },
    }
}

#[test]
fn forward_matches_naive() -> R<()> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut worst = 0f64;
    for c in cases() {
        let x = inputs(&mut rng, &c)?;
        let o = opts(&c, &x.qmap);
        let fused = masked_attention(&x.q, &x.k, &x.v, &x.p, &o)?;
        let naive = naive_masked_attention(&x.q, &x.k, &x.v, &x.p, &o)?;
        assert_eq!(fused.dims(), naive.dims());
        let err = rel_l2(&fused, &naive)?;
        assert!(err < 1e-5, "{c:?}: relative error {err}");
        worst = worst.max(err);
    }
    eprintln!("forward: worst relative L2 error {worst:e}");
    Ok(())
}

#[test]
fn gradients_match_naive_autograd() -> R<()> {
    let mut rng = StdRng::seed_from_u64(2);
    let mut worst = 0f64;
    for c in cases() {
        let x = inputs(&mut rng, &c)?;
        let w = randn(&mut rng, &[c.b, c.h, c.lq, c.d], 1.0)?;
        let mut grads = vec![];
        for fused in [true, false] {
            let vars: Vec<Var> = [&x.q, &x.k, &x.v, &x.p, &x.qmap]
                .iter()
                .map(|t| Var::from_tensor(t))
                .collect::<candle_core::Result<_>>()?;
            let qmap = vars[4].as_tensor().clone();
            let o = opts(&c, &qmap);
            let f = if fused {
                masked_attention
            } else {
                naive_masked_attention
            };
            let out = f(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                vars[3].as_tensor(),
                &o,
            )?;
            let loss = (out * &w)?.sum_all()?;
            let g = loss.backward()?;
            let per_var: Vec<Option<Tensor>> = vars.iter().map(|v| g.get(v.as_tensor()).cloned()).collect();
            grads.push(per_var);
        }
        let names = ["q", "k", "v", "p", "qmap"];
        for (i, name) in names.iter().enumerate() {
            match (&grads[0][i], &grads[1][i]) {
                (Some(a), Some(b)) => {
                    let err = rel_l2(a, b)?;
                    assert!(err < 1e-5, "{c:?}: d{name} relative error {err}");
                    worst = worst.max(err);
                }
                (None, None) => {}
                // Hard mode: the naive graph routes p through `ge`, which passes no gradient;
                // ours returns None. Either way no gradient reaches p from the mask.
                (a, b) => {
                    let zero_or_none = |t: &Option<Tensor>| -> R<bool> {
                        Ok(match t {
                            None => true,
                            Some(t) => t.abs()?.max_all()?.to_scalar::<f32>()? == 0.0,
                        })
                    };
                    assert!(
                        zero_or_none(a)? && zero_or_none(b)?,
                        "{c:?}: d{name} present in only one of fused/naive"
                    );
                }
            }
        }
        // q, k, v always get gradients from the fused op.
        for i in 0..3 {
            assert!(grads[0][i].is_some(), "{c:?}: missing d{}", names[i]);
        }
        if matches!(c.mode, MaskMode::Soft { .. }) {
            assert!(grads[0][3].is_some(), "{c:?}: soft mode must give dp");
        }
    }
    eprintln!("gradients: worst relative L2 error {worst:e}");
    Ok(())
}

/// Loss `sum(out ⊙ w)` accumulated in f64.
fn loss_of(out: &Tensor, w: &[f64]) -> R<f64> {
    let o = out.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(o.iter().zip(w).map(|(a, b)| a * b).sum())
}

#[test]
fn gradients_match_finite_differences() -> R<()> {
    // Soft mode with a per-query map and explicit query scaling exercises every gradient.
    let mut rng = StdRng::seed_from_u64(3);
    for per_query in [false, true] {
        let c = Case {
            b: 2,
            h: 2,
            lq: 6,
            lk: 9,
            d: 4,
            per_query,
            mode: MaskMode::Soft { eps: 1e-3 },
            scaling: 2,
        };
        let x = inputs(&mut rng, &c)?;
        // FD needs p away from the kink at eps and from 0.
        let p = (x.p.affine(0.8, 0.1))?;
        let w: Vec<f64> = (0..c.b * c.h * c.lq * c.d)
            .map(|_| rng.random::<f64>() * 2.0 - 1.0)
            .collect();
        let wt = Tensor::from_vec(
            w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (c.b, c.h, c.lq, c.d),
            &Device::Cpu,
        )?;
        let vars: Vec<Var> = [&x.q, &x.k, &x.v, &p]
            .iter()
            .map(|t| Var::from_tensor(t))
            .collect::<candle_core::Result<_>>()?;
        let o = opts(&c, &x.qmap);
        let out = masked_attention(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            vars[3].as_tensor(),
            &o,
        )?;
        let g = (out * &wt)?.sum_all()?.backward()?;
        let base: Vec<Tensor> = vec![x.q.clone(), x.k.clone(), x.v.clone(), p.clone()];
        for (vi, var) in vars.iter().enumerate() {
            let grad = g
                .get(var.as_tensor())
                .ok_or("missing gradient")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let flat = base[vi].flatten_all()?.to_vec1::<f32>()?;
            let n = flat.len();
            for idx in [0, n / 3, n / 2, n - 1] {
                let step = 1e-2f32;
                let eval = |delta: f32| -> R<f64> {
                    let mut f = flat.clone();
                    f[idx] += delta;
                    let t = Tensor::from_vec(f, base[vi].shape(), &Device::Cpu)?;
                    let mut args = base.clone();
                    args[vi] = t;
                    loss_of(&masked_attention(&args[0], &args[1], &args[2], &args[3], &o)?, &w)
                };
                let fd = (eval(step)? - eval(-step)?) / (2.0 * step as f64);
                let an = grad[idx] as f64;
                assert!(
                    (fd - an).abs() <= 2e-3 * (1.0 + an.abs()),
                    "input {vi} index {idx} (per_query={per_query}): analytic {an}, finite difference {fd}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn hard_mode_fully_masked_rows_fall_back_to_plain_attention() -> R<()> {
    let mut rng = StdRng::seed_from_u64(4);
    let (b, h, l, d) = (2, 2, 70, 8);
    let q = randn(&mut rng, &[b, h, l, d], 2.0)?;
    let k = randn(&mut rng, &[b, h, l, d], 2.0)?;
    let v = randn(&mut rng, &[b, h, l, d], 1.0)?;
    let all_masked = Tensor::full(0.2f32, (b, l), &Device::Cpu)?;
    let ones = Tensor::ones((b, l), DType::F32, &Device::Cpu)?;
    let hard = MaskedAttentionOptions {
        mode: MaskMode::Hard,
        ..Default::default()
    };
    let plain = naive_masked_attention(&q, &k, &v, &ones, &MaskedAttentionOptions::default())?;
    let fused = masked_attention(&q, &k, &v, &all_masked, &hard)?;
    assert!(rel_l2(&fused, &plain)? < 1e-5);

    // Per-query map: even rows fully masked, odd rows keep only key 3.
    let mut pq = vec![0f32; b * l * l];
    for bi in 0..b {
        for i in (1..l).step_by(2) {
            pq[(bi * l + i) * l + 3] = 1.0;
        }
    }
    let pq = Tensor::from_vec(pq, (b, l, l), &Device::Cpu)?;
    let fused = masked_attention(&q, &k, &v, &pq, &hard)?;
    let v3 = v.narrow(2, 3, 1)?.broadcast_as((b, h, l, d))?;
    for i in 0..l {
        let row = fused.narrow(2, i, 1)?;
        let want = if i % 2 == 1 {
            v3.narrow(2, i, 1)?
        } else {
            plain.narrow(2, i, 1)?
        };
        assert!(rel_l2(&row, &want)? < 1e-5, "row {i}");
    }
    Ok(())
}

#[test]
fn soft_mode_with_unit_map_is_plain_attention() -> R<()> {
    let mut rng = StdRng::seed_from_u64(5);
    let (b, h, lq, lk, d) = (1, 3, 40, 77, 16);
    let q = randn(&mut rng, &[b, h, lq, d], 2.0)?;
    let k = randn(&mut rng, &[b, h, lk, d], 2.0)?;
    let v = randn(&mut rng, &[b, h, lk, d], 1.0)?;
    let ones = Tensor::ones((b, lk), DType::F32, &Device::Cpu)?;
    let out = masked_attention(&q, &k, &v, &ones, &MaskedAttentionOptions::default())?;
    // Plain softmax attention written out by hand.
    let logits = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
    let plain = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?.matmul(&v)?;
    assert!(rel_l2(&out, &plain)? < 1e-5);
    Ok(())
}

#[test]
fn half_precision_inputs_are_accepted() -> R<()> {
    let mut rng = StdRng::seed_from_u64(6);
    let c = Case {
        b: 2,
        h: 2,
        lq: 33,
        lk: 65,
        d: 8,
        per_query: false,
        mode: MaskMode::default(),
        scaling: 2,
    };
    let x = inputs(&mut rng, &c)?;
    for dt in [DType::BF16, DType::F16] {
        let (q, k, v, p, qm) = (
            x.q.to_dtype(dt)?,
            x.k.to_dtype(dt)?,
            x.v.to_dtype(dt)?,
            x.p.to_dtype(dt)?,
            x.qmap.to_dtype(dt)?,
        );
        let o = opts(&c, &qm);
        let fused = masked_attention(&q, &k, &v, &p, &o)?;
        assert_eq!(fused.dtype(), dt);
        // Reference on the same (rounded) values in f32.
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let qm32 = up(&qm)?;
        let o32 = opts(&c, &qm32);
        let want = naive_masked_attention(&up(&q)?, &up(&k)?, &up(&v)?, &up(&p)?, &o32)?;
        let err = rel_l2(&fused, &want)?;
        assert!(err < 1e-2, "{dt:?}: relative error {err}");
        // Gradients flow back in the input dtype.
        let qv = Var::from_tensor(&q)?;
        let g = masked_attention(qv.as_tensor(), &k, &v, &p, &o)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .backward()?;
        assert_eq!(g.get(qv.as_tensor()).ok_or("no dq")?.dtype(), dt);
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors_not_panics() -> R<()> {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev)?;
    let k = Tensor::zeros((1, 2, 5, 8), DType::F32, &dev)?;
    let p = Tensor::ones((1, 5), DType::F32, &dev)?;
    let def = MaskedAttentionOptions::default();
    assert!(masked_attention(&q, &k, &k, &p, &def).is_ok());
    // Wrong p shapes.
    assert!(masked_attention(&q, &k, &k, &Tensor::ones((1, 4), DType::F32, &dev)?, &def).is_err());
    assert!(masked_attention(&q, &k, &k, &Tensor::ones((1, 5, 5), DType::F32, &dev)?, &def).is_err());
    // Mismatched heads / dims.
    let k_bad = Tensor::zeros((1, 2, 5, 4), DType::F32, &dev)?;
    assert!(masked_attention(&q, &k_bad, &k_bad, &p, &def).is_err());
    assert!(masked_attention(&q, &k, &k_bad, &p, &def).is_err());
    assert!(masked_attention(&q.flatten(0, 1)?, &k, &k, &p, &def).is_err());
    // No keys.
    let k0 = Tensor::zeros((1, 2, 0, 8), DType::F32, &dev)?;
    assert!(masked_attention(&q, &k0, &k0, &Tensor::ones((1, 0), DType::F32, &dev)?, &def).is_err());
    // Query scaling from a key map needs self-attention.
    let fk = MaskedAttentionOptions {
        query_scaling: QueryScaling::FromKeyMap,
        ..def
    };
    assert!(masked_attention(&q, &k, &k, &p, &fk).is_err());
    let qmap = Tensor::ones((1, 5), DType::F32, &dev)?;
    let bad_map = MaskedAttentionOptions {
        query_scaling: QueryScaling::Map(&qmap),
        ..def
    };
    assert!(masked_attention(&q, &k, &k, &p, &bad_map).is_err());
    // eps must be positive.
    for eps in [0.0, -1.0, f32::NAN] {
        let o = MaskedAttentionOptions {
            mode: MaskMode::Soft { eps },
            ..def
        };
        assert!(masked_attention(&q, &k, &k, &p, &o).is_err());
    }
    // Integer inputs.
    let qi = q.to_dtype(DType::U32)?;
    assert!(masked_attention(&qi, &k, &k, &p, &def).is_err());
    Ok(())
}

#[test]
fn non_contiguous_inputs_are_handled() -> R<()> {
    let mut rng = StdRng::seed_from_u64(7);
    // [B,L,H,D] transposed to [B,H,L,D], the usual layout after a head split.
    let q = randn(&mut rng, &[2, 19, 3, 8], 1.0)?.transpose(1, 2)?;
    let k = randn(&mut rng, &[2, 23, 3, 8], 1.0)?.transpose(1, 2)?;
    let v = randn(&mut rng, &[2, 23, 3, 8], 1.0)?.transpose(1, 2)?;
    let p = prob_map(&mut rng, &[2, 23])?;
    let o = MaskedAttentionOptions::default();
    let fused = masked_attention(&q, &k, &v, &p, &o)?;
    let naive = naive_masked_attention(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, &p, &o)?;
    assert!(rel_l2(&fused, &naive)? < 1e-5);
    Ok(())
}

#[test]
fn backward_is_independent_of_the_thread_pool() -> R<()> {
    // dQ is accumulated per rayon thread; any pool size must give the naive gradients.
    let mut rng = StdRng::seed_from_u64(8);
    let c = Case {
        b: 2,
        h: 2,
        lq: 140,
        lk: 270,
        d: 8,
        per_query: true,
        mode: MaskMode::default(),
        scaling: 0,
    };
    let x = inputs(&mut rng, &c)?;
    let grads = |fused: bool| -> R<Vec<Tensor>> {
        let vars: Vec<Var> = [&x.q, &x.k, &x.v, &x.p]
            .iter()
            .map(|t| Var::from_tensor(t))
            .collect::<candle_core::Result<_>>()?;
        let f = if fused {
            masked_attention
        } else {
            naive_masked_attention
        };
        let out = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            vars[3].as_tensor(),
            &opts(&c, &x.qmap),
        )?;
        let g = out.sqr()?.sum_all()?.backward()?;
        Ok(vars
            .iter()
            .map(|v| g.get(v.as_tensor()).cloned().ok_or("missing gradient"))
            .collect::<Result<_, _>>()?)
    };
    let want = grads(false)?;
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let got = pool.install(|| grads(true).map_err(|e| e.to_string()))?;
        for (a, b) in got.iter().zip(&want) {
            let err = rel_l2(a, b)?;
            assert!(err < 1e-5, "{threads} threads: relative error {err}");
        }
    }
    Ok(())
}

/// The forward-only plain attention with values narrower, as wide as, and wider than the
/// keys, against matmul → softmax → matmul; lengths cross the 64/128/256-row query tiles
/// and the 256-key tiles (and, on AVX-512 CPUs, the 64-query panels, 16-query vectors and
/// 6-column micro-tiles of its kernel there; the last shape is SAM2's memory attention,
/// one 256-wide head over 64-channel values, with ragged ends).
#[test]
fn plain_attention_matches_the_composition_for_any_value_width() -> R<()> {
    use sgp_kernels::masked_attention::attention_inference;
    let mut rng = StdRng::seed_from_u64(11);
    for &(b, h, lq, lk, d, dv) in &[
        (1, 1, 300, 600, 32, 8),
        (2, 2, 65, 257, 16, 16),
        (1, 3, 7, 5, 8, 24),
        (1, 1, 1, 1, 4, 1),
        (1, 1, 530, 1031, 256, 64),
    ] {
        let q = randn(&mut rng, &[b, h, lq, d], 2.0)?;
        let k = randn(&mut rng, &[b, h, lk, d], 2.0)?;
        let v = randn(&mut rng, &[b, h, lk, dv], 1.0)?;
        let ours = attention_inference(&q, &k, &v)?;
        let logits = (q.matmul(&k.t()?)? / (d as f64).sqrt())?;
        let reference = candle_nn::ops::softmax_last_dim(&logits)?.matmul(&v)?;
        assert_eq!(ours.dims(), [b, h, lq, dv]);
        let diff = sgp_kernels::testing::max_abs_diff(&ours, &reference)?;
        assert!(diff < 1e-5, "{:?}: {diff}", (b, h, lq, lk, d, dv));
    }
    Ok(())
}

#[test]
fn plain_attention_refuses_mismatched_and_tracked_inputs() -> R<()> {
    use sgp_kernels::masked_attention::attention_inference;
    let mut rng = StdRng::seed_from_u64(12);
    let q = randn(&mut rng, &[1, 1, 4, 8], 1.0)?;
    let k = randn(&mut rng, &[1, 1, 6, 8], 1.0)?;
    let short_v = randn(&mut rng, &[1, 1, 5, 8], 1.0)?;
    let err = attention_inference(&q, &k, &short_v).unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
    let tracked = Var::from_tensor(&k)?;
    let err = attention_inference(&q, tracked.as_tensor(), &k).unwrap_err();
    assert!(err.to_string().contains("tracked"), "{err}");
    Ok(())
}
