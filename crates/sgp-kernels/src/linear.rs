//! `y = x Wᵀ + b` on the CPU in one `gemm` call, differentiable.
//!
//! candle's matmul output is followed by a bias pass that allocates a second full-size
//! buffer. Here the output starts as the bias rows and `gemm` accumulates `x Wᵀ` into
//! it: one buffer for every linear layer of the encoder and decoder.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Below this many rows, and with at least this many output columns per thread, the
/// threads split the output columns (measured with `cargo xtask bench matmul`).
const SHORT_ROWS: usize = 512;
const MIN_SPLIT_COLS: usize = 128;
/// Up to this many rows, a product that narrows (k > n: an MLP's second layer) also splits
/// the output columns. gemm's own split of those shapes ran 8–17% slower on 2 cores
/// (medians of 21): 1024×1536→384 at 271 against 300 GFLOP/s, 1024×3072→768 267 / 312,
/// 1024×2048→256 278 / 302, 2048×1536→384 281 / 313, 4096×1536→384 296 / 315. Wider
/// products (k ≤ n) and taller ones keep gemm's split, which was as fast or faster.
const NARROWING_SPLIT_ROWS: usize = 4096;

/// Whether the threads should each take a band of output columns of an m×k · k×n product.
fn split_columns(threads: usize, m: usize, k: usize, n: usize) -> bool {
    threads > 1 && n >= threads * MIN_SPLIT_COLS && (m < SHORT_ROWS || (k > n && m <= NARROWING_SPLIT_ROWS))
}

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
///
/// Differentiable: when any input is tracked by autograd, the result carries a backward
/// that computes the gradients of the *tracked* inputs only. candle's matmul backward
/// computes both operands' gradients unconditionally, so a frozen weight (the Hiera
/// trunk under LoRA) would cost one full weight-gradient matmul per layer, and its
/// gradient buffer would stay alive until the backward pass ends.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let all_f32 = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    if !x.device().is_cpu() || !all_f32 {
        return Err(Error::Unsupported("linear: CPU f32 tensors only".into()));
    }
    let (m, k, n, out_dims) = product_shape(x, weight, bias)?;
    let tracked = any_tracked(&[Some(x), Some(weight), bias]);
    if tracked {
        let x2 = x.contiguous()?.reshape((m, k))?;
        let w = weight.contiguous()?;
        let y = match bias {
            Some(b) => x2.apply_op3(&w, &b.contiguous()?, LinearOp)?,
            None => x2.apply_op2(&w, LinearOp)?,
        };
        return y.reshape(out_dims).map_err(Error::from);
    }
    untracked_product(x, weight, bias, out_dims, |xd, wd, bd| {
        linear_slices(xd, wd, bd, m, k, n, Epilogue::None)
    })
}

/// `act(x Wᵀ + b)`, the first layer of an MLP, with the bias and activation applied in
/// one pass over the product while it is in cache (no bias prefill, no second buffer).
/// Shapes as [`linear`]. Tracked inputs take [`linear`] and the differentiable activation.
///
/// At Hiera's stage-3 MLP at 1024 px (4096×384→1536, 2 cores), fc1 with its bias took
/// 17.6 ms and the scalar out-of-place GELU after it another 7.4; this takes 20.3 (min).
pub fn linear_activated(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: crate::activation::Activation,
) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let tracked = any_tracked(&[Some(x), Some(weight), bias]);
    let all_f32 = [Some(x), Some(weight), bias]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    if tracked || !x.device().is_cpu() || !all_f32 {
        return act.apply(&linear(x, weight, bias)?).map_err(Error::from);
    }
    let (m, k, n, out_dims) = product_shape(x, weight, bias)?;
    untracked_product(x, weight, bias, out_dims, |xd, wd, bd| {
        linear_slices(xd, wd, bd, m, k, n, Epilogue::Activation(act))
    })
}

