//! Fused CPU layouts for the decoder: 3×3 im2col/col2im and the 2×2 depth-to-space
//! shuffle, each one pass with its backward. GELU lives in `sgp_kernels::activation`.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// GELU (erf form): `sgp_kernels::activation::gelu_erf`.
pub(crate) fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    sgp_kernels::activation::gelu_erf(x)
}

/// 3×3 im2col with zero padding 1 on a contiguous NHWC tensor: `[B, H, W, C]` →
/// `[B·H·W, 9·C]`, columns ordered `(ky, kx, c)`. Its backward is the matching col2im.
struct Im2Col3x3 {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

fn im2col<T: Copy + Default + Send + Sync>(x: &[T], b: usize, h: usize, w: usize, c: usize) -> Vec<T> {
    let row = w * 9 * c;
    let mut out = vec![T::default(); b * h * row];
    out.par_chunks_mut(row).enumerate().for_each(|(by, o)| {
        let (bi, y) = (by / h, by % h);
        for ky in 0..3 {
            let sy = y + ky;
            if sy < 1 || sy > h {
                continue;
            }
            let src_row = &x[(bi * h + sy - 1) * w * c..(bi * h + sy) * w * c];
            for xo in 0..w {
                for kx in 0..3 {
                    let sx = xo + kx;
                    if sx < 1 || sx > w {
                        continue;
                    }
                    let dst = xo * 9 * c + (ky * 3 + kx) * c;
                    o[dst..dst + c].copy_from_slice(&src_row[(sx - 1) * c..sx * c]);
                }
            }
        }
    });
    out
}

fn col2im<T: Copy + Default + Send + Sync + std::ops::AddAssign>(
    g: &[T],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
) -> Vec<T> {
    let row = w * c;
    let mut out = vec![T::default(); b * h * row];
    out.par_chunks_mut(row).enumerate().for_each(|(by, o)| {
        let (bi, y) = (by / h, by % h);
        for ky in 0..3 {
            // Output row yo reads input row y through tap ky when yo + ky − 1 = y.
            let yo = y + 1;
            if yo < ky || yo - ky >= h {
                continue;
            }
            let yo = yo - ky;
            let g_row = &g[(bi * h + yo) * w * 9 * c..(bi * h + yo + 1) * w * 9 * c];
            for xi in 0..w {
                let acc = &mut o[xi * c..(xi + 1) * c];
                for kx in 0..3 {
                    let xo = xi + 1;
                    if xo < kx || xo - kx >= w {
                        continue;
                    }
                    let xo = xo - kx;
                    let src = &g_row[xo * 9 * c + (ky * 3 + kx) * c..][..c];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a += v;
                    }
                }
            }
        }
    });
    out
}

impl CustomOp1 for Im2Col3x3 {
    fn name(&self) -> &'static str {
        "sgp-im2col-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = (self.b, self.h, self.w, self.c);
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("im2col: non-contiguous input");
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(im2col(&v[o0..o1], b, h, w, c)),
            CpuStorage::F64(v) => CpuStorage::F64(im2col(&v[o0..o1], b, h, w, c)),
            other => candle_core::bail!("im2col: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b * h * w, 9 * c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&Col2Im3x3 {
            b: self.b,
            h: self.h,
            w: self.w,
            c: self.c,
        })?))
    }
}

struct Col2Im3x3 {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl CustomOp1 for Col2Im3x3 {
    fn name(&self) -> &'static str {
        "sgp-col2im-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = (self.b, self.h, self.w, self.c);
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("col2im: non-contiguous input");
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(col2im(&v[o0..o1], b, h, w, c)),
            CpuStorage::F64(v) => CpuStorage::F64(col2im(&v[o0..o1], b, h, w, c)),
            other => candle_core::bail!("col2im: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from((b, h, w, c))))
    }
}

/// The 3×3, padding-1 im2col of an NHWC tensor `[B, H, W, C]` as `[B·H·W, 9·C]` (columns
/// `(ky, kx, c)`), or `None` where the fast op does not apply (not CPU f32/f64).
pub(crate) fn im2col_3x3(x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let (b, h, w, c) = x.dims4()?;
    Ok(Some(x.contiguous()?.apply_op1(Im2Col3x3 { b, h, w, c })?))
}

/// Depth-to-space by 2 on contiguous NHWC data: `[B, H, W, (dy, dx, C)]` →
/// `[B, 2H, 2W, C]` (`inverse` = false), or back (`inverse` = true). A permutation, so
/// each direction is the other's backward.
struct Shuffle2 {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    inverse: bool,
}

fn shuffle2<T: Copy + Default + Send + Sync>(x: &[T], b: usize, h: usize, w: usize, c: usize, inverse: bool) -> Vec<T> {
    // One output row of the fine grid (b, 2h + dy) holds 2W·C values; it reads (or, in
    // reverse, writes) the coarse row (b, h) at offset dy·2C within each pixel.
    let fine_row = 2 * w * c;
    let mut out = vec![T::default(); x.len()];
    if inverse {
        // Coarse row (b, y) of W·4C gathers fine rows 2y and 2y + 1.
        out.par_chunks_mut(w * 4 * c).enumerate().for_each(|(by, o)| {
            for dy in 0..2 {
                let src = &x[(2 * by + dy) * fine_row..(2 * by + dy + 1) * fine_row];
                for xi in 0..w {
                    o[xi * 4 * c + dy * 2 * c..][..2 * c].copy_from_slice(&src[xi * 2 * c..(xi + 1) * 2 * c]);
                }
            }
        });
    } else {
        out.par_chunks_mut(fine_row).enumerate().for_each(|(r, o)| {
            let (by, dy) = (r / 2, r % 2);
            let src = &x[by * w * 4 * c..(by + 1) * w * 4 * c];
            for xi in 0..w {
                o[xi * 2 * c..(xi + 1) * 2 * c].copy_from_slice(&src[xi * 4 * c + dy * 2 * c..][..2 * c]);
            }
        });
    }
    let _ = (b, h);
    out
}

impl CustomOp1 for Shuffle2 {
    fn name(&self) -> &'static str {
        "sgp-pixel-shuffle-2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c, inv) = (self.b, self.h, self.w, self.c, self.inverse);
        let Some((o0, o1)) = l.contiguous_offsets() else {
            candle_core::bail!("pixel shuffle: non-contiguous input");
        };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(shuffle2(&v[o0..o1], b, h, w, c, inv)),
            CpuStorage::F64(v) => CpuStorage::F64(shuffle2(&v[o0..o1], b, h, w, c, inv)),
            other => candle_core::bail!("pixel shuffle: unsupported dtype {:?}", other.dtype()),
        };
        let shape = if inv {
            Shape::from((b, h, w, 4 * c))
        } else {
            Shape::from((b, 2 * h, 2 * w, c))
        };
        Ok((out, shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Shuffle2 {
            inverse: !self.inverse,
            ..*self
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// Depth-to-space by 2: `[B, H, W, 4·C]` (channels `(dy, dx, c)`) → `[B, 2H, 2W, C]`, or
/// `None` where the fast op does not apply (not CPU f32/f64).
pub(crate) fn depth_to_space_2(x: &Tensor, c: usize) -> candle_core::Result<Option<Tensor>> {
    if !matches!(x.device(), Device::Cpu) || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let (b, h, w, c4) = x.dims4()?;
    if c4 != 4 * c {
        candle_core::bail!("depth_to_space_2: {c4} channels is not 4·{c}");
    }
    let op = Shuffle2 {
        b,
        h,
        w,
        c,
        inverse: false,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}
