//! GELU (erf form, PyTorch's `nn.GELU()` default) for f32 on the CPU, with its backward.
//!
//! candle's `gelu_erf` evaluates a scalar f64 `erf` per element and its backward is a chain
//! of eight full-size tensor ops; at full resolution (16M values at S = 1024) that
//! dominated the decoder. Here both directions are one pass each over the data, in
//! parallel chunks, with a branch-free `erf` (Abramowitz–Stegun 7.1.26, absolute error
//! ≤ 1.5e-7, the approximation PyTorch's vectorised CPU `erf` uses) and a Cephes-style
//! `exp` that the compiler vectorises. Other dtypes and devices keep candle's ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

use crate::math::exp_f32;

/// `erf(x)` for f32 (Abramowitz–Stegun 7.1.26), absolute error ≤ 1.5e-7.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_73;
    p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * exp_f32(-a * a);
    y.copysign(x)
}

#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Φ(x) + x·φ(x)`.
#[inline(always)]
fn gelu_grad_f32(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * INV_SQRT_2PI * exp_f32(-0.5 * x * x)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "sgp-fast-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32("fast gelu", s, l)?;
        let mut y = crate::OverwriteBuf::new(x.len());
        y.slice()
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    y.write(gelu_f32(x));
                }
            });
        // SAFETY: every element was written above.
        Ok((CpuStorage::F32(unsafe { y.assume_init() }), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let x = arg.contiguous()?;
        Ok(Some(g.apply_op2_no_bwd(&x, &GeluBackward)?))
    }
}

/// `(grad, x) ↦ grad · gelu'(x)`.
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "sgp-fast-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = crate::contiguous_f32("fast gelu", gs, gl)?;
        let x = crate::contiguous_f32("fast gelu", xs, xl)?;
        if g.len() != x.len() {
            candle_core::bail!("fast gelu backward: {} gradients for {} inputs", g.len(), x.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| {
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    *o = g * gelu_grad_f32(x);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// GELU (erf form): the fast op for f32 CPU tensors (differentiable through its own
/// backward), candle's `gelu_erf` otherwise.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_gelu_matches_candle_and_its_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x64 = Tensor::arange(-12_000i64, 12_000, &dev)?
            .to_dtype(DType::F64)?
            .affine(1e-3, 0.0)?;
        let x = x64.to_dtype(DType::F32)?;
        let reference = x64.gelu_erf()?;
        let err = (gelu_erf(&x)?.to_dtype(DType::F64)? - &reference)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(err < 1e-6, "gelu differs from the f64 reference by {err}");

        let xv = candle_core::Var::from_tensor(&x)?;
        let grads = gelu_erf(xv.as_tensor())?.sum_all()?.backward()?;
        let g = grads.get(xv.as_tensor()).expect("gradient").to_dtype(DType::F64)?;
        let xv64 = candle_core::Var::from_tensor(&x64)?;
        let grads64 = xv64.as_tensor().gelu_erf()?.sum_all()?.backward()?;
        let g64 = grads64.get(xv64.as_tensor()).expect("gradient");
        let err = (g - g64)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-6, "gelu gradient differs from the f64 reference by {err}");
        Ok(())
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp_f32(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b.abs() + 1e-37, "exp({x}) = {a}, want {b}");
        }
    }
}