/// `residual + x Wᵀ + b` (a transformer block's MLP or projection with its skip
/// connection): the output starts as `residual + b` and gemm accumulates onto it, so the
/// skip costs no pass or buffer of its own. Shapes as [`linear`]; `residual` has the
/// output's shape. Tracked inputs take [`linear`] and candle's add.
pub fn linear_residual(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: &Tensor) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let tracked = any_tracked(&[Some(x), Some(weight), bias, Some(residual)]);
    if tracked || !residual.device().is_cpu() || residual.dtype() != DType::F32 {
        return (residual + linear(x, weight, bias)?).map_err(Error::from);
    }
    let (m, k, n, out_dims) = product_shape(x, weight, bias)?;
    if residual.dims() != out_dims.as_slice() {
        return Err(Error::Shape(format!(
            "linear: residual {:?} for an output of {out_dims:?}",
            residual.dims()
        )));
    }
    let residual = residual.contiguous()?;
    let (rs, rl) = residual.storage_and_layout();
    let Storage::Cpu(rs) = &*rs else {
        return Err(Error::Unsupported("linear: CPU tensors only".into()));
    };
    let rd = crate::contiguous_f32("linear", rs, rl)?;
    untracked_product(x, weight, bias, out_dims, |xd, wd, bd| {
        linear_slices(xd, wd, bd, m, k, n, Epilogue::Residual(rd))
    })
}

/// Whether any of the given operands is tracked by autograd.
fn any_tracked(ts: &[Option<&Tensor>]) -> bool {
    ts.iter().flatten().any(|t| t.track_op())
}

/// `(m, k, n, output dims)` of `x [..., k] · weight [n, k]ᵀ (+ bias [n])`, or the shape error.
fn product_shape(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<(usize, usize, usize, Vec<usize>)> {
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
    let m: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = n;
    Ok((m, k, n, out_dims))
}

/// Runs `product` on the contiguous f32 slices of untracked `x`, `w` and `bias`, and
/// wraps its result as a tensor of `out_dims`.
fn untracked_product(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out_dims: Vec<usize>,
    product: impl FnOnce(&[f32], &[f32], Option<&[f32]>) -> Vec<f32>,
) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let bias_storage = bias.as_ref().map(|b| b.storage_and_layout());
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Err(Error::Unsupported("linear: CPU tensors only".into()));
    };
    let bd = match &bias_storage {
        Some((bs, bl)) => {
            let Storage::Cpu(bs) = &**bs else {
                return Err(Error::Unsupported("linear: CPU tensors only".into()));
            };
            Some(crate::contiguous_f32("linear", bs, bl)?)
        }
        None => None,
    };
    let out = product(
        crate::contiguous_f32("linear", xs, xl)?,
        crate::contiguous_f32("linear", ws, wl)?,
        bd,
    );
    Tensor::from_vec(out, out_dims, x.device()).map_err(Error::from)
}

/// The m×n output of a product with k > 0: rows set to the bias (plus the residual's
/// row), which gemm then accumulates onto, or left for gemm to write without either.
fn output_rows(m: usize, n: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> crate::OverwriteBuf {
    let mut buf = crate::OverwriteBuf::new(m * n);
    let out_ptr = buf.ptr();
    if bias.is_none() && residual.is_none() {
        return buf;
    }
    let row = |i: usize| {
        // SAFETY: row i of the m×n buffer, written by this task alone.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(i * n), n) };
        match (bias, residual) {
            (Some(b), Some(r)) => out
                .iter_mut()
                .zip(b)
                .zip(&r[i * n..(i + 1) * n])
                .for_each(|((o, &b), &r)| *o = r + b),
            (None, Some(r)) => out.copy_from_slice(&r[i * n..(i + 1) * n]),
            (Some(b), None) => out.copy_from_slice(b),
            (None, None) => {} // returned above
        }
    };
    if m < 64 {
        (0..m).for_each(row); // a rayon dispatch would cost more than the copies
    } else {
        (0..m).into_par_iter().with_min_len(64).for_each(row);
    }
    buf
}

/// What a product's output passes through besides the bias.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    None,
    /// `act(x Wᵀ + b)`: gemm writes the bare product, one pass adds the bias and applies it.
    Activation(crate::activation::Activation),
    /// `r + x Wᵀ + b`: the output starts as `r + b` and gemm accumulates onto it.
    Residual(&'a [f32]),
}

/// `x (m×k) · w (n×k)ᵀ [+ b (n)]` through `epilogue` into a new m×n buffer.
fn linear_slices(
    xd: &[f32],
    wd: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    epilogue: Epilogue,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        // No product to write the output: it is the bias rows (or zeros).
        let mut out = vec![0f32; m * n];
        if let Some(bd) = bias {
            out.chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(bd));
        }
        match epilogue {
            Epilogue::None => {}
            Epilogue::Activation(act) => act.apply_rows_in_place(&mut out, None),
            Epilogue::Residual(r) => out.iter_mut().zip(r).for_each(|(o, &r)| *o += r),
        }
        return out;
    }
    let (prefill, residual) = match epilogue {
        Epilogue::None => (bias, None),
        Epilogue::Activation(_) => (None, None),
        Epilogue::Residual(r) => (bias, Some(r)),
    };
    let mut buf = output_rows(m, n, prefill, residual);
    let out_ptr = buf.ptr();
    let threads = candle_core::utils::get_num_threads();
    let parallelism = crate::gemm_parallelism();
    // With a bias or residual gemm accumulates onto the rows written above; without
    // either it writes every element (k > 0), so the buffer is fully initialised.
    let read_dst = prefill.is_some() || residual.is_some();
    if split_columns(threads, m, k, n) {
        // Few rows, wide output (Hiera's last stages), or a narrowing product: gemm's own
        // split leaves cores idle; give each thread a band of output columns instead.
        let band = n.div_ceil(threads);
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
        unsafe { gemm_rows(m, n, k, out_ptr.get(), n, read_dst, xd, wd, parallelism) };
    }
    // SAFETY: see `read_dst` above.
    let mut out = unsafe { buf.assume_init() };
    if let Epilogue::Activation(act) = epilogue {
        act.apply_rows_in_place(&mut out, bias);
    }
    out
}

