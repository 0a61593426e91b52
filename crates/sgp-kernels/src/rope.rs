//! Rotary position encoding on interleaved channel pairs, one pass, with its backward.
//!
//! SAM2's memory attention rotates pairs `(2i, 2i+1)` of every query and key by a
//! per-token angle; keys of several memory frames repeat the query grid's angles, and the
//! object-pointer keys at the end are not rotated. As candle ops that is a concatenation
//! of repeated tables, `rope_i`, a narrow and a concatenation per call (and in training a
//! ten-op composition). Here the table row is `token mod grid`, tokens past `rotated` are
//! copied, and the backward is the rotation by the opposite angle.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of `D` values per parallel task (amortises the task cost on short heads).
const ROWS_PER_TASK: usize = 64;

#[derive(Clone, Copy)]
struct Rope {
    /// Leading tokens (per batch and head) that are rotated.
    rotated: usize,
    /// Rotate by the negative angle (the backward).
    inverse: bool,
}

impl Rope {
    fn run(&self, x: &[f32], cos: &[f32], sin: &[f32], t: usize, d: usize, grid: usize) -> Vec<f32> {
        let half = d / 2;
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(ROWS_PER_TASK * d)
            .zip(x.par_chunks(ROWS_PER_TASK * d))
            .enumerate()
            .for_each(|(task, (dst, src))| {
                for (r, (o, xi)) in dst.chunks_exact_mut(d).zip(src.chunks_exact(d)).enumerate() {
                    let token = (task * ROWS_PER_TASK + r) % t;
                    if token >= self.rotated {
                        o.copy_from_slice(xi);
                        continue;
                    }
                    let row = (token % grid) * half;
                    let (c, s) = (&cos[row..row + half], &sin[row..row + half]);
                    for i in 0..half {
                        let (a, b) = (xi[2 * i], xi[2 * i + 1]);
                        let (ci, si) = (c[i], sign * s[i]);
                        o[2 * i] = a * ci - b * si;
                        o[2 * i + 1] = a * si + b * ci;
                    }
                }
            });
        out
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "sgp-rope-interleaved"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::contiguous_f32("rope", xs, xl)?;
        let cos = crate::contiguous_f32("rope", cs, cl)?;
        let sin = crate::contiguous_f32("rope", ss, sl)?;
        let [_, _, t, d] = xl.dims() else {
            candle_core::bail!("rope: input must be [B, H, T, D], got {:?}", xl.dims());
        };
        let grid = cl.dims()[0];
        Ok((CpuStorage::F32(self.run(x, cos, sin, *t, *d, grid)), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope {
            inverse: !self.inverse,
            ..*self
        };
        let g = grad.detach().contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(g), None, None))
    }
}

/// Rotates channel pairs `(2i, 2i+1)` of `x` `[B, H, T, D]` by the angles whose cosines
/// and sines are `cos`/`sin` `[G, D/2]`: token `t < rotated` uses table row `t mod G` (a
/// `G`-token grid repeated along the sequence); tokens from `rotated` on are copied
/// unchanged. `rotated` must be a multiple of `G` no larger than `T`. Differentiable in
/// `x` (the tables are constants). f32 on the CPU.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor, rotated: usize) -> Result<Tensor> {
    let all_cpu_f32 = [x, cos, sin]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !all_cpu_f32 {
        return Err(Error::Unsupported("rope: CPU f32 tensors only".into()));
    }
    let (_, _, t, d) = x.dims4()?;
    let (g, half) = cos.dims2()?;
    if sin.dims() != cos.dims() || d != 2 * half || g == 0 {
        return Err(Error::Shape(format!(
            "rope: tables {:?}/{:?} for head dim {d}",
            cos.dims(),
            sin.dims()
        )));
    }
    if rotated > t || !rotated.is_multiple_of(g) {
        return Err(Error::Shape(format!(
            "rope: {rotated} rotated tokens of {t} are not a multiple of the {g}-token grid"
        )));
    }
    let op = Rope {
        rotated,
        inverse: false,
    };
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The rotation composed from candle ops, table repeated, excluded tokens appended.
    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor, rotated: usize) -> candle_core::Result<Tensor> {
        let (_, _, t, _) = x.dims4()?;
        let g = cos.dim(0)?;
        let reps = rotated / g;
        let c = Tensor::cat(&vec![cos.clone(); reps], 0)?;
        let s = Tensor::cat(&vec![sin.clone(); reps], 0)?;
        let rot = candle_nn::rotary_emb::rope_i_slow(&x.narrow(2, 0, rotated)?, &c, &s)?;
        if rotated == t {
            Ok(rot)
        } else {
            Tensor::cat(&[rot, x.narrow(2, rotated, t - rotated)?], 2)
        }
    }

    #[test]
    fn matches_the_composition_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, h, g, reps, extra, d) in &[(1, 1, 9, 1, 0, 8), (2, 2, 4, 3, 5, 16), (1, 3, 16, 2, 70, 4)] {
            let t = g * reps + extra;
            let cos = Tensor::randn(0f32, 1.0, (g, d / 2), &dev)?;
            let sin = Tensor::randn(0f32, 1.0, (g, d / 2), &dev)?;
            let xv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?)?;
            let got = rope_interleaved(xv.as_tensor(), &cos, &sin, g * reps)?;
            let want = reference(xv.as_tensor(), &cos, &sin, g * reps)?;
            assert!(crate::testing::max_abs_diff(&got, &want)? < 1e-6);
            let up = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev)?;
            let gg = (&got * &up)?.sum_all()?.backward()?;
            let gw = (&want * &up)?.sum_all()?.backward()?;
            let diff = crate::testing::max_abs_diff(gg.get(xv.as_tensor()).unwrap(), gw.get(xv.as_tensor()).unwrap())?;
            assert!(diff < 1e-5, "gradient differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn bad_tables_and_counts_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 1, 8, 4), DType::F32, &dev)?;
        let t = Tensor::zeros((4, 2), DType::F32, &dev)?;
        assert!(rope_interleaved(&x, &t, &t, 6).is_err());
        assert!(rope_interleaved(&x, &t, &t, 12).is_err());
        let wide = Tensor::zeros((4, 3), DType::F32, &dev)?;
        assert!(rope_interleaved(&x, &wide, &wide, 4).is_err());
        assert!(rope_interleaved(&x, &t, &t, 8).is_ok());
        Ok(())
    }
}
