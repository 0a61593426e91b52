//! `y = x Wᵀ + b` for inference on the CPU in one `gemm` call.
//!
//! candle's matmul output is followed by a bias pass that allocates a second full-size
//! buffer. Here the output starts as the bias rows and `gemm` accumulates `x Wᵀ` into
//! it: one buffer for every linear layer of the encoder and decoder.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result, SendPtr};

/// Below this many rows, and with at least this many output columns per thread, the
/// threads split the output columns (measured with `cargo xtask bench matmul`).
const SHORT_ROWS: usize = 512;
const MIN_SPLIT_COLS: usize = 128;

/// `dst (m×n, row stride ld) [+]= x (m×k) · w (n×k)ᵀ`.
///
/// # Safety
/// `dst` must hold m rows of stride `ld` with n columns; `x` m·k values; `w` n·k values.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ld: usize,
    read_dst: bool,
    x: &[f32],
    w: &[f32],
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        ld as isize,
        read_dst,
        x.as_ptr(),
        1,
        k as isize,
        w.as_ptr(),
        k as isize,
        1,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// `x Wᵀ + b` for f32 CPU tensors: `x` `[..., k]` (made contiguous if it is not), `weight`
/// `[n, k]`, `bias` `[n]`. Returns `[..., n]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let all_f32 = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    if !x.device().is_cpu() || !all_f32 {
        return Err(Error::Unsupported("linear: CPU f32 tensors only".into()));
    }
    let (n, k) = weight.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Err(Error::Shape(format!("linear: input {dims:?} for weight [{n}, {k}]")));
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            return Err(Error::Shape(format!("linear: bias {:?} for {n} outputs", b.dims())));
        }
    }
    let m = x.elem_count() / k.max(1);
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = n;
    let mut out = vec![0f32; m * n];
    if m > 0 && n > 0 {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
            return Err(Error::Unsupported("linear: CPU tensors only".into()));
        };
        let xd = &xs.as_slice::<f32>()?[xl.start_offset()..xl.start_offset() + m * k];
        let wd = &ws.as_slice::<f32>()?[wl.start_offset()..wl.start_offset() + n * k];
        if let Some(b) = &bias {
            let (bs, bl) = b.storage_and_layout();
            let Storage::Cpu(bs) = &*bs else {
                return Err(Error::Unsupported("linear: CPU tensors only".into()));
            };
            let bd = &bs.as_slice::<f32>()?[bl.start_offset()..bl.start_offset() + n];
            out.par_chunks_mut(n)
                .with_min_len(64)
                .for_each(|row| row.copy_from_slice(bd));
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let read_dst = bias.is_some();
        if threads > 1 && m < SHORT_ROWS && n >= threads * MIN_SPLIT_COLS {
            // Few rows, wide output (Hiera's last stages): gemm's own split over rows leaves
            // cores idle; give each thread a band of output columns instead.
            let band = n.div_ceil(threads);
            let out_ptr = SendPtr(out.as_mut_ptr());
            (0..n.div_ceil(band)).into_par_iter().for_each(|t| {
                let j0 = t * band;
                let nb = band.min(n - j0);
                // SAFETY: as below, restricted to columns j0..j0+nb, which this task alone writes.
                unsafe {
                    gemm_rows(
                        m,
                        nb,
                        k,
                        out_ptr.get().add(j0),
                        n,
                        read_dst,
                        xd,
                        &wd[j0 * k..],
                        gemm::Parallelism::None,
                    )
                };
            });
        } else {
            // SAFETY: out is m×n (row stride n), x is m×k (row stride k), Wᵀ element (kk, j)
            // is w[j·k + kk] (column stride k, row stride 1); all inside their slices.
            unsafe { gemm_rows(m, n, k, out.as_mut_ptr(), n, read_dst, xd, wd, parallelism) };
        }
    }
    Tensor::from_vec(out, out_dims, x.device()).map_err(Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul_plus_bias() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev)?.transpose(1, 2)?; // strided input
        let w = Tensor::randn(0f32, 1.0, (11, 7), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 11, &dev)?;
        let want = x
            .contiguous()?
            .reshape((30, 7))?
            .matmul(&w.t()?)?
            .broadcast_add(&b)?
            .reshape((2, 5, 3, 11))?;
        let got = linear(&x, &w, Some(&b))?;
        assert!(crate::testing::max_abs_diff(&got, &want)? < 1e-5);
        let want = x
            .contiguous()?
            .reshape((30, 7))?
            .matmul(&w.t()?)?
            .reshape((2, 5, 3, 11))?;
        assert!(crate::testing::max_abs_diff(&linear(&x, &w, None)?, &want)? < 1e-5);
        assert!(linear(&x, &w.t()?, Some(&b)).is_err());
        // Few rows, wide output: the column-band split.
        let x = Tensor::randn(0f32, 1.0, (40, 64), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (1000, 64), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 1000, &dev)?;
        let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        assert!(crate::testing::max_abs_diff(&linear(&x, &w, Some(&b))?, &want)? < 1e-4);
        assert!(linear(&x, &w, Some(&w)).is_err());
        Ok(())
    }
}
