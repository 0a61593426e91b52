//! Inference convolutions of NCHW f32 CPU tensors, each one `gemm` into the NCHW output,
//! and a channel LayerNorm (with an optional GELU) that works on NCHW in place of a
//! permute, a last-dim norm and a permute back.
//!
//! candle's CPU `conv2d` unfolds the input, multiplies with the kernel on the wrong side
//! (so the result is NHWC) and copies it back to NCHW; with few input channels (SAM2's
//! mask downsampler starts from one) or 1×1 kernels (the FPN laterals, the memory
//! encoder's projections) the copies cost more than the arithmetic. Here the output
//! plane `[C_out, H_o·W_o]` is `W [C_out, K] · cols [K, H_o·W_o]`, written once with the
//! bias already in it; a 1×1, stride-1 convolution multiplies the input itself.
//!
//! These are forward-only: callers use them on untracked tensors and keep candle's
//! differentiable ops for training.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result, SendPtr};

/// Shapes of one convolution.
#[derive(Clone, Copy, Debug)]
struct ConvGeometry {
    b: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl ConvGeometry {
    fn new(x: &[usize], wt: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[b, c_in, h, w], &[c_out, wc_in, kh, kw]) = (x, wt) else {
            return Err(Error::Shape(format!(
                "conv2d: input {x:?} must be [B, C, H, W] and weight {wt:?} [C_out, C_in, kh, kw]"
            )));
        };
        if wc_in != c_in || kh == 0 || kw == 0 || stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            return Err(Error::Shape(format!(
                "conv2d: weight {wt:?} does not fit input {x:?} (stride {stride}, padding {pad})"
            )));
        }
        Ok(Self {
            b,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (w + 2 * pad - kw) / stride + 1,
        })
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Unfolds one image `[C_in, H, W]` into `cols [C_in·kh·kw, H_o·W_o]` (zeros outside).
    fn im2col(&self, img: &[f32], cols: &mut [f32]) {
        let p = self.ho * self.wo;
        cols.par_chunks_mut(p).enumerate().for_each(|(row, dst)| {
            let (ci, ky, kx) = (row / (self.kh * self.kw), (row / self.kw) % self.kh, row % self.kw);
            let plane = &img[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for oy in 0..self.ho {
                let out = &mut dst[oy * self.wo..(oy + 1) * self.wo];
                let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                if iy < 0 || iy >= self.h as isize {
                    out.fill(0.0);
                    continue;
                }
                let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                for (ox, o) in out.iter_mut().enumerate() {
                    let ix = (ox * self.stride + kx) as isize - self.pad as isize;
                    *o = if ix < 0 || ix >= self.w as isize {
                        0.0
                    } else {
                        src[ix as usize]
                    };
                }
            }
        });
    }
}

struct Conv2d {
    stride: usize,
    pad: usize,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "sgp-conv2d"
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
        let g = ConvGeometry::new(xl.dims(), wl.dims(), self.stride, self.pad).map_err(candle_err)?;
        let x = crate::contiguous_f32("conv2d", xs, xl)?;
        let wt = crate::contiguous_f32("conv2d", ws, wl)?;
        let bias = crate::contiguous_f32("conv2d", bs, bl)?;
        if bias.len() != g.c_out {
            candle_core::bail!("conv2d: bias of {} for {} output channels", bias.len(), g.c_out);
        }
        let (p, k) = (g.ho * g.wo, g.c_in * g.kh * g.kw);
        if g.b * g.c_out * p == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((g.b, g.c_out, g.ho, g.wo))));
        }
        // Each image's planes start as the bias and gemm accumulates onto them: every
        // element is written.
        let mut out = crate::OverwriteBuf::new(g.b * g.c_out * p);
        let mut cols = if g.pointwise() { Vec::new() } else { vec![0f32; k * p] };
        for (bi, out_b) in out.slice().chunks_mut(g.c_out * p).enumerate() {
            out_b.par_chunks_mut(p).zip(bias.par_iter()).for_each(|(plane, &bv)| {
                for v in plane {
                    v.write(bv);
                }
            });
            let img = &x[bi * g.c_in * g.h * g.w..(bi + 1) * g.c_in * g.h * g.w];
            let rhs = if g.pointwise() {
                img
            } else {
                g.im2col(img, &mut cols);
                &cols[..]
            };
            // SAFETY: out_b is c_out×p (initialised just above), wt is c_out×k, rhs is k×p,
            // all row-major.
            unsafe {
                crate::gemm_row_major(
                    g.c_out,
                    p,
                    k,
                    out_b.as_mut_ptr().cast(),
                    true,
                    wt.as_ptr(),
                    rhs.as_ptr(),
                )
            };
        }
        // SAFETY: see above.
        Ok((
            CpuStorage::F32(unsafe { out.assume_init() }),
            Shape::from((g.b, g.c_out, g.ho, g.wo)),
        ))
    }
}

