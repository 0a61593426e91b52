//! Hiera's window partition and its inverse on channels-last maps, one copy each way.
//!
//! As candle ops a partition is pad, reshape, permute, copy and reshape; in a training
//! step every one of those nodes costs the backward pass a zero-filled buffer and an add.
//! Here each direction is a single parallel copy of `C`-long rows, and each is the
//! other's backward.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// `[B, H, W, C]` (contiguous) to `[B·nH·nW, ws, ws, C]` windows, zero-padding H and W up
/// to multiples of `ws`; or back, cropping, when `inverse`.
#[derive(Clone, Copy)]
struct Windows {
    ws: usize,
    /// Map size (unpadded).
    h: usize,
    w: usize,
    inverse: bool,
}

impl Windows {
    fn padded(&self) -> (usize, usize) {
        (self.h.div_ceil(self.ws) * self.ws, self.w.div_ceil(self.ws) * self.ws)
    }

    /// Copies between the map `[B, H, W, C]` and the windows, in the op's direction.
    fn run(&self, src: &[f32], b: usize, c: usize) -> Vec<f32> {
        let ws = self.ws;
        let (hp, wp) = self.padded();
        let (nh, nw) = (hp / ws, wp / ws);
        let (h, w) = (self.h, self.w);
        if b * h * w * c == 0 {
            return Vec::new(); // an empty map or no windows (row chunks below must not be empty)
        }
        if !self.inverse {
            partition_rows(src, b, c, ws, (h, w), None)
        } else {
            // Every (row, column) pixel of the map is copied from its window.
            let mut out = crate::OverwriteBuf::new(b * h * w * c);
            out.slice().par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
                let (bi, yy) = (row / h, row % h);
                let (i, y) = (yy / ws, yy % ws);
                for xx in 0..w {
                    let (j, x) = (xx / ws, xx % ws);
                    let win = (bi * nh + i) * nw + j;
                    let s = ((win * ws + y) * ws + x) * c;
                    for (d, &v) in dst[xx * c..(xx + 1) * c].iter_mut().zip(&src[s..s + c]) {
                        d.write(v);
                    }
                }
            });
            // SAFETY: see above.
            unsafe { out.assume_init() }
        }
    }
}

impl CustomOp1 for Windows {
    fn name(&self) -> &'static str {
        if self.inverse {
            "sgp-window-unpartition"
        } else {
            "sgp-window-partition"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = crate::contiguous_f32("window partition", s, l)?;
        let dims = l.dims();
        let ws = self.ws;
        let (hp, wp) = self.padded();
        let windows_per_image = (hp / ws) * (wp / ws);
        let (b, c, out_shape) = if self.inverse {
            let [n, a, a2, c] = dims else {
                candle_core::bail!("window unpartition: windows must be [N, ws, ws, C], got {dims:?}");
            };
            if *a != ws || *a2 != ws || !n.is_multiple_of(windows_per_image) {
                candle_core::bail!(
                    "window unpartition: windows {dims:?} for a {}x{} map, ws {ws}",
                    self.h,
                    self.w
                );
            }
            let b = n / windows_per_image;
            (b, *c, Shape::from((b, self.h, self.w, *c)))
        } else {
            let [b, h, w, c] = dims else {
                candle_core::bail!("window partition: map must be [B, H, W, C], got {dims:?}");
            };
            if (*h, *w) != (self.h, self.w) {
                candle_core::bail!("window partition: map {dims:?}, expected {}x{}", self.h, self.w);
            }
            (*b, *c, Shape::from((b * windows_per_image, ws, ws, *c)))
        };
        Ok((CpuStorage::F32(self.run(src, b, c)), out_shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = Windows {
            inverse: !self.inverse,
            ..*self
        };
        Ok(Some(grad.detach().contiguous()?.apply_op1(back)?))
    }
}

/// The windows of a `[B, H, W, C]` map (`src`), every padding pixel set to `fill` (zeros
/// without one). Every output value is written once.
fn partition_rows(
    src: &[f32],
    b: usize,
    c: usize,
    ws: usize,
    (h, w): (usize, usize),
    fill: Option<&[f32]>,
) -> Vec<f32> {
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let (nh, nw) = (hp / ws, wp / ws);
    if b * h * w * c == 0 {
        return Vec::new(); // no values, or no windows (the row bands below must not be empty)
    }
    let mut out = crate::OverwriteBuf::new(b * hp * wp * c);
    // One task per window row band of one image: nw windows × ws rows.
    out.slice()
        .par_chunks_mut(nw * ws * ws * c)
        .enumerate()
        .for_each(|(band, dst)| {
            let (bi, i) = (band / nh, band % nh);
            for j in 0..nw {
                for y in 0..ws {
                    let yy = i * ws + y;
                    for x in 0..ws {
                        let xx = j * ws + x;
                        let o = ((j * ws + y) * ws + x) * c;
                        let d = &mut dst[o..o + c];
                        if yy < h && xx < w {
                            let s = ((bi * h + yy) * w + xx) * c;
                            d.iter_mut().zip(&src[s..s + c]).for_each(|(d, &v)| {
                                d.write(v);
                            });
                        } else {
                            match fill {
                                Some(f) => d.iter_mut().zip(f).for_each(|(d, &v)| {
                                    d.write(v);
                                }),
                                None => d.iter_mut().for_each(|d| {
                                    d.write(0.0);
                                }),
                            }
                        }
                    }
                }
            }
        });
    // SAFETY: every pixel of every window is written above (map value, fill or zero).
    unsafe { out.assume_init() }
}

fn check(x: &Tensor, ws: usize) -> Result<()> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Err(Error::Unsupported("window partition: CPU f32 tensors only".into()));
    }
    if ws == 0 {
        return Err(Error::Shape("window partition: window size 0".into()));
    }
    Ok(())
}

