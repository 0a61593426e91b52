//! Tensor ops that candle lacks, written to match PyTorch where PyTorch defines them.
//!
//! - [`resize`]: `F.interpolate` bicubic (align_corners=False, A=-0.75) and bilinear with
//!   `antialias=True`, bit-for-bit in spirit with ATen's CPU kernels.
//! - [`masked_attention`]: attention with a probability-map key bias (soft) or key mask
//!   (hard), tiled with an online softmax; CPU and, under feature `cuda`, CUDA; with backward.
//! - [`attention`]: plain attention on strided `[B, L, H, D]` views, for inference.
//! - [`conv`]: NCHW convolutions (im2col + one gemm, 2×2 transposed) and the channel
//!   LayerNorm, for inference.
//! - [`layout`]: tiled contiguous copies of transposed and permuted views.
//! - [`linear`]: `x Wᵀ + b` in one gemm call with the bias fused, for inference.
//! - [`pool`]: channels-last max pooling on strided views, for inference.
//! - [`rope`]: rotary encoding of interleaved pairs over repeated grids, with its backward.
//! - [`activation`]: a one-pass GELU (erf form) with its backward.
//! - [`math`]: a vectorisable f32 `exp` and lane-parallel sums that the kernels share.
//! - [`runtime`]: process settings of the CPU runtime (candle's idle worker threads).
//! - [`testing`]: the comparison helpers the workspace's tests share.
//!
//! The two kernel families keep their module paths (`resize::bilinear` says what it is);
//! errors are at the root.
//!
//! ```rust
//! use candle_core::{Device, Tensor};
//! use sgp_kernels::masked_attention::{masked_attention, naive_masked_attention, MaskedAttentionOptions};
//!
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev)?; // [B, H, Lq, D]
//! let k = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev)?;
//! let p = Tensor::new(&[[1f32, 0.9, 0.5, 0.1, 0.0, 1.0]], &dev)?; // key probabilities [B, Lk]
//! let opts = MaskedAttentionOptions::default(); // soft bias ln(max(p, eps))
//! let fused = masked_attention(&q, &k, &v, &p, &opts)?;
//! let reference = naive_masked_attention(&q, &k, &v, &p, &opts)?;
//! assert!(sgp_kernels::testing::max_abs_diff(&fused, &reference)? < 1e-5);
//!
//! // PyTorch's antialiased bilinear downsampling (`F.interpolate(..., antialias=True)`).
//! let small = sgp_kernels::resize::bilinear_antialias(&Tensor::ones((1, 1, 8, 8), candle_core::DType::F32, &dev)?, 3, 3)?;
//! assert_eq!(small.dims(), [1, 1, 3, 3]);
//! # Ok::<(), sgp_kernels::Error>(())
//! ```

#![warn(missing_docs)]

pub mod activation;
pub mod attention;
pub mod conv;
pub mod depthwise;
mod error;
pub mod layout;
pub mod linear;
pub mod masked_attention;
pub mod math;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod resize;
pub mod rope;
pub mod runtime;
pub mod testing;
pub mod window;

pub use error::{Error, Result};

/// A raw output pointer that parallel tasks share, each writing a region no other task
/// touches (documented at each use); the owning buffer outlives the parallel loop.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: see above: tasks write disjoint regions of a buffer that outlives them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method (not field access) so closures capture the Send wrapper, not the pointer.
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An output buffer that a kernel fully overwrites (through raw pointers, as gemm with
/// `read_dst = false` does, or [`std::mem::MaybeUninit::write`]) before anyone reads it,
/// so it is never zeroed. `vec![0f32; n]` zeroes on the calling thread while the others
/// wait: on 2 cores that held a 4096×384→1536 linear at 250 GFLOP/s instead of 300.
pub(crate) struct OverwriteBuf(Vec<std::mem::MaybeUninit<f32>>);

impl OverwriteBuf {
    pub(crate) fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation.
        unsafe { v.set_len(len) };
        Self(v)
    }

    pub(crate) fn ptr(&mut self) -> SendPtr {
        SendPtr(self.0.as_mut_ptr().cast())
    }

    pub(crate) fn slice(&mut self) -> &mut [std::mem::MaybeUninit<f32>] {
        &mut self.0
    }

    /// # Safety
    /// Every element must have been written.
    pub(crate) unsafe fn assume_init(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: MaybeUninit<f32> has f32's layout; the caller vouches for the contents.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
    }
}

/// The f32 slice of a contiguous CPU operand of a custom op (`what` names the op in the
/// error for another dtype or a strided layout).
pub(crate) fn contiguous_f32<'a>(
    what: &str,
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    use candle_core::backend::BackendStorage;
    let candle_core::CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected f32, got {:?}", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: non-contiguous operand"),
    }
}

/// `dst (m×n, row stride n) [+]= a (m×k, row stride k) · b (k×n, row stride n)`, on
/// gemm's threads (`accumulate`: add to `dst` instead of overwriting it).
///
/// # Safety
/// `dst` holds m·n values, `a` m·k, `b` k·n.
pub(crate) unsafe fn gemm_row_major(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    accumulate: bool,
    a: *const f32,
    b: *const f32,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        a,
        1,
        k as isize,
        b,
        1,
        n as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm_parallelism(),
    );
}

/// The threads gemm may use for one large product: candle's thread count (rayon's).
pub(crate) fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// The check of the forward-only inference ops: every tensor f32 on the CPU and not
/// tracked by autograd (they record no backward).
pub(crate) fn require_untracked_cpu_f32(what: &str, ts: &[(&candle_core::Tensor, &str)]) -> Result<()> {
    for (t, name) in ts {
        if !t.device().is_cpu() || t.dtype() != candle_core::DType::F32 {
            return Err(Error::Unsupported(format!("{what}: {name} must be f32 on the CPU")));
        }
        if t.track_op() {
            return Err(Error::Unsupported(format!(
                "{what}: {name} is tracked by autograd (forward only)"
            )));
        }
    }
    Ok(())
}
