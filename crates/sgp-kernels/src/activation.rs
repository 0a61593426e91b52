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

/// Values per parallel task of the in-place passes (whole rows, at least one).
fn rows_per_task(row_len: usize) -> usize {
    (CHUNK / row_len.max(1)).max(1)
}

/// `gelu(x)` of 16 lanes: the same erf (Abramowitz–Stegun 7.1.26) and exp polynomials as
/// [`gelu_f32`], with fused multiply-adds, a refined reciprocal for the division, and
/// `scalef` for the power of two. It differs from the scalar form by float rounding
/// (both are within 2e-7 of the exact GELU).
///
/// LLVM keeps the scalar loop at 8 lanes on CPUs tuned to prefer 256-bit vectors (Sapphire
/// Rapids among them), with a separate multiply and add per step: a 6.3M-value GELU took
/// 7.4 ms on 2 cores; this one takes ~2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_x16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let splat = _mm512_set1_ps;
    let one = splat(1.0);
    let sign_mask = _mm512_set1_epi32(i32::MIN);
    // erf(z), z = x/√2, a = |z|, t = 1/(1 + p·a) (14-bit reciprocal, one Newton step).
    let z = _mm512_mul_ps(x, splat(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm512_abs_ps(z);
    let d = _mm512_fmadd_ps(splat(0.327_591_1), a, one);
    let t0 = _mm512_rcp14_ps(d);
    let t = _mm512_fmadd_ps(t0, _mm512_fnmadd_ps(d, t0, one), t0);
    let mut p = splat(1.061_405_4);
    p = _mm512_fmadd_ps(p, t, splat(-1.453_152_1));
    p = _mm512_fmadd_ps(p, t, splat(1.421_413_8));
    p = _mm512_fmadd_ps(p, t, splat(-0.284_496_73));
    p = _mm512_fmadd_ps(p, t, splat(0.254_829_6));
    // exp(-a²): below e^-104 it is 0, and 1 - p·t·e is 1 well before that.
    let e = crate::math::exp_x16(_mm512_fnmadd_ps(a, a, _mm512_setzero_ps()));
    let erf_abs = _mm512_fnmadd_ps(_mm512_mul_ps(p, t), e, one);
    // erf = copysign(erf_abs, z); erf_abs ≥ 0, so its sign bit is clear.
    let erf = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(erf_abs),
        _mm512_and_si512(sign_mask, _mm512_castps_si512(z)),
    ));
    let half_x = _mm512_mul_ps(splat(0.5), x);
    _mm512_fmadd_ps(half_x, erf, half_x)
}