/// Splits `x` `[B, H, W, C]` into `[B·nW, ws, ws, C]` windows (row-major over the window
/// grid), zero-padding H and W up to multiples of `ws`; returns the padded size too.
/// Differentiable (its backward is [`window_unpartition`]).
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    check(x, ws)?;
    let (_, h, w, _) = x.dims4()?;
    let op = Windows {
        ws,
        h,
        w,
        inverse: false,
    };
    let padded = op.padded();
    Ok((x.contiguous()?.apply_op1(op)?, padded))
}

/// [`window_partition`] with every padding pixel set to `fill` (`[C]`) instead of zeros,
/// for untracked inputs (no backward).
///
/// A per-token layer maps the zero padding of a partition to one fixed row, `layer(0)`
/// (a linear's bias). Applying the layer to the unpadded map and padding its output with
/// that row gives exactly the windows of the layer applied after zero padding, without
/// computing the layer on the padding: Hiera's qkv at 512 px runs on 1764 rows per
/// stage-3 block for a 32×32 map.
pub fn window_partition_filled(x: &Tensor, ws: usize, fill: &[f32]) -> Result<(Tensor, (usize, usize))> {
    check(x, ws)?;
    if x.track_op() {
        return Err(Error::Unsupported(
            "window partition with a fill: untracked inputs only".into(),
        ));
    }
    let (b, h, w, c) = x.dims4()?;
    if fill.len() != c {
        return Err(Error::Shape(format!(
            "window partition: fill of {} for {c} channels",
            fill.len()
        )));
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Unsupported("window partition: CPU tensors only".into()));
    };
    let src = crate::contiguous_f32("window partition", cpu, layout)?;
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let out = partition_rows(src, b, c, ws, (h, w), Some(fill));
    let n = b * (hp / ws) * (wp / ws);
    Ok((Tensor::from_vec(out, (n, ws, ws, c), x.device())?, (hp, wp)))
}

