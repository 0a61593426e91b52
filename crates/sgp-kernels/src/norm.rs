//! Layer norm over the last dimension for f32 on the CPU, differentiable in one pass
//! each way.
//!
//! candle's differentiable layer norm is a composition (mean, centre, square, mean, add,
//! sqrt, divide, scale, shift) whose backward is about twenty full-size tensor ops, each
//! a fresh buffer; in a LoRA training step that is most of Hiera's elementwise time. Here
//! the forward is one pass per row and the backward one pass per row plus the column sums
//! for the affine parameters (only when they are tracked). Statistics are recomputed in
//! the backward (two reductions per row) rather than stored.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Mean and 1/√(var + eps) of one row (biased variance, two passes, f32 like PyTorch's
/// CPU kernel, in vector lanes).
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = crate::math::lane_sum(x, |v| v) / n;
    let var = crate::math::lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "sgp-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32("layer norm", xs, xl)?;
        let (w, b) = (
            crate::contiguous_f32("layer norm", ws, wl)?,
            crate::contiguous_f32("layer norm", bs, bl)?,
        );
        let n = w.len();
        if n == 0 || b.len() != n || !x.len().is_multiple_of(n) {
            candle_core::bail!("layer norm: input {:?} for {n} features", xl.shape());
        }
        let mut y = crate::OverwriteBuf::new(x.len());
        y.slice()
            .par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                        y.write((x - mean) * rstd * w + b);
                    }
                }
            });
        // SAFETY: x.len() is a multiple of n (checked above), so every row was written.
        Ok((CpuStorage::F32(unsafe { y.assume_init() }), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = w.elem_count();
        let rows = x.elem_count() / n.max(1);
        let want_params = w.track_op() || b.track_op();
        let out = grad.detach().contiguous()?.apply_op3_no_bwd(
            &x.detach(),
            &w.detach(),
            &LayerNormBackward {
                eps: self.eps,
                params: want_params,
            },
        )?;
        let dx = out.narrow(0, 0, rows)?.reshape(x.shape())?;
        let (dw, db) = if want_params {
            (
                w.track_op().then(|| out.get(rows)).transpose()?,
                b.track_op().then(|| out.get(rows + 1)).transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((x.track_op().then_some(dx), dw, db))
    }
}

/// `(grad, x, w) ↦ [dx rows; dw; db]` (`[rows + 2, n]`, or `[rows, n]` without params).
struct LayerNormBackward {
    eps: f32,
    params: bool,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "sgp-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = crate::contiguous_f32("layer norm", gs, gl)?;
        let x = crate::contiguous_f32("layer norm", xs, xl)?;
        let w = crate::contiguous_f32("layer norm", ws, wl)?;
        let n = w.len();
        if n == 0 || g.len() != x.len() || !x.len().is_multiple_of(n) {
            candle_core::bail!("layer norm backward: {} gradients for input {:?}", g.len(), xl.shape());
        }
        let rows = x.len() / n;
        let extra = if self.params { 2 * n } else { 0 };
        let mut out = vec![0f32; x.len() + extra];
        let (dx, params) = out.split_at_mut(x.len());
        // Each task: its rows of dx, and its partial column sums of dy·x̂ and dy.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK).zip(g.par_chunks(n * ROWS_PER_TASK)))
            .map(|(dx, (x, g))| {
                let mut sums = if self.params { vec![0f32; 2 * n] } else { Vec::new() };
                let mut xhat = vec![0f32; n];
                for ((dx, x), g) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(g.chunks_exact(n)) {
                    let (mean, rstd) = row_stats(x, self.eps);
                    let (mut s1, mut s2) = (0f32, 0f32);
                    for (((h, &x), &g), &w) in xhat.iter_mut().zip(x).zip(g).zip(w) {
                        *h = (x - mean) * rstd;
                        let d = g * w;
                        s1 += d;
                        s2 += d * *h;
                    }
                    let (m1, m2) = (s1 / n as f32, s2 / n as f32);
                    for (((dx, &h), &g), &w) in dx.iter_mut().zip(&xhat).zip(g).zip(w) {
                        *dx = rstd * (g * w - m1 - h * m2);
                    }
                    if self.params {
                        let (sw, sb) = sums.split_at_mut(n);
                        for (((sw, sb), &h), &g) in sw.iter_mut().zip(sb.iter_mut()).zip(&xhat).zip(g) {
                            *sw += g * h;
                            *sb += g;
                        }
                    }
                }
                sums
            })
            .collect();
        if self.params {
            for p in &partials {
                for (o, &v) in params.iter_mut().zip(p) {
                    *o += v;
                }
            }
        }
        let out_rows = rows + if self.params { 2 } else { 0 };
        Ok((CpuStorage::F32(out), Shape::from((out_rows, n))))
    }
}

/// Layer norm of `x` `[..., n]` over its last dimension with `weight` and `bias` `[n]`
/// (biased variance, `eps` inside the square root, as `nn.LayerNorm`). f32 CPU tensors;
/// differentiable with respect to every tracked input.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let f32_cpu = [x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !f32_cpu {
        return Err(Error::Unsupported("layer norm: CPU f32 tensors only".into()));
    }
    let n = x.dims().last().copied().unwrap_or(0);
    if n == 0 || weight.dims() != [n] || bias.dims() != [n] {
        return Err(Error::Shape(format!(
            "layer norm: input {:?}, weight {:?}, bias {:?}",
            x.dims(),
            weight.dims(),
            bias.dims()
        )));
    }
    let op = LayerNormOp { eps: eps as f32 };
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
        .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The official formulation in f64: (x − mean) / √(var + eps) · w + b.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let c = x.broadcast_sub(&mean)?;
        let var = c.sqr()?.mean_keepdim(D::Minus1)?;
        c.broadcast_div(&(var + eps)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    }

    #[test]
    fn forward_and_gradients_match_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        let x64 = ((Tensor::randn(0f64, 1.0, (3, 70, 48), &dev)? * 3.0)? + 1.5)?;
        let w64 = Tensor::randn(1f64, 0.3, 48, &dev)?;
        let b64 = Tensor::randn(0f64, 0.3, 48, &dev)?;
        let up64 = Tensor::randn(0f64, 1.0, (3, 70, 48), &dev)?;
        let (xv, wv, bv) = (
            Var::from_tensor(&x64)?,
            Var::from_tensor(&w64)?,
            Var::from_tensor(&b64)?,
        );
        let want = (reference(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-6)? * &up64)?
            .sum_all()?
            .backward()?;
        let f32v = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?) };
        let (x, w, b) = (f32v(&x64)?, f32v(&w64)?, f32v(&b64)?);
        let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6)?;
        let y_ref = reference(&x64, &w64, &b64, 1e-6)?.to_dtype(DType::F32)?;
        assert!(crate::testing::max_abs_diff(&y, &y_ref)? < 1e-5);
        let got = (y * up64.to_dtype(DType::F32)?)?.sum_all()?.backward()?;
        for (ours, theirs) in [(&x, &xv), (&w, &wv), (&b, &bv)] {
            let g = got.get(ours.as_tensor()).expect("tracked input has a gradient");
            let r = want.get(theirs.as_tensor()).unwrap().to_dtype(DType::F32)?;
            let scale = (r.abs()?.max_all()?.to_scalar::<f32>()? as f64).max(1.0);
            assert!(crate::testing::max_abs_diff(g, &r)? / scale < 1e-4);
        }
        // Frozen affine parameters: only dx is produced.
        let (wf, bf) = (w.as_tensor().detach(), b.as_tensor().detach());
        let got = layer_norm(x.as_tensor(), &wf, &bf, 1e-6)?.sum_all()?.backward()?;
        assert!(got.get(x.as_tensor()).is_some() && got.get(&wf).is_none() && got.get(&bf).is_none());
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 8), DType::F32, &dev)?;
        let w = Tensor::ones(8, DType::F32, &dev)?;
        assert!(layer_norm(&x, &Tensor::ones(7, DType::F32, &dev)?, &w, 1e-6).is_err());
        assert!(layer_norm(&x.to_dtype(DType::F64)?, &w, &w, 1e-6).is_err());
        // A constant row normalises to the bias (variance 0, eps keeps it finite).
        let y = layer_norm(&x, &w, &w, 1e-6)?;
        assert!(crate::testing::max_abs_diff(&y, &Tensor::ones((2, 8), DType::F32, &dev)?)? < 1e-6);
        Ok(())
    }
}