fn candle_err(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `nn.Conv2d(C_in, C_out, (kh, kw), stride, padding)` (groups 1, dilation 1) on `x`
/// `[B, C_in, H, W]` with `weight` `[C_out, C_in, kh, kw]` and `bias` `[C_out]`.
/// Untracked f32 CPU tensors; returns `[B, C_out, H_o, W_o]`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    crate::require_untracked_cpu_f32("conv2d", &[(x, "x"), (weight, "weight"), (bias, "bias")])?;
    ConvGeometry::new(x.dims(), weight.dims(), stride, padding)?;
    Ok(x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &Conv2d { stride, pad: padding },
    )?)
}

struct ConvTranspose2x2;

impl CustomOp3 for ConvTranspose2x2 {
    fn name(&self) -> &'static str {
        "sgp-conv-transpose-2x2"
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
        let (&[b, c_in, h, w], &[wc_in, c_out, 2, 2]) = (xl.dims(), wl.dims()) else {
            candle_core::bail!(
                "conv_transpose 2x2: input {:?} must be [B, C_in, H, W] and weight {:?} [C_in, C_out, 2, 2]",
                xl.dims(),
                wl.dims()
            );
        };
        if wc_in != c_in {
            candle_core::bail!("conv_transpose 2x2: weight {:?} for input {:?}", wl.dims(), xl.dims());
        }
        let x = crate::contiguous_f32("conv_transpose 2x2", xs, xl)?;
        let wt = crate::contiguous_f32("conv_transpose 2x2", ws, wl)?;
        let bias = crate::contiguous_f32("conv_transpose 2x2", bs, bl)?;
        if bias.len() != c_out {
            candle_core::bail!("conv_transpose 2x2: bias of {} for {c_out} output channels", bias.len());
        }
        let (p, m) = (h * w, c_out * 4);
        if b * m * p == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((b, c_out, 2 * h, 2 * w))));
        }
        // taps[(o, ki, kj), i·w + j] = Σ_ci W[ci, o, ki, kj] · x[ci, i, j]: Wᵀ is the weight
        // read with row stride 1 and column stride c_out·4.
        let mut taps = vec![0f32; m * p]; // overwritten by each image's product
        let mut out = vec![0f32; b * c_out * 4 * p];
        for bi in 0..b {
            let img = &x[bi * c_in * p..(bi + 1) * c_in * p];
            // SAFETY: taps is m×p (row stride p); Wᵀ element (r, ci) is wt[ci·m + r]; img is
            // c_in×p row-major.
            unsafe {
                gemm::gemm(
                    m,
                    p,
                    c_in,
                    taps.as_mut_ptr(),
                    1,
                    p as isize,
                    false,
                    wt.as_ptr(),
                    m as isize,
                    1,
                    img.as_ptr(),
                    1,
                    p as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    crate::gemm_parallelism(),
                )
            };
            let out_b = &mut out[bi * c_out * 4 * p..(bi + 1) * c_out * 4 * p];
            out_b.par_chunks_mut(4 * p).enumerate().for_each(|(o, plane)| {
                // Output row 2i + ki, column 2j + kj of channel o.
                for i in 0..h {
                    for ki in 0..2 {
                        let row = &mut plane[(2 * i + ki) * 2 * w..(2 * i + ki + 1) * 2 * w];
                        let t0 = &taps[(o * 4 + ki * 2) * p + i * w..][..w];
                        let t1 = &taps[(o * 4 + ki * 2 + 1) * p + i * w..][..w];
                        for (j, pair) in row.chunks_exact_mut(2).enumerate() {
                            pair[0] = t0[j] + bias[o];
                            pair[1] = t1[j] + bias[o];
                        }
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, 2 * h, 2 * w))))
    }
}

