//! Depthwise 2D convolution (`groups = channels`, stride 1) for f32 on the CPU, with its
//! backward.
//!
//! SAM2's memory encoder runs a 7×7 depthwise convolution in each ConvNeXt block of its
//! fuser. candle implements `groups = C` as C separate single-channel convolutions
//! (chunk, conv, cat); in a training step each chunk's backward also allocates a
//! zero-filled full-size gradient and adds into it, C times per layer. The arithmetic is
//! small (k² multiply-adds per output), so here it is a direct loop per (image, channel)
//! plane, vectorised along rows, in both directions.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Geometry of one call.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], w: &[usize], pad: usize) -> Result<Self> {
        let ([b, c, h, wd], [cw, one, k, k2]) = (x, w) else {
            return Err(Error::Shape(format!(
                "depthwise conv: input {x:?} must be [B, C, H, W], weight {w:?} [C, 1, k, k]"
            )));
        };
        if cw != c || *one != 1 || k != k2 || *k == 0 || h + 2 * pad < *k || wd + 2 * pad < *k {
            return Err(Error::Shape(format!(
                "depthwise conv: weight {w:?} for input {x:?} with padding {pad}"
            )));
        }
        Ok(Self {
            b: *b,
            c: *c,
            h: *h,
            w: *wd,
            k: *k,
            pad,
            ho: h + 2 * pad - k + 1,
            wo: wd + 2 * pad - k + 1,
        })
    }
}

/// `out[y, x] += Σ_{i,j} w[i, j] · inp[y + i − pad, x + j − pad]` for one plane (`inp`
/// `h × w`, `out` `ho × wo`; out-of-range inputs are zeros).
#[allow(clippy::too_many_arguments)]
fn correlate(
    inp: &[f32],
    h: usize,
    w: usize,
    kern: &[f32],
    k: usize,
    pad: isize,
    out: &mut [f32],
    ho: usize,
    wo: usize,
) {
    for y in 0..ho {
        let orow = &mut out[y * wo..(y + 1) * wo];
        for i in 0..k {
            let iy = y as isize + i as isize - pad;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            let irow = &inp[iy as usize * w..(iy as usize + 1) * w];
            for j in 0..k {
                let wv = kern[i * k + j];
                // Output columns x whose input column x + j − pad lies in [0, w).
                let shift = j as isize - pad;
                let x0 = (-shift).max(0) as usize;
                let x1 = ((w as isize - shift).min(wo as isize)).max(0) as usize;
                if x0 >= x1 {
                    continue;
                }
                let src = &irow[(x0 as isize + shift) as usize..(x1 as isize + shift) as usize];
                for (o, &v) in orow[x0..x1].iter_mut().zip(src) {
                    *o += wv * v;
                }
            }
        }
    }
}

struct Depthwise {
    pad: usize,
}