/// At most this many rows go to [`linear_transposed`] in callers that cache `Wᵀ`.
pub const FEW_ROWS: usize = 16;

/// `x Wᵀ + b` from the transposed weight `weight_t` `[k, n]` (contiguous), for untracked
/// f32 CPU tensors. For a few rows (SAM's prompt tokens) this is what `gemm` wants: with
/// `W` `[n, k]` it re-packs the whole weight on every call, which cost the decoder's
/// 7-row 256→2048 MLP layer three times its arithmetic; `Wᵀ` it reads in place.
pub fn linear_transposed(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    crate::runtime::keep_workers_awake();
    let mut inputs = vec![(x, "x"), (weight_t, "weight_t")];
    if let Some(b) = bias {
        inputs.push((b, "bias"));
    }
    crate::require_untracked_cpu_f32("linear", &inputs)?;
    let (k, n) = weight_t.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) || bias.is_some_and(|b| b.dims() != [n]) {
        return Err(Error::Shape(format!(
            "linear: input {dims:?}, transposed weight [{k}, {n}], bias {:?}",
            bias.map(|b| b.dims().to_vec())
        )));
    }
    let m: usize = dims[..dims.len() - 1].iter().product();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("x has a last dim") = n;
    untracked_product(x, weight_t, bias, out_dims, |xd, wd, bd| {
        if m == 0 || n == 0 || k == 0 {
            return linear_slices(xd, &[], bd, m, k, n, Epilogue::None); // nothing to multiply
        }
        let mut buf = output_rows(m, n, bd, None);
        // SAFETY: the buffer is m×n, x m×k, Wᵀ k×n, all row-major; without a bias gemm
        // writes every element (k > 0).
        unsafe {
            crate::gemm_row_major(m, n, k, buf.ptr().get(), bd.is_some(), xd.as_ptr(), wd.as_ptr());
            buf.assume_init()
        }
    })
}

/// The tracked linear: forward as [`linear`], backward only for tracked operands.
struct LinearOp;

impl LinearOp {
    fn forward(
        &self,
        xd: &[f32],
        xl: &Layout,
        wd: &[f32],
        wl: &Layout,
        bd: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if k != kw || bd.is_some_and(|b| b.len() != n) {
            candle_core::bail!("linear: operands {:?}, {:?} do not fit", xl.shape(), wl.shape());
        }
        Ok((
            CpuStorage::F32(linear_slices(xd, wd, bd, m, k, n, Epilogue::None)),
            Shape::from((m, n)),
        ))
    }