/// `nn.ConvTranspose2d(C_in, C_out, kernel_size=2, stride=2)` on `x` `[B, C_in, H, W]`
/// with `weight` `[C_in, C_out, 2, 2]` and `bias` `[C_out]`: one `gemm` for the four taps
/// of every pixel, then one pass that interleaves them into `[B, C_out, 2H, 2W]` with the
/// bias. Untracked f32 CPU tensors.
pub fn conv_transpose_2x2(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    crate::require_untracked_cpu_f32("conv_transpose 2x2", &[(x, "x"), (weight, "weight"), (bias, "bias")])?;
    Ok(x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &ConvTranspose2x2)?)
}

/// Pixels per task of the channel norm: each task reads every channel of its pixels.
const NORM_PIXELS: usize = 256;

struct ChannelNorm<'a> {
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f32,
    gelu: bool,
}

impl CustomOp1 for ChannelNorm<'_> {
    fn name(&self) -> &'static str {
        "sgp-channel-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let &[b, c, h, w] = l.dims() else {
            candle_core::bail!("channel layer norm: input {:?} must be [B, C, H, W]", l.dims());
        };
        if self.weight.len() != c || self.bias.len() != c {
            candle_core::bail!(
                "channel layer norm: weight/bias of {}/{} for {c} channels",
                self.weight.len(),
                self.bias.len()
            );
        }
        let x = crate::contiguous_f32("channel layer norm", s, l)?;
        let p = h * w;
        if x.is_empty() {
            return Ok((CpuStorage::F32(Vec::new()), l.shape().clone()));
        }
        let mut out = vec![0f32; x.len()];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let tiles = p.div_ceil(NORM_PIXELS);
        (0..b * tiles).into_par_iter().for_each(|task| {
            let (bi, t) = (task / tiles, task % tiles);
            let (p0, np) = (t * NORM_PIXELS, NORM_PIXELS.min(p - t * NORM_PIXELS));
            let img = &x[bi * c * p..(bi + 1) * c * p];
            let mut mean = [0f32; NORM_PIXELS];
            let mut var = [0f32; NORM_PIXELS];
            for ch in 0..c {
                for (m, &v) in mean[..np].iter_mut().zip(&img[ch * p + p0..ch * p + p0 + np]) {
                    *m += v;
                }
            }
            let inv_c = 1.0 / c as f32;
            for m in &mut mean[..np] {
                *m *= inv_c;
            }
            for ch in 0..c {
                for ((s, &m), &v) in var[..np]
                    .iter_mut()
                    .zip(&mean[..np])
                    .zip(&img[ch * p + p0..ch * p + p0 + np])
                {
                    *s += (v - m) * (v - m);
                }
            }
            for s in &mut var[..np] {
                *s = 1.0 / (*s * inv_c + self.eps).sqrt();
            }
            for ch in 0..c {
                let (wv, bv) = (self.weight[ch], self.bias[ch]);
                let src = &img[ch * p + p0..ch * p + p0 + np];
                // SAFETY: this task alone writes pixels p0..p0+np of every channel of image bi.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(bi * c * p + ch * p + p0), np) };
                for (((d, &v), &m), &r) in dst.iter_mut().zip(src).zip(&mean[..np]).zip(&var[..np]) {
                    let y = (v - m) * r * wv + bv;
                    *d = if self.gelu { crate::activation::gelu_f32(y) } else { y };
                }
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// SAM2's `LayerNorm2d` (normalise each pixel over the channels, biased variance, `eps`
/// inside the square root, then `weight · x + bias` per channel) on `x` `[B, C, H, W]`,
/// followed by the exact GELU when `gelu`. Untracked f32 CPU tensors.
pub fn channel_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, gelu: bool) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    crate::require_untracked_cpu_f32("channel layer norm", &[(x, "x"), (weight, "weight"), (bias, "bias")])?;
    let weight: Vec<f32> = weight.flatten_all()?.to_vec1()?;
    let bias: Vec<f32> = bias.flatten_all()?.to_vec1()?;
    let op = ChannelNorm {
        weight: &weight,
        bias: &bias,
        eps: eps as f32,
        gelu,
    };
    Ok(x.contiguous()?.apply_op1_no_bwd(&op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, D};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
    }

    #[test]
    fn conv2d_matches_candle_for_strided_padded_and_pointwise_kernels() -> Result<()> {
        for &(b, c_in, h, w, c_out, k, stride, pad) in &[
            (2, 1, 17, 16, 4, 3, 2, 1),
            (1, 8, 9, 12, 16, 3, 2, 1),
            (2, 6, 8, 8, 5, 1, 1, 0),
            (1, 3, 23, 21, 7, 7, 4, 3),
            (1, 4, 5, 5, 3, 2, 1, 0),
        ] {
            let x = randn(&[b, c_in, h, w]);
            let wt = randn(&[c_out, c_in, k, k]);
            let bias = randn(&[c_out]);
            let ours = conv2d(&x, &wt, &bias, stride, pad)?;
            let reference = x
                .conv2d(&wt, pad, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            assert_eq!(ours.dims(), reference.dims());
            let diff = max_abs_diff(&ours, &reference)?;
            assert!(diff < 1e-4, "k{k} s{stride} p{pad}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn conv2d_refuses_a_weight_that_does_not_fit() {
        let x = randn(&[1, 3, 8, 8]);
        let err = conv2d(&x, &randn(&[4, 2, 3, 3]), &randn(&[4]), 1, 1).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = conv2d(&x, &randn(&[4, 3, 3, 3]), &randn(&[5]), 1, 1).unwrap_err();
        assert!(err.to_string().contains("bias"), "{err}");
    }

    #[test]
    fn conv_transpose_matches_candle() -> Result<()> {
        let (b, c_in, c_out, h, w) = (2, 8, 3, 5, 7);
        let x = randn(&[b, c_in, h, w]);
        let wt = randn(&[c_in, c_out, 2, 2]);
        let bias = randn(&[c_out]);
        let ours = conv_transpose_2x2(&x, &wt, &bias)?;
        let reference = x
            .conv_transpose2d(&wt, 0, 0, 2, 1)?
            .broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
        assert_eq!(ours.dims(), [b, c_out, 2 * h, 2 * w]);
        assert!(max_abs_diff(&ours, &reference)? < 1e-4);
        Ok(())
    }

    #[test]
    fn channel_norm_matches_the_permuted_layer_norm_with_and_without_gelu() -> Result<()> {
        // 300 pixels: one full tile of 256 and a partial one.
        let (b, c, h, w) = (2, 6, 15, 20);
        let x = randn(&[b, c, h, w]).affine(3.0, 1.5)?;
        let weight = randn(&[c]);
        let bias = randn(&[c]);
        let eps = 1e-6;
        let y = x.permute((0, 2, 3, 1))?;
        let mean = y.mean_keepdim(D::Minus1)?;
        let centred = y.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
        let reference = normed
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)?
            .permute((0, 3, 1, 2))?;
        let plain = channel_layer_norm(&x, &weight, &bias, eps, false)?;
        assert!(max_abs_diff(&plain, &reference)? < 1e-5);
        let with_gelu = channel_layer_norm(&x, &weight, &bias, eps, true)?;
        assert!(max_abs_diff(&with_gelu, &reference.gelu_erf()?)? < 1e-5);
        Ok(())
    }

    #[test]
    fn empty_shapes_give_empty_outputs() -> Result<()> {
        let none_out = conv2d(
            &randn(&[1, 2, 8, 8]),
            &Tensor::zeros((0, 2, 3, 3), candle_core::DType::F32, &Device::Cpu)?,
            &Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?,
            2,
            1,
        )?;
        assert_eq!(none_out.dims(), [1, 0, 4, 4]);
        let empty = Tensor::zeros((0, 3, 4, 4), candle_core::DType::F32, &Device::Cpu)?;
        assert_eq!(
            conv_transpose_2x2(&empty, &randn(&[3, 2, 2, 2]), &randn(&[2]))?.dims(),
            [0, 2, 8, 8]
        );
        assert_eq!(
            channel_layer_norm(&empty, &randn(&[3]), &randn(&[3]), 1e-6, true)?.dims(),
            [0, 3, 4, 4]
        );
        Ok(())
    }

    #[test]
    fn tracked_inputs_are_refused() -> Result<()> {
        let x = candle_core::Var::from_tensor(&randn(&[1, 2, 4, 4]))?;
        let err = conv2d(x.as_tensor(), &randn(&[3, 2, 1, 1]), &randn(&[3]), 1, 0).unwrap_err();
        assert!(err.to_string().contains("forward only"), "{err}");
        Ok(())
    }
}