impl CustomOp3 for Depthwise {
    fn name(&self) -> &'static str {
        "sgp-depthwise-conv2d"
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
        let g = Geometry::new(xl.dims(), wl.dims(), self.pad).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let x = crate::contiguous_f32("depthwise conv", xs, xl)?;
        let wt = crate::contiguous_f32("depthwise conv", ws, wl)?;
        let bias = crate::contiguous_f32("depthwise conv", bs, bl)?;
        if bias.len() != g.c {
            candle_core::bail!("depthwise conv: bias of {} for {} channels", bias.len(), g.c);
        }
        let mut out = vec![0f32; g.b * g.c * g.ho * g.wo];
        out.par_chunks_mut(g.ho * g.wo).enumerate().for_each(|(plane, o)| {
            let ch = plane % g.c;
            o.fill(bias[ch]);
            let inp = &x[plane * g.h * g.w..(plane + 1) * g.h * g.w];
            correlate(
                inp,
                g.h,
                g.w,
                &wt[ch * g.k * g.k..(ch + 1) * g.k * g.k],
                g.k,
                g.pad as isize,
                o,
                g.ho,
                g.wo,
            );
        });
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.c, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geometry::new(x.dims(), w.dims(), self.pad).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let gr: Vec<f32> = grad.detach().contiguous()?.flatten_all()?.to_vec1()?;
        let xv: Vec<f32> = x.detach().contiguous()?.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.detach().contiguous()?.flatten_all()?.to_vec1()?;
        let (kk, hw, howo) = (g.k * g.k, g.h * g.w, g.ho * g.wo);
        let dx = if x.track_op() {
            // dx = dout correlated with the 180°-rotated kernel, padding k − 1 − pad.
            let mut dx = vec![0f32; g.b * g.c * hw];
            let pad = g.k as isize - 1 - g.pad as isize;
            dx.par_chunks_mut(hw).enumerate().for_each(|(plane, d)| {
                let ch = plane % g.c;
                let rot: Vec<f32> = wv[ch * kk..(ch + 1) * kk].iter().rev().copied().collect();
                correlate(
                    &gr[plane * howo..(plane + 1) * howo],
                    g.ho,
                    g.wo,
                    &rot,
                    g.k,
                    pad,
                    d,
                    g.h,
                    g.w,
                );
            });
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // dw[c, i, j] = Σ_{b, y, x} dout[b, c, y, x] · x[b, c, y + i − pad, x + j − pad].
            let dw: Vec<f32> = (0..g.c)
                .into_par_iter()
                .flat_map_iter(|ch| {
                    let mut acc = vec![0f32; kk];
                    for bi in 0..g.b {
                        let plane = bi * g.c + ch;
                        let (inp, dout) = (&xv[plane * hw..(plane + 1) * hw], &gr[plane * howo..(plane + 1) * howo]);
                        for i in 0..g.k {
                            for j in 0..g.k {
                                let mut s = 0f32;
                                let shift = j as isize - g.pad as isize;
                                let x0 = (-shift).max(0) as usize;
                                let x1 = ((g.w as isize - shift).min(g.wo as isize)).max(0) as usize;
                                for y in 0..g.ho {
                                    let iy = y as isize + i as isize - g.pad as isize;
                                    if iy < 0 || iy >= g.h as isize || x0 >= x1 {
                                        continue;
                                    }
                                    let irow = &inp[iy as usize * g.w..];
                                    let drow = &dout[y * g.wo..];
                                    for xx in x0..x1 {
                                        s += drow[xx] * irow[(xx as isize + shift) as usize];
                                    }
                                }
                                acc[i * g.k + j] += s;
                            }
                        }
                    }
                    acc
                })
                .collect();
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        let db = if b.track_op() {
            let db: Vec<f32> = (0..g.c)
                .map(|ch| {
                    (0..g.b)
                        .map(|bi| {
                            gr[(bi * g.c + ch) * howo..(bi * g.c + ch + 1) * howo]
                                .iter()
                                .sum::<f32>()
                        })
                        .sum()
                })
                .collect();
            Some(Tensor::from_vec(db, b.shape(), b.device())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Depthwise convolution of `x` `[B, C, H, W]` with `weight` `[C, 1, k, k]` and `bias`
/// `[C]`: stride 1, zero padding `padding`, as `nn.Conv2d(C, C, k, padding=p, groups=C)`.
/// f32 CPU tensors; differentiable with respect to every tracked input.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    if ![x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
    {
        return Err(Error::Unsupported("depthwise conv: CPU f32 tensors only".into()));
    }
    Geometry::new(x.dims(), weight.dims(), padding)?;
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Depthwise { pad: padding })
        .map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_candle_grouped_conv_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c, h, w, k, p) in &[(2, 3, 9, 7, 3, 1), (1, 4, 12, 12, 7, 3), (1, 2, 5, 6, 3, 0)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
            let want = x
                .as_tensor()
                .conv2d(wt.as_tensor(), p, 1, 1, c)?
                .broadcast_add(&bias.as_tensor().reshape((1, c, 1, 1))?)?;
            let got = depthwise_conv2d(x.as_tensor(), wt.as_tensor(), bias.as_tensor(), p)?;
            assert_eq!(got.dims(), want.dims());
            assert!(crate::testing::max_abs_diff(&got, &want)? < 1e-4);
            let up = Tensor::randn(0f32, 1.0, want.shape(), &dev)?;
            let gw = (want * &up)?.sum_all()?.backward()?;
            let gg = (got * &up)?.sum_all()?.backward()?;
            for v in [&x, &wt, &bias] {
                let err = crate::testing::max_abs_diff(gg.get(v.as_tensor()).unwrap(), gw.get(v.as_tensor()).unwrap())?;
                assert!(err < 1e-3, "({b},{c},{h},{w},{k},{p}): gradient diff {err}");
            }
        }
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &dev)?;
        let bad = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev)?;
        assert!(depthwise_conv2d(&x, &bad, &Tensor::zeros(2, DType::F32, &dev)?, 1).is_err());
        Ok(())
    }
}
