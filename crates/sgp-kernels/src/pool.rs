//! Max pooling on channels-last maps, reading the input where it lies, differentiable.
//!
//! Hiera pools its queries (`nn.MaxPool2d(k = stride = s)`) on a `[B, H, W, C]` view of
//! the qkv output; candle's pool wants NCHW, which costs two full transposes around it.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::attention::{view, View};
use crate::{Error, Result};

/// `nn.MaxPool2d(kernel = stride = s, ceil_mode = False)` on a `[B, H, W, C]` f32 CPU view
/// (any strides, unit stride on C). Returns `[B, H / s0, W / s1, C]`, contiguous.
///
/// Differentiable: with a tracked input, the backward routes each output's gradient to
/// the first maximum of its window (PyTorch's rule; also the element the forward keeps).
pub fn max_pool_nhwc(x: &Tensor, s: [usize; 2]) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Err(Error::Unsupported("max_pool_nhwc: CPU f32 tensors only".into()));
    }
    if s[0] == 0 || s[1] == 0 {
        return Err(Error::Shape(format!("max_pool_nhwc: stride {s:?}")));
    }
    if x.track_op() {
        return x.apply_op1(MaxPoolNhwc { s }).map_err(Error::from);
    }
    let (st, l) = x.storage_and_layout();
    let Storage::Cpu(st) = &*st else {
        return Err(Error::Unsupported("max_pool_nhwc: CPU tensors only".into()));
    };
    let xv = view("x", st, l)?;
    let (out, dims) = pool_view(&xv, s);
    Tensor::from_vec(out, dims, x.device()).map_err(Error::from)
}

/// Offset of input element (b, y, x, 0) of a view.
#[inline]
fn at(v: &View, b: usize, y: usize, x: usize) -> usize {
    v.offset + b * v.strides[0] + y * v.strides[1] + x * v.strides[2]
}

fn pool_view(xv: &View, s: [usize; 2]) -> (Vec<f32>, (usize, usize, usize, usize)) {
    let [b, h, w, c] = xv.dims;
    let (ho, wo) = (h / s[0], w / s[1]);
    let mut out = vec![0f32; b * ho * wo * c];
    if !out.is_empty() {
        out.par_chunks_mut(wo * c).enumerate().for_each(|(row, orow)| {
            let (bi, oy) = (row / ho, row % ho);
            for ox in 0..wo {
                let o = &mut orow[ox * c..(ox + 1) * c];
                o.fill(f32::NEG_INFINITY);
                for dy in 0..s[0] {
                    for dx in 0..s[1] {
                        let a = at(xv, bi, oy * s[0] + dy, ox * s[1] + dx);
                        for (o, &v) in o.iter_mut().zip(&xv.data[a..a + c]) {
                            // PyTorch's max pooling propagates NaN.
                            *o = if v > *o || v.is_nan() { v } else { *o };
                        }
                    }
                }
            }
        });
    }
    (out, (b, ho, wo, c))
}

struct MaxPoolNhwc {
    s: [usize; 2],
}

impl CustomOp1 for MaxPoolNhwc {
    fn name(&self) -> &'static str {
        "sgp-max-pool-nhwc"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xv = view("x", st, l).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (out, dims) = pool_view(&xv, self.s);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.detach().contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("max_pool_nhwc backward: CPU tensors only");
        };
        let xv = view("x", xs, xl).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let gd = crate::contiguous_f32("max_pool_nhwc backward", gs, gl)?;
        let [b, h, w, c] = xv.dims;
        let s = self.s;
        let (ho, wo) = (h / s[0], w / s[1]);
        if gd.len() != b * ho * wo * c {
            candle_core::bail!(
                "max_pool_nhwc backward: gradient {:?} for input {:?}",
                gl.shape(),
                xv.dims
            );
        }
        // dx rows of one (b, output row) band: s0 input rows, each [W, C].
        let mut dx = vec![0f32; b * h * w * c];
        let band = s[0] * w * c;
        dx.par_chunks_mut(h * w * c).enumerate().for_each(|(bi, dxb)| {
            for oy in 0..ho {
                let dband = &mut dxb[oy * band..(oy + 1) * band];
                for ox in 0..wo {
                    let g = &gd[((bi * ho + oy) * wo + ox) * c..][..c];
                    for ch in 0..c {
                        let (mut best, mut arg) = (f32::NEG_INFINITY, None);
                        for dy in 0..s[0] {
                            for dxx in 0..s[1] {
                                let v = xv.data[at(&xv, bi, oy * s[0] + dy, ox * s[1] + dxx) + ch];
                                if arg.is_none() || v > best || (v.is_nan() && !best.is_nan()) {
                                    best = v;
                                    arg = Some((dy, dxx));
                                }
                            }
                        }
                        if let Some((dy, dxx)) = arg {
                            dband[(dy * w + ox * s[1] + dxx) * c + ch] += g[ch];
                        }
                    }
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, (b, h, w, c), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_pool_on_strided_views() -> Result<()> {
        let dev = Device::Cpu;
        let base = Tensor::randn(0f32, 1.0, (2, 9, 7, 3, 5), &dev)?; // odd sizes: floor mode
        let x = base.narrow(3, 1, 1)?.squeeze(3)?; // [2, 9, 7, 5], strided
        let got = max_pool_nhwc(&x, [2, 2])?;
        let want = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .max_pool2d_with_stride((2, 2), (2, 2))?
            .permute((0, 2, 3, 1))?;
        assert_eq!(got.dims(), [2, 4, 3, 5]);
        assert_eq!(crate::testing::max_abs_diff(&got, &want)?, 0.0);
        assert!(max_pool_nhwc(&x, [0, 2]).is_err());
        Ok(())
    }

    #[test]
    fn backward_routes_to_the_window_maximum() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let base = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 9, 7, 3, 5), &dev)?)?;
        let x = base.as_tensor().narrow(3, 1, 1)?.squeeze(3)?;
        let up = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev)?;
        let got = (max_pool_nhwc(&x, [2, 2])? * &up)?.sum_all()?.backward()?;
        // Reference: reshape + max (distinct random values: no ties).
        let r = x
            .narrow(1, 0, 8)?
            .narrow(2, 0, 6)?
            .reshape((2, 4, 2, 3, 2, 5))?
            .max_keepdim(4)?
            .max_keepdim(2)?
            .reshape((2, 4, 3, 5))?;
        let want = (r * &up)?.sum_all()?.backward()?;
        let (g, w) = (got.get(base.as_tensor()).unwrap(), want.get(base.as_tensor()).unwrap());
        assert!(crate::testing::max_abs_diff(g, w)? < 1e-6);
        Ok(())
    }
}