/// `dst[i] = gelu(src[i] + bias[i % bias.len()])` for whole rows of `bias.len()` values
/// (`src` and `dst` may be the same buffer, see [`gelu_rows_in_place`]).
///
/// # Safety
/// `src` and `dst` hold `len` values; `bias`, when given, divides `len` into rows.
unsafe fn gelu_rows_raw(src: *const f32, dst: *mut f32, len: usize, bias: Option<&[f32]>) {
    let row = bias.map_or(len, <[f32]>::len).max(1);
    #[cfg(target_arch = "x86_64")]
    if crate::math::has_avx512() {
        // SAFETY: the CPU has AVX-512F; the pointers are valid for `len` values.
        return unsafe { gelu_rows_avx512(src, dst, len, row, bias) };
    }
    for i in 0..len {
        // SAFETY: i < len.
        unsafe {
            let v = *src.add(i) + bias.map_or(0.0, |b| b[i % row]);
            *dst.add(i) = gelu_f32(v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gelu_rows_avx512(src: *const f32, dst: *mut f32, len: usize, row: usize, bias: Option<&[f32]>) {
    use std::arch::x86_64::*;
    let mut start = 0;
    while start < len {
        let width = row.min(len - start);
        let mut j = 0;
        while j < width {
            // The row's last vector is masked to the values that remain.
            let mask = crate::math::lanes16(j, width);
            // SAFETY: the masked lanes lie inside this row of `src`/`dst` (start + j +
            // lanes ≤ len) and of the bias row (j + lanes ≤ row = bias.len()).
            unsafe {
                let mut v = _mm512_maskz_loadu_ps(mask, src.add(start + j));
                if let Some(b) = bias {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, b.as_ptr().add(j)));
                }
                _mm512_mask_storeu_ps(dst.add(start + j), mask, gelu_x16(v));
            }
            j += 16;
        }
        start += width;
    }
}

/// `v ← gelu(v + bias)` over rows of `bias.len()` values (all of `v` as one row without a
/// bias), in parallel: the epilogue of a linear layer, done in place so its output is
/// read and written once while in cache, and the bias costs no pass of its own.
pub(crate) fn gelu_rows_in_place(v: &mut [f32], bias: Option<&[f32]>) {
    let task = bias.map_or(CHUNK, |b| rows_per_task(b.len()) * b.len());
    v.par_chunks_mut(task.max(1)).for_each(|c| {
        // SAFETY: src = dst = the chunk, which holds whole rows.
        unsafe { gelu_rows_raw(c.as_ptr(), c.as_mut_ptr(), c.len(), bias) }
    });
}

/// `v ← max(v + bias, 0)` over rows of `bias.len()` values, in parallel (as
/// [`gelu_rows_in_place`]).
pub(crate) fn relu_rows_in_place(v: &mut [f32], bias: Option<&[f32]>) {
    let row = bias.map_or(CHUNK, <[f32]>::len).max(1);
    v.par_chunks_mut(rows_per_task(row) * row).for_each(|c| {
        for r in c.chunks_mut(row) {
            match bias {
                Some(b) => r.iter_mut().zip(b).for_each(|(x, &b)| *x = (*x + b).max(0.0)),
                None => r.iter_mut().for_each(|x| *x = x.max(0.0)),
            }
        }
    });
}

/// The activation a linear layer's output can pass through in the same pass as its bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Erf form (PyTorch's `nn.GELU()` default).
    Gelu,
}

impl Activation {
    /// `v ← act(v + bias)` in place, over rows of `bias.len()` values.
    pub(crate) fn apply_rows_in_place(self, v: &mut [f32], bias: Option<&[f32]>) {
        match self {
            Activation::Relu => relu_rows_in_place(v, bias),
            Activation::Gelu => gelu_rows_in_place(v, bias),
        }
    }

    /// The differentiable op (any device and dtype): [`gelu_erf`] or candle's `relu`.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Relu => x.relu(),
            Activation::Gelu => gelu_erf(x),
        }
    }
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
                // SAFETY: both chunks hold y.len() values; every one is written.
                unsafe { gelu_rows_raw(x.as_ptr(), y.as_mut_ptr().cast(), y.len(), None) }
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
    fn gelu_with_bias_rows_in_place_is_accurate() -> candle_core::Result<()> {
        // Rows of 1, 16, 21 and 300 values (full, masked and scalar-free tails) and no rows.
        let dev = Device::Cpu;
        for (rows, cols) in [(5usize, 1usize), (3, 16), (7, 21), (40, 300), (0, 8)] {
            let x = Tensor::randn(0f64, 3.0, (rows, cols), &dev)?;
            let b = Tensor::randn(0f64, 1.0, cols, &dev)?;
            let want = x.broadcast_add(&b)?.gelu_erf()?;
            let mut v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let bias: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
            gelu_rows_in_place(&mut v, Some(&bias));
            let got = Tensor::from_vec(v, (rows, cols), &dev)?.to_dtype(DType::F64)?;
            if rows > 0 {
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 2e-6, "{rows}x{cols}: {err}");
            }
        }
        // Extremes: ±large, ±0, and values whose exp(-z²) underflows.
        let mut v = vec![-1e4f32, -30.0, -13.5, -0.0, 0.0, 1e-8, 13.5, 30.0, 1e4];
        let want: Vec<f32> = v.iter().map(|&x| gelu_f32(x)).collect();
        gelu_rows_in_place(&mut v, None);
        for (g, w) in v.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
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
