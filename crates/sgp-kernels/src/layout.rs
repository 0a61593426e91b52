//! Contiguous copies of transposed views, tiled.
//!
//! candle copies a strided view element by element through a strided index (about 2 ns
//! per f32 here): the `[B, C, H·W] → [B, H·W, C]` flatten-and-transpose between SAM2's
//! NCHW maps and its token sequences cost 0.5 ms per 32×32×256 map, and Hiera's patch
//! embedding permute 3 ms at 512 px. When the innermost output dim is strided and some
//! other dim has unit stride, the copy is a batch of 2-D transposes; here each one runs in
//! 16×16 tiles (reads and writes both stay within a few cache lines) across threads.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::{Result, SendPtr};

/// Tile of the 2-D transposes: source rows (unit stride) by output columns. Few columns:
/// their source lines are a large power-of-two stride apart (a 32×32 map's channels are
/// 4 KiB apart) and so share an L1 set, which holds 12 lines on current cores.
const TILE_ROWS: usize = 64;
const TILE_COLS: usize = 8;
/// Below this many elements one thread copies (a rayon dispatch costs more).
const PAR_MIN_ELEMS: usize = 1 << 15;

/// `x.contiguous()`, tiled when `x` is an untracked f32 CPU view whose last dim is strided
/// and another dim has unit stride (a transpose or permute); otherwise candle's copy.
/// Tracked tensors keep candle's op and so their gradient.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.track_op() {
        return Ok(x.contiguous()?);
    }
    let Some(plan) = TransposePlan::new(x.dims(), x.stride()) else {
        return Ok(x.contiguous()?);
    };
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(candle_core::CpuStorage::F32(src)) = &*storage else {
        return Ok(x.contiguous()?);
    };
    let start = layout.start_offset();
    let last = start
        + x.dims()
            .iter()
            .zip(x.stride())
            .map(|(&d, &s)| (d.max(1) - 1) * s)
            .sum::<usize>();
    if x.elem_count() == 0 || last >= src.len() {
        drop(storage);
        return Ok(x.contiguous()?);
    }
    let out = plan.run(&src[start..=last]);
    drop(storage);
    Ok(Tensor::from_vec(out, x.dims(), x.device())?)
}

/// A strided copy seen as `outer` 2-D transposes: `rows` (the unit-stride source dim) by
/// `cols` (the output's last dim, source stride `col_stride`).
struct TransposePlan {
    /// Dims other than the two transposed ones, with source strides and output strides.
    outer: Vec<(usize, usize, usize)>,
    rows: usize,
    cols: usize,
    col_stride: usize,
    /// Output stride of the `rows` dim.
    row_out_stride: usize,
    len: usize,
}

impl TransposePlan {
    fn new(dims: &[usize], strides: &[usize]) -> Option<Self> {
        let r = dims.len();
        if r < 2 || dims[r - 1] < 2 || strides[r - 1] == 1 {
            return None;
        }
        let j = (0..r - 1).rev().find(|&i| strides[i] == 1 && dims[i] > 1)?;
        let mut out_strides = vec![1usize; r];
        for i in (0..r - 1).rev() {
            out_strides[i] = out_strides[i + 1] * dims[i + 1];
        }
        let outer = (0..r - 1)
            .filter(|&i| i != j && dims[i] > 1)
            .map(|i| (dims[i], strides[i], out_strides[i]))
            .collect();
        Some(Self {
            outer,
            rows: dims[j],
            cols: dims[r - 1],
            col_stride: strides[r - 1],
            row_out_stride: out_strides[j],
            len: dims.iter().product(),
        })
    }

    /// Source and output offsets of outer index `idx` (row-major over `outer`).
    fn outer_offsets(&self, mut idx: usize) -> (usize, usize) {
        let (mut s, mut o) = (0, 0);
        for &(d, ss, os) in self.outer.iter().rev() {
            s += (idx % d) * ss;
            o += (idx % d) * os;
            idx /= d;
        }
        (s, o)
    }

    /// `src` starts at the view's first element and ends at its last.
    fn run(&self, src: &[f32]) -> Vec<f32> {
        let mut out = Vec::<f32>::with_capacity(self.len);
        let n_outer: usize = self.outer.iter().map(|o| o.0).product();
        let row_tiles = self.rows.div_ceil(TILE_ROWS);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let task = |t: usize| {
            let (oi, rt) = (t / row_tiles, t % row_tiles);
            let (s0, o0) = self.outer_offsets(oi);
            let r0 = rt * TILE_ROWS;
            let r1 = (r0 + TILE_ROWS).min(self.rows);
            for c0 in (0..self.cols).step_by(TILE_COLS) {
                let c1 = (c0 + TILE_COLS).min(self.cols);
                for r in r0..r1 {
                    let dst = o0 + r * self.row_out_stride;
                    for c in c0..c1 {
                        // SAFETY: (outer, r, c) enumerates every output element exactly
                        // once across tasks (tasks own disjoint row tiles); the source
                        // offset is the view's element, inside `src` (the caller's slice
                        // ends at the view's last element).
                        unsafe { *out_ptr.get().add(dst + c) = *src.get_unchecked(s0 + r + c * self.col_stride) };
                    }
                }
            }
        };
        let tasks = n_outer * row_tiles;
        if self.len >= PAR_MIN_ELEMS {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        // SAFETY: every element of 0..len was written above.
        unsafe { out.set_len(self.len) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn permuted_views_copy_like_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 37, 5, 19), &dev)?;
        let cases = [
            x.permute((0, 2, 3, 1))?,
            x.permute((0, 3, 1, 2))?,
            x.permute((3, 2, 1, 0))?,
            x.transpose(1, 3)?,
            x.flatten_from(2)?.transpose(1, 2)?,
            x.narrow(1, 3, 30)?.permute((0, 2, 3, 1))?,
            x.narrow(3, 1, 17)?.transpose(2, 3)?,
            Tensor::randn(0f32, 1.0, (1, 256, 32, 32), &dev)?
                .flatten_from(2)?
                .transpose(1, 2)?,
        ];
        for v in &cases {
            let ours = contiguous(v)?;
            assert!(ours.is_contiguous());
            assert_eq!(ours.dims(), v.dims());
            let a: Vec<f32> = ours.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = v.contiguous()?.flatten_all()?.to_vec1()?;
            assert_eq!(a, b, "view {:?} / {:?}", v.dims(), v.stride());
        }
        Ok(())
    }

    #[test]
    fn other_views_fall_back_and_tracked_views_keep_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 6), &dev)?;
        // Already contiguous, a narrow (unit last stride), a broadcast (no unit stride).
        for v in [
            x.clone(),
            x.narrow(1, 1, 3)?,
            Tensor::ones(3, DType::F32, &dev)?.broadcast_as((5, 3))?.t()?,
        ] {
            let a: Vec<f32> = contiguous(&v)?.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = v.contiguous()?.flatten_all()?.to_vec1()?;
            assert_eq!(a, b);
        }
        let var = candle_core::Var::from_tensor(&x)?;
        let y = contiguous(&var.as_tensor().t()?)?;
        let grads = (y.sqr()?.sum_all()?).backward()?;
        let g = grads.get(var.as_tensor()).expect("gradient reaches the variable");
        let want: Vec<f32> = (x * 2.0)?.flatten_all()?.to_vec1()?;
        assert_eq!(g.flatten_all()?.to_vec1::<f32>()?, want);
        Ok(())
    }
}