/// The inverse of [`window_partition`] for a `h × w` map: `[B·nW, ws, ws, C]` windows to
/// `[B, h, w, C]`, cropping the padding away. Differentiable.
pub fn window_unpartition(windows: &Tensor, ws: usize, hw: (usize, usize)) -> Result<Tensor> {
    check(windows, ws)?;
    let op = Windows {
        ws,
        h: hw.0,
        w: hw.1,
        inverse: true,
    };
    windows.contiguous()?.apply_op1(op).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// candle's composition (pad, reshape, permute).
    fn reference(x: &Tensor, ws: usize) -> candle_core::Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
        let x = x.pad_with_zeros(1, 0, ph)?.pad_with_zeros(2, 0, pw)?;
        let (hp, wp) = (h + ph, w + pw);
        x.reshape(vec![b, hp / ws, ws, wp / ws, ws, c])?
            .permute(vec![0, 1, 3, 2, 4, 5])?
            .contiguous()?
            .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))
    }

    #[test]
    fn filled_partition_pads_with_the_fill_row() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 7, 3), &dev)?;
        let fill = [1.5f32, -2.0, 7.0];
        let (got, padded) = window_partition_filled(&x, 4, &fill)?;
        assert_eq!(padded, (8, 8));
        // The same as partitioning x - fill with zeros, then adding the fill back.
        let f = Tensor::new(&fill, &dev)?;
        let want = reference(&x.broadcast_sub(&f)?, 4)?.broadcast_add(&f)?;
        assert!(crate::testing::max_abs_diff(&got, &want)? < 1e-6);
        assert!(window_partition_filled(&x, 4, &fill[..2]).is_err());
        let var = Var::from_tensor(&x)?;
        assert!(window_partition_filled(var.as_tensor(), 4, &fill).is_err());
        let empty = Tensor::zeros((1, 4, 4, 0), DType::F32, &dev)?;
        assert_eq!(window_partition_filled(&empty, 2, &[])?.0.dims(), [4, 2, 2, 0]);
        Ok(())
    }

    #[test]
    fn empty_maps_give_empty_windows() -> Result<()> {
        let x = Tensor::zeros((1, 4, 4, 0), DType::F32, &Device::Cpu)?;
        let (win, _) = window_partition(&x, 2)?;
        assert_eq!(win.dims(), [4, 2, 2, 0]);
        assert_eq!(window_unpartition(&win, 2, (4, 4))?.dims(), [1, 4, 4, 0]);
        Ok(())
    }

    #[test]
    fn partition_matches_the_composition_and_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, h, w, c, ws) in &[(2, 10, 7, 3, 4), (1, 16, 16, 5, 8), (1, 5, 5, 2, 7)] {
            let xv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?)?;
            let (win, pad) = window_partition(xv.as_tensor(), ws)?;
            let want = reference(xv.as_tensor(), ws)?;
            assert_eq!(crate::testing::max_abs_diff(&win, &want)?, 0.0);
            assert_eq!(pad, (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws));
            let back = window_unpartition(&win, ws, (h, w))?;
            assert_eq!(crate::testing::max_abs_diff(&back, xv.as_tensor())?, 0.0);
            // Backward: against the composition's gradient (padding gets none).
            let up = Tensor::randn(0f32, 1.0, win.shape(), &dev)?;
            let got = (&win * &up)?.sum_all()?.backward()?;
            let wanted = (want * &up)?.sum_all()?.backward()?;
            let (g, r) = (got.get(xv.as_tensor()).unwrap(), wanted.get(xv.as_tensor()).unwrap());
            assert_eq!(crate::testing::max_abs_diff(g, r)?, 0.0);
            let up = Tensor::randn(0f32, 1.0, (b, h, w, c), &dev)?;
            let wv = Var::from_tensor(&win.detach())?;
            let g = (window_unpartition(wv.as_tensor(), ws, (h, w))? * &up)?
                .sum_all()?
                .backward()?;
            let (gw, _) = window_partition(&up, ws)?;
            assert_eq!(crate::testing::max_abs_diff(g.get(wv.as_tensor()).unwrap(), &gw)?, 0.0);
        }
        let x = Tensor::zeros((1, 4, 4, 2), DType::F32, &dev)?;
        assert!(window_partition(&x, 0).is_err());
        assert!(window_unpartition(&x, 3, (4, 4)).is_err());
        Ok(())
    }
}