    /// `(dx, dw)` for `grad` `[m, n]`; `None` for an untracked operand.
    fn grads(x: &Tensor, w: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach();
        let dx = if x.track_op() {
            Some(g.matmul(&w.detach())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(g.t()?.matmul(&x.detach())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "sgp-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(
            crate::contiguous_f32("linear", xs, xl)?,
            xl,
            crate::contiguous_f32("linear", ws, wl)?,
            wl,
            None,
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Self::grads(x, w, grad)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "sgp-linear-bias"
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
        self.forward(
            crate::contiguous_f32("linear", xs, xl)?,
            xl,
            crate::contiguous_f32("linear", ws, wl)?,
            wl,
            Some(crate::contiguous_f32("linear", bs, bl)?),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = Self::grads(x, w, grad)?;
        let db = if b.track_op() {
            Some(grad.detach().sum(0)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
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
        // A narrowing product of 600 rows (k > n): the column split, with an odd band
        // width and onto a residual.
        let x = Tensor::randn(0f32, 1.0, (600, 301), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (257, 301), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 257, &dev)?;
        let r = Tensor::randn(0f32, 1.0, (600, 257), &dev)?;
        assert!(split_columns(2, 600, 301, 257) && !split_columns(2, 600, 257, 301));
        let want = (x.matmul(&w.t()?)?.broadcast_add(&b)? + &r)?;
        assert!(crate::testing::max_abs_diff(&linear_residual(&x, &w, Some(&b), &r)?, &want)? < 1e-4);
        // Many rows (gemm's own threads) without a bias: every output element is written.
        let x = Tensor::randn(0f32, 1.0, (700, 33), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (45, 33), &dev)?;
        assert!(crate::testing::max_abs_diff(&linear(&x, &w, None)?, &x.matmul(&w.t()?)?)? < 1e-4);
        // No input features: the output is the bias rows, or zeros.
        let x = Tensor::zeros((3, 0), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 0), DType::F32, &dev)?;
        let b = Tensor::new(&[1f32, 2., 3., 4.], &dev)?;
        let y: Vec<Vec<f32>> = linear(&x, &w, Some(&b))?.to_vec2()?;
        assert_eq!(y, vec![vec![1., 2., 3., 4.]; 3]);
        let y: Vec<Vec<f32>> = linear(&x, &w, None)?.to_vec2()?;
        assert_eq!(y, vec![vec![0f32; 4]; 3]);
        Ok(())
    }

    #[test]
    fn transposed_weight_gives_the_same_product() -> Result<()> {
        let dev = Device::Cpu;
        for rows in [1usize, 7, 40] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, 96), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (160, 96), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 160, &dev)?;
            let wt = w.t()?.contiguous()?;
            for bias in [Some(&b), None] {
                let d = crate::testing::max_abs_diff(&linear_transposed(&x, &wt, bias)?, &linear(&x, &w, bias)?)?;
                assert!(d < 1e-4, "{rows} rows: {d}");
            }
        }
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        assert!(linear_transposed(&x, &Tensor::zeros((9, 4), DType::F32, &dev)?, None).is_err());
        let wt = Tensor::zeros((8, 4), DType::F32, &dev)?;
        assert!(linear_transposed(&x, &wt, Some(&Tensor::zeros(5, DType::F32, &dev)?)).is_err());
        let var = candle_core::Var::from_tensor(&wt)?;
        assert!(
            linear_transposed(&x, var.as_tensor(), None).is_err(),
            "tracked weights are refused"
        );
        Ok(())
    }

    #[test]
    fn backward_matches_candle_and_skips_untracked_operands() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 7), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 7), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 11, &dev)?)?;
        let up = Tensor::randn(0f32, 1.0, (2, 5, 11), &dev)?;
        let reference = x
            .as_tensor()
            .reshape((10, 7))?
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?
            .reshape((2, 5, 11))?;
        let want = (&reference * &up)?.sum_all()?.backward()?;
        let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()))?;
        assert!(crate::testing::max_abs_diff(&y, &reference)? < 1e-5);
        let got = (&y * &up)?.sum_all()?.backward()?;
        for v in [&x, &w, &b] {
            let (g, r) = (got.get(v.as_tensor()).unwrap(), want.get(v.as_tensor()).unwrap());
            assert!(crate::testing::max_abs_diff(g, r)? < 1e-4);
        }
        // A frozen weight and bias (plain tensors): only the input's gradient is made.
        let (wf, bf) = (w.as_tensor().detach(), b.as_tensor().detach());
        let y = linear(x.as_tensor(), &wf, Some(&bf))?;
        let got = (&y * &up)?.sum_all()?.backward()?;
        assert!(
            crate::testing::max_abs_diff(got.get(x.as_tensor()).unwrap(), want.get(x.as_tensor()).unwrap())? < 1e-4
        );
        assert!(got.get(&wf).is_none() && got.get(&bf).is_none());
        // Without bias, a tracked weight and an untracked input.
        let xf = x.as_tensor().detach();
        let y = linear(&xf, w.as_tensor(), None)?;
        let got = (&y * &up)?.sum_all()?.backward()?;
        let want = (xf.reshape((10, 7))?.matmul(&w.as_tensor().t()?)?.reshape((2, 5, 11))? * &up)?
            .sum_all()?
            .backward()?;
        assert!(
            crate::testing::max_abs_diff(got.get(w.as_tensor()).unwrap(), want.get(w.as_tensor()).unwrap())? < 1e-4
        );
        assert!(got.get(&xf).is_none());
        Ok(())
    }

    #[test]
    fn activated_linear_equals_linear_then_activation() -> Result<()> {
        use crate::activation::Activation;
        let dev = Device::Cpu;
        // Rows of 37 outputs (not a multiple of 16: the masked last vector of each row),
        // few rows (the column split) and many (gemm's threads), k past one gemm block.
        for (m, k, n) in [(3usize, 5usize, 37usize), (40, 64, 1000), (700, 600, 37)] {
            let x = (Tensor::randn(0f32, 1.0, (m, k), &dev)? * 0.3)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            for act in [Activation::Gelu, Activation::Relu] {
                for bias in [Some(&b), None] {
                    let want = act.apply(
                        &x.matmul(&w.t()?)?
                            .broadcast_add(&bias.cloned().unwrap_or(b.zeros_like()?))?,
                    )?;
                    let got = linear_activated(&x, &w, bias, act)?;
                    let d = crate::testing::max_abs_diff(&got, &want)?;
                    assert!(d < 1e-4, "{act:?} {m}x{k}->{n} bias {}: {d}", bias.is_some());
                }
            }
        }
        // Tracked inputs keep a backward; bad shapes are errors.
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 4), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (9, 4), &dev)?;
        let y = linear_activated(x.as_tensor(), &w, None, Activation::Gelu)?;
        assert!(y.sum_all()?.backward()?.get(x.as_tensor()).is_some());
        assert!(linear_activated(&x.as_tensor().detach(), &w.t()?, None, Activation::Relu).is_err());
        // No input features: act(bias).
        let x = Tensor::zeros((2, 0), DType::F32, &dev)?;
        let w = Tensor::zeros((3, 0), DType::F32, &dev)?;
        let b = Tensor::new(&[-1f32, 0., 2.], &dev)?;
        let y: Vec<Vec<f32>> = linear_activated(&x, &w, Some(&b), Activation::Relu)?.to_vec2()?;
        assert_eq!(y, vec![vec![0., 0., 2.]; 2]);
        Ok(())
    }

    #[test]
    fn residual_linear_equals_residual_plus_linear() -> Result<()> {
        let dev = Device::Cpu;
        for (m, k, n) in [(3usize, 5usize, 37usize), (40, 64, 1000), (700, 600, 37)] {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            let r = Tensor::randn(0f32, 1.0, (1, m, n), &dev)?;
            for bias in [Some(&b), None] {
                let want = (&r + linear(&x, &w, bias)?)?;
                let d = crate::testing::max_abs_diff(&linear_residual(&x, &w, bias, &r)?, &want)?;
                assert!(d < 1e-4, "{m}x{k}->{n} bias {}: {d}", bias.is_some());
            }
            // A strided residual is read in its logical order.
            let rt = Tensor::randn(0f32, 1.0, (1, n, m), &dev)?.transpose(1, 2)?;
            let want = (&rt + linear(&x, &w, Some(&b))?)?;
            assert!(crate::testing::max_abs_diff(&linear_residual(&x, &w, Some(&b), &rt)?, &want)? < 1e-4);
        }
        let x = Tensor::randn(0f32, 1.0, (4, 3), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        assert!(linear_residual(&x, &w, None, &Tensor::zeros((4, 4), DType::F32, &dev)?).is_err());
        // No input features: residual + bias.
        let x0 = Tensor::zeros((2, 0), DType::F32, &dev)?;
        let w0 = Tensor::zeros((3, 0), DType::F32, &dev)?;
        let r = Tensor::ones((2, 3), DType::F32, &dev)?;
        let b = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let y: Vec<Vec<f32>> = linear_residual(&x0, &w0, Some(&b), &r)?.to_vec2()?;
        assert_eq!(y, vec![vec![2., 3., 4.]; 2]);
        // Tracked: the gradient reaches the residual.
        let rv = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &dev)?)?;
        let y = linear_residual(&x, &w, None, rv.as_tensor())?;
        assert!(y.sum_all()?.backward()?.get(rv.as_tensor()).is_some());
        Ok(())
    }
}
