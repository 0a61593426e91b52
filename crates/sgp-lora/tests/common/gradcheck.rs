//! Finite-difference check of the LoRA gradients.
#![allow(dead_code)]

use candle_core::{Tensor, Var};

/// Central differences on `picks` entries of each var vs the autograd gradient of
/// `loss()`. Returns the worst relative error `|g - fd| / max(|g|, |fd|, floor)` and the
/// number of entries whose autograd gradient is non-zero.
pub fn check(vars: &[(String, Var)], loss: &dyn Fn() -> Tensor, eps: f64, picks: usize, floor: f64) -> (f64, usize) {
    let l = loss();
    let grads = l.backward().unwrap();
    let mut worst = 0.0f64;
    let mut nonzero = 0;
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reaches {name}"));
        let g: Vec<f64> = super::values(g);
        let original = var.as_tensor().copy().unwrap();
        let base: Vec<f64> = super::values(&original);
        let n = base.len();
        for p in 0..picks.min(n) {
            // Spread the picked entries over the tensor.
            let idx = (p * 7919 + 13) % n;
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let t = Tensor::from_vec(v, original.shape(), original.device())
                    .unwrap()
                    .to_dtype(original.dtype())
                    .unwrap();
                var.set(&t).unwrap();
                loss()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&original).unwrap();
            let err = (g[idx] - fd).abs() / g[idx].abs().max(fd.abs()).max(floor);
            if g[idx] != 0.0 {
                nonzero += 1;
            }
            assert!(err.is_finite(), "{name}[{idx}]: autograd {} vs fd {fd}", g[idx]);
            worst = worst.max(err);
            if err > 1e-2 {
                eprintln!(
                    "{name}[{idx}]: autograd {} vs finite difference {fd} (rel err {err:.2e})",
                    g[idx]
                );
            }
        }
    }
    (worst, nonzero)
}
